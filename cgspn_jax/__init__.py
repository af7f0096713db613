"""cgspn_jax: C-GSPN vision encoders in JAX: the GSPN line-scan op, its kernels, models and
distillation."""
from cgspn_jax._ffi import build_info
from cgspn_jax.gspn import DIRECTIONS, gspn_scan
from cgspn_jax.models import (CGSPNEncoder, CGSPNMixer, GSPNMixer, ViT, decode_variant, encode,
                              init_student_from_teacher)
from cgspn_jax.teachers import load_teacher, save_teacher

__all__ = [
    "DIRECTIONS", "build_info", "gspn_scan",
    "CGSPNEncoder", "CGSPNMixer", "GSPNMixer", "ViT", "decode_variant", "encode",
    "init_student_from_teacher",
    "load_teacher", "save_teacher",
]
__version__ = "0.1.0"
