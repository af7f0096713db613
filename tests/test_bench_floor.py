"""The kernel benchmark's byte floor, against the arrays the op actually reads and writes.

The floor is what every "% of copy" figure divides by; an array counted once too often makes a
kernel look faster than it is (it did, until 2026-11-26). Here the floor is recounted from the
shapes of the FFI call's operands and results (jax.eval_shape of the op and its VJP), an
account independent of bench_kernel's formula: each input read once by each direction that
uses it, each output written once.
"""
import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from cgspn_jax import gspn_scan

_SPEC = importlib.util.spec_from_file_location(
    "bench_kernel", Path(__file__).resolve().parents[1] / "experiments" / "bench_kernel.py")


@pytest.fixture(scope="module")
def bench():
    module = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(module)
    return module


def nbytes(tree):
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("B,C,H,W,G,D,dtype", [
    (2, 48, 5, 7, 48, 1, jnp.float32), (2, 48, 5, 7, 3, 4, jnp.bfloat16),
    (1, 96, 8, 6, 12, 2, jnp.float16), (3, 32, 4, 9, 32, 3, jnp.float32)])
def test_byte_floor_counts_each_array_once(bench, B, C, H, W, G, D, dtype):
    directions = ("tb", "bt", "lr", "rl")[:D]
    x = jax.ShapeDtypeStruct((B, H, W, C), dtype)
    lam = jax.ShapeDtypeStruct((D, B, H, W, C), dtype)
    w = jax.ShapeDtypeStruct((D, B, H, W, G, 3), dtype)
    scan = functools.partial(gspn_scan, directions=directions, backend="reference")
    h = jax.eval_shape(scan, x, lam, w)
    grads = jax.eval_shape(lambda x, lam, w, dh: jax.vjp(scan, x, lam, w)[1](dh), x, lam, w, h)
    # Every direction reads x; lam and w are per direction already.
    fwd = D * nbytes(x) + nbytes(lam) + nbytes(w) + nbytes(h)
    # The backward reads x (each direction), lam, w, the saved h and dh; writes dx, dlam, dw.
    bwd = D * nbytes(x) + nbytes(lam) + nbytes(w) + nbytes(h) + nbytes(h) + nbytes(grads)
    assert bench.byte_floor(B, C, H, W, G, D, jnp.dtype(dtype).itemsize) == (fwd, bwd)


def test_waves_count_whole_slabs(bench, monkeypatch):
    """The benchmark's "waves" column counts slabs over resident blocks: a tail split (tail=NxK,
    N blocks of 1/K slab each) adds blocks but no work, and plans printed before the split
    existed have no tail field."""

    class Device:
        core_count = 132

    monkeypatch.setattr(bench.jax, "devices", lambda: [Device()])
    plan = "V=8 NG=8 P=1 Vs=4 Pt=128 threads=512 blocks={} tail={} regs=128 blocks/SM={}"
    assert bench.waves_of(plan.format(312, "48x2", 1)) == pytest.approx(288 / 132)
    assert bench.waves_of(plan.format(360, "96x4", 1)) == pytest.approx(288 / 132)
    assert bench.waves_of(plan.format(1536, "0x1", 2)) == pytest.approx(1536 / 264)
    old = "V=4 NG=4 P=1 Vs=8 Pt=64 threads=512 blocks=1152 regs=100 blocks/SM=1"
    assert bench.waves_of(old) == pytest.approx(1152 / 132)
    # The TMA plans lead with a bare word and have no tail split (the v22 benchmark lost their
    # plans and waves to a parse error here).
    tma = "TMA S=48 threads=224 blocks=192 smem=108064 cluster=2 gbox=16 nsub=2 blocks/SM=2"
    assert bench.waves_of(tma) == pytest.approx(192 / 264)


@pytest.mark.parametrize("args,flag", [
    (["--dtypes", "float16"], "--dtypes"), (["--dtypes", ""], "--dtypes"),
    (["--directions", "2"], "--directions"), (["--directions", "1,x"], "--directions"),
    (["--quick", "--directions", "4"], "--directions")])
def test_case_selection_rejects_what_it_cannot_time(bench, monkeypatch, capsys, args, flag):
    # Checked before any device work: a typo costs an error message, not a device call. (The
    # usage line names every flag: the error's own line must name the one at fault.)
    monkeypatch.setattr("sys.argv", ["bench_kernel.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert f"error: {flag}:" in capsys.readouterr().err
