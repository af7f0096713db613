"""experiments/plot_bench_history.py: which runs it reads, and the %copy it scores each with (the
newest run's floor, each run's own copy bandwidth), on small hand-made runs."""
import importlib.util
import json
from pathlib import Path

import pytest

_EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
_SPEC = importlib.util.spec_from_file_location(
    "plot_bench_history", _EXPERIMENTS / "plot_bench_history.py")


@pytest.fixture
def hist_module(monkeypatch):
    monkeypatch.syspath_prepend(str(_EXPERIMENTS))  # as when run as a script: compare_bench
    module = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(module)
    return module


def _row(shape, G, dtype, D, fwd_floor, bwd_floor, fwd_s, bwd_s):
    B, C, H, W = shape
    return dict(B=B, C=C, H=H, W=W, G=G, dtype=dtype, D=D, fwd_floor_bytes=fwd_floor,
                bwd_floor_bytes=bwd_floor, kernel_fwd_s=fwd_s, kernel_bwd_s=bwd_s)


def _write(folder, name, copy_bw, rows):
    (folder / name).write_text(json.dumps(dict(copy_bandwidth=copy_bw, rows=rows)))


def test_history_scores_every_run_on_the_newest_floor(hist_module, tmp_path):
    big = (8, 1152, 128, 128)
    # v3 stored a backward floor too large (as runs before v11 did); v12 has the right one.
    _write(tmp_path, "bench_kernel_h100_v3.json", 2.0e12,
           [_row(big, 72, "bfloat16", 1, 1.0e9, 3.0e9, 1.0e-3, 2.0e-3)])
    _write(tmp_path, "bench_kernel_h100_v12.json", 2.5e12,
           [_row(big, 72, "bfloat16", 1, 1.0e9, 2.0e9, 0.5e-3, 1.0e-3),
            _row((1, 8, 4, 4), 8, "float32", 4, 1.0e6, 2.0e6, 1.0e-6, 4.0e-6)])
    _write(tmp_path, "bench_kernel_h100_v12_ref.json", 1.0, [])  # a side run: not read
    _write(tmp_path, "bench_kernel_h200_v13.json", 1.0, [])      # another GPU: not read
    runs = hist_module.runs_of(tmp_path)
    assert [v for v, _ in runs] == [3, 12]
    hist = hist_module.history(runs)
    points = hist[(*big, 72, "bfloat16", 1)]
    assert [p[0] for p in points] == [3, 12]
    # v3: 1e9 / 1e-3 / 2e12 = 50% forward; backward on v12's floor 2e9: 2e9 / 2e-3 / 2e12 = 50%.
    assert points[0][1:] == pytest.approx((50.0, 50.0))
    assert points[1][1:] == pytest.approx((80.0, 80.0))
    small = hist[(1, 8, 4, 4, 8, "float32", 4)]
    assert small == [(12, pytest.approx(40.0), pytest.approx(20.0))]

    out = tmp_path / "history.png"
    hist_module.plot(hist, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
