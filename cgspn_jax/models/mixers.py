"""GSPN token mixers: drop-in replacements for attention on a token grid [B, h, w, C].

Both run the four-direction line scan `gspn_scan` (normalised 3-neighbour gates, so each line is
a stable row-stochastic propagation of the previous one) and differ in where it runs:

- `GSPNMixer`, the original GSPN sub-layer: the scan runs over the full width C; a small proxy
  space (proxy_dim channels) predicts the per-direction input gate lam, output gate u and
  neighbour-gate logits for every channel.
- `CGSPNMixer`, the compressed C-GSPN sub-layer: project C -> C_c = C / compression (1152 -> 64
  at the default 18); lam, u and the gate logits are predicted from, and the scan runs in, that
  latent space; project back C_c -> C.

Common to both, for values v [B, h, w, K] and a context z they predict from:
    lam_d = sigmoid(lam_proj(z)),  u_d = u_proj(z),  w_d = gate_proj(z)   (d = each direction)
    h_d   = gspn_scan(v, lam, w, normalize=True)[d]
    y     = norm(sum_d u_d * h_d)                     the u-gated merge of the directions
Memory is O(h * w) throughout: nothing pairs tokens with tokens.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cgspn_jax.gspn import DIRECTIONS, gspn_scan
from cgspn_jax.models.vit import _dense, _layer_norm, check_grid, is_positive_int


def _positive_int(name: str, value) -> int:
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class DirectionalPropagation(nnx.Module):
    """Predicts lam, u and gate logits from a context, scans the values in every direction and
    merges the directions u-gated, then LayerNorms: the part `GSPNMixer` and `CGSPNMixer` share.

    ``__call__(values [B, h, w, channels], context [B, h, w, context_dim]) -> [B, h, w, channels]``
    """

    def __init__(self, channels: int, context_dim: int, *, gate_groups: int | None = None,
                 directions: Sequence[str] = DIRECTIONS, chunk: int | None = None,
                 backend: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        self.channels = _positive_int("channels", channels)
        self.gate_groups = channels if gate_groups is None else _positive_int("gate_groups",
                                                                              gate_groups)
        if channels % self.gate_groups:
            raise ValueError(f"gate_groups = {self.gate_groups} must divide the propagated "
                             f"channels {channels}")
        if isinstance(directions, str):
            raise TypeError(f"directions must be a sequence of names such as ('tb', 'lr'), got "
                            f"the string {directions!r}")
        self.directions = tuple(directions)
        if not self.directions or len(set(self.directions)) != len(self.directions) or any(
                d not in DIRECTIONS for d in self.directions):
            raise ValueError(f"directions must be distinct names among {DIRECTIONS}, got "
                             f"{self.directions}")
        self.chunk = chunk
        self.backend = backend
        self.dtype = dtype
        n_dir = len(self.directions)
        self.lam_proj = _dense(context_dim, n_dir * channels, dtype, rngs)
        self.u_proj = _dense(context_dim, n_dir * channels, dtype, rngs)
        # Zero-initialised gate logits would start every neighbour at weight 1/3; a small random
        # kernel keeps that mean but lets the gradient tell the tokens apart from step one.
        self.gate_proj = _dense(context_dim, n_dir * self.gate_groups * 3, dtype, rngs)
        self.norm = _layer_norm(channels, dtype, rngs)

    def __call__(self, values: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, _ = values.shape
        n_dir, groups = len(self.directions), self.gate_groups
        per_direction = lambda a, *tail: jnp.moveaxis(
            a.reshape(batch, height, width, n_dir, *tail), 3, 0)
        lam = jax.nn.sigmoid(per_direction(self.lam_proj(context), self.channels))
        u = per_direction(self.u_proj(context), self.channels)
        gates = per_direction(self.gate_proj(context), groups, 3)
        dtype = jnp.dtype(self.dtype)
        h = gspn_scan(values.astype(dtype), lam.astype(dtype), gates.astype(dtype),
                      directions=self.directions, chunk=self.chunk, normalize=True,
                      backend=self.backend)
        return self.norm(jnp.sum(u.astype(dtype) * h, axis=0))


class CGSPNMixer(nnx.Module):
    """Compressed GSPN mixer: [B, h, w, width] -> [B, h, w, width].

    down: Linear(width -> latent_dim), latent_dim = round(width / compression) unless given
    (1152 -> 64 at compression 18); in the latent space, lam, u and gate logits (gate_groups
    groups, default one per latent channel) are predicted and the four-direction normalised scan
    runs; the u-gated merge is LayerNormed; up: Linear(latent_dim -> width).
    """

    def __init__(self, width: int, *, compression: int = 18, latent_dim: int | None = None,
                 gate_groups: int | None = None, directions: Sequence[str] = DIRECTIONS,
                 chunk: int | None = None, backend: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.width = _positive_int("width", width)
        if latent_dim is None:
            latent_dim = max(1, round(width / _positive_int("compression", compression)))
        self.latent_dim = _positive_int("latent_dim", latent_dim)
        self.down = _dense(width, self.latent_dim, dtype, rngs)
        self.propagation = DirectionalPropagation(
            self.latent_dim, self.latent_dim, gate_groups=gate_groups, directions=directions,
            chunk=chunk, backend=backend, dtype=dtype, rngs=rngs)
        self.up = _dense(self.latent_dim, width, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_grid(x, self.width)
        latent = self.down(x)
        return self.up(self.propagation(latent, latent))


class GSPNMixer(nnx.Module):
    """The original GSPN mixer at full width: [B, h, w, width] -> [B, h, w, width].

    value: Linear(width -> width) gives the propagated values; proxy: Linear(width -> proxy_dim)
    the small space that predicts lam and u for every channel and the gate logits (gate_groups
    groups, default one per channel as in GSPN); the four-direction scan runs over all width
    channels; the u-gated merge is LayerNormed; out: Linear(width -> width).
    """

    def __init__(self, width: int, *, proxy_dim: int = 32, gate_groups: int | None = None,
                 directions: Sequence[str] = DIRECTIONS, chunk: int | None = None,
                 backend: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        self.width = _positive_int("width", width)
        self.proxy_dim = _positive_int("proxy_dim", proxy_dim)
        self.value = _dense(width, width, dtype, rngs)
        self.proxy = _dense(width, self.proxy_dim, dtype, rngs)
        self.propagation = DirectionalPropagation(
            width, self.proxy_dim, gate_groups=gate_groups, directions=directions, chunk=chunk,
            backend=backend, dtype=dtype, rngs=rngs)
        self.out = _dense(width, width, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_grid(x, self.width)
        return self.out(self.propagation(self.value(x), self.proxy(x)))
