"""Benchmark of the CUDA gspn_scan kernel: time, byte floor, bandwidth, speedups, targets.

    python experiments/bench_kernel.py [--out DIR] [--quick] [--no-reference]
                                       [--dtypes bfloat16] [--directions 4]
    python experiments/bench_kernel.py --rescore RESULT.json [--out DIR]   # no GPU needed

For each case (shapes B x C x H x W of ../shared/ANCHORS.md, G = C and C / 16, float32 and
bfloat16, D = 1 and 4) it times, in one process on one GPU:
  - the kernel's forward (gspn_scan, backend="ffi"), its backward alone (the FFI backward target
    on a saved h) and forward + backward (jax.vjp);
  - the pure-JAX lax.scan reference (backend="reference"), forward and forward + backward;
  - a device-to-device copy (the bandwidth ceiling), at the start of the run.
Times are medians over repeated batches: each batch dispatches several calls back to back
(rotating among input sets where they are small enough for L2 to matter, so the cache cannot
flatter) and waits for the last; the GPU executes them back to back, so a batch's wall time over
its calls is the GPU time per call. Byte floor: each input read once per direction that uses it,
each output written once (x is read by every direction; dx is written once).

Writes a Markdown table and the raw numbers (JSON) under --out (default runs/bench_kernel-<time>).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # room for the copy probe

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cgspn_jax import _ffi, build_info, gspn_scan  # noqa: E402
from cgspn_jax.gspn import DIRECTION_CODES  # noqa: E402

SHAPES = [(32, 1152, 64, 64), (8, 1152, 128, 128), (8, 192, 128, 128)]  # B, C, H, W
LARGE = {(32, 1152, 64, 64), (8, 1152, 128, 128)}  # where the bandwidth targets apply
DIRECTIONS = {1: ("tb",), 4: ("tb", "bt", "lr", "rl")}

# The original GSPN kernel on the same H100 (../shared/ANCHORS.md): one direction, G = C,
# global propagation; forward / backward ms.
ORIGINAL_MS = {
    ("float32", (32, 1152, 64, 64)): (43.86, 107.32),
    ("float32", (8, 1152, 128, 128)): (45.82, 111.74),
    ("float32", (8, 192, 128, 128)): (7.29, 18.07),
    ("bfloat16", (32, 1152, 64, 64)): (31.81, 69.30),
    ("bfloat16", (8, 1152, 128, 128)): (43.80, 100.23),
    ("bfloat16", (8, 192, 128, 128)): (6.61, 15.87),
}
TARGETS = {
    "fwd_pct_copy": 90.0, "bwd_pct_copy": 85.0, "speedup_vs_reference": 2.0,
    "vs_original_fwd": {"float32": 32.0, "bfloat16": 45.0},
    "vs_original_bwd": {"float32": 37.0, "bfloat16": 45.0},
}
L2_BYTES = 50e6


# ----------------------------------------------------------------------------- timing


def time_calls(fn, arg_sets, min_batch_s=0.03, reps=9):
    """Median seconds per call of fn over `reps` batches of back-to-back calls."""
    jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm-up
    t0 = time.perf_counter()
    for args in arg_sets:
        out = fn(*args)
    jax.block_until_ready(out)
    est = (time.perf_counter() - t0) / len(arg_sets)
    inner = int(min(200, max(2, math.ceil(min_batch_s / max(est, 1e-6)))))
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        for i in range(inner):
            out = fn(*arg_sets[(r * inner + i) % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    del out
    return statistics.median(times), times


def copy_bandwidth(nbytes=4 << 30):
    """Device-to-device copy, bytes read + written per second; and how it was measured."""
    try:
        import cupy as cp

        a = cp.empty(nbytes // 4, cp.float32)
        a[:] = 1.0
        b = cp.empty_like(a)
        times = []
        for i in range(12):
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            cp.cuda.runtime.memcpyAsync(b.data.ptr, a.data.ptr, nbytes,
                                        cp.cuda.runtime.memcpyDeviceToDevice,
                                        cp.cuda.get_current_stream().ptr)
            stop.record()
            stop.synchronize()
            if i >= 2:
                times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
        del a, b
        cp.get_default_memory_pool().free_all_blocks()
        return 2 * nbytes / statistics.median(times), "cupy cudaMemcpyAsync D2D, 4 GiB, CUDA events"
    except Exception as e:  # noqa: BLE001 - any failure: fall back to an XLA copy kernel
        print(f"cupy copy probe failed ({e!r}); using an XLA elementwise kernel")
        a = jnp.ones(nbytes // 4, jnp.float32)
        t, _ = time_calls(jax.jit(lambda v: v * 2.0), [(a,)])
        return 2 * nbytes / t, "jax.jit(a * 2.0), 4 GiB (no cupy)"


def xla_elementwise_bandwidth(nbytes=4 << 30):
    a = jnp.ones(nbytes // 4, jnp.float32)
    t, _ = time_calls(jax.jit(lambda v: v * 2.0), [(a,)])
    del a
    return 2 * nbytes / t


# ----------------------------------------------------------------------------- launch plans


def plan_lines(fn, args):
    """Runs fn(*args) once with CGSPN_CUDA_VERBOSE=1 and returns what the handler printed: the
    launch plan of each kernel call, with its registers and blocks per multiprocessor."""
    os.environ["CGSPN_CUDA_VERBOSE"] = "1"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            jax.block_until_ready(fn(*args))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.environ.pop("CGSPN_CUDA_VERBOSE")
        f.seek(0)
        text = f.read().decode(errors="replace")
    return [ln.split(": ", 1)[1] for ln in text.splitlines() if ln.startswith("gspn_scan CUDA")]


def waves_of(plan_line):
    """Blocks over resident blocks (SMs x blocks per SM) of one printed plan: a grid of 4.36
    waves takes about as long as one of 5 (docs/kernel_notes.md, v5). Counted in whole slabs:
    the tail split (tail=NxK: N blocks of 1/K slab) does not change the work. Words without
    '=' (the TMA plans' leading "TMA") are skipped."""
    fields = dict(f.split("=", 1) for f in plan_line.split() if "=" in f)
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    tail_blocks, k = (int(v) for v in fields.get("tail", "0x1").split("x"))
    slabs = int(fields["blocks"]) - tail_blocks + tail_blocks // k
    return slabs / (sms * max(1, int(fields["blocks/SM"])))


# ----------------------------------------------------------------------------- cases


def byte_floor(B, C, H, W, G, D, itemsize):
    bhwc, gates = B * H * W * C, B * H * W * G * 3
    fwd = (D * bhwc + D * bhwc + D * gates + D * bhwc) * itemsize          # x, lam, w; h
    # Backward: reads x (by every direction), lam, h, dh and w; writes dx (once), dlam and dw.
    # (Until 2026-11-26 this counted one D x BHWC array too many, which overstated the
    # backward's %copy by 4-9%; `--rescore` recomputes stored results.)
    bwd = (4 * D * bhwc + D * gates + bhwc + D * bhwc + D * gates) * itemsize
    return fwd, bwd


def make_sets(B, C, H, W, G, D, dtype, n_sets):
    sets = []
    for s in range(n_sets):
        k = jax.random.split(jax.random.PRNGKey(1234 + s), 4)
        x = jax.random.normal(k[0], (B, H, W, C), jnp.float32).astype(dtype)
        lam = jax.random.uniform(k[1], (D, B, H, W, C), jnp.float32, 0.5, 1.5).astype(dtype)
        w = jax.random.normal(k[2], (D, B, H, W, G, 3), jnp.float32).astype(dtype)
        dh = jax.random.normal(k[3], (D, B, H, W, C), jnp.float32).astype(dtype)
        sets.append((x, lam, w, dh))
    return sets


def ffi_backward(directions, chunk=None, normalize=True):
    """The backward FFI target alone: (x, lam, w, h, dh) -> (dx, dlam, dw)."""
    attrs = dict(directions=np.array([DIRECTION_CODES[d] for d in directions], np.int64),
                 chunk=np.int64(chunk or 0), normalize=bool(normalize))

    def bwd(x, lam, w, h, dh):
        outs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, lam, w))
        return jax.ffi.ffi_call(_ffi.BWD_TARGET, outs)(x, lam, w, h, dh, **attrs)
    return jax.jit(bwd)


