"""Two-stage cross-operator distillation of an attention ViT into a C-GSPN encoder.

    cgspn-distill --out RUN            # or: python -m cgspn_jax.distill --out RUN

trains a small ViT teacher on scikit-learn's digits, distils it into a C-GSPN student (stage 1:
each mixer matches the teacher's attention sub-layer from the teacher's block input; stage 2:
end-to-end with per-block taps), and evaluates both. Modules: `config` (options, --help, config
files), `data` (grain pipelines), `modules` (head, adapters), `losses`, `stages` (objectives,
optimizer), `train` (sharded step and loop), `parallel` (mesh), `checkpoint` (orbax),
`files` (write beside, then swap in), `evaluate`, `report` (progress, metrics, plot), `run`
(the job). See docs/distillation.md.
"""
from cgspn_jax.distill.config import (ConfigError, DistillConfig, DistillError, make_config,
                                      parse_args)
from cgspn_jax.distill.run import main, run

__all__ = ["ConfigError", "DistillConfig", "DistillError", "main", "make_config", "parse_args",
           "run"]
