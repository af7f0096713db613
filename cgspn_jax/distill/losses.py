"""Distillation losses on feature arrays (pure functions, float32 arithmetic).

Features are token grids [B, h, w, C] (or any [..., C]); "softmax-normalised" means a softmax
over the channels of each token.

- stage 1: mean over blocks of MSE(student mixer sub-layer output, teacher's), each computed
  from the teacher's block input.
- stage 2, per block and tap (after the mixer sub-layer, after the block):
      tap(s, t) = MSE(s, t) + kl_weight * T^2 * KL(softmax(t / T) || softmax(s / T))
  total = mean over blocks of (alpha * tap_mixer + beta * tap_block)
          + cosine_weight * mean(1 - cos(pooled student, pooled teacher)).
  (T^2 keeps the KL's gradient scale independent of the temperature, as in Hinton et al.)
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


def softmax_kl(prediction: jax.Array, target: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Mean over tokens of KL(softmax(target / T) || softmax(prediction / T)) over channels,
    times T^2."""
    log_p = jax.nn.log_softmax(target.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(prediction.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.mean(kl) * temperature ** 2


def cosine_distance(prediction: jax.Array, target: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Mean over rows of 1 - cos(prediction, target) along the last axis."""
    return 1.0 - jnp.mean(cosine_similarity(prediction, target, eps))


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, eps)


def stage1_loss(student_mixer_outs: Sequence[jax.Array],
                teacher_mixer_outs: Sequence[jax.Array]) -> tuple[jax.Array, dict]:
    """Mean over blocks of the MSE of the mixer sub-layer outputs; per-block values in aux."""
    per_block = jnp.stack([mse(s, t) for s, t in zip(student_mixer_outs, teacher_mixer_outs,
                                                     strict=True)])
    return jnp.mean(per_block), {"mse_per_block": per_block}


def tap_loss(student: jax.Array, teacher: jax.Array,
             temperature: float) -> tuple[jax.Array, jax.Array]:
    """(MSE, KL) of one tap, unweighted."""
    return mse(student, teacher), softmax_kl(student, teacher, temperature)


def stage2_loss(student_taps: dict[str, Sequence[jax.Array]],
                teacher_taps: dict[str, Sequence[jax.Array]], student_embedding: jax.Array,
                teacher_embedding: jax.Array, *, alpha: float, beta: float, kl_weight: float,
                temperature: float, cosine_weight: float) -> tuple[jax.Array, dict]:
    """The end-to-end loss. ``*_taps`` have lists (one entry per block) under "mixer" and
    "block"; the student's have already passed through their adapters. The parts in aux are
    unweighted block means."""
    parts = {}
    for tap in ("mixer", "block"):
        pairs = [tap_loss(s, t, temperature)
                 for s, t in zip(student_taps[tap], teacher_taps[tap], strict=True)]
        parts[f"{tap}_mse"] = jnp.mean(jnp.stack([m for m, _ in pairs]))
        parts[f"{tap}_kl"] = jnp.mean(jnp.stack([k for _, k in pairs]))
    parts["cosine"] = cosine_distance(student_embedding, teacher_embedding)
    total = (alpha * (parts["mixer_mse"] + kl_weight * parts["mixer_kl"])
             + beta * (parts["block_mse"] + kl_weight * parts["block_kl"])
             + cosine_weight * parts["cosine"])
    return total, parts
