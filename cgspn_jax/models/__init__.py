"""Flax NNX models: the ViT teacher, the GSPN / C-GSPN mixers and encoder, and inference."""
from cgspn_jax.models.cgspn import (CGSPNConfig, CGSPNEncoder, cgspn_config,
                                    init_student_from_teacher)
from cgspn_jax.models.inference import encode, preprocess
from cgspn_jax.models.mixers import CGSPNMixer, DirectionalPropagation, GSPNMixer
from cgspn_jax.models.vit import (MLP, Attention, Block, GlobalAveragePool, MAPHead, PatchEmbed,
                                  ViT, ViTConfig, VisionEncoder, count_params, decode_variant,
                                  vit_config)

__all__ = [
    "MLP", "Attention", "Block", "CGSPNConfig", "CGSPNEncoder", "CGSPNMixer",
    "DirectionalPropagation", "GSPNMixer", "GlobalAveragePool", "MAPHead", "PatchEmbed", "ViT",
    "ViTConfig", "VisionEncoder", "cgspn_config", "count_params", "decode_variant", "encode",
    "init_student_from_teacher", "preprocess", "vit_config",
]
