"""Line timelines of the TMA forward's blocks (an experiment, run on a GPU).

Each setting runs one call of the case with CGSPN_CUDA_TMA_TRACE set, so that every block's
producer records its multiprocessor (%smid), its start and end (%globaltimer, ns) and the clock
at the end of each line's barrier (clock64; all kept in trace_B<batch>.npz). From them: how many
blocks shared each block's multiprocessor, and per group (alone, or sharing) when blocks started
and ended and how long their lines took, early and late in the scan. The question
(docs/kernel_notes.md, v25-v28): why a GPU-scope fence, or a sleep, in each line makes the
forward faster while the GPU is full.

    python3 experiments/tma_trace.py --out runs/trace [--batch 8 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import jax
import jax.numpy as jnp

from cgspn_jax import gspn_scan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_kernel import knobs  # noqa: E402  (sets a setting's knobs, clears the others)

SETTINGS = {"default": {}, "v27": {"CGSPN_CUDA_TMA_LEAD": "0"},
            "release": {"CGSPN_CUDA_TMA_LOCKSTEP": "2"},
            "relaxed": {"CGSPN_CUDA_TMA_LOCKSTEP": "1"},
            "relaxed+fence": {"CGSPN_CUDA_TMA_LOCKSTEP": "1", "CGSPN_CUDA_TMA_PACE": "2"},
            "relaxed+sleep1000": {"CGSPN_CUDA_TMA_LOCKSTEP": "1", "CGSPN_CUDA_TMA_PACE": "1000"},
            "relaxed+sleep2000": {"CGSPN_CUDA_TMA_LOCKSTEP": "1", "CGSPN_CUDA_TMA_PACE": "2000"},
            "relaxed+spread": {"CGSPN_CUDA_TMA_LOCKSTEP": "1", "CGSPN_CUDA_CLUSTER_POLICY": "1"},
            "relaxed+balance": {"CGSPN_CUDA_TMA_LOCKSTEP": "1", "CGSPN_CUDA_CLUSTER_POLICY": "2"},
            # v45: 33 even slabs a line (264 blocks of 32 and 48 channels at 8 images of
            # 1152), and as many as fill the wave
            "even33": {"CGSPN_CUDA_TMA_FWD_SLABS": "33"},
            "fill": {"CGSPN_CUDA_TMA_FWD_SLABS": "-1"},
            # v46: the 48-channel slabs ("default" is the plan's, its slabs of 32 where v46's
            # rules take them)
            "slabs48": {"CGSPN_CUDA_TMA_FWD_SLABS": "0"},
            # v47: the pairs of 32 in place of the lone wide blocks the plan takes first
            "pairs": {"CGSPN_CUDA_TMA_FWD_LONE": "0"}}


def read_trace(path: Path):
    """(smid, start ns, end ns, line ends in ns from the block's start) per block."""
    raw = np.fromfile(path, dtype=np.int64)
    blocks, words = int(raw[0]), int(raw[1])
    t = raw[2:].reshape(blocks, words).astype(np.float64)
    smid, g0, g1, c0, lines = t[:, 0].astype(int), t[:, 1], t[:, 2], t[:, 3], t[:, 4:]
    # Cycles to ns: one rate for the call (the clocks of all SMs run together).
    rate = np.median((lines[:, -1] - c0) / np.maximum(g1 - g0, 1.0))
    return smid, g0, g1, (lines - c0[:, None]) / rate


def sharing(smid, g0, g1):
    """For each block, the most blocks that ran on its multiprocessor at once during its life."""
    n = np.ones(len(smid), int)
    for i in range(len(smid)):
        same = np.flatnonzero((smid == smid[i]) & (g0 < g1[i]) & (g1 > g0[i]))
        n[i] = max(n[i], len(same))
    return n


def summarise(smid, g0, g1, ends):
    t0 = g0.min()
    shared = sharing(smid, g0, g1)
    period = np.diff(ends, axis=1)
    T = ends.shape[1]
    rows = {}
    for k in sorted(set(shared)):
        sel = shared == k
        rows[f"{k} on its SM"] = dict(
            blocks=int(sel.sum()), start_us=float(np.median(g0[sel] - t0) / 1e3),
            end_us=float(np.median(g1[sel] - t0) / 1e3),
            last_end_us=float((g1[sel] - t0).max() / 1e3),
            line_ns_early=float(np.median(period[sel, : T // 4])),
            line_ns_late=float(np.median(period[sel, -T // 4:])))
    # Stragglers (v28): SMs holding two blocks whose last block ends more than 6% after the
    # median end of the blocks that share an SM.
    two = shared == 2
    late = 1.06 * np.median(g1[two] - t0) if two.any() else np.inf
    slow = sorted({int(s) for s, e, k in zip(smid, g1 - t0, shared) if k == 2 and e > late})
    return dict(span_us=float((g1.max() - t0) / 1e3), groups=rows, slow_sms=slow), shared


def run(shape, G, dtype, out: Path, settings):
    B, C, H, W = shape
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(ks[0], (B, H, W, C)).astype(dtype)
    lam = jax.random.uniform(ks[1], (1, B, H, W, C), minval=0.5, maxval=1.5).astype(dtype)
    w = jax.random.normal(ks[2], (1, B, H, W, G, 3)).astype(dtype)
    fwd = jax.jit(lambda x, lam, w: gspn_scan(x, lam, w, directions=("tb",), backend="ffi"))
    results, curves, raw = {}, {}, {}
    for name in settings:
        with knobs(SETTINGS[name]):
            for _ in range(3):  # warm-up, untraced
                fwd(x, lam, w).block_until_ready()
        path = out / f"trace_B{B}_{name}.bin"
        with knobs({**SETTINGS[name], "CGSPN_CUDA_TMA_TRACE": str(path)}):
            fwd(x, lam, w).block_until_ready()
        smid, g0, g1, ends = read_trace(path)
        results[name], shared = summarise(smid, g0, g1, ends)
        curves[name] = (g0 - g0.min(), ends, shared)
        raw.update({f"{name}/smid": smid, f"{name}/start": g0, f"{name}/end": g1,
                    f"{name}/lines": ends.astype(np.float32)})
        path.unlink()
    np.savez_compressed(out / f"trace_B{B}.npz", **raw)
    return results, curves


def plot(curves, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), sharey=True,
                             squeeze=False)
    for ax, (name, (start, ends, shared)) in zip(axes[0], curves.items()):
        lines = np.arange(1, ends.shape[1] + 1)
        for i in range(len(start)):
            ax.plot((start[i] + ends[i]) / 1e3, lines, lw=0.4, alpha=0.5,
                    color="tab:blue" if shared[i] == 1 else "tab:red")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("µs from the first block's start")
    axes[0][0].set_ylabel("lines done (blue: alone on its SM, red: sharing)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/trace")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for B in args.batch:
        shape = (B, 1152, 128, 128)
        results, curves = run(shape, 72, jnp.bfloat16, out, args.settings)
        summary[f"B={B}"] = results
        plot(curves, out / f"tma_trace_B{B}.png",
             f"{B}×1152×128×128 bfloat16 G = 72, TMA forward")
        print(f"\n{B}×1152×128×128 bfloat16 G = 72: span µs; per group: blocks, median start / "
              "end / last end µs, median line ns (first / last quarter)")
        for name, r in results.items():
            cells = "; ".join(
                f"{g}: {v['blocks']} blk, {v['start_us']:.1f}/{v['end_us']:.1f}/"
                f"{v['last_end_us']:.1f} µs, {v['line_ns_early']:.0f}/{v['line_ns_late']:.0f} ns"
                for g, v in r["groups"].items())
            print(f"{name:18s} {r['span_us']:7.1f} | {cells}")
            if r["slow_sms"]:
                print(f"{'':18s} slow SMs (two blocks, > 1.06 x the median end): {r['slow_sms']}")
    (out / "tma_trace.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
