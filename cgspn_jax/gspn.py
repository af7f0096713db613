"""`gspn_scan`: the 2D line-scan propagation of GSPN as a JAX op.

h[d] = lam[d] * x + sum_k a_k(w[d]) * h[d](previous line, neighbour k), scanned along direction
d (see the README for the exact contract). Three backends compute the same function:
"reference" (pure JAX, differentiated by JAX), and "ffi": the compiled C++ (CPU) and CUDA kernels
under a custom VJP whose backward is its own reverse scan. "auto" picks the compiled kernel of
whichever platform the computation is lowered for and falls back to the reference elsewhere.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cgspn_jax import _ffi, sharding
from cgspn_jax.reference import gspn_scan_reference

DIRECTIONS = ("tb", "bt", "lr", "rl")
DIRECTION_CODES = {name: code for code, name in enumerate(DIRECTIONS)}
BACKENDS = ("auto", "reference", "ffi")
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Static parameters of one call (hashable: they become jit-static and FFI attributes)."""

    directions: tuple[str, ...]
    chunk: int | None
    normalize: bool

    def ffi_attributes(self) -> dict:
        return dict(
            directions=np.array([DIRECTION_CODES[d] for d in self.directions], np.int64),
            chunk=np.int64(self.chunk or 0),
            normalize=bool(self.normalize),
        )


def gspn_scan(
    x: jax.Array,
    lam: jax.Array,
    w: jax.Array,
    *,
    directions: Sequence[str] = DIRECTIONS,
    chunk: int | None = None,
    normalize: bool = True,
    backend: str = "auto",
) -> jax.Array:
    """Propagates x over the 2D grid along each of ``directions``.

    Args:
      x: ``[B, H, W, C]`` input, shared by all directions.
      lam: ``[D, B, H, W, C]`` input gate per direction.
      w: ``[D, B, H, W, G, 3]`` neighbour gates (logits if ``normalize``); G divides C and channel
        c uses group ``c // (C // G)``.
      directions: distinct names among "tb", "bt", "lr", "rl"; D = len(directions).
      chunk: restart the propagation every ``chunk`` lines (local GSPN); None scans globally.
      normalize: weights are sigmoid(w) renormalised over the valid neighbours; else w as given.
      backend: "auto", "reference" or "ffi".

    Returns:
      ``[D, B, H, W, C]`` hidden states in the dtype of the inputs (float32 arithmetic).
    """
    config = _validate(x, lam, w, directions, chunk, normalize, backend)
    x, lam, w = (jnp.asarray(a) for a in (x, lam, w))
    if backend == "reference":
        return gspn_scan_reference(x, lam, w, config.directions, config.chunk, config.normalize)
    if backend == "ffi":
        platforms = _ffi.registered_platforms()
        if not platforms:
            raise ValueError(
                "backend='ffi' needs the compiled extension cgspn_jax._gspn_ffi, which is not "
                f"built here ({_ffi.build_info()}); reinstall with a C++ compiler, or use "
                "backend='reference'"
            )
    # The CUDA kernel holds whole lines on chip; "auto" leaves longer lines to the reference.
    max_line = _ffi.build_info()["cuda_max_line_length"]
    cuda_ok = backend == "ffi" or max(x.shape[1:3]) <= max_line
    return _gspn_scan_vjp(x, lam, w, config, backend == "ffi", cuda_ok)


# ----------------------------------------------------------------------------- validation