def run_case(B, C, H, W, G, D, dtype_name, do_reference=True):
    dtype = jnp.dtype(dtype_name)
    directions = DIRECTIONS[D]
    fwd_floor, bwd_floor = byte_floor(B, C, H, W, G, D, dtype.itemsize)
    set_bytes = fwd_floor + bwd_floor
    # Several input sets where a set is within reach of L2; one set of arrays of many GB cannot
    # sit in a 50 MB cache anyway (and two would not fit the GPU beside the reference).
    n_sets = 4 if set_bytes < 40 * L2_BYTES else (2 if set_bytes < 12e9 else 1)
    sets = make_sets(B, C, H, W, G, D, dtype, n_sets)
    scan = functools.partial(gspn_scan, directions=directions)
    row = dict(B=B, C=C, H=H, W=W, G=G, D=D, dtype=dtype_name, input_sets=n_sets,
               fwd_floor_bytes=fwd_floor, bwd_floor_bytes=bwd_floor)

    def fb(backend):
        def f(x, lam, w, dh):
            _, vjp = jax.vjp(functools.partial(scan, backend=backend), x, lam, w)
            return vjp(dh)
        return jax.jit(f)

    kfwd = jax.jit(functools.partial(scan, backend="ffi"))
    row["kernel_fwd_s"], row["kernel_fwd_all_s"] = time_calls(kfwd, [s[:3] for s in sets])
    hs = [kfwd(*s[:3]) for s in sets]
    kbwd = ffi_backward(directions)
    row["kernel_bwd_s"], row["kernel_bwd_all_s"] = time_calls(
        kbwd, [(s[0], s[1], s[2], h, s[3]) for s, h in zip(sets, hs)])
    bwd_args = (*sets[0][:3], hs[0], sets[0][3])
    for kind, fn, args in (("fwd", kfwd, sets[0][:3]), ("bwd", kbwd, bwd_args)):
        try:  # the plan the handler chose (a record only: never fails the benchmark)
            row[kind + "_plan"] = plan_lines(fn, args)[0]
            row[kind + "_waves"] = waves_of(row[kind + "_plan"])
        except Exception as e:  # noqa: BLE001 - a plan that printed is kept
            row.setdefault(kind + "_plan", repr(e)[:200])
            row[kind + "_waves"] = None
    del hs
    row["kernel_fwdbwd_s"], _ = time_calls(fb("ffi"), sets)
    if do_reference:
        ref_fwd = jax.jit(functools.partial(scan, backend="reference"))
        for name, fn, arg_sets in (("reference_fwd_s", ref_fwd, [s[:3] for s in sets]),
                                   ("reference_fwdbwd_s", fb("reference"), sets)):
            try:
                row[name], _ = time_calls(fn, arg_sets, reps=5)
            except Exception as e:  # noqa: BLE001 - out of memory at the largest cases
                row[name] = None
                row[name + "_error"] = repr(e)[:300]
                print(f"  reference {name} failed: {repr(e)[:160]}")
    del sets
    return row


