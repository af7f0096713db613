"""experiments/ncu_stalls.py against source pages whose sums are known by construction.

The CSVs are written here in Nsight Compute's layout (per kernel: a row naming it, the header,
one row per SASS instruction; numbers with thousands separators; the not-issued columns beside
the all-samples ones, different from them). One page has hand-set counts, so that the order of
reasons and instructions and the branch annotations are fixed; one has random counts (seeded
from the test's id), whose shares are recounted here in plain Python.
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
HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)",
          "Warp Stall Sampling (Not-issued Samples)", "Instructions Executed",
          *REASONS, *(r + " (Not Issued)" for r in REASONS)]

# (SASS line, samples by reason as in REASONS, executed)
PAGE = [
    ("SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R32+URZ], R27", [0, 100, 0, 10], 147_456),
    ("@!P0  BRA 0x7f00", [0, 5000, 0, 50], 147_456),
    ("LDS.U16 R23, [R28]", [0, 0, 300, 20], 909_312),
    ("STG.E.U16 desc[UR30][R20.64], R23", [0, 0, 2000, 100], 909_312),
    ("IMAD R1, R2, R3, RZ", [10, 0, 0, 900], 1_500_000),
    ("IMAD.WIDE.U32 R4, R5, 0x3, R6", [0, 0, 0, 400], 700_000),
    ("@P1  FFMA R7, R8, R9, R7", [0, 0, 0, 30], 1_200_000),
    ("BAR.SYNC.DEFER_BLOCKING 0x0", [1600, 0, 0, 0], 147_456),
]


@pytest.fixture(scope="module")
def tool():
    module = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(module)
    return module


def write_pages(path, kernels):
    """kernels: [(name, [(source, samples by reason, executed)])], one CSV."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        for name, page in kernels:
            w.writerow(["Kernel Name", name])
            w.writerow(HEADER)
            for i, (text, by_reason, executed) in enumerate(page):
                total = sum(by_reason)
                # Not issued: a part of each reason's samples, and a total that is not All's.
                w.writerow([hex(0x7000 + 16 * i), text, f"{total:,}", f"{total // 3:,}",
                            f"{executed:,}", *(f"{v:,}" for v in by_reason),
                            *(f"{v // 3 + 7:,}" for v in by_reason)])


def table_rows(text):
    return [line for line in text.splitlines() if re.match(r"\| \d+\.\d\d \|", line)]


def test_hand_set_page(tool, tmp_path):
    path = tmp_path / "page.csv"
    write_pages(path, [("void Probe<float>(int)", PAGE)])
    text = tool.summarize(str(path), top=8)
    total = sum(sum(c) for _, c, _ in PAGE)  # 10,620
    executed = sum(e for _, _, e in PAGE)
    assert f"{total:,} stall samples, {executed:,} warp instructions" in text
    assert "`void Probe<float>(int)`" in text
    # Reasons by share, largest first: long_sb 5100, short_sb 2300, barrier 1610, wait 1510.
    reasons = re.findall(r"^\| (\w+) \| (\d+\.\d)% \|$", text, re.M)
    assert reasons == [("long_sb", f"{100 * 5100 / total:.1f}"),
                       ("short_sb", f"{100 * 2300 / total:.1f}"),
                       ("barrier", f"{100 * 1610 / total:.1f}"),
                       ("wait", f"{100 * 1510 / total:.1f}")]
    rows = table_rows(text)
    listed = [re.search(r"`([^`]*)`", r).group(1) for r in rows]
    assert len(rows) == 8 and [t.split(" (after")[0] for t in listed[:4]] == [
        PAGE[1][0], PAGE[3][0], PAGE[7][0], PAGE[4][0]]
    bra, stg = rows[0], rows[1]
    assert bra.startswith(f"| {100 * 5050 / total:.2f} | 147,456 |")
    assert f"(after {PAGE[0][0]})" in bra and bra.endswith("| long_sb 99%, wait 1% |")
    assert stg.endswith("| short_sb 95%, wait 5% |") and "(after" not in stg
    ffma = next(r for r in rows if "FFMA" in r)
    assert "(after" not in ffma  # predicated, but not a branch
    # Samples by execution count, largest first: the three rows run 147,456 times, then the
    # two run 909,312 times.
    by_count = re.findall(r"^\| ([\d,]+) \| (\d+) \| (\d+\.\d)% \|$", text, re.M)
    assert by_count[:2] == [("147,456", "3", f"{100 * 6760 / total:.1f}"),
                            ("909,312", "2", f"{100 * 2420 / total:.1f}")]
    # Opcodes without predicates and modifiers: the two IMAD forms are one row.
    imad = 1_500_000 + 700_000
    assert f"| IMAD | {imad:,} | {100 * imad / executed:.1f}% |" in text
    assert f"| BRA | 147,456 | {100 * 147_456 / executed:.1f}% |" in text
    assert "| FFMA | 1,200,000 |" in text and "| @P1 |" not in text


