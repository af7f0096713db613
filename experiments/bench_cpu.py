"""Times gspn_scan's C++ CPU kernel against the pure-JAX lax.scan reference on the host CPU.

    python experiments/bench_cpu.py [--shape B H W C] [--groups G] [--repeats N] [--out FILE]

Forward, and forward + backward (jax.grad of a sum), jit-compiled, median of N timed runs after a
warm-up; prints a table and writes the raw numbers as JSON.
"""
import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import cgspn_jax
from cgspn_jax import gspn_scan


def median_seconds(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 64, 64, 64], metavar=("B", "H", "W", "C"))
    parser.add_argument("--groups", type=int, default=None, help="gate groups G (default C)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON file for the raw numbers")
    args = parser.parse_args()

    if not cgspn_jax.build_info()["cpu_kernel"]:
        raise SystemExit("the CPU kernel is not built: pip install -e . first")
    B, H, W, C = args.shape
    G, D = args.groups or C, 4
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    x = jnp.asarray(rng.normal(size=(B, H, W, C)), dtype)
    lam = jnp.asarray(rng.uniform(0.2, 1.2, size=(D, B, H, W, C)), dtype)
    w = jnp.asarray(rng.normal(size=(D, B, H, W, G, 3)), dtype)

    rows = []
    for backend in ("reference", "ffi"):
        fwd = jax.jit(lambda *a, b=backend: gspn_scan(*a, backend=b))
        grad = jax.jit(jax.grad(lambda *a, b=backend: jnp.sum(gspn_scan(*a, backend=b).astype(jnp.float32)),
                                argnums=(0, 1, 2)))
        rows.append(dict(backend=backend, forward_ms=1e3 * median_seconds(fwd, (x, lam, w), args.repeats),
                         forward_backward_ms=1e3 * median_seconds(grad, (x, lam, w), args.repeats)))
    ref, ffi = rows
    result = dict(shape=dict(B=B, H=H, W=W, C=C, G=G, D=D), dtype=args.dtype,
                  cpu=platform.processor() or platform.machine(), cores=jax.local_device_count(),
                  jax=jax.__version__, rows=rows,
                  speedup_forward=ref["forward_ms"] / ffi["forward_ms"],
                  speedup_forward_backward=ref["forward_backward_ms"] / ffi["forward_backward_ms"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"gspn_scan on CPU, B×H×W×C = {B}×{H}×{W}×{C}, G = {G}, D = {D}, {args.dtype}, "
          f"median of {args.repeats}")
    print(f"{'backend':<10} {'forward ms':>11} {'fwd+bwd ms':>11}")
    for r in rows:
        print(f"{r['backend']:<10} {r['forward_ms']:>11.1f} {r['forward_backward_ms']:>11.1f}")
    print(f"{'speedup':<10} {result['speedup_forward']:>10.1f}× {result['speedup_forward_backward']:>10.1f}×")


if __name__ == "__main__":
    main()