def derive(row, copy_bw):
    row["fwd_bw"] = row["fwd_floor_bytes"] / row["kernel_fwd_s"]
    row["bwd_bw"] = row["bwd_floor_bytes"] / row["kernel_bwd_s"]
    row["fwd_pct_copy"] = 100 * row["fwd_bw"] / copy_bw
    row["bwd_pct_copy"] = 100 * row["bwd_bw"] / copy_bw
    if row.get("reference_fwd_s"):
        row["speedup_fwd"] = row["reference_fwd_s"] / row["kernel_fwd_s"]
    if row.get("reference_fwdbwd_s"):
        row["speedup_fwdbwd"] = row["reference_fwdbwd_s"] / row["kernel_fwdbwd_s"]
    orig = ORIGINAL_MS.get((row["dtype"], (row["B"], row["C"], row["H"], row["W"])))
    if orig and row["D"] == 1:
        row["vs_original_fwd"] = orig[0] / (1e3 * row["kernel_fwd_s"])
        row["vs_original_bwd"] = orig[1] / (1e3 * row["kernel_bwd_s"])
    return row


# ----------------------------------------------------------------------------- report


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows, copy_bw):
    head = ("| B×C×H×W | G | dtype | D | floor fwd GB | fwd ms | fwd TB/s | fwd %copy (≥90) | "
            "floor bwd GB | bwd ms | bwd TB/s | bwd %copy (≥85) | f+b ms | ref fwd ms | "
            "ref f+b ms | ×ref fwd (≥2) | ×ref f+b (≥2) | ×orig fwd | ×orig bwd | "
            "waves fwd / bwd |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        big = (r["B"], r["C"], r["H"], r["W"]) in LARGE
        tgt_o_f = TARGETS["vs_original_fwd"][r["dtype"]] * (2 if r["G"] != r["C"] else 1)
        tgt_o_b = TARGETS["vs_original_bwd"][r["dtype"]] * (2 if r["G"] != r["C"] else 1)
        lines.append(
            f"| {r['B']}×{r['C']}×{r['H']}×{r['W']} | {r['G']} | {r['dtype']} | {r['D']} | "
            f"{r['fwd_floor_bytes'] / 1e9:.3f} | {1e3 * r['kernel_fwd_s']:.3f} | "
            f"{r['fwd_bw'] / 1e12:.2f} | {r['fwd_pct_copy']:.1f}{'' if big else '*'} | "
            f"{r['bwd_floor_bytes'] / 1e9:.3f} | {1e3 * r['kernel_bwd_s']:.3f} | "
            f"{r['bwd_bw'] / 1e12:.2f} | {r['bwd_pct_copy']:.1f}{'' if big else '*'} | "
            f"{1e3 * r['kernel_fwdbwd_s']:.3f} | "
            f"{fmt(r.get('reference_fwd_s') and 1e3 * r['reference_fwd_s'], '.3f')} | "
            f"{fmt(r.get('reference_fwdbwd_s') and 1e3 * r['reference_fwdbwd_s'], '.3f')} | "
            f"{fmt(r.get('speedup_fwd'), '.2f')} | {fmt(r.get('speedup_fwdbwd'), '.2f')} | "
            f"{fmt(r.get('vs_original_fwd'), '.1f')} (≥{tgt_o_f:.0f}) | "
            f"{fmt(r.get('vs_original_bwd'), '.1f')} (≥{tgt_o_b:.0f}) | "
            f"{fmt(r.get('fwd_waves'), '.2f')} / {fmt(r.get('bwd_waves'), '.2f')} |")
    lines.append(f"\nCopy bandwidth (read + write): {copy_bw / 1e12:.3f} TB/s. "
                 "* = not a large shape (the bandwidth targets apply to the two large ones). "
                 "×orig: original GSPN kernel time (ANCHORS.md, G = C, D = 1) / ours; its targets "
                 "are doubled for G = C/16, whose byte floor is about half. Waves: blocks over "
                 "resident blocks of the launch (time steps with the waves rounded up).")
    return "\n".join(lines)


def rescore(path: Path, out: Path):
    """A stored result with the floors of byte_floor() as it is now: the times are kept."""
    result = json.loads(path.read_text())
    for row in result["rows"]:
        row["fwd_floor_bytes"], row["bwd_floor_bytes"] = byte_floor(
            row["B"], row["C"], row["H"], row["W"], row["G"], row["D"],
            jnp.dtype(row["dtype"]).itemsize)
        derive(row, result["copy_bandwidth"])
    out.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = f"GPU: {result['device']}\n\n" + table(result["rows"], result["copy_bandwidth"])
    (out / f"{stem}.md").write_text(md + "\n")
    print(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default runs/bench_kernel-<time>)")
    ap.add_argument("--quick", action="store_true", help="D = 1 only, no reference")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="comma-separated subset of float32,bfloat16 (an A/B of a change that "
                         "touches one dtype's kernels need not time the other's)")
    ap.add_argument("--directions", default=None,
                    help="comma-separated subset of 1,4 (D; default both, 1 with --quick)")
    ap.add_argument("--rescore", metavar="JSON", default=None,
                    help="recompute the floors and derived figures of a stored result from "
                         "its times and write its JSON and table under --out (default: in "
                         "place, replacing RESULT.json and RESULT.md); no GPU needed")
    args = ap.parse_args()
    # Each value once (a repeat would time its cases twice and write their rows twice).
    dtypes = list(dict.fromkeys(d for d in args.dtypes.split(",") if d))
    dirs = list(dict.fromkeys(d for d in (args.directions or "1,4").split(",") if d))
    if not set(dtypes) <= {"float32", "bfloat16"} or not dtypes:
        ap.error(f"--dtypes: expected a subset of float32,bfloat16, got {args.dtypes!r}")
    if not set(dirs) <= {str(D) for D in DIRECTIONS} or not dirs:
        ap.error(f"--directions: expected a subset of 1,4, got {args.directions!r}")
    if args.quick and args.directions is not None:
        ap.error("--directions: not with --quick, which times D = 1 alone")
    dirs = [1] if args.quick else [int(d) for d in dirs]
    if args.rescore:
        return rescore(Path(args.rescore), Path(args.out or Path(args.rescore).parent))
    out = Path(args.out or f"runs/bench_kernel-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}; build: {build_info()}; jax {jax.__version__}", flush=True)
    copy_bw, copy_how = copy_bandwidth()
    xla_bw = xla_elementwise_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s ({copy_how}); "
          f"XLA a*2.0: {xla_bw / 1e12:.3f} TB/s", flush=True)

    result = dict(device=dev.device_kind, jax=jax.__version__, build=build_info(),
                  copy_bandwidth=copy_bw, copy_method=copy_how, xla_elementwise_bandwidth=xla_bw,
                  targets=TARGETS, rows=[])
    for (B, C, H, W) in SHAPES:
        for G in (C, C // 16):
            for dtype in dtypes:
                for D in dirs:
                    row = run_case(B, C, H, W, G, D, dtype,
                                   do_reference=not (args.quick or args.no_reference))
                    derive(row, copy_bw)
                    result["rows"].append(row)
                    print(f"{B}x{C}x{H}x{W} G={G} {dtype} D={D}: fwd "
                          f"{1e3 * row['kernel_fwd_s']:.3f} ms ({row['fwd_pct_copy']:.1f}% copy), "
                          f"bwd {1e3 * row['kernel_bwd_s']:.3f} ms ({row['bwd_pct_copy']:.1f}%), "
                          f"f+b {1e3 * row['kernel_fwdbwd_s']:.3f} ms; ref fwd "
                          f"{fmt(row.get('reference_fwd_s') and 1e3 * row['reference_fwd_s'], '.3f')}"
                          f" f+b {fmt(row.get('reference_fwdbwd_s') and 1e3 * row['reference_fwdbwd_s'], '.3f')}",
                          flush=True)
                    (out / "bench_kernel.json").write_text(json.dumps(result, indent=1))
    md = f"GPU: {dev.device_kind}\n\n" + table(result["rows"], copy_bw)
    (out / "bench_kernel.md").write_text(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