def _validate(x, lam, w, directions, chunk, normalize, backend) -> ScanConfig:
    if isinstance(directions, str):
        raise TypeError(f"directions must be a sequence of names such as ('tb', 'lr'), got the "
                        f"string {directions!r}")
    directions = tuple(directions)
    unknown = [d for d in directions if d not in DIRECTION_CODES]
    if unknown:
        raise ValueError(f"directions: unknown {unknown}; expected names among {DIRECTIONS}")
    if not directions or len(set(directions)) != len(directions):
        raise ValueError(f"directions must be non-empty and distinct, got {directions}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer))
                              or chunk < 1):
        raise ValueError(f"chunk must be None or an integer >= 1, got {chunk!r}")
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    arrays = {"x": x, "lam": lam, "w": w}
    for name, a in arrays.items():
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    for name, rank in (("x", 4), ("lam", 5), ("w", 6)):
        if arrays[name].ndim != rank:
            layout = {"x": "[B, H, W, C]", "lam": "[D, B, H, W, C]", "w": "[D, B, H, W, G, 3]"}
            raise ValueError(f"{name} must have rank {rank} {layout[name]}, got shape "
                             f"{tuple(arrays[name].shape)}")
    dtypes = {name: jnp.dtype(a.dtype) for name, a in arrays.items()}
    for name, dt in dtypes.items():
        if dt not in [jnp.dtype(f) for f in FLOAT_DTYPES]:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {dt}")
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"x, lam and w must share one dtype, got "
                        + ", ".join(f"{n}: {d}" for n, d in dtypes.items()))

    b, h, wd, c = x.shape
    d = len(directions)
    if tuple(lam.shape) != (d, b, h, wd, c):
        raise ValueError(f"lam must have shape [D, B, H, W, C] = {(d, b, h, wd, c)} "
                         f"(D = len(directions), the rest from x), got {tuple(lam.shape)}")
    if tuple(w.shape[:4]) != (d, b, h, wd) or w.shape[5] != 3:
        raise ValueError(f"w must have shape [D, B, H, W, G, 3] = {(d, b, h, wd, 'G', 3)} "
                         f"(D = len(directions), the rest from x), got {tuple(w.shape)}")
    g = w.shape[4]
    if g < 1 or c % g:
        raise ValueError(f"the gate groups G = w.shape[4] = {g} must divide the channels "
                         f"C = x.shape[3] = {c}")
    if min(b, h, wd, c) < 1:
        raise ValueError(f"x must have non-empty B, H, W and C, got shape {tuple(x.shape)}")
    if max(h, wd) >= 2**31:  # the CUDA kernels count a scan's lines in 32 bits
        raise ValueError(f"x's H and W must be below 2**31, got shape {tuple(x.shape)}")
    return ScanConfig(directions, None if chunk is None else int(chunk), bool(normalize))


# ----------------------------------------------------------------------------- dispatch


def _reference_fwd(config):
    return lambda x, lam, w: gspn_scan_reference(x, lam, w, config.directions, config.chunk,
                                                 config.normalize)


def _ffi_fwd(config):
    def fwd(x, lam, w):
        out = jax.ShapeDtypeStruct(lam.shape, lam.dtype)
        return jax.ffi.ffi_call(_ffi.FWD_TARGET, out)(
            x, lam, w, **config.ffi_attributes())
    return fwd


def _reference_bwd(config):
    def bwd(x, lam, w, h, dh):
        del h
        return jax.vjp(_reference_fwd(config), x, lam, w)[1](dh)
    return bwd


def _ffi_bwd(config):
    def bwd(x, lam, w, h, dh):
        outs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, lam, w))
        return jax.ffi.ffi_call(_ffi.BWD_TARGET, outs)(
            x, lam, w, h, dh, **config.ffi_attributes())
    return bwd


def _per_platform(make_ffi, make_reference, config, ffi_only, cuda_ok):
    """platform_dependent branches: the kernel where one is registered, else the reference."""
    platforms = _ffi.registered_platforms() - (set() if cuda_ok else {"cuda"})
    branches = {p: make_ffi(config) for p in ("cpu", "cuda") if p in platforms}
    default = None if ffi_only else make_reference(config)

    def run(*args):
        if not branches:
            return default(*args)
        return jax.lax.platform_dependent(*args, default=default, **branches)
    return run


@functools.cache
def _partitioned(kind: str, config: ScanConfig, ffi_only: bool, cuda_ok: bool):
    """The forward or backward computation, split over batch / channel shards by the partitioner."""
    if kind == "fwd":
        run = _per_platform(_ffi_fwd, _reference_fwd, config, ffi_only, cuda_ok)
    else:
        run = _per_platform(_ffi_bwd, _reference_bwd, config, ffi_only, cuda_ok)
    return sharding.partition_per_shard(run, kind)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gspn_scan_vjp(x, lam, w, config, ffi_only, cuda_ok):
    return _partitioned("fwd", config, ffi_only, cuda_ok)(x, lam, w)


def _gspn_scan_vjp_fwd(x, lam, w, config, ffi_only, cuda_ok):
    h = _partitioned("fwd", config, ffi_only, cuda_ok)(x, lam, w)
    return h, (x, lam, w, h)


def _gspn_scan_vjp_bwd(config, ffi_only, cuda_ok, residuals, dh):
    return _partitioned("bwd", config, ffi_only, cuda_ok)(*residuals, dh)


_gspn_scan_vjp.defvjp(_gspn_scan_vjp_fwd, _gspn_scan_vjp_bwd)
