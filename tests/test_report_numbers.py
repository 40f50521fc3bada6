"""The numbers report.md prints are report.json's: each accuracy (overall, mean group,
worst group, gap, every group with its Wilson interval), each layer's widths and folding,
the average width and the FINN throughput. Read back from the Markdown, not from the code
that wrote it."""
from __future__ import annotations

import json
import re

from fqhw.report.report import markdown

LABELS = {"float": "Float", "uniform8": "Uniform 8-bit", "uniform4": "Uniform 4-bit", "compiled": "fqhw (compiled)"}


def _table(md: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table after `heading`, without its header."""
    lines = md.split("\n")
    i = next(k for k, line in enumerate(lines) if line.startswith(heading))
    while not lines[i].startswith("|"):
        i += 1
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    return rows[2:]  # header and --- line


def _same_pct(cell: str, v: float) -> bool:
    """The cell is v in percent to one decimal (within the rounding of the last digit)."""
    return abs(float(cell) - 100 * v) <= 0.05 + 1e-9


def check_report_md(report: dict, md: str) -> None:
    groups = report["data"]["groups"]
    rows = {r[0]: r for r in _table(md, "## Accuracy on the test split")}
    printed = 0
    for key, label in LABELS.items():
        m = report["accuracy"].get(key)
        if m is None:
            assert label not in rows
            continue
        printed += 1
        r = rows[label]
        assert _same_pct(r[1], m["overall_acc"]) and _same_pct(r[2], m["mean_group_acc"]), (label, r)
        worst = re.fullmatch(r"([\d.]+) \((.+)\)", r[3])
        assert worst and _same_pct(worst.group(1), m["worst_group_acc"]) and worst.group(2) == m["worst_group"], (label, r)
        assert _same_pct(r[4], m["gap_mean_worst"]), (label, r)
        for g, cell in zip(groups, r[5:]):
            got = re.fullmatch(r"([\d.]+)(?: \[([\d.]+), ([\d.]+)\])?", cell)
            assert got and _same_pct(got.group(1), m["group_acc"][g]), (label, g, cell)
            ci = m.get("group_acc_ci95", {}).get(g)
            if ci is None:
                assert got.group(2) is None
            else:
                assert _same_pct(got.group(2), ci[0]) and _same_pct(got.group(3), ci[1]), (label, g, cell)
    assert printed == len(rows) and printed >= 1
    a = report["allocation"]
    head = re.search(r"## Allocation \(average weight width ([\d.]+) bits, input (\d+) bits\)", md)
    assert head and abs(float(head.group(1)) - a["avg_weight_bits"]) <= 0.0005 + 1e-12 and int(head.group(2)) == a["input_bits"]
    layers = _table(md, "## Allocation")
    assert [r[0] for r in layers] == [la["name"] for la in a["layers"]]
    for r, la in zip(layers, a["layers"]):
        assert r[1] == f"{la['mw']} x {la['mh']}" and int(r[2]) == la["params"]
        assert int(r[3]) == la["weight_bits"] and int(r[4]) == la["in_bits"]
        assert r[5] == (str(la["act_bits"]) if la["act_bits"] else "acc")
        assert int(r[6]) == la["pe"] and int(r[7]) == la["simd"]
    hw = report["hardware"].get("finn")
    if hw:
        fps = re.search(r"Estimated throughput ([\d.]+) images/s", md)
        assert fps and abs(float(fps.group(1)) - hw["fps"]) <= 0.05 + 1e-9
    be = report["bit_exact"]
    assert md.count("PASS: " if be["ok"] else "FAIL: ") == 1 and f"compared on {be['n_images']} test images" in md


def _metrics(accs: dict, ci: bool = True) -> dict:
    vals = list(accs.values())
    worst = min(accs, key=accs.get)
    return {
        "overall_acc": sum(vals) / len(vals) + 0.0123, "mean_group_acc": sum(vals) / len(vals), "worst_group": worst,
        "worst_group_acc": accs[worst], "gap_mean_worst": sum(vals) / len(vals) - accs[worst], "group_acc": accs,
        "group_n": {g: 100 for g in accs},
        **({"group_acc_ci95": {g: [v - 0.04567, min(1.0, v + 0.03456)] for g, v in accs.items()}} if ci else {}),
    }


def small_report() -> dict:
    groups = ["light", "dark"]
    return {
        "target": "pynq-z2", "budget": 4.0,
        "data": {"groups": groups},
        "accuracy": {"float": _metrics({"light": 0.9126, "dark": 0.8049}), "uniform8": _metrics({"light": 0.90051, "dark": 0.7999}),
                     "compiled": _metrics({"light": 0.8875, "dark": 0.70349}, ci=False)},
        "allocation": {
            "avg_weight_bits": 3.98765, "input_bits": 8, "solver": {"status": "OPTIMAL", "wall_time_s": 0.5},
            "layers": [
                {"name": "conv0", "mw": 27, "mh": 16, "params": 432, "weight_bits": 8, "in_bits": 8, "act_bits": 7, "pe": 2, "simd": 27,
                 "finn": {"cycles": 8192, "LUT": 1234, "BRAM_18K": 1, "DSP": 0}},
                {"name": "fc", "mw": 64, "mh": 4, "params": 256, "weight_bits": 8, "in_bits": 7, "act_bits": None, "pe": 4, "simd": 1,
                 "finn": None},
            ],
        },
        "hardware": {"part": "xc7z020clg400-1", "predicted": {"caps": {"LUT": 37240}},
                     "finn": {"total": {"LUT": 5000}, "fps": 12207.03125, "latency_cycles": 57393, "latency_ms": 0.57393, "clock_ns": 10.0}},
        "bit_exact": {"ok": True, "backends": ["brevitas", "qonnx", "finn"], "n_images": 32, "keys": ["input", "head.acc"]},
        "timings_s": {"data": 0.1},
        "steps": {"data": {"reused": False}},
    }


def test_small_report_md_prints_report_json_numbers():
    report = small_report()
    md = markdown(report)
    check_report_md(report, md)
    assert "Uniform 4-bit" not in md  # a row without numbers is left out
    assert "| Float | 87.1 | 85.9 | 80.5 (dark) | 5.4 | 91.3 [86.7, 94.7] | 80.5 [75.9, 83.9] |" in md


def test_a_wrong_number_is_caught():
    report = small_report()
    md = markdown(report)
    report["accuracy"]["float"]["group_acc"]["dark"] += 0.002
    try:
        check_report_md(report, md)
    except AssertionError:
        return
    raise AssertionError("check_report_md missed a changed accuracy")


def test_compiled_report_md_prints_report_json_numbers(compiled):
    out, _ = compiled
    report = json.loads((out / "report.json").read_text())
    check_report_md(report, (out / "report.md").read_text())
