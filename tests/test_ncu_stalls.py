"""experiments/ncu_stalls.py against a source page whose sums are known by construction.

The CSV is written here in Nsight Compute's layout (a row naming the kernel, the header, one row
per SASS instruction, numbers with thousands separators); random sample counts per instruction
and reason (seeded from the test's id), so the expected shares are recounted from the same numbers in plain Python.
"""
import csv
import importlib.util
import random
import re
import zlib
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "ncu_stalls", Path(__file__).resolve().parents[1] / "experiments" / "ncu_stalls.py")
REASONS = ["stall_barrier", "stall_long_sb", "stall_short_sb", "stall_wait"]


@pytest.fixture(scope="module")
def tool():
    module = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(module)
    return module


def write_page(path, program, seed):
    """program: SASS lines. Returns each line's (samples by reason, executed)."""
    rng = random.Random(seed)
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)",
              "Warp Stall Sampling (Not-issued Samples)", "Instructions Executed",
              *REASONS, *(r + " (Not Issued)" for r in REASONS)]
    counts = []
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "void Probe<float>(int)"])
        w.writerow(header)
        for i, text in enumerate(program):
            by_reason = [rng.randrange(0, 3000) for _ in REASONS]
            executed = rng.randrange(1, 2_000_000)
            counts.append((by_reason, executed))
            total = sum(by_reason)
            w.writerow([hex(0x7000 + 16 * i), text, f"{total:,}", f"{total:,}", f"{executed:,}",
                        *(f"{v:,}" for v in by_reason), *("0" for _ in REASONS)])
    return counts


PROGRAM = ["SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R32+URZ], R27", "@!P0  BRA 0x7f00",
           "LDS.U16 R23, [R28]", "STG.E.U16 desc[UR30][R20.64], R23", "IMAD R1, R2, R3, RZ",
           "IMAD.WIDE.U32 R4, R5, 0x3, R6", "FFMA R7, R8, R9, R7", "BAR.SYNC.DEFER_BLOCKING 0x0"]


def test_shares_top_and_mix(tool, tmp_path, request):
    path = tmp_path / "page.csv"
    counts = write_page(path, PROGRAM, seed=zlib.crc32(request.node.nodeid.encode()))
    text = tool.summarize(str(path), top=3)
    total = sum(sum(c) for c, _ in counts)
    executed = sum(e for _, e in counts)
    assert f"{total:,} stall samples, {executed:,} warp instructions" in text
    assert "`void Probe<float>(int)`" in text
    for j, reason in enumerate(REASONS):
        share = 100 * sum(c[j] for c, _ in counts) / total
        assert f"| {reason[len('stall_'):]} | {share:.1f}% |" in text
    # The top three instructions, in order, with their shares.
    order = sorted(range(len(PROGRAM)), key=lambda i: -sum(counts[i][0]))[:3]
    rows = [line for line in text.splitlines() if re.match(r"\| \d+\.\d\d \|", line)]
    assert len(rows) == 3
    for line, i in zip(rows, order):
        assert line.startswith(f"| {100 * sum(counts[i][0]) / total:.2f} | {counts[i][1]:,} |")
        assert PROGRAM[i] in line
        if i == 1:  # the spinning branch names what it waits on
            assert f"(after {PROGRAM[0]})" in line
    # Opcodes without their modifiers: the two IMAD forms are one row.
    imad = counts[4][1] + counts[5][1]
    assert f"| IMAD | {imad:,} | {100 * imad / executed:.1f}% |" in text


def test_not_a_source_page(tool, tmp_path, capsys):
    path = tmp_path / "details.csv"
    path.write_text('"ID","Section Name","Metric Name"\n"0","SpeedOfLight","Duration"\n')
    assert tool.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "not a SASS source page" in err and str(path) in err


def test_top_must_be_positive(tool, tmp_path, capsys):
    path = tmp_path / "page.csv"
    write_page(path, PROGRAM, seed=1)
    with pytest.raises(SystemExit) as e:
        tool.main([str(path), "--top", "0"])
    assert e.value.code == 2
    assert "--top must be at least 1, got 0" in capsys.readouterr().err
