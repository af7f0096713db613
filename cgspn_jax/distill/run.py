"""`run(config)`: a whole distillation run; `main()`: the `cgspn-distill` command.

Order: check everything the user gave (config, data, teacher, mesh, run folder) before writing
anything; then teacher pre-training (or fitting a head to a given teacher that has none), stage
1, stage 2 (each resumed from its last checkpoint if the run folder has one), export of teacher
and student, evaluation, plot and summary. A run folder that holds a run of other settings is
refused, not overwritten.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax

from cgspn_jax.distill import data, parallel
from cgspn_jax.distill.checkpoint import load_teacher_model, save_model
from cgspn_jax.distill.config import (DistillConfig, DistillError, config_json, parse_args,
                                      with_model_shape)
from cgspn_jax.distill.evaluate import evaluate
from cgspn_jax.distill.files import write_json
from cgspn_jax.distill.modules import DistillModels, build_models, copy_shared_parts
from cgspn_jax.distill.report import Reporter, plot_losses
from cgspn_jax.distill.train import StageRunner, make_stages
from cgspn_jax.models import CGSPNEncoder, count_params

RUN_CONFIG = "config.json"


def _check_run_dir(config: DistillConfig) -> None:
    """Refuses an --out that is a file, or that holds a run of other result-changing settings
    (resuming it would mix two runs' checkpoints)."""
    out = config.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise DistillError(f"--out {out}: exists and is not a directory")
    previous_path = os.path.join(out, RUN_CONFIG)
    if not os.path.exists(previous_path):
        return
    try:
        with open(previous_path) as f:
            previous = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise DistillError(f"--out {out}: cannot read {RUN_CONFIG} of the run there: {error}") \
            from None
    current = config.result_fields()
    differing = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
    if differing:
        shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in
                          sorted(differing.items())[:4])
        raise DistillError(f"--out {out} holds a run with other settings ({shown}); resume it "
                           f"with the same settings or choose another --out")


def _load_teacher(config: DistillConfig, num_classes: int):
    """(encoder, classifier or None, config with the teacher's shape) of --teacher."""
    encoder, classifier = load_teacher_model(config.teacher, dtype=config.dtype)
    config = with_model_shape(config, encoder.config,
                              teacher_is_student=isinstance(encoder, CGSPNEncoder))
    if classifier is not None and classifier.num_classes != num_classes:
        raise DistillError(f"--teacher {config.teacher} classifies {classifier.num_classes} "
                           f"classes, the data has {num_classes}")
    return encoder, classifier, config


def _train(models: DistillModels, dataset, config: DistillConfig, mesh, reporter,
           teacher_mode: str) -> dict:
    """Runs the stages in order, exporting the teacher after its stage and the student at the
    end; returns per-stage timings."""
    out, info = config.out, {}
    for stage in make_stages(config, models, teacher=teacher_mode):
        if stage.name == "stage1":
            # The shared parts start as the teacher's, frozen through stage 1 (a student given
            # as teacher passes on its mixers too: high-resolution transfer starts from them).
            copy_shared_parts(models.teacher, models.student)
        started = time.perf_counter()
        if stage.steps:
            info[stage.name] = StageRunner(stage, models, config, mesh).run(dataset.train, out,
                                                                            reporter)
        info.setdefault(stage.name, {})["wall_s"] = round(time.perf_counter() - started, 2)
        if stage.name in ("teacher", "head"):
            note = ("ViT teacher trained by cgspn-distill" if stage.name == "teacher" else
                    f"{config.teacher} with a classification head fitted by cgspn-distill")
            save_model(os.path.join(out, "teacher"), models.teacher, models.classifier,
                       class_names=dataset.class_names, note=note)
    save_model(os.path.join(out, "student"), models.student, models.classifier,
               class_names=dataset.class_names,
               note="C-GSPN student distilled by cgspn-distill; the classifier is its teacher's "
                    "head")
    return info


def run(config: DistillConfig) -> dict:
    """Runs (or resumes) the distillation of ``config``; returns the summary it writes."""
    started = time.perf_counter()
    if config.distributed:
        parallel.initialize_distributed()
    dataset = data.load_dataset(config)
    if config.teacher:
        teacher, classifier, config = _load_teacher(config, dataset.num_classes)
        teacher_mode = "head" if classifier is None else "given"
    else:
        teacher, classifier, config = None, None, with_model_shape(config)
        teacher_mode = "train"
    mesh = parallel.make_mesh(config)
    _check_run_dir(config)

    out = config.out
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, RUN_CONFIG), json.loads(config_json(config)))
    reporter = Reporter(out, progress=config.progress, enabled=writer)
    reporter.message(f"data: {dataset.description}; {len(dataset.train)} train, "
                     f"{len(dataset.heldout)} held-out; mesh {dict(mesh.shape)} of "
                     f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    models = build_models(config, dataset.num_classes, teacher, classifier)
    stages = _train(models, dataset, config, mesh, reporter, teacher_mode)

    reporter.message("evaluating on the held-out split")
    eval_started = time.perf_counter()
    results = evaluate(models, dataset, config, mesh)
    stages["eval"] = {"wall_s": round(time.perf_counter() - eval_started, 2)}
    ratio = (results["student_accuracy"] / results["teacher_accuracy"]
             if results["teacher_accuracy"] else float("nan"))
    summary = {
        **results,
        "student_over_teacher": ratio,
        "teacher_params": count_params(models.teacher),
        "student_params": count_params(models.student),
        "classifier_params": count_params(models.classifier),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "stages": stages,
        "data": dataset.description,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "mesh": dict(mesh.shape),
        "teacher": config.teacher or os.path.join(out, "teacher"),
    }
    if writer:
        plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss_curves.png"))
        write_json(os.path.join(out, "summary.json"), summary)
        reporter.message(
            f"teacher accuracy {summary['teacher_accuracy']:.4f}, student accuracy "
            f"{summary['student_accuracy']:.4f} ({ratio:.1%} of the teacher), feature cosine "
            f"{summary['feature_cosine']:.4f}, {summary['wall_time_s']:.0f} s; "
            f"{os.path.join(out, 'summary.json')}")
    return summary


def main(argv: list[str] | None = None) -> None:
    """The `cgspn-distill` command: an input error is one line on stderr and exit status 2."""
    try:
        run(parse_args(argv))
    except DistillError as error:
        print(f"cgspn-distill: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("cgspn-distill: interrupted; the same command resumes from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)
