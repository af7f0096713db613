"""Device mesh and shardings of a distillation run.

A 2D `Mesh` with axes ("data", "fsdp"), of mesh_data x mesh_fsdp devices:
- the batch is split over both axes: "fsdp" is data parallelism too, whose replicas hold only a
  slice of the parameters (ZeRO-3 / FSDP), so every device computes a different part of the
  batch;
- every parameter, and its AdamW moments, is split over "fsdp" along its largest axis that the
  fsdp size divides (replicated if none does). XLA all-gathers a parameter where a layer needs it
  whole and reduce-scatters its gradient.

The same code runs on one device (a 1 x 1 mesh), on several devices of one process, and on
several processes (hosts) after `jax.distributed.initialize()`: each process feeds its own slice
of the global batch (`put_batch`) and `jax.jit` sees global arrays.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cgspn_jax.distill.config import ConfigError, DistillConfig

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


def initialize_distributed() -> None:
    """`jax.distributed.initialize()`, before any other JAX call. On SLURM, Open MPI,
    Kubernetes (JobSet) and Cloud TPU it finds the coordinator, the process count and this
    process's id itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process's environment."""
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(num_processes=int(count) if count else None,
                                   process_id=int(index) if index else None)
    except (ValueError, RuntimeError) as error:
        raise ConfigError(f"--distributed: jax.distributed.initialize() failed: {error}") \
            from None


def make_mesh(config: DistillConfig) -> Mesh:
    """The ("data", "fsdp") mesh of ``config``; mesh_data = 0 takes all devices."""
    count = jax.device_count()
    fsdp = config.mesh_fsdp
    data = config.mesh_data or count // fsdp
    if data < 1 or data * fsdp > count:
        raise ConfigError(f"--mesh-data {data} x --mesh-fsdp {fsdp} needs {data * fsdp} devices, "
                          f"{count} available")
    if jax.process_count() > 1 and data * fsdp != count:
        raise ConfigError(f"a multi-process run must use all {count} devices; --mesh-data "
                          f"{data} x --mesh-fsdp {fsdp} = {data * fsdp}")
    if config.batch_size % (data * fsdp):
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by the "
                          f"{data * fsdp} devices of the mesh")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by the "
                          f"{jax.process_count()} processes")
    devices = np.asarray(jax.devices()[:data * fsdp]).reshape(data, fsdp)
    return Mesh(devices, AXES)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shards the largest axis that ``fsdp`` divides (the first of equals); replicated else."""
    if fsdp == 1:
        return P()
    candidates = [(size, -axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    _, negative_axis = max(candidates)
    spec = [None] * len(shape)
    spec[-negative_axis] = "fsdp"
    return P(*spec)


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for every array of ``tree`` (parameters or optimizer state)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp)),
                        tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch -> global arrays sharded over the batch axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def local_batch_size(config: DistillConfig) -> int:
    return config.batch_size // jax.process_count()
