"""The modules of a distillation run: teacher, classification head, student and tap adapters.

`DistillModels` holds them all in one NNX module so that each stage selects what it trains by a
path filter over one state (`stage1_trainable`, ...) and everything else stays frozen.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cgspn_jax.distill.config import DistillConfig
from cgspn_jax.models import CGSPNEncoder, ViT, init_student_from_teacher
from cgspn_jax.models.vit import VisionEncoder, config_to_json, resize_posemb

ENCODER_CLASSES = {"ViT": ViT, "CGSPNEncoder": CGSPNEncoder}


class Classifier(nnx.Module):
    """Linear head on a pooled embedding [B, width] -> logits [B, num_classes]. Trained with the
    teacher; the student is evaluated through it (its embedding must mean what the teacher's
    means)."""

    def __init__(self, width: int, num_classes: int, *, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.linear = nnx.Linear(width, num_classes, kernel_init=nnx.initializers.zeros_init(),
                                 rngs=rngs)

    def __call__(self, embedding: jax.Array) -> jax.Array:
        return self.linear(embedding.astype(jnp.float32))


class TapAdapter(nnx.Module):
    """A small residual MLP a student feature passes through before it is compared with the
    teacher's: x + fc2(gelu(fc1(x))). fc2 starts at zero, so stage 2 starts from the identity,
    i.e. from the features stage 1 matched. Training-only: not part of the exported student."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(width, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, kernel_init=nnx.initializers.zeros_init(),
                              rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class DistillModels(nnx.Module):
    def __init__(self, teacher: VisionEncoder, classifier: Classifier, student: CGSPNEncoder,
                 adapter_dim: int, *, rngs: nnx.Rngs):
        self.teacher = teacher
        self.classifier = classifier
        self.student = student
        width, depth = student.config.width, student.config.depth
        self.mixer_adapters = nnx.List([TapAdapter(width, adapter_dim, rngs=rngs)
                                        for _ in range(depth)])
        self.block_adapters = nnx.List([TapAdapter(width, adapter_dim, rngs=rngs)
                                        for _ in range(depth)])


# ----------------------------------------------------------------------------- trainable sets


def teacher_trainable(path, value) -> bool:
    return isinstance(value, nnx.Param) and path[0] in ("teacher", "classifier")


def head_trainable(path, value) -> bool:
    """Fitting a classification head to a pretrained teacher that has none."""
    return isinstance(value, nnx.Param) and path[0] == "classifier"


def make_stage1_trainable(student: CGSPNEncoder):
    """Stage 1 trains the student's GSPN mixers only; blocks that kept attention (hybrids)
    have the teacher's copy and stay frozen with the other shared parts."""
    attention_blocks = student.config.attention_block_set

    def stage1_trainable(path, value) -> bool:
        return (isinstance(value, nnx.Param) and path[:2] == ("student", "blocks")
                and path[3] == "mixer" and path[2] not in attention_blocks)
    return stage1_trainable


def stage2_trainable(path, value) -> bool:
    return isinstance(value, nnx.Param) and path[0] in ("student", "mixer_adapters",
                                                        "block_adapters")


# ----------------------------------------------------------------------------- construction


def encoder_spec(encoder: VisionEncoder) -> dict:
    """JSON-able description that `build_encoder` rebuilds the encoder from: its class, and its
    config (`config_to_json`) as a variant name and overrides."""
    values = config_to_json(encoder.config)
    return {"class": type(encoder).__name__, "variant": values.pop("variant"),
            "overrides": values}


def build_encoder(spec: dict, seed: int) -> VisionEncoder:
    """The encoder of an `encoder_spec` (or `teacher_spec`, `student_spec`): its class builds
    the config from the variant and overrides (`make_config`: JSON lists become tuples)."""
    cls = ENCODER_CLASSES[spec["class"]]
    return cls(spec["variant"], rngs=nnx.Rngs(seed), **spec["overrides"])


def shape_overrides(config: DistillConfig) -> dict:
    return dict(width=config.width, depth=config.depth, mlp_dim=config.mlp_dim,
                num_heads=config.num_heads, patch_size=config.patch_size, pool=config.pool,
                image_size=config.image_size, dtype=config.dtype)


def teacher_spec(config: DistillConfig) -> dict:
    """The ViT a run trains as its teacher when none is given ("mu" + overrides: every size
    is set explicitly)."""
    return {"class": "ViT", "variant": "mu", "overrides": shape_overrides(config)}


def student_spec(config: DistillConfig, teacher_config=None) -> dict:
    """The student of ``config``; with the teacher's config, also its input channels, pixel
    normalisation and LayerNorm epsilon (the norms are copies of the teacher's)."""
    overrides = dict(shape_overrides(config), posemb=config.student_posemb, mixer=config.mixer,
                     latent_dim=config.latent_dim, directions=list(config.directions),
                     scan_backend=config.scan_backend)
    if teacher_config is not None:
        overrides.update({name: getattr(teacher_config, name) for name in (
            "in_channels", "pixel_mean", "pixel_std", "layer_norm_eps")})
    return {"class": "CGSPNEncoder", "variant": "mu", "overrides": overrides}


def build_models(config: DistillConfig, num_classes: int, teacher=None,
                 classifier=None) -> DistillModels:
    """A fresh student, and a fresh teacher unless one is given, and a fresh (zero) head
    unless one is given; all initialised from ``config.seed``."""
    if teacher is None:
        teacher = build_encoder(teacher_spec(config), config.seed)
    if classifier is None:
        classifier = Classifier(teacher.config.width, num_classes,
                                rngs=nnx.Rngs(config.seed + 1))
    student = build_encoder(student_spec(config, teacher.config), config.seed + 2)
    return DistillModels(teacher, classifier, student, config.adapter_dim,
                         rngs=nnx.Rngs(config.seed + 3))


def copy_shared_parts(teacher: VisionEncoder, student: VisionEncoder) -> None:
    """`init_student_from_teacher`, also for a teacher whose position embedding is laid out for
    another grid (another resolution): the student gets it resized bilinearly to its own."""
    own = student.pos_emb
    if teacher.pos_emb is None or own is None or teacher.pos_emb.shape == own.shape:
        init_student_from_teacher(teacher, student)
        return
    student.pos_emb = None  # the rest is copied as usual; the embedding below, resized
    try:
        init_student_from_teacher(teacher, student)
    finally:
        student.pos_emb = own
    own[...] = resize_posemb(teacher.pos_emb[...], own.shape[1:3])
