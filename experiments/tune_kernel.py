"""Launch-plan experiments for the CUDA gspn_scan kernel (a GPU is required).

    python experiments/tune_kernel.py sweep [--out DIR]     # time every knob setting per case
    python experiments/tune_kernel.py one bwd 32,1152,64,64 1152 float32 1   # for ncu

`sweep` times the forward and the backward FFI targets (D = 1 and 4 at the two large shapes of
the benchmark) under the handler's tuning knobs, which it reads at every call:
CGSPN_CUDA_VS_FWD / CGSPN_CUDA_VS_BWD (vector lanes per block: the slab width) and
CGSPN_CUDA_P_FWD / CGSPN_CUDA_P_BWD (positions per thread), CGSPN_CUDA_PREFETCH_BWD (the
backward's L2 prefetch, 0 or 1), CGSPN_CUDA_FWD_SYNC=block and CGSPN_CUDA_BWD_SYNC=block (a
block barrier per line instead of the neighbour synchronisation), CGSPN_CUDA_TAIL_SPLIT (the
split factor of the last wave's slabs; 1: none). A knob the plan cannot honour
is ignored, so each row also records the plan the handler actually chose (printed by the
handler with CGSPN_CUDA_VERBOSE=1: registers and blocks per multiprocessor included). The
numbers choose the defaults of MakePlan in xla_ffi/gspn_cuda.cu; docs/kernel_notes.md has them.

`one` runs a few calls of one case, for `ncu -k regex:Gspn --launch-skip 2 --launch-count 1`.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import (DIRECTIONS, SHAPES, byte_floor, copy_bandwidth,  # noqa: E402
                          ffi_backward, make_sets, plan_lines, time_calls, waves_of)

from cgspn_jax import gspn_scan  # noqa: E402

CASES = [((32, 1152, 64, 64), G, dt, 1) for G in (1152, 72) for dt in ("float32", "bfloat16")]
CASES += [((8, 1152, 128, 128), G, dt, 1) for G in (1152, 72) for dt in ("float32", "bfloat16")]
CASES += [((32, 1152, 64, 64), 1152, "bfloat16", 4), ((8, 1152, 128, 128), 1152, "float32", 4)]
SETTINGS = [{}, {"CGSPN_CUDA_P_BWD": "1"}, {"CGSPN_CUDA_P_BWD": "2", "CGSPN_CUDA_VS_BWD": "4"},
            {"CGSPN_CUDA_P_BWD": "2", "CGSPN_CUDA_VS_BWD": "8"}, {"CGSPN_CUDA_VS_FWD": "2"},
            {"CGSPN_CUDA_VS_FWD": "4"}, {"CGSPN_CUDA_VS_FWD": "8"}]
# Slab widths (vector lanes per block) forced alone: with one block per multiprocessor, the
# number of blocks decides how full the last wave is.
SLAB_SETTINGS = [{}] + [{"CGSPN_CUDA_VS_FWD": str(v), "CGSPN_CUDA_VS_BWD": str(v)}
                        for v in (2, 4, 6, 8)]
# The backward's L2 prefetch forced off and on (the forward's is fixed by the storage type).
PREFETCH_SETTINGS = [{}, {"CGSPN_CUDA_PREFETCH_BWD": "0"}, {"CGSPN_CUDA_PREFETCH_BWD": "1"}]
# 3-lane slabs (48 bytes of bf16, 96 of float32): at 8x1152x128x128 bf16 the forward's 288
# blocks make 2.18 waves (two full, one of 18%); 384 blocks of 3 lanes make 2.91 waves of equal,
# lighter fill. Whether that pays is the question (docs/kernel_notes.md, next steps).
BALANCE_SETTINGS = [{}, {"CGSPN_CUDA_VS_FWD": "3"}, {"CGSPN_CUDA_VS_FWD": "3",
                                                     "CGSPN_CUDA_VS_BWD": "3",
                                                     "CGSPN_CUDA_P_BWD": "2"}]
# All 24 cases of the benchmark. The prefetch family needs D = 4 and the small shape: the 16-bit
# backward at D = 4 with 32-byte slabs ran twice as slow with the prefetch as without (v8
# against v7).
BENCH_CASES = [((B, C, H, W), G, dt, D) for (B, C, H, W) in SHAPES
               for G in (C, C // 16) for dt in ("float32", "bfloat16") for D in (1, 4)]
# The backward's neighbour synchronisation (mbarriers between neighbouring warps) against a
# block barrier per line, each with the plan's L2 prefetch rule, without and with the prefetch:
# the rule was measured with the block barrier. (The forward's synchronisation was measured the
# same way for v10.)
SYNC_SETTINGS = [dict(sync, **prefetch)
                 for prefetch in ({}, {"CGSPN_CUDA_PREFETCH_BWD": "0"},
                                  {"CGSPN_CUDA_PREFETCH_BWD": "1"})
                 for sync in ({}, {"CGSPN_CUDA_BWD_SYNC": "block"})]
# The tail split (SplitTail in xla_ffi/gspn_cuda.cu): the slabs of the partial last wave
# scanned by k blocks of 1/k the width each. Default (the plan's rule), off, and k = 2 and 4
# forced, at every D = 1 case (where the last wave is the largest share) and two D = 4 ones.
TAIL_SETTINGS = [{}] + [{"CGSPN_CUDA_TAIL_SPLIT": str(k)} for k in (1, 2, 4)]
TAIL_CASES = [c for c in BENCH_CASES if c[3] == 1] + [c for c in CASES if c[3] == 4]
# The small shape of the benchmark (8 x 192 x 128 x 128: fewer slabs than multiprocessors, so
# every plan is one partial wave): slab widths and positions per thread of both kernels.
SMALL_SETTINGS = [{}] + [{"CGSPN_CUDA_VS_FWD": str(v)} for v in (2, 4, 8)] + [
    {"CGSPN_CUDA_P_BWD": "1", "CGSPN_CUDA_VS_BWD": "2"},
    {"CGSPN_CUDA_P_BWD": "2", "CGSPN_CUDA_VS_BWD": "2"},
    {"CGSPN_CUDA_P_BWD": "2", "CGSPN_CUDA_VS_BWD": "4"},
    {"CGSPN_CUDA_P_BWD": "1", "CGSPN_CUDA_VS_BWD": "4"}]
SMALL_CASES = [c for c in BENCH_CASES if c[0][1] == 192]
# The 16-bit forward's L2 prefetch off, with the plan's slabs, 32-byte slabs, and 32-byte halves
# in the tail split (narrow slabs ran slower with the prefetch in the backward, v9).
FWD_PREFETCH_SETTINGS = [{}, {"CGSPN_CUDA_PREFETCH_FWD": "0"},
                         {"CGSPN_CUDA_VS_FWD": "2"},
                         {"CGSPN_CUDA_VS_FWD": "2", "CGSPN_CUDA_PREFETCH_FWD": "0"},
                         {"CGSPN_CUDA_TAIL_SPLIT": "2", "CGSPN_CUDA_PREFETCH_FWD": "0"}]
FWD_PREFETCH_CASES = [c for c in BENCH_CASES if c[2] == "bfloat16" and c[3] == 1]
FWD_PREFETCH_CASES += [c for c in SMALL_CASES if c[2] == "bfloat16" and c[3] == 4]
# The backward's block size (BwdMaxThreads, v16): instances with one position per thread take
# 384 or 512 threads. The plan's choice, the two-positions plans of 256 threads, and one
# position per thread at each slab width (lines of 64 positions: 4 lanes = 256 threads, 6 = 384,
# 8 = 512; of 128: 2 = 256, 3 = 384, 4 = 512; widths a block cannot hold are ignored).
BWD_THREADS_SETTINGS = [{}, {"CGSPN_CUDA_P_BWD": "2"}] + [
    {"CGSPN_CUDA_P_BWD": "1", "CGSPN_CUDA_VS_BWD": str(v)} for v in (2, 3, 4, 6, 8)]
# The float32 backward with one gate group per vector: the plan's choice against two positions
# per thread (256 threads), three times each, interleaved (run-to-run noise is up to 6% at
# D = 4), and the L2 prefetch forced off and on.
BWD512_SETTINGS = [{}, {"CGSPN_CUDA_P_BWD": "2"}, {"CGSPN_CUDA_PREFETCH_BWD": "0"},
                   {"CGSPN_CUDA_PREFETCH_BWD": "1"}, {}, {"CGSPN_CUDA_P_BWD": "2"}, {},
                   {"CGSPN_CUDA_P_BWD": "2"}]
BWD512_CASES = [c for c in BENCH_CASES if c[2] == "float32" and c[0][1] // c[1] == 16]
# The backward's neighbour synchronisation against a block barrier per line, with the plan's own
# prefetch rule, at every case: since v16 the backward's blocks hold up to 512 threads (16
# warps, more neighbours to wait for), which the sync family's measurement (v11) predates.
BWD_SYNC_SETTINGS = [{}, {"CGSPN_CUDA_BWD_SYNC": "block"}]
# Half vectors (HalfVector, v18: 4 channels of 8 bytes per thread) for 16-bit types, G = C and
# G = C / 16. The backward (G = C staged, 512-thread blocks; at D = 4 with the dx sum): half and
# whole vectors forced, narrower slabs (6 or 4 lanes; lanes a block cannot hold are ignored),
# the tail split and the L2 prefetch. The forward (blocks of up to 768 threads; by default where
# whole vectors fill few waves): half and whole forced, and slab widths of 8, 6 and 4 lanes.
_HALF_BWD = {"CGSPN_CUDA_HALF_BWD": "1"}
BWD_HALF_SETTINGS = [{}, {"CGSPN_CUDA_HALF_BWD": "0"}, _HALF_BWD] + [
    dict(_HALF_BWD, CGSPN_CUDA_VS_BWD=str(v)) for v in (6, 4)] + [
    dict(_HALF_BWD, CGSPN_CUDA_TAIL_SPLIT="2"), dict(_HALF_BWD, CGSPN_CUDA_PREFETCH_BWD="1"), {}]
BWD_HALF_CASES = [c for c in BENCH_CASES if c[2] != "float32" and (c[3] == 1 or c[1] == c[0][1])]
_HALF_FWD = {"CGSPN_CUDA_HALF_FWD": "1"}
FWD_HALF_SETTINGS = [{}, {"CGSPN_CUDA_HALF_FWD": "0"}, _HALF_FWD] + [
    dict(_HALF_FWD, CGSPN_CUDA_VS_FWD=str(v)) for v in (8, 6, 4)] + [{}]
FWD_HALF_CASES = [c for c in BENCH_CASES if c[2] != "float32"]
# Lines of 256 positions (no benchmark shape has them; 2K inputs at patch 8 do): the plan's
# choice (v21: the TMA forward with lines split between a cluster's two blocks where it applies,
# whole vectors elsewhere; two positions per thread in the backward), the register forward,
# split lines on the 128-position case too, and v20's plans (half vectors forced, one position
# per thread in the backward's 512-thread blocks).
LONG_SETTINGS = [{}, {"CGSPN_CUDA_TMA_FWD": "0"}, {"CGSPN_CUDA_TMA_SPLIT": "1"},
                 {"CGSPN_CUDA_TMA_FWD": "0", "CGSPN_CUDA_HALF_FWD": "1", "CGSPN_CUDA_P_BWD": "1"}]
LONG_CASES = [((4, 1152, 128, 256), G, dt, 1) for G in (1152, 72) for dt in ("float32", "bfloat16")]
LONG_CASES += [((2, 1152, 256, 256), 72, "bfloat16", 4), ((8, 1152, 128, 128), 72, "bfloat16", 1),
               ((4, 1152, 128, 256), 72, "float16", 1), ((16, 768, 96, 192), 48, "bfloat16", 4)]
# The TMA forward with split lines against the register forward at several wave counts (blocks
# over the 2 x SMs resident at once): 0.73, 1.45 (twice), 2.18 and 2.91.
SPLIT_SETTINGS = [{}, {"CGSPN_CUDA_TMA_FWD": "0"}]
SPLIT_CASES = [((B, 1152, H, 256), 72, "bfloat16", 4)
               for B, H in ((1, 256), (2, 256), (2, 128), (3, 128), (4, 256))]
# What made the split TMA forward slower at 2 x 1152 x 256 x 256 D = 4 (v21): the column lines'
# 590 KB position stride, or 256 steps per line? Rows alone against columns alone, one and two
# directions, TMA forced against the register forward (the plan declines columns this far apart).
STRIDE_SETTINGS = [{"CGSPN_CUDA_TMA_FWD": "1"}, {"CGSPN_CUDA_TMA_FWD": "0"}]
STRIDE_CASES = [((2, 1152, 256, 256), 72, "bfloat16", dirs)
                for dirs in ("tb", "lr", "tb-bt", "lr-rl")]
STRIDE_CASES += [((4, 1152, 128, 256), 72, "bfloat16", dirs) for dirs in ("tb", "lr")]
# The TMA backward (v22) against the register backward, forced on (it also takes lines of 64
# positions then) and off, twice, on the 16-bit cases with gate groups of 16 channels.
TMA_BWD_SETTINGS = [{"CGSPN_CUDA_TMA_BWD": "1"}, {"CGSPN_CUDA_TMA_BWD": "0"}] * 2 + [
    {"CGSPN_CUDA_TMA_BWD": "1", "CGSPN_CUDA_TMA_BWD_MODE": m} for m in ("1", "2", "3", "4", "5")]
TMA_BWD_CASES = [c for c in BENCH_CASES if c[2] == "bfloat16" and c[0][1] // c[1] == 16
                 and c[1] % 8 == 0] + [((8, 1152, 128, 128), 72, "float16", 1)]
# How full the GPU is, against the TMA kernels' speed (v24). 8 x 1152 x 128 x 128 bfloat16 G = 72
# runs 192 whole-line blocks at two per SM: 0.73 waves, 60 SMs with two blocks and 72 with one.
# The batch from 4 to 11 images (0.36 to 1.0 waves) says whether the time follows the bytes or
# the blocks per SM; lines split between a cluster's two blocks (2 x the blocks) spread the work
# wider; the backward's copies alone (mode 1) at each batch.
FILL_SETTINGS = [{}, {"CGSPN_CUDA_TMA_SPLIT": "1"},
                 {"CGSPN_CUDA_TMA_BWD": "1", "CGSPN_CUDA_TMA_BWD_MODE": "1"}, {}]
FILL_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (4, 6, 8, 11)]
FILL_CASES += [((8, 1152, 128, 128), 72, "float16", 1), ((8, 1152, 128, 128), 72, "bfloat16", 4),
               ((16, 768, 96, 96), 48, "bfloat16", 1)]
# The TMA copies' L2 promotion (CGSPN_CUDA_TMA_L2: none, the default since v24, 64, 128 or 256), on
# the whole kernels and on the backward's copies alone (mode 1): a 96-byte box row promoted to
# 256 bytes also fetches its neighbouring slabs' bytes, which pays only if their blocks read them
# while they are in L2.
_L2 = [{"CGSPN_CUDA_TMA_L2": v} for v in ("64", "128", "256")]
TMA_L2_SETTINGS = [{}] + _L2 + [dict(l2, CGSPN_CUDA_TMA_BWD="1", CGSPN_CUDA_TMA_BWD_MODE="1")
                                for l2 in [{}] + _L2] + [{}]
TMA_L2_CASES = [((8, 1152, 128, 128), 72, "bfloat16", D) for D in (1, 4)]
TMA_L2_CASES += [((16, 768, 96, 96), 48, "bfloat16", 1), ((4, 1152, 128, 256), 72, "bfloat16", 1)]
# The clusters' lockstep (v24: a cluster barrier per line, release and acquire; since v25 the
# backward's default has a relaxed arrive, family linesync) against a block barrier alone
# (CGSPN_CUDA_TMA_LOCKSTEP=0), with the copies unpromoted (the default since v24) and with the
# 256-byte L2 promotion under which v20's model measured the lockstep (0.41 ms against 0.68-0.73
# at 8 x 1152 x 128 x 128 bfloat16 G = 72): was its gain the neighbouring slabs' shared 256-byte
# granules, or their reading the same pixels' DRAM pages together? Split lines always keep it
# (the control).
_NO_LOCKSTEP = {"CGSPN_CUDA_TMA_LOCKSTEP": "0"}
LOCKSTEP_SETTINGS = [{}, _NO_LOCKSTEP, {"CGSPN_CUDA_TMA_L2": "256"},
                     dict(_NO_LOCKSTEP, CGSPN_CUDA_TMA_L2="256"), {}, _NO_LOCKSTEP]
LOCKSTEP_CASES = [((8, 1152, 128, 128), 72, "bfloat16", D) for D in (1, 4)]
LOCKSTEP_CASES += [((8, 1152, 128, 128), 72, "float16", 1), ((16, 768, 96, 96), 48, "bfloat16", 1),
                   ((4, 1152, 128, 256), 72, "bfloat16", 1)]
# Lockstep groups of 2, 4 or 8 neighbouring slabs (CGSPN_CUDA_TMA_CLUSTER; the forward's default
# is 2, the backward's 8 since v24): the lockstep family showed that its gain is the slabs
# reading the same pixels together, not shared L2 granules (without it the forward is 1.34x
# slower with no promotion at all).
_CLUSTER = [{"CGSPN_CUDA_TMA_CLUSTER": str(c)} for c in (2, 4, 8)]
CLUSTER_SETTINGS = _CLUSTER + _CLUSTER[:2]
CLUSTER_CASES = LOCKSTEP_CASES[:4]
# The TMA backward alone, in pairs, groups of 8 and of 4, interleaved, three times.
BWD_CLUSTER_SETTINGS = [_CLUSTER[0], _CLUSTER[2], _CLUSTER[1]] * 3
BWD_CLUSTER_CASES = [((8, 1152, 128, 128), 72, dt, 1) for dt in ("bfloat16", "float16")]
# The lockstep's line barrier (v25): a relaxed cluster arrive with a block barrier inside (the
# backward's default since v25) against release and acquire at cluster scope (the forward's;
# v20-v24's for both, whose MEMBAR.ALL.GPU held 40% of the TMA forward's stall samples); the TMA
# backward also forced where the plan declines it (D = 4, 96 positions). Split lines keep the
# cluster's (the control).
_RELAXED_SYNC = {"CGSPN_CUDA_TMA_LOCKSTEP": "1"}
_CLUSTER_SYNC = {"CGSPN_CUDA_TMA_LOCKSTEP": "2"}
_TMA_BWD = {"CGSPN_CUDA_TMA_BWD": "1"}
LINE_SYNC_SETTINGS = [_RELAXED_SYNC, _CLUSTER_SYNC, dict(_TMA_BWD, **_RELAXED_SYNC),
                      dict(_TMA_BWD, **_CLUSTER_SYNC), _RELAXED_SYNC, _CLUSTER_SYNC]
# The TMA forward's h as one bulk tensor store per line and block from the stage (the default
# since v26) against 16-byte stores from every thread (CGSPN_CUDA_TMA_FWD_BULK=0), with either
# line barrier: does the forward's preference for the release at cluster scope (v25) come from
# its h stores?
_THREAD_H = {"CGSPN_CUDA_TMA_FWD_BULK": "0"}
# Also the split lines (rows of 256), which store in bulk too since v26, and the TMA forced at
# 64 positions, where the plan keeps the register forward (v20, v24: TMA 0.454-0.510 ms against
# 0.375 at 32 x 1152 x 64 x 64 bfloat16 G = 72).
_TMA_FWD = {"CGSPN_CUDA_TMA_FWD": "1"}
FWD_BULK_SETTINGS = [_THREAD_H, {}, dict(_THREAD_H, **_RELAXED_SYNC), _RELAXED_SYNC,
                     _THREAD_H, {}, _TMA_FWD, dict(_TMA_FWD, **_THREAD_H)]
FWD_BULK_CASES = LOCKSTEP_CASES + [((32, 1152, 64, 64), 72, "bfloat16", 1)]
# The TMA forward's line barrier over the batch (v27): release and acquire at cluster scope (2)
# against the relaxed lockstep (1), each forced, and the plan's default, which turns relaxed
# once fewer than R blocks remain (R = 176 on an H100; 132 and 220 by the knob), twice
# interleaved. The first such sweep (family narrowfill of commit 4708fcd, with 24-channel slabs
# that were then dropped; docs/bench/tune_narrowfill_h100_v27.log) had the relaxed lockstep
# 19-23% faster at 2-6 images of 1152 x 128 x 128 and at 96 x 96, but 2-7% slower at 8-10.
_RELAX_BELOW = [{"CGSPN_CUDA_TMA_RELAX_BELOW": r} for r in ("132", "220")]
LINE_SYNC_FILL_SETTINGS = [_CLUSTER_SYNC, _RELAXED_SYNC, {}] + _RELAX_BELOW + \
    [_CLUSTER_SYNC, _RELAXED_SYNC, {}]
LINE_SYNC_FILL_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (4, 7, 8, 9, 12, 16)]
LINE_SYNC_FILL_CASES += [((B, 1152, 112, 112), 72, "bfloat16", 1) for B in (6, 8)]
LINE_SYNC_FILL_CASES += [((8, 1152, 128, 128), 72, "bfloat16", 4),
                         ((8, 1152, 128, 128), 72, "float16", 1),
                         ((16, 768, 96, 96), 48, "bfloat16", 1)]
# v28: which part of the release's GPU-wide memory barrier helps the TMA forward on a full GPU.
# Forced relaxed lines with a fence in the producer before its copies (PACE=1), in the
# consumers before the line barrier (2), or the producer asleep N ns (N >= 16); then the
# adaptive default with the same on its relaxed lines.
_PACES = [{"CGSPN_CUDA_TMA_PACE": p} for p in ("1", "2", "250", "500", "1000")]
PACE_SETTINGS = [{}, _CLUSTER_SYNC, _RELAXED_SYNC] + [{**_RELAXED_SYNC, **p} for p in _PACES] + \
    [_PACES[0], _PACES[3], {}, _CLUSTER_SYNC, _RELAXED_SYNC]
PACE_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (2, 8, 12)]
PACE_CASES += [((8, 1152, 128, 128), 72, "bfloat16", 4), ((16, 768, 96, 96), 48, "bfloat16", 1)]
# (v28 also timed two knobs removed after it, in 0e3431f and b0ec51f: the sleep only in blocks
# alone on their SM, or ahead of the running blocks' mean rate; the slabs rotated by image.)
# The sleep's length near 1 µs (1500 and 2000 ns ran alike: rounded to powers of two?).
PACE_FINE_SETTINGS = [{}, _RELAXED_SYNC] + \
    [{**_RELAXED_SYNC, "CGSPN_CUDA_TMA_PACE": p} for p in ("700", "900", "1000", "1100", "1300")]
PACE_FINE_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (7, 8)]
PACE_FINE_CASES += [((8, 1152, 112, 112), 72, "bfloat16", 1)]
# Where the clusters' blocks go (v28: the relaxed forward's slow blocks sat on particular SMs).
_POLICY = [{"CGSPN_CUDA_CLUSTER_POLICY": p} for p in ("1", "2")]
POLICY_SETTINGS = [{}, _RELAXED_SYNC] + [{**_RELAXED_SYNC, **p} for p in _POLICY] + _POLICY + \
    [{**_RELAXED_SYNC, "CGSPN_CUDA_TMA_PACE": "1000"}, {}, _RELAXED_SYNC]
POLICY_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (2, 8, 10, 12)]
POLICY_CASES += [((8, 1152, 128, 128), 72, "bfloat16", 4)]
# The sleep only on some SMs (v29): the SMs of the two 8-SM scheduling units that the cluster
# scheduler fills with two blocks per SM (sm_gpc_map on the v28-v29 H100s; PACE_SMS overrides),
# or only on all the others.
_SMALL_UNITS = os.environ.get("PACE_SMS", "0,1,16,17,32,33,48,49," +
                              ",".join(str(i) for i in range(124, 132)))
_OTHERS = ",".join(str(i) for i in range(132) if str(i) not in _SMALL_UNITS.split(","))
PACE_SMS_SETTINGS = [{}, _RELAXED_SYNC, {**_RELAXED_SYNC, "CGSPN_CUDA_TMA_PACE": "1000"}] + \
    [{**_RELAXED_SYNC, "CGSPN_CUDA_TMA_PACE": p, "CGSPN_CUDA_TMA_PACE_SMS": _SMALL_UNITS}
     for p in ("500", "1000", "2000")] + \
    [{**_RELAXED_SYNC, "CGSPN_CUDA_TMA_PACE": "1000", "CGSPN_CUDA_TMA_PACE_SMS": _OTHERS},
     {}, _RELAXED_SYNC]
PACE_SMS_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (8, 10)]
PACE_SMS_CASES += [((8, 1152, 112, 112), 72, "bfloat16", 1)]
# The grid's loose lockstep (v29): a block's copies of line u wait until every block has finished
# line u - n (CGSPN_CUDA_TMA_LEAD=n; at most CGSPN_CUDA_TMA_LEAD_WAIT ns).
_LEADS = [{"CGSPN_CUDA_TMA_LEAD": n} for n in ("3", "4", "6", "10")]
LEAD_SETTINGS = [{}, _RELAXED_SYNC, {**_RELAXED_SYNC, "CGSPN_CUDA_TMA_PACE": "1000"}] + \
    [{**_RELAXED_SYNC, **n} for n in _LEADS] + [_LEADS[1], {}, _RELAXED_SYNC] + \
    [{**_RELAXED_SYNC, **_LEADS[1], "CGSPN_CUDA_TMA_LEAD_WAIT": "1024"}]
LEAD_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (8, 10, 6)]
LEAD_CASES += [((8, 1152, 112, 112), 72, "bfloat16", 1), ((16, 768, 96, 96), 48, "bfloat16", 1)]
# The plan's rule (relaxed with a lead of kTmaLeadLines where the barrier would start with
# release, in one wave) against v27's adaptive barrier (LEAD=0) and other leads.
_V27 = {"CGSPN_CUDA_TMA_LEAD": "0"}
LEAD_RULE_SETTINGS = [{}, _V27] + [{**_RELAXED_SYNC, "CGSPN_CUDA_TMA_LEAD": n} for n in "46"] + \
    [{}, _V27]
LEAD_RULE_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (7, 8, 9, 10, 12)]
LEAD_RULE_CASES += [((8, 1152, 128, 128), 72, "float16", 1),
                    ((8, 1152, 112, 112), 72, "bfloat16", 1), ((2, 1152, 128, 128), 72, "bfloat16", 4)]
# The TMA backward's loose lockstep: the plan's (5 lines where one wave holds more than 4/3 SMs'
# worth of blocks) against none and other leads.
_BWD_NO_LEAD = {"CGSPN_CUDA_TMA_BWD_LEAD": "0"}
BWD_LEAD_SETTINGS = [{}, _BWD_NO_LEAD] + [{"CGSPN_CUDA_TMA_BWD_LEAD": n} for n in ("3", "8")] + \
    [{}, _BWD_NO_LEAD]
BWD_LEAD_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (7, 8, 10)]
BWD_LEAD_CASES += [((8, 1152, 128, 128), 72, "float16", 1),
                   ((8, 1152, 112, 112), 72, "bfloat16", 1)]
# The loose lockstep wave by wave (v30: the forward's default; CGSPN_CUDA_TMA_LEAD_WAVES=0 keeps
# it to calls of one wave, v29, where v27's adaptive barrier runs the rest) and the relaxed
# lockstep throughout. The backward's (CGSPN_CUDA_TMA_BWD_LEAD_WAVES=1; off by default) against
# none, and its groups of 8 where they take more waves than pairs (CGSPN_CUDA_TMA_CLUSTER=8).
_ONE_WAVE = {"CGSPN_CUDA_TMA_LEAD_WAVES": "0"}
LEAD_WAVES_SETTINGS = [{}, _ONE_WAVE, _RELAXED_SYNC, {}, _ONE_WAVE]
LEAD_WAVES_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (8, 12, 16)]
LEAD_WAVES_CASES += [((B, 1152, 128, 128), 72, "bfloat16", 4) for B in (4, 8)]
_BWD_WAVES = {"CGSPN_CUDA_TMA_BWD_LEAD_WAVES": "1"}
BWD_LEAD_WAVES_SETTINGS = [{}, _BWD_WAVES, {"CGSPN_CUDA_TMA_CLUSTER": "8"}, {}, _BWD_WAVES]
BWD_LEAD_WAVES_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (10, 11, 12, 16)]
# The partial last wave (v30's next lead): 11 images fill one wave of the TMA kernels, 12 add
# 24 blocks (48 for the backward's groups of 8) that take about as long as a full wave. The
# forward with lines split between a cluster's two blocks, relaxed throughout; the backward in
# pairs (264 + 24 blocks).
WAVE_TAIL_SETTINGS = [{}, {"CGSPN_CUDA_TMA_SPLIT": "1"}, _RELAXED_SYNC,
                      {"CGSPN_CUDA_TMA_CLUSTER": "2"}]
WAVE_TAIL_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (11, 12)]
# The TMA backward at D = 4 (forced: the plan keeps the register backward there, v22 measured
# the TMA form 1.4-1.6x slower) with its running dx sum prefetched into L2 2 lines ahead (v31,
# the default where D > 1), 4 lines ahead, and not at all (CGSPN_CUDA_TMA_BWD_ACC_L2=n), and
# loaded item by item (CGSPN_CUDA_TMA_BWD_ACC_ITEM=1), against the register backward (the
# plan's), each twice.
_ACC_L2 = [{**_TMA_BWD, "CGSPN_CUDA_TMA_BWD_ACC_L2": n} for n in ("0", "2", "4")]
_ACC_L2 += [{**_TMA_BWD, "CGSPN_CUDA_TMA_BWD_ACC_ITEM": "1"}]
ACC_L2_SETTINGS = [{}] + _ACC_L2 + [{}] + _ACC_L2
ACC_L2_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 4) for B in (8, 4, 11)]
ACC_L2_CASES += [((8, 1152, 128, 128), 72, "float16", 4), ((32, 1152, 64, 64), 72, "bfloat16", 4)]
# The item-by-item form (v31's faster one) over the batch, against the register backward: as
# v31 left it, and with the last item's carry in shared memory (v32,
# CGSPN_CUDA_TMA_BWD_CARRY_SMEM); each twice. (v32 also measured the sum's loads around L1,
# ld.global.cg: slower, 0.95-1.5x; removed.)
_BY_ITEM = {**_TMA_BWD, "CGSPN_CUDA_TMA_BWD_ACC_ITEM": "1"}
_CARRY = {**_BY_ITEM, "CGSPN_CUDA_TMA_BWD_CARRY_SMEM": "1"}
ACC_ITEM_SETTINGS = [{}, _BY_ITEM, _CARRY] * 2
ACC_ITEM_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 4) for B in (4, 6, 8, 11)]
ACC_ITEM_CASES += [((8, 1152, 128, 128), 72, "float16", 4),
                   ((32, 1152, 64, 64), 72, "bfloat16", 4),
                   ((8, 1152, 96, 96), 72, "bfloat16", 4)]
# v34: the TMA kernels' next copies issued earlier: the forward's lam and gates before the wait
# for the bulk store's read of the x box (the default since v34; CGSPN_CUDA_TMA_FWD_EARLY=0:
# with x, after that wait), the backward's dh and h as soon as the line barrier has passed
# (CGSPN_CUDA_TMA_BWD_EARLY=1), interleaved, three times. (v34 also measured the forward's lam
# and gates before the line barrier: 3-8% slower, removed.) Cases where the plans take the TMA
# kernels: 128 x 128 16-bit G = C / 16 over the batch, 96 x 96 (forward only).
EARLY_SETTINGS = [{"CGSPN_CUDA_TMA_FWD_EARLY": "0"}, {"CGSPN_CUDA_TMA_BWD_EARLY": "1"}] * 3
EARLY_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (4, 8, 11, 12)]
EARLY_CASES += [((8, 1152, 128, 128), 72, "float16", 1), ((8, 1152, 128, 128), 72, "bfloat16", 4),
                ((16, 768, 96, 96), 48, "bfloat16", 1)]
# The TMA forward's consumer warps, 6 of 4 items and 12 of 2 (CGSPN_CUDA_TMA_FWD_WARPS), beside
# the plan's choice (v36: 12 where the last wave fills at most 7/8 of a wave), twice, on cases
# where the plan takes the TMA forward: 1152 x 128 x 128 over the batch (2-12 images: 48-288
# blocks), D = 4, lines of 256 split between two blocks, 96 x 96. (v35-v36 also measured the
# TMA backward with 12 consumer warps in 4 spans of 32 positions: 47-76% slower.)
FWD_WARPS_SETTINGS = [{}, {"CGSPN_CUDA_TMA_FWD_WARPS": "6"},
                      {"CGSPN_CUDA_TMA_FWD_WARPS": "12"}] * 2
FWD_WARPS_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (2, 4, 8, 11, 12)]
FWD_WARPS_CASES += [((8, 1152, 128, 128), 72, "bfloat16", 4),
                    ((2, 1152, 128, 256), 72, "bfloat16", 1),
                    ((16, 768, 96, 96), 48, "bfloat16", 1)]
# v45: the TMA forward's even slabs (CGSPN_CUDA_TMA_FWD_SLABS=n slabs of 32 or 48 channels a
# line) against the plan's 48-channel slabs, twice. At 8 images 24 slabs are the plan's blocks
# through the even kernel (its own cost), 33 fill the wave (264 blocks: no multiprocessor left
# with one block), 36 (all 32 channels) spill into a second wave; -1 fills the wave whatever the
# batch. Over the batch (2-11 images), D = 4, 96 x 96. (docs/bench/tune_evenslabs_h200_v45.log)
EVEN_SLABS_SETTINGS = [{}] + [{"CGSPN_CUDA_TMA_FWD_SLABS": n} for n in ("24", "30", "33", "36",
                                                                          "-1")]
EVEN_SLABS_SETTINGS *= 2
EVEN_SLABS_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (8, 2, 4, 6, 7, 9, 10, 11)]
EVEN_SLABS_CASES += [((8, 1152, 128, 128), 72, "float16", 1),
                     ((2, 1152, 128, 128), 72, "bfloat16", 4),
                     ((16, 768, 96, 96), 48, "bfloat16", 1)]
# The rule v45 left to decide (run with v45's plan, whose default was the 48-channel slabs;
# docs/bench/tune_evenrule_h200_v46.log): slabs filling the wave (-1; all 32 channels wherever their
# blocks fit one wave of two a multiprocessor, else a mix of 32 and 48) against the default over
# channel counts and batches (filled waves of 144-264 blocks, 8 images the one mixed), and 30
# slabs at the benchmark's 8 images again; three times.
EVEN_RULE_SETTINGS = [{}, {"CGSPN_CUDA_TMA_FWD_SLABS": "-1"}] * 3
EVEN_RULE_SETTINGS += [{"CGSPN_CUDA_TMA_FWD_SLABS": "30"}]
EVEN_RULE_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (5, 6, 7, 8)]
EVEN_RULE_CASES += [((B, 768, 128, 128), 48, "bfloat16", 1) for B in (6, 8, 10)]
EVEN_RULE_CASES += [((B, 1536, 128, 128), 96, "bfloat16", 1) for B in (3, 4, 5)]
EVEN_RULE_CASES += [((6, 1152, 128, 128), 72, "float16", 1),
                    ((7, 1152, 112, 112), 72, "bfloat16", 1),
                    ((1, 1152, 128, 128), 72, "bfloat16", 4)]
# v46: the plan's rule of slabs (32 channels where 48 would leave some multiprocessors a pair
# and others one block, and 32 fill at most a wave of two a multiprocessor) against the 48-channel
# slabs (CGSPN_CUDA_TMA_FWD_SLABS=0), three times; one block a multiprocessor (-2: more, narrower
# lone blocks where the default leaves multiprocessors idle); the consumer warps forced each way
# (the rule's 216-264 blocks straddle the 7/8-wave line of v36's choice). Over channel counts,
# batches on both sides of the rule's bounds, two directions, float16, and lines of 96 and 112.
SLAB_RULE_SETTINGS = [{}, {"CGSPN_CUDA_TMA_FWD_SLABS": "0"}] * 3
SLAB_RULE_SETTINGS += [{"CGSPN_CUDA_TMA_FWD_SLABS": "-2"}, {"CGSPN_CUDA_TMA_FWD_WARPS": "6"},
                       {"CGSPN_CUDA_TMA_FWD_WARPS": "12"}]
SLAB_RULE_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (2, 4, 5, 6, 7, 8, 9)]
SLAB_RULE_CASES += [((B, 768, 128, 128), 48, "bfloat16", 1) for B in (6, 10, 11)]
SLAB_RULE_CASES += [((B, 1536, 128, 128), 96, "bfloat16", 1) for B in (4, 5)]
SLAB_RULE_CASES += [((7, 1152, 128, 128), 72, "float16", 1),
                    ((7, 1152, 112, 112), 72, "bfloat16", 1),
                    ((10, 768, 96, 96), 48, "bfloat16", 1),
                    ((3, 1152, 128, 128), 72, "bfloat16", "tb-lr"),
                    ((1, 1152, 128, 128), 72, "bfloat16", 4)]
# What v46 left as a knob: the multiprocessors filled with lone blocks (-2: as many slabs as one
# block a multiprocessor takes, mixed widths where they do not divide) where the plan's 48-channel
# blocks leave some idle, against the plan, three times. Over channels 128-1536 and 1-32 images.
# (The benchmark's 8 x 192 x 128 x 128 keeps the register forward: with G = 12, 3 G = 36 is not
# a multiple of 8; with G = C, groups of one channel.)
# (Run first on v46's build, whose plan left these calls their 48-channel slabs:
# docs/bench/tune_lonefill_h200_v46.log. Since v46b the plan fills the multiprocessors itself, so
# the family sets it against the 48-channel slabs.)
LONE_FILL_SETTINGS = [{}, {"CGSPN_CUDA_TMA_FWD_SLABS": "0"}] * 3
LONE_FILL_CASES = [((B, 128, 128, 128), 8, "bfloat16", 1) for B in (8, 32)]
LONE_FILL_CASES += [((16, 256, 128, 128), 16, "bfloat16", 1),
                    ((8, 384, 128, 128), 24, "bfloat16", 1),
                    ((4, 768, 128, 128), 48, "bfloat16", 1),
                    ((6, 768, 128, 128), 48, "bfloat16", 1)]
LONE_FILL_CASES += [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (1, 2, 3, 4)]
LONE_FILL_CASES += [((1, 1152, 128, 128), 72, "bfloat16", 4),
                    ((2, 1536, 128, 128), 96, "bfloat16", 1),
                    ((4, 1152, 128, 128), 72, "float16", 1)]
# v47: lone wide blocks (-3: slabs of 64 or 80 channels, one block a multiprocessor; 20 consumer
# warps, or 10) against the plan, three times, where the 48-channel blocks are more than the
# multiprocessors: the benchmark's 8 x 1152 (the plan's 48-channel slabs, 60 SMs a pair), 6 and 7
# images (the plan's pairs of 32), 9 images (one wave and a bit), 768 and 1536 channels, four
# directions, float16, lines of 112.
LONE_WIDE_SETTINGS = [{}, {"CGSPN_CUDA_TMA_FWD_SLABS": "-3"}] * 3
LONE_WIDE_SETTINGS += [{"CGSPN_CUDA_TMA_FWD_SLABS": "-3", "CGSPN_CUDA_TMA_FWD_WARPS": "10"}]
LONE_WIDE_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (6, 7, 8, 9)]
LONE_WIDE_CASES += [((12, 768, 128, 128), 48, "bfloat16", 1),
                    ((6, 1536, 128, 128), 96, "bfloat16", 1),
                    ((2, 1152, 128, 128), 72, "bfloat16", 4),
                    ((8, 1152, 128, 128), 72, "float16", 1),
                    ((8, 1152, 112, 112), 72, "bfloat16", 1)]
# v47's rule (lone wide blocks first where they fit a wave, then v46's pairs of 32) against the
# pairs (CGSPN_CUDA_TMA_FWD_LONE=0) and the 48-channel slabs, three times, over the calls where
# v46 took the pairs (1152, 768 and 1536 channels; lines of 96, 112, 128; two directions;
# float16) and the benchmark's 8 x 1152.
LONE_RULE_SETTINGS = [{}, {"CGSPN_CUDA_TMA_FWD_LONE": "0"}, {"CGSPN_CUDA_TMA_FWD_SLABS": "0"}] * 3
LONE_RULE_CASES = [((B, 1152, 128, 128), 72, "bfloat16", 1) for B in (6, 7, 8)]
LONE_RULE_CASES += [((B, 768, 128, 128), 48, "bfloat16", 1) for B in (10, 11)]
LONE_RULE_CASES += [((5, 1536, 128, 128), 96, "bfloat16", 1),
                    ((7, 1152, 128, 128), 72, "float16", 1),
                    ((7, 1152, 112, 112), 72, "bfloat16", 1),
                    ((10, 768, 96, 96), 48, "bfloat16", 1),
                    ((3, 1152, 128, 128), 72, "bfloat16", "tb-lr")]
# Each family: its knob settings, the cases it times and (optionally) which kernels: a family of
# backward knobs need not time the forward.
FAMILIES = {"plans": (SETTINGS, CASES), "slabs": (SLAB_SETTINGS, CASES),
            "prefetch": (PREFETCH_SETTINGS, BENCH_CASES),
            "balance": (BALANCE_SETTINGS, CASES), "sync": (SYNC_SETTINGS, BENCH_CASES),
            "tail": (TAIL_SETTINGS, TAIL_CASES), "small": (SMALL_SETTINGS, SMALL_CASES),
            "fwdprefetch": (FWD_PREFETCH_SETTINGS, FWD_PREFETCH_CASES),
            "bwdthreads": (BWD_THREADS_SETTINGS, BENCH_CASES, ("bwd",)),
            "bwd512": (BWD512_SETTINGS, BWD512_CASES, ("bwd",)),
            "bwdsync": (BWD_SYNC_SETTINGS, BENCH_CASES, ("bwd",)),
            "bwdhalf": (BWD_HALF_SETTINGS, BWD_HALF_CASES, ("bwd",)),
            "fwdhalf": (FWD_HALF_SETTINGS, FWD_HALF_CASES, ("fwd",)),
            "long": (LONG_SETTINGS, LONG_CASES),
            "split": (SPLIT_SETTINGS, SPLIT_CASES, ("fwd",)),
            "stride": (STRIDE_SETTINGS, STRIDE_CASES, ("fwd",)),
            "tmabwd": (TMA_BWD_SETTINGS, TMA_BWD_CASES, ("bwd",)),
            "fill": (FILL_SETTINGS, FILL_CASES),
            "tmal2": (TMA_L2_SETTINGS, TMA_L2_CASES),
            "lockstep": (LOCKSTEP_SETTINGS, LOCKSTEP_CASES),
            "cluster": (CLUSTER_SETTINGS, CLUSTER_CASES),
            "bwdcluster": (BWD_CLUSTER_SETTINGS, BWD_CLUSTER_CASES, ("bwd",)),
            "linesync": (LINE_SYNC_SETTINGS, LOCKSTEP_CASES),
            "fwdbulk": (FWD_BULK_SETTINGS, FWD_BULK_CASES, ("fwd",)),
            "early": (EARLY_SETTINGS, EARLY_CASES),
            "fwdwarps": (FWD_WARPS_SETTINGS, FWD_WARPS_CASES, ("fwd",)),
            "evenslabs": (EVEN_SLABS_SETTINGS, EVEN_SLABS_CASES, ("fwd",)),
            "evenrule": (EVEN_RULE_SETTINGS, EVEN_RULE_CASES, ("fwd",)),
            "slabrule": (SLAB_RULE_SETTINGS, SLAB_RULE_CASES, ("fwd",)),
            "lonefill": (LONE_FILL_SETTINGS, LONE_FILL_CASES, ("fwd",)),
            "lonewide": (LONE_WIDE_SETTINGS, LONE_WIDE_CASES, ("fwd",)),
            "lonerule": (LONE_RULE_SETTINGS, LONE_RULE_CASES, ("fwd",)),
            "accl2": (ACC_L2_SETTINGS, ACC_L2_CASES, ("bwd",)),
            "accitem": (ACC_ITEM_SETTINGS, ACC_ITEM_CASES, ("bwd",)),
            "linesyncfill": (LINE_SYNC_FILL_SETTINGS, LINE_SYNC_FILL_CASES, ("fwd",)),
            "pace": (PACE_SETTINGS, PACE_CASES, ("fwd",)),
            "pacefine": (PACE_FINE_SETTINGS, PACE_FINE_CASES, ("fwd",)),
            "pacesms": (PACE_SMS_SETTINGS, PACE_SMS_CASES, ("fwd",)),
            "lead": (LEAD_SETTINGS, LEAD_CASES, ("fwd",)),
            "leadrule": (LEAD_RULE_SETTINGS, LEAD_RULE_CASES, ("fwd",)),
            "bwdlead": (BWD_LEAD_SETTINGS, BWD_LEAD_CASES, ("bwd",)),
            "leadwaves": (LEAD_WAVES_SETTINGS, LEAD_WAVES_CASES, ("fwd",)),
            "bwdleadwaves": (BWD_LEAD_WAVES_SETTINGS, BWD_LEAD_WAVES_CASES, ("bwd",)),
            "wavetail": (WAVE_TAIL_SETTINGS, WAVE_TAIL_CASES),
            "policy": (POLICY_SETTINGS, POLICY_CASES),
            # The A/B alone where the TMA backward is the default (a short check after a change).
            "tmabwdab": (TMA_BWD_SETTINGS[:4],
                         [c for c in TMA_BWD_CASES if c[0][2] == 128 and c[3] == 1], ("bwd",))}
KNOBS = ("CGSPN_CUDA_VS_FWD", "CGSPN_CUDA_VS_BWD", "CGSPN_CUDA_P_FWD", "CGSPN_CUDA_P_BWD",
         "CGSPN_CUDA_PREFETCH_BWD", "CGSPN_CUDA_FWD_SYNC", "CGSPN_CUDA_BWD_SYNC",
         "CGSPN_CUDA_TAIL_SPLIT", "CGSPN_CUDA_TAIL_WAVE", "CGSPN_CUDA_PREFETCH_FWD",
         "CGSPN_CUDA_HALF_FWD", "CGSPN_CUDA_HALF_BWD", "CGSPN_CUDA_TMA_FWD",
         "CGSPN_CUDA_TMA_SPLIT", "CGSPN_CUDA_TMA_L2", "CGSPN_CUDA_TMA_LOCKSTEP",
         "CGSPN_CUDA_TMA_FWD_BULK", "CGSPN_CUDA_TMA_RELAX_BELOW", "CGSPN_CUDA_TMA_PACE",
         "CGSPN_CUDA_TMA_PACE_SMS", "CGSPN_CUDA_TMA_LEAD", "CGSPN_CUDA_TMA_LEAD_WAIT",
         "CGSPN_CUDA_TMA_BWD_LEAD", "CGSPN_CUDA_TMA_LEAD_WAVES", "CGSPN_CUDA_TMA_LEAD_WAVE",
         "CGSPN_CUDA_TMA_BWD_LEAD_WAVES", "CGSPN_CUDA_TMA_BWD_ACC_L2",
         "CGSPN_CUDA_TMA_BWD_ACC_ITEM", "CGSPN_CUDA_TMA_BWD_CARRY_SMEM",
         "CGSPN_CUDA_TMA_FWD_EARLY", "CGSPN_CUDA_TMA_BWD_EARLY", "CGSPN_CUDA_TMA_FWD_WARPS",
         "CGSPN_CUDA_TMA_FWD_SLABS", "CGSPN_CUDA_TMA_FWD_LONE",
         "CGSPN_CUDA_TMA_TRACE", "CGSPN_CUDA_CLUSTER_POLICY",
         "CGSPN_CUDA_TMA_CLUSTER", "CGSPN_CUDA_TMA_BWD", "CGSPN_CUDA_TMA_BWD_MODE",
         "CGSPN_CUDA_VERBOSE")


def knob_name(setting):
    return " ".join(f"{k.removeprefix('CGSPN_CUDA_')}={v}" for k, v in setting.items())


@contextlib.contextmanager
def knobs(setting):
    for key in KNOBS:
        os.environ.pop(key, None)
    os.environ.update(setting)
    try:
        yield
    finally:
        for key in KNOBS:
            os.environ.pop(key, None)


def directions_of(D):
    """A case's D: 1 or 4 (the benchmark's directions), or direction names joined by '-'."""
    return DIRECTIONS[D] if isinstance(D, int) else tuple(D.split("-"))


def case_fns(shape, G, dtype, D, chunk=None):
    """The case's FFI forward and backward, each with its arguments (the same seeded inputs at
    every call)."""
    B, C, H, W = shape
    directions = directions_of(D)
    sets = make_sets(B, C, H, W, G, len(directions), jnp.dtype(dtype), 1)
    kfwd = jax.jit(functools.partial(gspn_scan, directions=directions, chunk=chunk, backend="ffi"))
    h = kfwd(*sets[0][:3])
    kbwd = ffi_backward(directions, chunk=chunk)
    return (kfwd, sets[0][:3]), (kbwd, (*sets[0][:3], h, sets[0][3]))


def sweep(out: Path, settings, cases, kinds=("fwd", "bwd")):
    copy_bw, _ = copy_bandwidth()
    print(f"device {jax.devices()[0].device_kind}; copy {copy_bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    for shape, G, dtype, D in cases:
        (kfwd, fargs), (kbwd, bargs) = case_fns(shape, G, dtype, D)
        floors = byte_floor(*shape, G, len(directions_of(D)), jnp.dtype(dtype).itemsize)
        for setting in settings:
            with knobs(setting):
                row = dict(shape=shape, G=G, dtype=dtype, D=D, setting=setting)
                for kind, fn, args, floor in (("fwd", kfwd, fargs, floors[0]),
                                              ("bwd", kbwd, bargs, floors[1])):
                    if kind not in kinds:
                        continue
                    row[kind + "_plan"] = plan_lines(fn, args)
                    t, _ = time_calls(fn, [args], min_batch_s=0.02, reps=5)
                    row[kind + "_ms"] = 1e3 * t
                    row[kind + "_pct"] = 100 * floor / t / copy_bw
                rows.append(row)
                times = " | ".join(f"{k} {row[k + '_ms']:.3f} ms {row[k + '_pct']:.1f}%"
                                   for k in kinds)
                plans = " ".join(str(row[k + "_plan"][-1:]) for k in kinds)
                print(f"{'x'.join(map(str, shape))} G={G} {dtype} D={D} [{knob_name(setting)}] "
                      f"{times} | {plans}", flush=True)
        del kfwd, kbwd, fargs, bargs
        (out / "tune.json").write_text(json.dumps(dict(copy_bw=copy_bw, rows=rows), indent=1))
    # Best setting per case and kernel, and the default's time.
    print("\n| case | " + " | ".join(f"best {k} ms (%copy) | setting | default {k} ms"
                                    for k in kinds) + " |")
    print("|---|" + "---|---|---|" * len(kinds))
    name = lambda r: knob_name(r["setting"]) or "default"  # noqa: E731
    for shape, G, dtype, D in cases:
        mine = [r for r in rows if (r["shape"], r["G"], r["dtype"], r["D"]) == (shape, G, dtype, D)]
        cells = []
        for k in kinds:
            best = min(mine, key=lambda r: r[k + "_ms"])
            cells.append(f"{best[k + '_ms']:.3f} ({best[k + '_pct']:.1f}) | {name(best)} | "
                         f"{mine[0][k + '_ms']:.3f}")
        print(f"| {'×'.join(map(str, shape))} G={G} {dtype} D={D} | " + " | ".join(cells) + " |")


def batches(out: Path):
    """The same case at several batch sizes: if the partial last wave costs what a full one
    does, the time per image steps with ceil(waves), not with the batch."""
    copy_bw, _ = copy_bandwidth()
    rows = []
    for (C, H, W), G, dtype in [((1152, 64, 64), 1152, "bfloat16"), ((1152, 64, 64), 72, "float32"),
                                ((1152, 128, 128), 1152, "bfloat16")]:
        for B in ((28, 29, 30, 31, 32, 33, 34, 36) if H == 64 else (6, 7, 8, 9, 11, 12)):
            (kfwd, fargs), (kbwd, bargs) = case_fns((B, C, H, W), G, dtype, 1)
            floors = byte_floor(B, C, H, W, G, 1, jnp.dtype(dtype).itemsize)
            row = dict(shape=(B, C, H, W), G=G, dtype=dtype)
            for kind, fn, args, floor in (("fwd", kfwd, fargs, floors[0]),
                                          ("bwd", kbwd, bargs, floors[1])):
                plan = plan_lines(fn, args)[-1]
                t, _ = time_calls(fn, [args], min_batch_s=0.02, reps=5)
                row.update({kind + "_plan": plan, kind + "_ms": 1e3 * t,
                            kind + "_pct": 100 * floor / t / copy_bw,
                            kind + "_waves": waves_of(plan)})
            rows.append(row)
            print(f"{B}x{C}x{H}x{W} G={G} {dtype}: fwd {row['fwd_ms']:.3f} ms "
                  f"{row['fwd_pct']:.1f}% waves {row['fwd_waves']:.2f} | bwd {row['bwd_ms']:.3f} ms "
                  f"{row['bwd_pct']:.1f}% waves {row['bwd_waves']:.2f}", flush=True)
            del kfwd, kbwd, fargs, bargs
    (out / "batches.json").write_text(json.dumps(dict(copy_bw=copy_bw, rows=rows), indent=1))


def one(kind, shape, G, dtype, D, calls=4):
    (kfwd, fargs), (kbwd, bargs) = case_fns(shape, G, dtype, D)
    fn, args = (kfwd, fargs) if kind == "fwd" else (kbwd, bargs)
    print(plan_lines(fn, args), flush=True)
    for _ in range(calls):
        jax.block_until_ready(fn(*args))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--out", default=None)
    s.add_argument("--family", choices=sorted(FAMILIES), default="plans",
                   help="plans: positions per thread and slab widths; slabs: slab widths "
                        "alone; prefetch: the backward's L2 prefetch off and on (D = 1 and 4, "
                        "all three shapes); balance: 3-lane slabs; sync: the backward's "
                        "neighbour synchronisation against a block barrier; tail: the "
                        "split of the last wave's slabs; small: the plans of the small shape; "
                        "fwdprefetch: the 16-bit forward's L2 prefetch; bwdthreads: the "
                        "backward's blocks of more than 256 threads; bwdhalf, fwdhalf: the "
                        "16-bit G = C half vectors against whole ones; tmabwd: the TMA "
                        "backward's forms and partial modes; tmabwdab: TMA against register "
                        "backward where TMA is the default; fill: the TMA kernels against how full "
                        "the GPU is; tmal2: the TMA copies' L2 promotion; "
                        "lockstep: the TMA clusters' lockstep against a block barrier; "
                        "cluster, bwdcluster: lockstep groups of 4 "
                        "and 8 slabs; linesync: the lockstep's relaxed line barrier against "
                        "release and acquire; fwdbulk: the TMA forward's h as bulk stores; "
                        "linesyncfill: the TMA forward's line barriers over the batch; "
                        "pace: what the relaxed lines of the TMA forward add (fences, sleeps); "
                        "pacefine: its length near 1 µs; policy: the cluster scheduling "
                        "policy; pacesms: the sleep on some SMs only; lead: the grid's loose "
                        "lockstep; leadrule: its plan rule; bwdlead: the backward's; accl2, "
                        "accitem: the TMA backward's running dx sum at D = 4")
    b = sub.add_parser("batches")
    b.add_argument("--out", default=None)
    o = sub.add_parser("one")
    o.add_argument("kind", choices=("fwd", "bwd"))
    o.add_argument("shape", help="B,C,H,W")
    o.add_argument("G", type=int)
    o.add_argument("dtype")
    o.add_argument("D", type=int, choices=(1, 4))
    args = ap.parse_args()
    if args.cmd in ("sweep", "batches"):
        out = Path(args.out or f"runs/tune_kernel-{time.strftime('%Y%m%d-%H%M%S')}")
        out.mkdir(parents=True, exist_ok=True)
        if args.cmd == "sweep":
            sweep(out, *FAMILIES[args.family])
        else:
            batches(out)
    else:
        one(args.kind, tuple(int(v) for v in args.shape.split(",")), args.G, args.dtype, args.D)


if __name__ == "__main__":
    main()