def test_random_page_shares(tool, tmp_path, request):
    rng = random.Random(zlib.crc32(request.node.nodeid.encode()))
    page = [(text, [rng.randrange(1, 3000) for _ in REASONS], rng.randrange(1, 2_000_000))
            for text, _, _ in PAGE]
    path = tmp_path / "page.csv"
    write_pages(path, [("void Probe<float>(int)", page)])
    text = tool.summarize(str(path), top=3)
    total = sum(sum(c) for _, c, _ in page)
    for j, reason in enumerate(REASONS):
        share = 100 * sum(c[j] for _, c, _ in page) / total
        assert f"| {reason[len('stall_'):]} | {share:.1f}% |" in text
    rows = table_rows(text)
    order = sorted(range(len(page)), key=lambda i: -sum(page[i][1]))[:3]
    assert len(rows) == 3
    for line, i in zip(rows, order):
        assert line.startswith(f"| {100 * sum(page[i][1]) / total:.2f} | {page[i][2]:,} |")


def test_one_table_per_kernel(tool, tmp_path):
    path = tmp_path / "two.csv"
    second = [(t, [c[0] * 2 + 1 for c in [by]] + by[1:], e) for t, by, e in PAGE]
    write_pages(path, [("void First(int)", PAGE), ("void Second(int)", second)])
    text = tool.summarize(str(path), top=2)
    first_total = sum(sum(c) for _, c, _ in PAGE)
    second_total = sum(sum(c) for _, c, _ in second)
    assert text.index("`void First(int)`") < text.index("`void Second(int)`")
    assert f"{first_total:,} stall samples" in text and f"{second_total:,} stall samples" in text
    assert len(table_rows(text)) == 4  # two a kernel: the second header is no instruction


def test_bad_pages(tool, tmp_path, capsys):
    details = tmp_path / "details.csv"
    details.write_text('"ID","Section Name","Metric Name"\n"0","SpeedOfLight","Duration"\n')
    idle = tmp_path / "idle.csv"
    write_pages(idle, [("void Idle(int)", [(t, c, 0) for t, c, _ in PAGE])])
    good = tmp_path / "good.csv"
    write_pages(good, [("void Probe<float>(int)", PAGE)])
    assert tool.main([str(details), str(idle), str(good)]) == 1
    captured = capsys.readouterr()
    assert "not a SASS source page" in captured.err and str(details) in captured.err
    assert "void Idle(int): no stall samples or no executed instructions" in captured.err
    assert "`void Probe<float>(int)`" in captured.out  # the good file still summarised


def test_top_must_be_positive(tool, tmp_path, capsys):
    path = tmp_path / "page.csv"
    write_pages(path, [("void Probe<float>(int)", PAGE)])
    with pytest.raises(SystemExit) as e:
        tool.main([str(path), "--top", "0"])
    assert e.value.code == 2
    assert "--top must be at least 1, got 0" in capsys.readouterr().err
