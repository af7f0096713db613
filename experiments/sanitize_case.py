"""A small odd-sized gspn_scan call on the GPU, forward and backward, for compute-sanitizer.

Run as `compute-sanitizer --tool memcheck python experiments/sanitize_case.py` (and racecheck).
Sizes are odd so that tiles are not full: C = 12 (scalar path, group lanes that need the second
launch), C = 40 (16-byte vectors, partial last slab), C = 24 with G = 12 (two groups per vector),
H != W, chunked and global, all three dtypes; and lines of 127 positions with the backward's
slab forced to 4 or 3 lanes, so that its wide blocks (BwdMaxThreads: 508 or 381 threads of 512
or 384) run with a partial last slab; the same with G = C and one direction, whose 16-bit
backward takes half vectors (4 channels of 8 bytes per thread) in wide blocks that stage their
inputs through shared memory (BwdStaged: cp.async into per-thread slots), as does its forward
(in blocks of up to 768 threads). G = 5 with C = 40 gives 16-bit vectors one gate group each, whose
forward loads a group's gates as a pair and a single element (GatePack): odd G changes the pair's
position from pixel to pixel, and the last group of the call ends the gate buffer. C = 64 with
G = 8, forced onto the TMA forward (CGSPN_CUDA_TMA_FWD=1; 16-bit only): row and column lines,
a partial last slab (48 + 16 channels) whose tensor-map boxes run past C and past the gates; and
the same with lines split between a cluster's two blocks (CGSPN_CUDA_TMA_SPLIT=1: odd lines of 5
and 71 positions, whose second halves' boxes run past the line), which read each other's shared
memory. Their h goes out as bulk tensor stores where the call's column lines are even (rows of 71
and columns of 6: the rows' second-half boxes run past W), else from every thread (columns of
5); and without the unsplit kernel's bulk stores (CGSPN_CUDA_TMA_FWD_BULK=0); and with its line
barrier turning relaxed partway (CGSPN_CUDA_TMA_RELAX_BELOW), or relaxed with the blocks on each
producer asleep before its copies (CGSPN_CUDA_TMA_PACE, an experiment's knob), or relaxed in the
grid's loose lockstep (CGSPN_CUDA_TMA_LEAD), also in waves of 2 blocks
(CGSPN_CUDA_TMA_LEAD_WAVE). The TMA backward
forced (CGSPN_CUDA_TMA_BWD=1): C = 64 with G = 8 (a partial slab, three directions with the
running dx sum) and C = 128 with G = 8 (groups of 16 channels, three slabs, so that a cluster's
two blocks belong to different images; and with B = 8, clusters of eight); its running dx
sum prefetched into L2 by the producer (the default since v31), that prefetch's ranges read
instead (CGSPN_CUDA_TMA_BWD_MODE=6: memcheck need not check a prefetch) and no prefetch
(CGSPN_CUDA_TMA_BWD_ACC_L2=0); the sum loaded item by item (CGSPN_CUDA_TMA_BWD_ACC_ITEM=1), and
so with the last item's carry in shared memory (v32). The TMA kernels' next copies issued
early (v34): the forward's lam and gates before its bulk store has read the x box (the
default; and without, CGSPN_CUDA_TMA_FWD_EARLY=0), the backward's dh and h before the stage
is handed back (CGSPN_CUDA_TMA_BWD_EARLY=1). The TMA forward's consumer warps: 12 (v36: the
plan's where the last wave is at most 7/8 full, as in every small case here) and 6 (forced,
CGSPN_CUDA_TMA_FWD_WARPS=6). Even slabs (v45) and lone wide blocks (v47: slabs of 64 and 80
channels, one block a multiprocessor; CGSPN_CUDA_TMA_FWD_SLABS=-3) in the forward.
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cgspn_jax import gspn_scan  # noqa: E402

CASES = [((1, 5, 7, 12), 4, ("tb", "rl"), {}), ((2, 3, 9, 40), 10, ("lr", "bt", "tb", "rl"), {}),
         ((1, 7, 5, 24), 12, ("bt", "lr"), {}),
         ((1, 3, 127, 40), 5, ("tb",), {"CGSPN_CUDA_VS_BWD": "4"}),
         ((1, 3, 127, 40), 5, ("bt", "tb"), {"CGSPN_CUDA_VS_BWD": "4"}),
         ((1, 3, 127, 40), 5, ("bt", "tb"), {"CGSPN_CUDA_VS_BWD": "3"}),
         ((1, 3, 127, 40), 40, ("tb",), {"CGSPN_CUDA_VS_BWD": "4"}),
         ((1, 3, 127, 40), 40, ("bt",), {"CGSPN_CUDA_VS_BWD": "4"}),
         ((1, 4, 127, 40), 40, ("tb",), {"CGSPN_CUDA_VS_BWD": "4"}),  # even T: ends on r1
         # Half vectors (HalfVector) by the plan's own choice, forward and backward, with partial
         # last slabs; also at D = 2 (forced: the backward with the dx sum).
         ((1, 3, 127, 40), 40, ("bt",), {}), ((1, 4, 61, 40), 40, ("bt",), {}),
         ((1, 4, 61, 40), 40, ("tb", "lr"), {"CGSPN_CUDA_HALF_FWD": "1",
                                             "CGSPN_CUDA_HALF_BWD": "1"}),
         ((1, 5, 72, 64), 8, ("tb", "lr"), {"CGSPN_CUDA_TMA_FWD": "1"}),
         ((1, 5, 72, 64), 8, ("bt", "rl"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_FWD_BULK": "0"}),
         ((1, 5, 71, 64), 8, ("tb", "rl"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_SPLIT": "1"}),
         ((2, 6, 71, 64), 8, ("bt", "lr"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_SPLIT": "1"}),
         # The TMA forward's line barrier turning relaxed after the sixth of 8 blocks finished.
         ((2, 5, 100, 64), 8, ("tb", "lr"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_RELAX_BELOW": "2"}),
         # Relaxed, with its experiment knob that puts the producer to sleep before its copies.
         ((2, 5, 100, 64), 8, ("bt", "rl"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_LOCKSTEP": "1",
           "CGSPN_CUDA_TMA_PACE": "300"}),
         # The grid's loose lockstep (experiment knob), its blocks 2 lines apart at most.
         ((2, 5, 100, 64), 8, ("tb", "rl"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_LOCKSTEP": "1", "CGSPN_CUDA_TMA_LEAD": "4"}),
         ((2, 5, 100, 64), 8, ("bt", "lr"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_LEAD": "3", "CGSPN_CUDA_TMA_LEAD_WAVE": "2"}),
         ((1, 5, 72, 64), 8, ("tb", "lr", "rl"), {"CGSPN_CUDA_TMA_BWD": "1"}),
         ((2, 7, 9, 128), 8, ("bt", "rl"), {"CGSPN_CUDA_TMA_BWD": "1"}),
         ((8, 5, 9, 128), 8, ("tb", "lr"), {"CGSPN_CUDA_TMA_BWD": "1"}),
         # The TMA backward in the grid's loose lockstep (experiment knob), with the dx sum.
         ((2, 7, 9, 128), 8, ("tb", "rl"),
          {"CGSPN_CUDA_TMA_BWD": "1", "CGSPN_CUDA_TMA_BWD_LEAD": "3"}),
         ((2, 7, 9, 128), 8, ("lr", "bt"),
          {"CGSPN_CUDA_TMA_BWD": "1", "CGSPN_CUDA_TMA_BWD_LEAD": "2",
           "CGSPN_CUDA_TMA_LEAD_WAVE": "2"}),
         ((1, 5, 72, 64), 8, ("rl", "tb"),
          {"CGSPN_CUDA_TMA_BWD": "1", "CGSPN_CUDA_TMA_BWD_ACC_L2": "0"}),
         ((2, 7, 9, 128), 8, ("tb", "lr", "bt"),
          {"CGSPN_CUDA_TMA_BWD": "1", "CGSPN_CUDA_TMA_BWD_MODE": "6",
           "CGSPN_CUDA_TMA_BWD_ACC_L2": "5"}),
         ((1, 5, 72, 64), 8, ("bt", "lr"),
          {"CGSPN_CUDA_TMA_BWD": "1", "CGSPN_CUDA_TMA_BWD_ACC_ITEM": "1"}),
         # The last item's carry in shared memory: lines of 53 and 72 positions reach item
         # KI - 1 (from position 48 on), where that carry is read.
         ((1, 53, 72, 128), 8, ("lr", "tb", "rl"),
          {"CGSPN_CUDA_TMA_BWD": "1", "CGSPN_CUDA_TMA_BWD_ACC_ITEM": "1",
           "CGSPN_CUDA_TMA_BWD_CARRY_SMEM": "1"}),
         # v34: the forward's lam and gates copied only with x, after the bulk store has read
         # the x box (the form before v34's default); the backward's dh and h copied before
         # the stage is handed back: row and column lines, the dx sum, chunks (lines that copy
         # no h).
         ((1, 5, 72, 64), 8, ("bt", "lr"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_FWD_EARLY": "0"}),
         ((1, 53, 72, 128), 8, ("bt", "lr", "tb"),
          {"CGSPN_CUDA_TMA_BWD": "1", "CGSPN_CUDA_TMA_BWD_EARLY": "1"}),
         # The TMA forward with 6 consumer warps of 4 items: small calls take 12 since v36.
         ((2, 5, 100, 64), 8, ("tb", "lr"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_FWD_WARPS": "6"}),
         ((1, 5, 71, 64), 8, ("bt", "lr"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_SPLIT": "1",
           "CGSPN_CUDA_TMA_FWD_WARPS": "6"}),
         # v45: the TMA forward's even slabs of 32 and 48 channels (C = 128: 2 + 3 + 3 units),
         # row and column lines, under both warp counts, clusters across directions (H = W), and
         # with per-thread h stores.
         ((2, 5, 72, 128), 16, ("tb", "lr"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_FWD_SLABS": "3"}),
         ((1, 9, 9, 128), 16, ("bt", "rl"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_FWD_SLABS": "3",
           "CGSPN_CUDA_TMA_FWD_WARPS": "6", "CGSPN_CUDA_TMA_FWD_BULK": "0"}),
         # v47: lone wide blocks (GspnFwdTmaLoneKernel), slabs of 64 and 80 channels (C = 576
         # in 8 slabs: 16 lines take the clamp's fewest; gate groups of 8, boxes starting inside
         # a group), rows beside column lines of another length, both warp counts, and
         # per-thread h stores.
         ((8, 5, 72, 576), 72, ("tb", "lr"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_FWD_SLABS": "-3"}),
         ((8, 72, 9, 576), 72, ("bt", "rl"),
          {"CGSPN_CUDA_TMA_FWD": "1", "CGSPN_CUDA_TMA_FWD_SLABS": "-3",
           "CGSPN_CUDA_TMA_FWD_WARPS": "10", "CGSPN_CUDA_TMA_FWD_BULK": "0"})]
KNOBS = ("CGSPN_CUDA_VS_BWD", "CGSPN_CUDA_HALF_FWD", "CGSPN_CUDA_HALF_BWD", "CGSPN_CUDA_TMA_FWD",
         "CGSPN_CUDA_TMA_SPLIT", "CGSPN_CUDA_TMA_BWD", "CGSPN_CUDA_TMA_FWD_BULK",
         "CGSPN_CUDA_TMA_RELAX_BELOW", "CGSPN_CUDA_TMA_LOCKSTEP", "CGSPN_CUDA_TMA_PACE",
         "CGSPN_CUDA_TMA_LEAD", "CGSPN_CUDA_TMA_BWD_LEAD", "CGSPN_CUDA_TMA_LEAD_WAVE",
         "CGSPN_CUDA_TMA_TRACE", "CGSPN_CUDA_TMA_BWD_ACC_L2", "CGSPN_CUDA_TMA_BWD_MODE",
         "CGSPN_CUDA_TMA_BWD_ACC_ITEM", "CGSPN_CUDA_TMA_BWD_CARRY_SMEM",
         "CGSPN_CUDA_TMA_FWD_EARLY", "CGSPN_CUDA_TMA_BWD_EARLY", "CGSPN_CUDA_TMA_FWD_WARPS",
         "CGSPN_CUDA_TMA_FWD_SLABS", "CGSPN_CUDA_TMA_FWD_LONE")

for (B, H, W, C), G, dirs, knobs in CASES:
    for key in KNOBS:  # the handler reads its knobs at every call
        os.environ.pop(key, None)
    os.environ.update(knobs)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        for chunk in (None, 2):
            D = len(dirs)
            k = jax.random.split(jax.random.PRNGKey(B * 1000 + C), 4)
            x = jax.random.normal(k[0], (B, H, W, C)).astype(dtype)
            lam = jax.random.uniform(k[1], (D, B, H, W, C), minval=0.5, maxval=1.5).astype(dtype)
            w = jax.random.normal(k[2], (D, B, H, W, G, 3)).astype(dtype)
            dh = jax.random.normal(k[3], (D, B, H, W, C)).astype(dtype)
            scan = functools.partial(gspn_scan, directions=dirs, chunk=chunk, backend="ffi")
            h, vjp = jax.vjp(scan, x, lam, w)
            grads = vjp(dh)
            jax.block_until_ready((h, grads))
            print("ok", (B, H, W, C), G, dirs, jnp.dtype(dtype).name, chunk, flush=True)
print("sanitize_case done")
