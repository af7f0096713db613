"""Checkpoints: per-stage training state (orbax CheckpointManager) and exported models.

Training state, RUN/checkpoints/STAGE/STEP/: the stage's trainable parameters and AdamW state
("state", an orbax PyTree) and the grain iterator's position ("data", one JSON file per
process). Everything else a stage needs is rebuilt deterministically from the run's config and
the earlier stages' final checkpoints, so a resumed run continues bitwise where it stopped. The
training loop draws no random numbers of its own: data order and augmentation are functions of
the seed and the iterator position, which is saved.

Orbax writes each step into a temporary folder and renames it when complete; `latest_step` only
sees completed steps, and the manager deletes the oldest only after a newer one is complete. So
a save that fails or is killed leaves the last good checkpoint as it was; its leftovers are
removed when the next run opens the folder.

Exported models, RUN/teacher/ and RUN/student/: ``model.json`` (the encoder class and config,
the classes) and ``params/`` (encoder and classification head), written beside the old export
and swapped in (`files`). `load_model` checks the stored shapes against model.json before
restoring. A later run takes one as ``--teacher``.
"""
from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cgspn_jax.distill import files
from cgspn_jax.distill.config import DistillError
from cgspn_jax.distill.modules import Classifier, build_encoder, encoder_spec

MODEL_FILE = "model.json"
FORMAT = "cgspn-distill-model/1"


def _abstract(tree):
    """Shape, dtype and sharding of every array: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _flat_shapes(tree) -> dict[str, tuple]:
    """{"encoder/blocks/0/mlp/fc1/kernel": shape}: paths as strings, whether the keys were
    ints (a model's state) or strings (read back from a checkpoint)."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _replicated_everywhere():
    """A sharding that every process agrees on: a whole copy on each device."""
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), P())


class StageCheckpoints:
    """Checkpoints of one training stage, in ``directory``."""

    def __init__(self, directory: str, *, keep: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            # Synchronous: the step after a save must not race a half-written checkpoint, and
            # these states are small; an asynchronous save would only hide milliseconds.
            enable_async_checkpointing=False)
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trainable, opt_state, iterator) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
            data=grain.checkpoint.CheckpointSave(iterator)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, trainable, opt_state, iterator=None):
        """(trainable, opt_state) of ``step`` with the shardings of the given ones; restores
        ``iterator``'s position in place when given."""
        target = {"trainable": trainable, "opt_state": opt_state}
        items = {"state": ocp.args.StandardRestore(_abstract(target))}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored.state["trainable"], restored.state["opt_state"]

    def close(self) -> None:
        self.manager.close()


# ----------------------------------------------------------------------------- exported models


def save_model(path: str, encoder, classifier: Classifier, *, class_names: list[str],
               note: str = "") -> None:
    """Writes an encoder and its head to ``path``, replacing it whole: the new one is written
    beside it and swapped in (`files.swap_in`), so an interrupted export leaves the old one
    readable (by `load_model`, which also finds it where a crash between the swap's two renames
    left it). Every process of a multi-process run calls it (orbax writes the arrays together);
    process 0 alone touches the folders."""
    path = os.path.abspath(path)
    staging = path + files.STAGING_SUFFIX
    primary = jax.process_index() == 0
    if primary:
        files.staging_path(path, directory=True)
    multihost_utils.sync_global_devices("cgspn-distill: export staging ready")
    params = {"encoder": nnx.to_pure_dict(nnx.state(encoder, nnx.Param)),
              "classifier": nnx.to_pure_dict(nnx.state(classifier, nnx.Param))}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(staging, "params"), params)
        checkpointer.wait_until_finished()
    if primary:
        meta = {"format": FORMAT, "encoder": encoder_spec(encoder), "class_names": class_names,
                "num_classes": classifier.num_classes, "note": note}
        with open(os.path.join(staging, MODEL_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        files.swap_in(staging, path)
    multihost_utils.sync_global_devices("cgspn-distill: export done")


def read_model_meta(path: str) -> dict:
    meta_path = os.path.join(path, MODEL_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DistillError(f"{path} is not a model saved by cgspn-distill (no {MODEL_FILE}); "
                           f"pass RUN/teacher or RUN/student of an earlier run") from None
    except (OSError, json.JSONDecodeError) as error:
        raise DistillError(f"cannot read {meta_path}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DistillError(f"{meta_path}: not a {FORMAT} file")
    return meta


def load_model(path: str, dtype: str | None = None):
    """(encoder, classifier, meta) saved by `save_model`, computing in ``dtype`` if given (else
    as saved); DistillError if the stored arrays do not have the shapes model.json describes."""
    path = files.existing_version(path)
    meta = read_model_meta(path)
    spec = meta["encoder"]
    if dtype is not None:
        spec = {**spec, "overrides": {**spec["overrides"], "dtype": dtype}}
    try:
        encoder = nnx.eval_shape(lambda: build_encoder(spec, 0))
        classifier = nnx.eval_shape(lambda: Classifier(
            encoder.config.width, meta["num_classes"], rngs=nnx.Rngs(0)))
    except (KeyError, TypeError, ValueError) as error:
        raise DistillError(f"{path}/{MODEL_FILE}: cannot build its model: {error}") from None
    target = {"encoder": nnx.to_pure_dict(nnx.state(encoder, nnx.Param)),
              "classifier": nnx.to_pure_dict(nnx.state(classifier, nnx.Param))}
    params_path = os.path.join(os.path.abspath(path), "params")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(params_path).item_metadata
        except (FileNotFoundError, ValueError, OSError) as error:
            raise DistillError(f"{path}: cannot read its parameters: {error}") from None
        expected, found = _flat_shapes(target), _flat_shapes(dict(stored))
        if expected != found:
            differing = sorted(set(expected.items()) ^ set(found.items()))[:3]
            raise DistillError(f"{path}: stored parameters do not match the model in "
                               f"{MODEL_FILE} (e.g. {differing})")
        sharding = _replicated_everywhere()
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target)
        restored = checkpointer.restore(params_path, abstract)
    for module, key in ((encoder, "encoder"), (classifier, "classifier")):
        state = nnx.state(module, nnx.Param)
        nnx.replace_by_pure_dict(state, restored[key])
        nnx.update(module, state)
    return encoder, classifier, meta


def load_teacher_model(path: str, dtype: str):
    """(encoder, classifier or None) computing in ``dtype``: a model saved by `save_model` (with
    its head), or a pretrained ViT that `cgspn_jax.load_teacher` reads (Hugging Face SigLIP,
    big_vision .npz, `save_teacher` folder; no head for this data)."""
    saved = files.existing_version(path)
    if os.path.isdir(saved) and os.path.exists(os.path.join(saved, MODEL_FILE)):
        encoder, classifier, _ = load_model(saved, dtype)
        return encoder, classifier
    from cgspn_jax.teachers import load_teacher
    try:
        return load_teacher(path, dtype=jnp.dtype(dtype)), None
    except (OSError, ValueError, KeyError, TypeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DistillError(f"--teacher {path}: cannot load it: {message}") from None
