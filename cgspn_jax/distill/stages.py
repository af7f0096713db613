"""What each training stage computes: the objective of a batch, given all models.

- "teacher": cross-entropy of the ViT + linear head (when no teacher is given).
- "stage1": every student mixer is fed the teacher's input to its block and matched to the
  teacher's mixer sub-layer output (MSE); the teacher's activations are constants, so no
  gradient crosses blocks and all blocks train at once.
- "stage2": the student runs on its own activations; per-block taps after the mixer sub-layer
  and after the block, through the adapters, against the teacher's; cosine on the embedding.

High-resolution transfer: when the teacher was trained at another resolution than the student,
it sees the batch resized to its own size and its token grids are resized bilinearly to the
student's grid before they are compared (or fed, in stage 1).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from cgspn_jax.distill import losses
from cgspn_jax.distill.config import DistillConfig
from cgspn_jax.distill.modules import DistillModels
from cgspn_jax.models.inference import preprocess
from cgspn_jax.models.vit import resize_grid


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    learning_rate: float
    trainable: Callable  # an nnx filter over the paths of DistillModels
    objective: Callable  # (models, batch) -> (loss, metrics)
    seed_offset: int     # each stage reads the data in its own order


def normalize(images: jax.Array, encoder_config) -> jax.Array:
    """uint8 [B, H, W, 3] -> the encoder's normalised float input, in its dtype."""
    return preprocess(images, mean=encoder_config.pixel_mean, std=encoder_config.pixel_std,
                      resize_to=None, dtype=encoder_config.dtype)


def teacher_input(models: DistillModels, images: jax.Array) -> jax.Array:
    """uint8 images -> the teacher's input, at the resolution it was trained at."""
    config = models.teacher.config
    return preprocess(images, mean=config.pixel_mean, std=config.pixel_std,
                      resize_to=config.image_hw, dtype=config.dtype)


def teacher_forward(models: DistillModels, images: jax.Array, grid_hw: tuple[int, int]):
    """The frozen teacher on ``images`` at its own resolution: (embedding, taps resized to
    ``grid_hw``), all constants for the gradient."""
    embedding, taps = models.teacher(teacher_input(models, images), return_intermediates=True)
    taps = {name: [jax.lax.stop_gradient(resize_grid(t, grid_hw)) for t in grids]
            for name, grids in taps.items() if name != "features"}
    return jax.lax.stop_gradient(embedding), taps


def student_grid(models: DistillModels, images: jax.Array) -> tuple[int, int]:
    patch = models.student.config.patch_size
    return images.shape[1] // patch, images.shape[2] // patch


def teacher_objective(models: DistillModels, batch) -> tuple[jax.Array, dict]:
    logits = models.classifier(models.teacher(teacher_input(models, batch["image"])))
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"accuracy": accuracy}


def stage1_objective(models: DistillModels, batch) -> tuple[jax.Array, dict]:
    _, taps = teacher_forward(models, batch["image"], student_grid(models, batch["image"]))
    predictions = [block.mixer_sublayer(x.astype(models.student.config.dtype))
                   for block, x in zip(models.student.blocks, taps["block_input"])]
    return losses.stage1_loss(predictions, taps["mixer_out"])


def make_stage2_objective(config: DistillConfig) -> Callable:
    weights = dict(alpha=config.alpha, beta=config.beta, kl_weight=config.kl_weight,
                   temperature=config.kl_temperature, cosine_weight=config.cosine_weight)

    def stage2_objective(models: DistillModels, batch) -> tuple[jax.Array, dict]:
        images = batch["image"]
        teacher_embedding, teacher_taps = teacher_forward(models, images,
                                                          student_grid(models, images))
        embedding, taps = models.student(normalize(images, models.student.config),
                                         return_intermediates=True)
        student = {"mixer": [a(t) for a, t in zip(models.mixer_adapters, taps["mixer_out"])],
                   "block": [a(t) for a, t in zip(models.block_adapters, taps["after_block"])]}
        teacher = {"mixer": teacher_taps["mixer_out"], "block": teacher_taps["after_block"]}
        return losses.stage2_loss(student, teacher, embedding, teacher_embedding, **weights)
    return stage2_objective


def make_optimizer(learning_rate: float, steps: int, config: DistillConfig):
    """(AdamW under linear warm-up + cosine decay to 0, after global-norm clipping; the
    schedule). Weight decay applies to arrays of rank >= 2 only, not to biases and norms."""
    warmup = min(int(round(config.warmup_fraction * steps)), max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=warmup, decay_steps=max(steps, 1), end_value=0.0)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw), schedule
    return adamw, schedule
