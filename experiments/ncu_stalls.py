"""Where a kernel's warps wait, from Nsight Compute's per-instruction source page.

Reads the CSV that `ncu -i REPORT --page source --print-source sass --csv` writes (the `ncu`
step of experiments/cuda_device_run.sh does, one per case) and prints, as markdown:
- the warp stall samples by reason (share of all samples);
- the instructions with the most samples, each with its two main reasons; a predicated branch
  shows the instruction before it too, since a wait's samples land on the branch that spins on
  it (what it waits on: an mbarrier's try-wait, a barrier);
- the samples by execution count: instructions that ran equally often are mostly one warp
  role's code run once a line (a consumer warp's, the producer's), so this splits the samples
  between roles and loops;
- the executed instructions by opcode.

A CSV of several kernels (ncu's --launch-count above 1) gives one table each. The CSV is
0.5-2 MB a kernel; these tables are what the notes keep (docs/bench/ncu_stalls_*.md).

  python3 experiments/ncu_stalls.py ncu_bwd_8x1152x128x128_72_bfloat16_1.csv [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_source_pages(path: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Each kernel's name and instructions (one dict per SASS line, by column name)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # Per kernel ncu writes a row naming it, then the header, then one row per instruction.
    starts = [i for i, r in enumerate(rows) if "Address" in r and "Source" in r]
    if not starts:
        raise ValueError(f"{path}: no header row with 'Address' and 'Source': not a SASS "
                         "source page from `ncu --page source --print-source sass --csv`")
    pages = []
    for n, start in enumerate(starts):
        header = rows[start]
        for needed in (SAMPLES, EXECUTED):
            if needed not in header:
                raise ValueError(f"{path}: column {needed!r} missing (was the SourceCounters "
                                 "section collected?)")
        end = starts[n + 1] - 1 if n + 1 < len(starts) else len(rows)
        kernel = rows[start - 1][1] if start > 0 and len(rows[start - 1]) > 1 else "?"
        pages.append((kernel, [dict(zip(header, r)) for r in rows[start + 1:end]
                               if len(r) == len(header)]))
    return pages


def summarize_page(kernel: str, rows: list[dict[str, str]], top: int = 25) -> str:
    reasons = [k for k in (rows[0] if rows else {})
               if k.startswith("stall_") and "Not Issued" not in k]
    samples = [_number(r[SAMPLES]) for r in rows]
    execs = [_number(r[EXECUTED]) for r in rows]
    total, executed = sum(samples), sum(execs)
    if total <= 0 or executed <= 0:
        raise ValueError(f"kernel {kernel}: no stall samples or no executed instructions")
    out = [f"kernel `{kernel}`", "",
           f"{total:,.0f} stall samples, {executed:,.0f} warp instructions executed", "",
           "| reason | share of samples |", "|---|---|"]
    by_reason = {k: sum(_number(r[k]) for r in rows) for k in reasons}
    for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]):
        if v > 0:
            out.append(f"| {k[len('stall_'):]} | {100 * v / total:.1f}% |")
    out += ["", f"The {top} instructions with the most samples:", "",
            "| % samples | executed | instruction | main reasons |", "|---|---|---|---|"]
    for i in sorted(range(len(rows)), key=lambda i: -samples[i])[:top]:
        r, s = rows[i], samples[i]
        if s <= 0:
            break
        text = r["Source"].strip()
        if text.startswith("@") and "BRA" in text and i > 0:
            text += f" (after {rows[i - 1]['Source'].strip()})"
        main = sorted(((_number(r[k]), k[len("stall_"):]) for k in reasons), reverse=True)[:2]
        why = ", ".join(f"{name} {100 * v / s:.0f}%" for v, name in main if v > 0)
        out.append(f"| {100 * s / total:.2f} | {execs[i]:,.0f} | "
                   f"`{text.replace('|', '/')}` | {why} |")
    # Samples and instructions by execution count; executions by opcode (no predicate, no
    # modifiers).
    by_count: collections.Counter[float] = collections.Counter()
    sizes: collections.Counter[float] = collections.Counter()
    mix: collections.Counter[str] = collections.Counter()
    for r, s, e in zip(rows, samples, execs):
        by_count[e] += s
        sizes[e] += 1
        words = [w for w in r["Source"].split() if not w.startswith("@")]
        if words:
            mix[words[0].split(".")[0]] += e
    out += ["", "| executed (each) | instructions | % samples |", "|---|---|---|"]
    for count, v in sorted(by_count.items(), key=lambda kv: -kv[1])[:8]:
        if v > 0:
            out.append(f"| {count:,.0f} | {sizes[count]} | {100 * v / total:.1f}% |")
    out += ["", "| opcode | executed | share |", "|---|---|---|"]
    for op, n in mix.most_common(12):
        out.append(f"| {op} | {n:,.0f} | {100 * n / executed:.1f}% |")
    return "\n".join(out) + "\n"


def summarize(path: str, top: int = 25) -> str:
    """The tables of every kernel in one ncu source-page CSV."""
    return "\n".join(summarize_page(kernel, rows, top) for kernel, rows in read_source_pages(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="ncu source-page CSV files")
    p.add_argument("--top", type=int, default=25, help="instructions to list (default 25)")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error(f"--top must be at least 1, got {args.top}")
    failed = 0
    for path in args.csv:  # each file on its own: one bad file does not hide the others
        try:
            print(f"## {path}\n\n{summarize(path, args.top)}")
        except (OSError, ValueError) as e:
            print(f"ncu_stalls: {e}", file=sys.stderr)
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
