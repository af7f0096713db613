"""Makes the scan run per shard: batch- and channel-sharded inputs need no collectives.

The scan couples positions along H and W and across directions, never across batch elements or
gate groups. So a shard that holds whole images and whole gate groups computes its part alone.
`partition_per_shard` wraps the forward or backward computation in `custom_partitioning` with a
Shardy rule that says so; H, W, D and the 3 neighbours must stay replicated.

It also gives the wrapped computation a batching rule (`custom_vmap`) that folds vmapped axes
into B, so `jax.vmap` runs one kernel call rather than a loop of them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

# Operand and result layouts: "x" = [B, H, W, C], "dirs" = [D, B, H, W, C], "w" = [D, B, H, W, G, 3].
_LAYOUTS = {
    "fwd": (("x", "dirs", "w"), ("dirs",)),
    "bwd": (("x", "dirs", "w", "dirs", "dirs"), ("x", "dirs", "w")),
}
# Channels (c) and gate groups (g) are separate factors: `partition` shards them together only
# when every shard holds whole groups. (A compound factor "(g r)" would let Shardy split a
# sharding across g and r, which no mesh axis describes, and it takes no factor of size 1.)
_RULE_TERMS = {"x": "b i j c", "dirs": "d b i j c", "w": "d b i j g k"}
_BATCH_AXIS = {"x": 0, "dirs": 1, "w": 1}


def _spec(layout, batch, channel):
    return {
        "x": P(batch, None, None, channel),
        "dirs": P(None, batch, None, None, channel),
        "w": P(None, batch, None, None, channel, None),
    }[layout]


def _shard_count(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def partition_per_shard(run, kind: str):
    """Wraps ``run`` (the forward or backward on one shard) for batch/channel sharding and vmap."""
    operands, results = _LAYOUTS[kind]
    single = len(results) == 1

    @custom_partitioning
    def per_shard(*args):
        return run(*args)

    def partition(mesh, arg_shapes, result_shape):
        x = arg_shapes[0]
        groups = arg_shapes[2].shape[4]
        x_spec = tuple(x.sharding.spec) + (None,) * (4 - len(x.sharding.spec))
        batch, channel = x_spec[0], x_spec[3]
        if groups % _shard_count(mesh, channel):  # a shard must hold whole gate groups
            channel = None
        shard = lambda layout: NamedSharding(mesh, _spec(layout, batch, channel))
        arg_shardings = tuple(shard(l) for l in operands)
        result_shardings = shard(results[0]) if single else tuple(shard(l) for l in results)
        return mesh, run, result_shardings, arg_shardings

    rule = (", ".join(_RULE_TERMS[l] for l in operands) + " -> "
            + ", ".join(_RULE_TERMS[l] for l in results))
    per_shard.def_partition(partition=partition, sharding_rule=rule,
                            need_replication_factors=("i", "j", "d", "k"))

    @jax.custom_batching.custom_vmap
    def batched(*args):
        return per_shard(*args)

    @batched.def_vmap
    def fold_vmapped_axes(axis_size, in_batched, *args):
        # Broadcast unbatched operands, then merge the vmapped axis (leading) into B.
        folded = []
        for layout, arg, is_batched in zip(operands, args, in_batched):
            if not is_batched:
                arg = jnp.broadcast_to(arg, (axis_size, *arg.shape))
            b_axis = _BATCH_AXIS[layout] + 1
            arg = jnp.moveaxis(arg, 0, b_axis - 1)  # [..., N, B, ...]
            folded.append(arg.reshape(*arg.shape[: b_axis - 1], -1, *arg.shape[b_axis + 1 :]))
        outs = batched(*folded)
        outs = (outs,) if single else outs
        unfolded = []
        for layout, out in zip(results, outs):
            b_axis = _BATCH_AXIS[layout]
            out = out.reshape(*out.shape[:b_axis], axis_size, -1, *out.shape[b_axis + 1 :])
            unfolded.append(jnp.moveaxis(out, b_axis, 0))
        return (unfolded[0] if single else tuple(unfolded)), (True if single else (True,) * len(results))

    return batched
