"""The configuration of a distillation run: one dataclass, its command line, and config files.

Every field of `DistillConfig` is a command-line flag (``image_size`` -> ``--image-size``) with
its help text and allowed range taken from the field's metadata, so ``--help`` lists them all.
Values come, in increasing priority, from the defaults below, a config file (``--config``: YAML
with a mapping of field names, or Python defining ``config = dict(...)``), and the flags.
Any invalid value raises `ConfigError` with one line saying which option and why.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import sys
from typing import Any

import yaml

from cgspn_jax.gspn import DIRECTIONS

# The shape a teacher and its student share, and the student's mixer: unset, they are the
# teacher's (the mixer's only if the teacher is a C-GSPN student), or these.
SHAPE_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "pool")
MIXER_FIELDS = ("mixer", "latent_dim", "directions")
MODEL_DEFAULTS = dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=4, pool="map",
                      mixer="cgspn", latent_dim=16, directions=DIRECTIONS)


class DistillError(Exception):
    """An error of the user's input (config, data, teacher): reported as one line, exit 2."""


class ConfigError(DistillError):
    pass


def option(default, help: str, *, low=None, high=None, choices=None, group: str = "run",
           resume_safe: bool = False, kind: type | None = None):
    """A config field: ``low``/``high`` bound numbers (inclusive), ``choices`` lists the allowed
    values; ``resume_safe`` fields may differ when a run is resumed (they do not change
    results); ``kind`` is the type where the default (None) does not tell it."""
    kind = kind or (type(default) if default is not None else str)
    return dataclasses.field(default=default, metadata=dict(
        help=help, low=low, high=high, choices=choices, group=group, resume_safe=resume_safe,
        kind=kind))


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    # ----------------------------------------------------------------- run
    out: str | None = option(None, "output directory: checkpoints, metrics, plot, summary.json "
                             "(required)", resume_safe=True)
    seed: int = option(0, "seed of parameter initialisation, data order and augmentation",
                       low=0, high=2**31 - 1)
    dtype: str = option("float32", "computation dtype of the models (parameters stay float32)",
                        choices=("float32", "bfloat16"))
    progress: bool = option(True, "show tqdm progress bars", resume_safe=True)
    log_every: int = option(10, "write a metrics line every this many steps", low=1,
                            resume_safe=True)
    # ----------------------------------------------------------------- data
    data: str = option("digits", "'digits' (scikit-learn's 8x8 handwritten digits, embedded), "
                       "an .npz file with 'images' and 'labels' (optionally 'heldout_images', "
                       "'heldout_labels'), or an image folder: ROOT/CLASS/*.png, or "
                       "ROOT/train/CLASS/* with ROOT/val/CLASS/*", group="data")
    image_size: int = option(32, "side of the square images the student sees (pixels)",
                             low=8, high=4096, group="data")
    heldout_fraction: float = option(0.25, "fraction held out for evaluation when the data has "
                                     "no held-out split of its own", low=0.01, high=0.9,
                                     group="data")
    batch_size: int = option(64, "global batch size (divisible by the number of devices)",
                             low=1, group="data")
    augment: bool = option(True, "random translations (and flips with --hflip) in training",
                           group="data")
    max_shift: int = option(2, "largest random translation, pixels", low=0, high=64,
                            group="data")
    hflip: bool = option(False, "random horizontal flips in training (off: digits are not "
                         "symmetric)", group="data")
    workers: int = option(0, "grain worker processes that decode and augment (0: in the "
                          "training process)", low=0, high=256, group="data", resume_safe=True)
    # ----------------------------------------------------------------- models
    teacher: str | None = option(None, "teacher: a model saved by a run (RUN/teacher, or "
                                 "RUN/student for high-resolution transfer), a Hugging Face "
                                 "SigLIP folder, a big_vision .npz or a save_teacher folder; "
                                 "none: train a ViT teacher first", group="model")
    # The model's shape: None means the teacher's (and the mixer's too when the teacher is a
    # C-GSPN student), or MODEL_DEFAULTS when the run trains its own teacher.
    width: int | None = option(None, "token width", low=1, group="model", kind=int)
    depth: int | None = option(None, "number of blocks", low=1, high=512, group="model", kind=int)
    mlp_dim: int | None = option(None, "hidden size of each block's MLP", low=1, group="model",
                                 kind=int)
    num_heads: int | None = option(None, "attention heads of the teacher and of the MAP head",
                                   low=1, group="model", kind=int)
    patch_size: int | None = option(None, "patch size, pixels", low=1, high=64, group="model",
                                    kind=int)
    pool: str | None = option(None, "pooling head: 'map' (SigLIP attention pooling) or 'gap' "
                              "(mean)", choices=("map", "gap"), group="model", kind=str)
    mixer: str | None = option(None, "student mixer: 'cgspn' (compressed latent scan) or "
                               "'gspn' (full width)", choices=("cgspn", "gspn"), group="model",
                               kind=str)
    latent_dim: int | None = option(None, "cgspn: channels of the latent space the scan runs "
                                    "in", low=1, group="model", kind=int)
    directions: tuple[str, ...] | None = option(None, "scan directions of the student mixers, "
                                                "some of: tb bt lr rl",
                                                choices=DIRECTIONS, group="model", kind=tuple)
    student_posemb: str = option("learn", "student position embedding: 'learn' (starts as a "
                                 "copy of the teacher's, so stage 2 starts from the teacher's "
                                 "block-0 input) or 'none' (the scans alone locate tokens)",
                                 choices=("learn", "none"), group="model")
    scan_backend: str = option("auto", "gspn_scan backend", choices=("auto", "reference", "ffi"),
                               group="model", resume_safe=True)
    # ----------------------------------------------------------------- optimisation
    teacher_steps: int = option(600, "steps of teacher pre-training (without --teacher), or of "
                                "fitting a classification head to a --teacher that has none",
                                low=0, group="optim")
    stage1_steps: int = option(300, "steps of stage 1 (mixers only, module-wise)", low=0,
                               group="optim")
    stage2_steps: int = option(400, "steps of stage 2 (end-to-end)", low=0, group="optim")
    teacher_lr: float = option(2e-3, "peak learning rate of teacher pre-training", low=0.0,
                               high=10.0, group="optim")
    stage1_lr: float = option(3e-3, "peak learning rate of stage 1", low=0.0, high=10.0,
                              group="optim")
    stage2_lr: float = option(3e-3, "peak learning rate of stage 2", low=0.0, high=10.0,
                              group="optim")
    warmup_fraction: float = option(0.05, "linear warm-up, as a fraction of each stage's steps",
                                    low=0.0, high=1.0, group="optim")
    weight_decay: float = option(0.05, "AdamW weight decay", low=0.0, high=10.0, group="optim")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)",
                              low=0.0, group="optim")
    # ----------------------------------------------------------------- stage-2 losses
    alpha: float = option(1.0, "weight of the per-block taps after the mixer sub-layer",
                          low=0.0, group="loss")
    beta: float = option(1.0, "weight of the per-block taps after the block", low=0.0,
                         group="loss")
    kl_weight: float = option(0.1, "weight of the KL term of each tap (added to its MSE)",
                              low=0.0, group="loss")
    kl_temperature: float = option(1.0, "temperature of the softmax over channels in the KL "
                                   "term", low=1e-3, high=1e3, group="loss")
    cosine_weight: float = option(5.0, "weight of the cosine loss on the pooled embedding",
                                  low=0.0, group="loss")
    adapter_dim: int = option(64, "hidden size of the MLP adapter before each tap", low=1,
                              group="loss")
    # ----------------------------------------------------------------- parallelism
    mesh_data: int = option(0, "devices along the 'data' mesh axis (0: all devices / "
                            "mesh_fsdp)", low=0, group="parallel", resume_safe=True)
    mesh_fsdp: int = option(1, "devices along the 'fsdp' axis, which shards parameters and "
                            "optimizer state", low=1, group="parallel", resume_safe=True)
    distributed: bool = option(False, "call jax.distributed.initialize() first (multi-host; "
                               "see docs/distillation.md)", group="parallel", resume_safe=True)
    # ----------------------------------------------------------------- checkpoints, evaluation
    checkpoint_every: int = option(200, "save a checkpoint every this many steps of a stage "
                                   "(and at its end)", low=1, group="checkpoint",
                                   resume_safe=True)
    keep_checkpoints: int = option(2, "checkpoints kept per stage (the newest)", low=1,
                                   high=1000, group="checkpoint", resume_safe=True)
    linear_probe: bool = option(True, "also report logistic-regression probe accuracies of "
                                "teacher and student embeddings", group="checkpoint",
                                resume_safe=True)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if self.directions is not None:
            values["directions"] = list(self.directions)
        return values

    def result_fields(self) -> dict[str, Any]:
        """The fields that change results: a resumed run must agree with these."""
        safe = {f.name for f in dataclasses.fields(self) if f.metadata["resume_safe"]}
        return {k: v for k, v in self.to_dict().items() if k not in safe}


FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def _check_field(name: str, value):
    """The value of field ``name`` converted to its type, or ConfigError."""
    field = FIELDS[name]
    meta, kind = field.metadata, field.metadata["kind"]
    flag = "--" + name.replace("_", "-")
    if value is None:
        if field.default is None:
            return None
        raise ConfigError(f"{flag}: a value is required")
    if kind is tuple:
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        value = tuple(value)
        bad = [d for d in value if d not in meta["choices"]]
        if not value or bad or len(set(value)) != len(value):
            raise ConfigError(f"{flag}: expected distinct names among {list(meta['choices'])}, "
                              f"got {list(value)}")
        return value
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                value = value.lower() in ("true", "1")
            if not isinstance(value, bool):
                raise ValueError
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: expected {kind.__name__}, got {value!r}") from None
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{flag}: expected one of {list(meta['choices'])}, got {value!r}")
    if meta["low"] is not None and value < meta["low"]:
        raise ConfigError(f"{flag}: must be >= {meta['low']}, got {value!r}")
    if meta["high"] is not None and value > meta["high"]:
        raise ConfigError(f"{flag}: must be <= {meta['high']}, got {value!r}")
    return value


def make_config(**values) -> DistillConfig:
    """A validated `DistillConfig` from field values (defaults for the others)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; see --help")
    checked = {name: _check_field(name, value) for name, value in values.items()}
    config = DistillConfig(**checked)
    _check_consistency(config)
    return config


def _check_consistency(c: DistillConfig) -> None:
    if c.max_shift * 2 >= c.image_size:
        raise ConfigError(f"--max-shift {c.max_shift} must be less than half of --image-size "
                          f"{c.image_size}")
    if c.teacher is not None and not os.path.exists(c.teacher):
        raise ConfigError(f"--teacher {c.teacher}: no such file or folder")


def with_model_shape(config: DistillConfig, teacher_config=None,
                     teacher_is_student: bool = False) -> DistillConfig:
    """``config`` with its unset model fields filled: from ``teacher_config`` (the teacher
    encoder's config) where given, else from MODEL_DEFAULTS. A field set to another value than
    the teacher's is a ConfigError: the student must have the teacher's shape."""
    inherited = SHAPE_FIELDS + (MIXER_FIELDS if teacher_is_student else ())
    values, differing = {}, []
    for name in SHAPE_FIELDS + MIXER_FIELDS:
        given = getattr(config, name)
        if teacher_config is not None and name in inherited:
            source = getattr(teacher_config, name)
            source = tuple(source) if isinstance(source, list) else source
            if given is not None and given != source:
                differing.append(f"{name}={source!r} (asked: {given!r})")
        else:
            source = MODEL_DEFAULTS[name]
        values[name] = source if given is None else given
    if differing:
        raise ConfigError(f"--teacher {config.teacher} has another shape than asked: "
                          f"{', '.join(differing)}")
    resolved = dataclasses.replace(config, **values)
    if resolved.width % resolved.num_heads:
        raise ConfigError(f"--width {resolved.width} must be divisible by --num-heads "
                          f"{resolved.num_heads}")
    if resolved.image_size % resolved.patch_size:
        raise ConfigError(f"--image-size {resolved.image_size} must be a multiple of the patch "
                          f"size {resolved.patch_size}")
    return resolved


def load_config_file(path: str) -> dict[str, Any]:
    """Field values from a YAML file (a mapping) or a Python file (``config = dict(...)``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        if path.endswith(".py"):
            values = runpy.run_path(path).get("config")
        else:
            with open(path) as f:
                values = yaml.safe_load(f)
    except Exception as error:  # a syntax error in the user's file: report it in one line
        raise ConfigError(f"--config {path}: cannot read it: {type(error).__name__}: "
                          f"{error}".replace("\n", " ")) from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values"
                          + (" (define `config = dict(...)`)" if path.endswith(".py") else ""))
    return {str(k).replace("-", "_"): v for k, v in values.items()}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is the one line 'cgspn-distill: error: ...' (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="cgspn-distill",
        description="Distil an attention ViT teacher into a C-GSPN student in two stages "
                    "(module-wise, then end-to-end), then evaluate both on held-out data. "
                    "With only --out it trains a small ViT on scikit-learn's digits first.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or Python (config = dict(...)) file of options; flags "
                             "override it")
    groups = {}
    for name, field in FIELDS.items():
        meta = field.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + name.replace("_", "-")
        bounds = "".join([f", >= {meta['low']}" if meta["low"] is not None else "",
                          f", <= {meta['high']}" if meta["high"] is not None else ""])
        default = (f"the teacher's, else {MODEL_DEFAULTS[name]!r}" if name in MODEL_DEFAULTS
                   else repr(field.default))
        help_text = f"{meta['help']} (default: {default}{bounds})".replace("%", "%%")
        if isinstance(field.default, bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               help=help_text)
        elif meta["kind"] is tuple:
            group.add_argument(flag, dest=name, nargs="+", metavar="DIR", help=help_text)
        else:
            metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else None
            group.add_argument(flag, dest=name, metavar=metavar, help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> DistillConfig:
    """Defaults < --config file < flags; raises ConfigError (or SystemExit for usage errors)."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    values = load_config_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    if values.get("teacher") in ("", "none", "None"):
        values["teacher"] = None
    config = make_config(**values)
    if config.out is None:
        raise ConfigError("--out DIR is required")
    return config


def config_json(config: DistillConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)
