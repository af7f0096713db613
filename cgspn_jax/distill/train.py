"""The training loop of one stage: sharded jit step, AdamW, checkpoints, resume, logging.

A stage trains the parameters its filter selects (``trainable``) and reads all others
(``frozen``); both are split out of one `DistillModels` state, placed on the mesh (parameters
and optimizer state over "fsdp", the batch over "data" and "fsdp") and passed to one jitted
step. The gradient is taken with respect to ``trainable`` only, so frozen parameters cannot
change. At the end the trained parameters are written back into the models.
"""
from __future__ import annotations

import os
import time

import jax
import optax
from flax import nnx

from cgspn_jax.distill import data, parallel
from cgspn_jax.distill.checkpoint import StageCheckpoints
from cgspn_jax.distill.config import DistillConfig, DistillError
from cgspn_jax.distill.modules import (DistillModels, head_trainable, make_stage1_trainable,
                                       stage2_trainable, teacher_trainable)
from cgspn_jax.distill.report import Reporter
from cgspn_jax.distill.stages import (Stage, make_optimizer, make_stage2_objective,
                                      stage1_objective, teacher_objective)


def make_stages(config: DistillConfig, models: DistillModels, *, teacher: str):
    """The stages in order. ``teacher``: "train" (pre-train teacher and head), "head" (fit a
    head to a given teacher that has none) or "given" (teacher and head are given)."""
    stages = []
    if teacher == "train":
        stages.append(Stage("teacher", config.teacher_steps, config.teacher_lr,
                            teacher_trainable, teacher_objective, seed_offset=0))
    elif teacher == "head":
        stages.append(Stage("head", config.teacher_steps, config.teacher_lr, head_trainable,
                            teacher_objective, seed_offset=0))
    stages.append(Stage("stage1", config.stage1_steps, config.stage1_lr,
                        make_stage1_trainable(models.student), stage1_objective, seed_offset=1))
    stages.append(Stage("stage2", config.stage2_steps, config.stage2_lr, stage2_trainable,
                        make_stage2_objective(config), seed_offset=2))
    return stages


def make_step(graphdef, objective, optimizer):
    """(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)."""

    def step(trainable, frozen, opt_state, batch):
        def loss_fn(params):
            return objective(nnx.merge(graphdef, params, frozen), batch)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(trainable, updates), opt_state, metrics
    return step


class StageRunner:
    """Everything one stage needs on the mesh; `run` trains it (resuming if a checkpoint
    exists) and writes the result into ``models``."""

    def __init__(self, stage: Stage, models: DistillModels, config: DistillConfig, mesh):
        self.stage, self.models, self.config, self.mesh = stage, models, config, mesh
        self.graphdef, trainable, frozen = nnx.split(models, stage.trainable, ...)
        if not jax.tree.leaves(trainable):
            raise DistillError(f"{stage.name}: nothing to train (no parameter matches)")
        self.optimizer, self.schedule = make_optimizer(stage.learning_rate, stage.steps, config)
        self.trainable_sharding = parallel.state_shardings(trainable, mesh)
        frozen_sharding = parallel.state_shardings(frozen, mesh)
        self.opt_sharding = parallel.state_shardings(
            jax.eval_shape(self.optimizer.init, trainable), mesh)
        self.trainable = jax.device_put(trainable, self.trainable_sharding)
        self.frozen = jax.device_put(frozen, frozen_sharding)
        self.opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_sharding)(
            self.trainable)
        batch_sharding = parallel.batch_sharding(mesh)
        self.step_fn = jax.jit(
            make_step(self.graphdef, stage.objective, self.optimizer),
            in_shardings=(self.trainable_sharding, frozen_sharding, self.opt_sharding,
                          {"image": batch_sharding, "label": batch_sharding}),
            out_shardings=(self.trainable_sharding, self.opt_sharding,
                           parallel.replicated(mesh)),
            donate_argnums=(0, 2))

    def step(self, local_batch) -> dict:
        """One optimizer step on this process's slice of a batch; returns device metrics."""
        batch = parallel.put_batch(local_batch, self.mesh)
        self.trainable, self.opt_state, metrics = self.step_fn(self.trainable, self.frozen,
                                                               self.opt_state, batch)
        return metrics

    def iterator(self, source):
        return data.train_iterator(source, self.config,
                                   local_batch=parallel.local_batch_size(self.config),
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(),
                                   seed_offset=self.stage.seed_offset)

    def run(self, source, run_dir: str, reporter: Reporter) -> dict:
        stage, config = self.stage, self.config
        checkpoints = StageCheckpoints(os.path.join(run_dir, "checkpoints", stage.name),
                                       keep=config.keep_checkpoints)
        try:
            iterator = self.iterator(source)
            start = checkpoints.latest_step() or 0
            if start > stage.steps:
                raise DistillError(f"{run_dir}: {stage.name} has a checkpoint at step {start} "
                                   f"but the config asks for {stage.steps} steps")
            if start:
                self.trainable, self.opt_state = checkpoints.restore(
                    start, self.trainable, self.opt_state,
                    iterator if start < stage.steps else None)
            info = {"resumed_from": start, "steps_run": stage.steps - start}
            if start < stage.steps:
                info.update(self._loop(iterator, start, checkpoints, reporter))
        finally:
            checkpoints.close()
        nnx.update(self.models, self.trainable)
        return info

    def _loop(self, iterator, start, checkpoints, reporter) -> dict:
        stage, config = self.stage, self.config
        reporter.begin_stage(stage.name, stage.steps, start)
        compile_s, window_start, window_steps, images_per_s = 0.0, None, 0, 0.0
        steady_start = None
        began = time.perf_counter()
        for step in range(start, stage.steps):
            metrics = self.step(next(iterator))
            done = step + 1
            if window_start is None:  # the first step compiles: keep it out of images/s
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - began
                window_start = steady_start = time.perf_counter()
            else:
                window_steps += 1
            if done % config.log_every == 0 or done == stage.steps:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                if window_steps:
                    images_per_s = window_steps * config.batch_size / max(elapsed, 1e-9)
                reporter.log_step(stage.name, done, metrics,
                                  learning_rate=float(self.schedule(step)),
                                  images_per_s=images_per_s)
                window_start, window_steps = time.perf_counter(), 0
            reporter.advance(1)
            if done % config.checkpoint_every == 0 or done == stage.steps:
                checkpoints.save(done, self.trainable, self.opt_state, iterator)
        reporter.end_stage()
        end, steady_steps = time.perf_counter(), stage.steps - start - 1
        return {"first_step_s": round(compile_s, 2), "train_s": round(end - began, 2),
                "images_per_s": round(steady_steps * config.batch_size
                                      / max(end - steady_start, 1e-9), 1)}
