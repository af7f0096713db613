"""The CUDA kernel's relative errors against the reference over many seeds, for one GPU test case.

Tolerances in tests/test_cuda_kernel.py are set from these distributions: a test draws fresh
inputs, so its tolerance must hold over seeds, not for one. Needs a GPU and the CUDA build.

    python experiments/error_over_seeds.py --shape 1,2000,3,4 --groups 4 --dtype bfloat16
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_cuda_kernel as cases  # noqa: E402  (its input maker and error measure)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, help="B,H,W,C")
    ap.add_argument("--groups", type=int, required=True, help="G")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(cases.DTYPES))
    ap.add_argument("--directions", default="tb,bt,lr,rl")
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=24)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4:
        ap.error(f"--shape: expected B,H,W,C, got {args.shape!r}")
    directions = tuple(args.directions.split(","))
    _, ffi = cases._functions(directions, args.chunk, True, "ffi")
    _, ref = cases._functions(directions, args.chunk, True, "reference")
    errors = []
    for seed in range(args.seeds):
        inputs = cases.make_inputs((shape, args.groups), directions, args.dtype, True, seed=seed)
        errors.append([cases.rel_err(g, r) for g, r in zip(ffi(*inputs), ref(*inputs))])
    errors = np.array(errors)
    print(f"{shape} G={args.groups} {args.dtype} {directions} chunk={args.chunk}")
    for name, column, tol in zip(("h", "dx", "dlam", "dw"), errors.T,
                                 (cases.FWD_TOL,) + 3 * (cases.GRAD_TOL,)):
        print(f"{name:5s} median {np.median(column):.4f}  max {column.max():.4f}  "
              f"over {args.seeds} seeds (tests' default tolerance {tol[args.dtype]})")


if __name__ == "__main__":
    main()
