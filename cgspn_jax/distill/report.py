"""What a run shows and writes: progress bars, RUN/metrics.jsonl, RUN/loss_curves.png.

Only process 0 of a multi-host run writes; the others run silently.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from tqdm.auto import tqdm

from cgspn_jax.distill.files import replacing

STAGE_ORDER = ("teacher", "head", "stage1", "stage2")
STAGE_TITLES = {"teacher": "teacher pre-training (cross-entropy)",
                "head": "classification head on the teacher (cross-entropy)",
                "stage1": "stage 1: mixer sub-layer MSE",
                "stage2": "stage 2: end-to-end taps + cosine"}


def _jsonable(value):
    array = np.asarray(value)
    if array.ndim == 0:
        return float(array) if array.dtype.kind == "f" else array.item()
    return array.tolist()


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Reporter:
    def __init__(self, run_dir: str, *, progress: bool, enabled: bool = True):
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.progress = progress and enabled
        self.enabled = enabled
        self.bar = None

    def begin_stage(self, stage: str, total: int, start: int) -> None:
        """Opens the stage's bar; drops metric lines a resumed stage will write again (its
        steps after ``start``, and everything of the stages after it)."""
        if not self.enabled:
            return
        order = STAGE_ORDER.index(stage)
        kept = [r for r in read_metrics(self.metrics_path)
                if STAGE_ORDER.index(r["stage"]) < order
                or (r["stage"] == stage and r["step"] <= start)]
        with replacing(self.metrics_path) as staging, open(staging, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.bar = tqdm(total=total, initial=start, desc=stage, unit="step",
                        disable=not self.progress, dynamic_ncols=True)

    def log_step(self, stage: str, step: int, metrics: dict, **extra) -> None:
        if not self.enabled:
            return
        record = {"stage": stage, "step": step,
                  **{k: _jsonable(v) for k, v in metrics.items()}, **extra}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}",
                                 img_s=f"{extra.get('images_per_s', 0):.0f}", refresh=False)

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def end_stage(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)


def plot_losses(metrics_path: str, png_path: str) -> None:
    """One panel per stage: training loss against step (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    stages = [s for s in STAGE_ORDER if any(r["stage"] == s and "loss" in r for r in records)]
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in records if r["stage"] == stage and "loss" in r]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], label="loss", color="C0")
        if stage == "stage2":  # the parts, unweighted, to see which tap dominates
            for i, part in enumerate(("mixer_mse", "block_mse", "cosine")):
                ax.plot(steps, [r[part] for r in rows], label=part, lw=0.8, color=f"C{i + 1}")
        if all(r["loss"] > 0 and math.isfinite(r["loss"]) for r in rows):
            ax.set_yscale("log")
        ax.set_title(STAGE_TITLES.get(stage, stage), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
