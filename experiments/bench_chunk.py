"""What a chunked scan (local GSPN: `chunk=k` restarts every k-th line) costs against a global one
on the CUDA kernel (a GPU is required).

    python experiments/bench_chunk.py [--out DIR] [--chunks 0,H,32,8]

chunk = 0 is the global scan; H stands for the case's H. On the square cases below (and D = 1,
top to bottom) chunk = H restarts only where the global scan does (line 0), so it does the same
arithmetic and moves the same bytes: any time it takes beyond chunk = 0 is the kernels' test of
which lines restart. Smaller chunks restart more lines, which skip the previous
line's h and so are a little cheaper. Forward (gspn_scan, backend="ffi") and the backward FFI
target alone, medians of batches of back-to-back calls (bench_kernel.time_calls), one process.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import time_calls  # noqa: E402
from tune_kernel import case_fns  # noqa: E402

# B, C, H, W, G, dtype, D: the TMA kernels (128 x 128 16-bit G = C / 16), the register kernels
# (64 x 64 float32 G = C) and the D = 4 register backward.
CASES = [((8, 1152, 128, 128), 72, "bfloat16", 1), ((32, 1152, 64, 64), 1152, "float32", 1),
         ((8, 1152, 128, 128), 72, "bfloat16", 4)]


def time_case(shape, G, dtype, D, chunks):
    rows = []
    for chunk in chunks:
        (fwd, fargs), (bwd, bargs) = case_fns(shape, G, dtype, D, chunk=chunk or None)
        t_f, _ = time_calls(fwd, [fargs], min_batch_s=0.02, reps=7)
        t_b, _ = time_calls(bwd, [bargs], min_batch_s=0.02, reps=7)
        rows.append(dict(shape=shape, G=G, dtype=dtype, D=D, chunk=chunk,
                         fwd_ms=1e3 * t_f, bwd_ms=1e3 * t_b))
        print(f"{'x'.join(map(str, shape))} G={G} {dtype} D={D} chunk={chunk}: "
              f"fwd {1e3 * t_f:.3f} ms, bwd {1e3 * t_b:.3f} ms", flush=True)
    return rows


def case_of(row):
    return row["shape"], row["G"], row["dtype"], row["D"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--chunks", default="0,H,32,8",
                    help="comma-separated chunk lengths; 0 is the global scan, H the lines a scan has")
    args = ap.parse_args()
    out = Path(args.out or f"runs/bench_chunk-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"device {jax.devices()[0].device_kind}", flush=True)
    rows = []
    for shape, G, dtype, D in CASES:
        chunks = [shape[2] if c == "H" else int(c) for c in args.chunks.split(",")]
        rows += time_case(shape, G, dtype, D, chunks)
    (out / "bench_chunk.json").write_text(json.dumps(
        dict(device=jax.devices()[0].device_kind, rows=rows), indent=1))
    lines = [f"Chunked against global scans, {jax.devices()[0].device_kind} (ms; ratio to the first chunk)",
             "", "| B×C×H×W | G | dtype | D | chunk | fwd ms | ×first | bwd ms | ×first |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if case_of(b) == case_of(r))  # the case's first chunk
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['G']} | {r['dtype']} | {r['D']} | "
                     f"{r['chunk'] or 'global'} | {r['fwd_ms']:.3f} | {r['fwd_ms'] / base['fwd_ms']:.3f} | "
                     f"{r['bwd_ms']:.3f} | {r['bwd_ms'] / base['bwd_ms']:.3f} |")
    (out / "bench_chunk.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
