"""cgspn_jax: C-GSPN vision encoders in JAX: the GSPN line-scan op, its kernels, models and
distillation."""
from cgspn_jax._ffi import build_info
from cgspn_jax.gspn import DIRECTIONS, gspn_scan

__all__ = ["DIRECTIONS", "build_info", "gspn_scan"]
__version__ = "0.1.0"
