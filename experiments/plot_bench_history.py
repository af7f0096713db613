"""The kernel's history: percent of copy bandwidth per benchmark case across the full runs of
experiments/bench_kernel.py kept in docs/bench (bench_kernel_<gpu>_v<N>.json, one per version;
files with a suffix after the version, such as _v12_ref, are side runs and left out).

Every run's time is scored against the byte floor of the newest run's row for the same case:
runs before 2026-11-26 stored a backward floor one array too large (docs/kernel_notes.md, v11),
and this keeps all versions on one, correct, scale. Each run keeps its own copy bandwidth.

    python experiments/plot_bench_history.py            # docs/bench/kernel_history_h100.png
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from compare_bench import load  # a run and its rows by case, as compare_bench keys them

_VERSION = re.compile(r"_v(\d+)\.json$")
LARGE = ((32, 1152, 64, 64), (8, 1152, 128, 128))  # the shapes the bandwidth targets apply to


def runs_of(folder: Path, gpu: str = "h100") -> list[tuple[int, Path]]:
    """(version, path) of each full run, oldest first."""
    found = []
    for path in folder.glob(f"bench_kernel_{gpu}_v*.json"):
        m = _VERSION.search(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def history(runs: list[tuple[int, Path]]) -> dict[tuple, list[tuple[int, float, float]]]:
    """Per case (B, C, H, W, G, dtype, D): [(version, forward %copy, backward %copy)], with the
    floors of the newest run that has the case."""
    loaded = [(v, *load(p)) for v, p in runs]
    floors = {}
    for _, _, rows in loaded:  # oldest first: the newest run's floors win
        floors.update({k: (r["fwd_floor_bytes"], r["bwd_floor_bytes"]) for k, r in rows.items()})
    out: dict[tuple, list[tuple[int, float, float]]] = {}
    for version, run, rows in loaded:
        bw = run["copy_bandwidth"]
        for key, r in rows.items():
            fwd, bwd = floors[key]
            out.setdefault(key, []).append(
                (version, 100 * fwd / r["kernel_fwd_s"] / bw, 100 * bwd / r["kernel_bwd_s"] / bw))
    return out


def plot(hist, path: Path, targets=(90.0, 85.0)) -> None:
    """A 2 x 2 grid (forward, backward) x (D = 1, D = 4) of the large cases' %copy by version,
    with the targets drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True, sharey=True)
    for col, D in enumerate((1, 4)):
        for row, (kind, target) in enumerate(zip(("forward", "backward"), targets)):
            ax = axes[row][col]
            for key, points in sorted(hist.items()):
                B, C, H, W, G, dtype, d = key
                if d != D or (B, C, H, W) not in LARGE:
                    continue
                label = f"{B}×{C}×{H}×{W} G={G} {dtype}"
                style = "-" if dtype == "float32" else "--"
                ax.plot([p[0] for p in points], [p[1 + row] for p in points], style, marker="o",
                        markersize=3, label=label)
            ax.axhline(target, color="k", linewidth=0.8, linestyle=":")
            ax.set_title(f"{kind}, D = {D} (target {target:.0f}%)")
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if row == 1:
                ax.set_xlabel("kernel version")
            if col == 0:
                ax.set_ylabel("% of copy bandwidth")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "bench")
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    runs = runs_of(args.folder, args.gpu)
    if not runs:
        raise SystemExit(f"no bench_kernel_{args.gpu}_v<N>.json in {args.folder}")
    hist = history(runs)
    out = args.out or args.folder / f"kernel_history_{args.gpu}.png"
    plot(hist, out)
    newest = runs[-1][0]
    print(f"{len(runs)} runs (v{runs[0][0]}-v{newest}); {out}")
    for key, points in sorted(hist.items()):
        if key[:4] in LARGE and key[6] == 1:
            first, last = points[0], points[-1]
            print(f"  {'×'.join(map(str, key[:4]))} G={key[4]} {key[5]} D=1: fwd "
                  f"{first[1]:.1f}% (v{first[0]}) → {last[1]:.1f}%, bwd {first[2]:.1f}% → "
                  f"{last[2]:.1f}% (v{last[0]})")


if __name__ == "__main__":
    main()
