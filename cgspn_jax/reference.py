"""Pure-JAX reference of the GSPN line scan.

Every direction is mapped onto the canonical top-to-bottom scan by a transpose and/or a flip of
the (H, W) axes; in that frame neighbour k of line position p is position p + k - 1 of the
previous line, for all four directions. This is the oracle of the tests and the fallback backend
where no compiled kernel exists; JAX differentiates it by itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Maps of an array [B, H, W, ...] onto the canonical frame [B, T, L, ...] (scan axis T, line axis
# L) and back. Neighbour k of canonical (t, p) is (t - 1, p + k - 1) in every direction.
_TO_CANONICAL = {
    "tb": lambda a: a,
    "bt": lambda a: jnp.flip(a, axis=1),
    "lr": lambda a: jnp.swapaxes(a, 1, 2),
    "rl": lambda a: jnp.flip(jnp.swapaxes(a, 1, 2), axis=1),
}
_FROM_CANONICAL = {
    "tb": lambda a: a,
    "bt": lambda a: jnp.flip(a, axis=1),
    "lr": lambda a: jnp.swapaxes(a, 1, 2),
    "rl": lambda a: jnp.swapaxes(jnp.flip(a, axis=1), 1, 2),
}


LOGIT_FLOOR = -80.0


def neighbour_weights(w: jax.Array, normalize: bool) -> jax.Array:
    """Weights a[..., L, G, 3] of one line from gate values w[..., L, G, 3] (float32).

    Neighbour 0 is missing at p = 0 and neighbour 2 at p = L - 1; missing neighbours get weight 0
    and, with ``normalize``, the valid sigmoids are renormalised to sum to one.
    """
    length = w.shape[-3]
    pos = jnp.arange(length)[:, None]
    valid = jnp.stack(
        [pos[:, 0] > 0, jnp.ones((length,), bool), pos[:, 0] < length - 1], axis=-1
    )[:, None, :]  # [L, 1, 3]
    if not normalize:
        return jnp.where(valid, w, 0.0)
    # sigmoid(w_k) / sum_valid sigmoid(w_k') as a softmax of log-sigmoids: the same weights,
    # but the gradient never forms the square of a sum of tiny sigmoids. Logits are clamped at
    # -80 (sigmoid < 2e-35) as in the kernels, which compute s / sum(s) directly.
    log_s = jax.nn.log_sigmoid(jnp.maximum(w, LOGIT_FLOOR))
    return jax.nn.softmax(jnp.where(valid, log_s, -jnp.inf), axis=-1)


def _scan_canonical(x, lam, w, chunk, normalize):
    """One direction in the canonical frame. x, lam: [B, T, L, C]; w: [B, T, L, G, 3] (float32)."""
    b, t_len, length, c = x.shape
    g = w.shape[-2]

    def step(h_prev, inputs):
        t, x_t, lam_t, w_t = inputs  # [B, L, C], [B, L, C], [B, L, G, 3]
        a = neighbour_weights(w_t, normalize)  # [B, L, G, 3]
        left = jnp.pad(h_prev, ((0, 0), (1, 0), (0, 0)))[:, :-1]   # h_prev[p - 1]
        right = jnp.pad(h_prev, ((0, 0), (0, 1), (0, 0)))[:, 1:]   # h_prev[p + 1]
        mix = sum(
            a[..., k : k + 1] * nb.reshape(b, length, g, c // g)
            for k, nb in enumerate((left, h_prev, right))
        ).reshape(b, length, c)
        restart = t == 0
        if chunk is not None and chunk < t_len:  # a longer chunk restarts no line but the first
            restart = restart | (t % chunk == 0)
        h = lam_t * x_t + jnp.where(restart, 0.0, mix)
        return h, h

    inputs = (jnp.arange(t_len), *(jnp.moveaxis(a, 1, 0) for a in (x, lam, w)))
    _, hs = lax.scan(step, jnp.zeros((b, length, c), jnp.float32), inputs)
    return jnp.moveaxis(hs, 0, 1)


def gspn_scan_reference(x, lam, w, directions, chunk, normalize):
    """h[D, B, H, W, C] for validated inputs; float32 arithmetic, output in the input dtype."""
    dtype = x.dtype
    f32 = lambda a: a.astype(jnp.float32)
    outs = []
    for d, name in enumerate(directions):
        to, back = _TO_CANONICAL[name], _FROM_CANONICAL[name]
        h = _scan_canonical(to(f32(x)), to(f32(lam[d])), to(f32(w[d])), chunk, normalize)
        outs.append(back(h).astype(dtype))
    return jnp.stack(outs)
