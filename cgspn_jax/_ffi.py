"""Loads the compiled extension (built from xla_ffi/ by CMake) and registers its FFI targets."""
from __future__ import annotations

import functools

import jax

FWD_TARGET = "cgspn_gspn_fwd"
BWD_TARGET = "cgspn_gspn_bwd"


@functools.cache
def _extension():
    try:
        from cgspn_jax import _gspn_ffi
    except ModuleNotFoundError as err:
        # A source checkout without a build: the reference backend still works. An extension
        # that exists but fails to load (a broken build) is an error, never silently skipped.
        if err.name != "cgspn_jax._gspn_ffi":
            raise
        return None
    return _gspn_ffi


@functools.cache
def registered_platforms() -> frozenset[str]:
    """Registers every handler the extension carries, once; returns the platforms covered."""
    ext = _extension()
    if ext is None:
        return frozenset()
    platforms = set()
    for platform, handlers in ext.registrations().items():
        for name, capsule in handlers.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
        platforms.add(platform.lower())
    return frozenset(platforms)


def build_info() -> dict:
    """What was compiled in: {'cpu_kernel': bool, 'cuda_kernel': bool, 'cuda_architectures': str,
    'cuda_max_line_length': int (longest H or W the CUDA kernel takes)}."""
    ext = _extension()
    if ext is None:
        return {"cpu_kernel": False, "cuda_kernel": False, "cuda_architectures": "",
                "cuda_max_line_length": 0}
    return dict(ext.build_info())
