"""Held-out evaluation of teacher and student.

- teacher_accuracy, student_accuracy: top-1 through the teacher's classification head (the
  student's embedding is meant to replace the teacher's, so it is read by the same head);
- feature_cosine: mean cosine similarity of the student's and the teacher's pooled embeddings;
- with ``linear_probe``: a logistic regression fitted on each model's embeddings of (at most
  PROBE_TRAIN_MAX) training images, its held-out accuracy.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from cgspn_jax.distill import data, losses, parallel
from cgspn_jax.distill.config import DistillConfig
from cgspn_jax.distill.modules import DistillModels
from cgspn_jax.distill.stages import normalize, teacher_input

PROBE_TRAIN_MAX = 20_000


def make_embed_fn(models: DistillModels, mesh):
    """(local images, labels, mask) -> host arrays of both embeddings, teacher and student
    logits, labels and mask of the whole global batch."""
    graphdef, state = nnx.split(models)
    state = jax.device_put(state, parallel.state_shardings(state, mesh))

    @jax.jit
    def embed(state, batch):
        models = nnx.merge(graphdef, state)
        teacher = models.teacher(teacher_input(models, batch["image"]))
        student = models.student(normalize(batch["image"], models.student.config))
        return {"teacher": teacher.astype(jnp.float32), "student": student.astype(jnp.float32),
                "teacher_logits": models.classifier(teacher),
                "student_logits": models.classifier(student),
                "label": batch["label"], "mask": batch["mask"]}

    def run(images, labels, mask):
        batch = parallel.put_batch({"image": images, "label": labels, "mask": mask}, mesh)
        outputs = multihost_utils.process_allgather(embed(state, batch), tiled=True)
        valid = np.asarray(outputs.pop("mask"), bool)
        return {k: np.asarray(v)[valid] for k, v in outputs.items()}
    return run


def collect(embed, source, local_batch: int, limit: int | None = None) -> dict:
    """`embed`'s outputs over ``source`` (its first ``limit`` examples, about), concatenated."""
    batches = data.eval_batches(source, local_batch=local_batch,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    if limit is not None:
        batches = itertools.islice(batches, -(-limit // (local_batch * jax.process_count())))
    parts = [embed(batch["image"], batch["label"], mask) for batch, mask in batches]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def probe_accuracy(train_features, train_labels, test_features, test_labels) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_features, train_labels)
    return float(probe.score(test_features, test_labels))


def evaluate(models: DistillModels, dataset: data.Dataset, config: DistillConfig,
             mesh) -> dict:
    embed = make_embed_fn(models, mesh)
    local_batch = parallel.local_batch_size(config)
    held = collect(embed, dataset.heldout, local_batch)
    labels = held["label"]
    results = {
        "teacher_accuracy": float(np.mean(np.argmax(held["teacher_logits"], -1) == labels)),
        "student_accuracy": float(np.mean(np.argmax(held["student_logits"], -1) == labels)),
        "feature_cosine": float(np.mean(losses.cosine_similarity(held["student"],
                                                                 held["teacher"]))),
        "heldout_examples": int(len(labels)),
    }
    if config.linear_probe:
        train = collect(embed, dataset.train, local_batch, limit=PROBE_TRAIN_MAX)
        for model in ("teacher", "student"):
            results[f"{model}_probe_accuracy"] = probe_accuracy(
                train[model], train["label"], held[model], labels)
    return results
