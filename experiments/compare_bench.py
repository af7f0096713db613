"""Two runs of experiments/bench_kernel.py side by side: per case, forward and backward time of
each and their ratio, then the geometric mean of the ratios. Decides whether a kernel change is
kept (docs/kernel_notes.md); the runs should come from the same GPU, and each run's own copy
bandwidth is printed so that a different card or a throttled one shows.

    python experiments/compare_bench.py docs/bench/bench_kernel_h100_v9.json runs/device/bench/bench_kernel.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def load(path: Path):
    run = json.loads(path.read_text())
    rows = {(r["B"], r["C"], r["H"], r["W"], r["G"], r["dtype"], r["D"]): r for r in run["rows"]}
    return run, rows


def compare(base_path: Path, new_path: Path) -> str:
    base, base_rows = load(base_path)
    new, new_rows = load(new_path)
    lines = [f"base: {base_path} ({base['device']}, copy {base['copy_bandwidth'] / 1e12:.3f} TB/s)",
             f"new:  {new_path} ({new['device']}, copy {new['copy_bandwidth'] / 1e12:.3f} TB/s)",
             "",
             "| B×C×H×W | G | dtype | D | fwd ms base → new | new/base | bwd ms base → new | new/base |",
             "|---|---|---|---|---|---|---|---|"]
    logs = {"fwd": [], "bwd": []}
    for key, b in base_rows.items():
        n = new_rows.get(key)
        if n is None:
            continue
        cells = []
        for kind in ("fwd", "bwd"):
            tb, tn = b[f"kernel_{kind}_s"], n[f"kernel_{kind}_s"]
            logs[kind].append(math.log(tn / tb))
            cells += [f"{1e3 * tb:.3f} → {1e3 * tn:.3f}", f"{tn / tb:.3f}"]
        B, C, H, W, G, dtype, D = key
        lines.append(f"| {B}×{C}×{H}×{W} | {G} | {dtype} | {D} | " + " | ".join(cells) + " |")
    if not logs["fwd"]:
        raise SystemExit("the two runs share no case")
    gm = {k: math.exp(sum(v) / len(v)) for k, v in logs.items()}
    lines.append(f"\n{len(logs['fwd'])} cases; geometric mean of new/base: forward "
                 f"{gm['fwd']:.3f}, backward {gm['bwd']:.3f} (< 1: the new run is faster)")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="bench_kernel.json of the baseline run")
    ap.add_argument("new", type=Path, help="bench_kernel.json of the run to compare")
    args = ap.parse_args()
    print(compare(args.base, args.new))


if __name__ == "__main__":
    main()
