"""report.html: one self-contained page (figures inlined as PNG data URIs)."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from fqhw.report import plots
from fqhw.report.report import MODEL_ROWS, group_cell, solver_line

CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.pass{color:#080;font-weight:bold}.fail{color:#b00;font-weight:bold}img{max-width:100%}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def render(report: dict) -> str:
    acc = report["accuracy"]
    fair_rows = []
    for key, label in MODEL_ROWS:
        m = acc.get(key)
        if m:
            fair_rows.append([label, _pct(m["overall_acc"]), _pct(m["mean_group_acc"]), f"{_pct(m['worst_group_acc'])} ({m['worst_group']})",
                              _pct(m["gap_mean_worst"]), _pct(m["balanced_acc"]), _pct(m.get("eopp0")), _pct(m.get("eopp1")), _pct(m.get("eodd")), _pct(m.get("dp_gap"))])
    alloc = report["allocation"]
    layer_rows = [
        [la["name"], f"{la['mw']} x {la['mh']}", la["params"], la["weight_bits"], la["in_bits"], la["act_bits"] or "acc", la["pe"], la["simd"],
         (la.get("finn") or {}).get("cycles", "-"), (la.get("finn") or {}).get("LUT", "-"), (la.get("finn") or {}).get("BRAM_18K", "-"), (la.get("finn") or {}).get("DSP", "-")]
        for la in alloc["layers"]
    ]
    be = report["bit_exact"]
    verdict = (f'<span class="pass">PASS</span>: the integer values of {", ".join(be["backends"])} agree exactly on {be["n_images"]} test images '
               f'({len(be["keys"])} tensors: {", ".join(be["keys"])}).') if be["ok"] else f'<span class="fail">FAIL</span>: {html.escape(str(be["first_mismatch"]))}'
    hw = report["hardware"]["finn"]
    solver = alloc["solver"]
    parts = [
        f"<h1>fqhw compile: {html.escape(report['target'])}, budget {report['budget']:g} bits</h1>",
        f"<p>Bit-exactness: {verdict}</p>",
        "<h2>Accuracy and fairness on the test split (%)</h2>",
        _table(["model", "overall", "mean group", "worst group", "gap", "balanced", "EOpp0", "EOpp1", "EOdd", "DP gap"], fair_rows),
        _img(plots.group_accuracy(report), "accuracy per group"),
        _table(["model"] + [f"{g} (n={acc['float']['group_n'].get(g, 0)})" for g in report["data"]["groups"]],
               [[label] + [group_cell(acc[key], g) for g in report["data"]["groups"]] for key, label in MODEL_ROWS if key in acc]),
        "<p>Per group: accuracy [95 % Wilson interval].</p>",
        "<h2>Allocation</h2>",
        f"<p>Average weight width {alloc['avg_weight_bits']:.3f} bits (budget {report['budget']:g}). {html.escape(solver_line(solver))}.</p>",
        _img(plots.layer_widths(report), "widths per layer"),
        _table(["layer", "MW x MH", "params", "W bits", "in bits", "out bits", "PE", "SIMD", "cycles", "LUT", "BRAM_18K", "DSP"], layer_rows),
        *(_hardware(report, hw)),
        "<h2>Step times (s)</h2>",
        _table(["step", "s"], [[k, f"{v:.2f}"] for k, v in report["timings_s"].items()]),
    ]
    return f"<!doctype html><html><head><meta charset='utf-8'><title>fqhw report</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n"


def _hardware(report: dict, hw: dict | None) -> list[str]:
    if hw is None and "hls4ml" not in report["hardware"]:  # an ASIC target
        pred = report["hardware"]["predicted"]
        return [
            f"<h2>Hardware ({html.escape(report['target'])}: cost model only)</h2>",
            _table(["quantity", "predicted"], [[k, f"{v:g}"] for k, v in pred.items() if isinstance(v, (int, float))]),
        ]
    if hw is None:  # --backend hls4ml
        h = report["hardware"]["hls4ml"]
        return [
            "<h2>Hardware (hls4ml project)</h2>",
            f"<p>{html.escape(h['backend'])} for {html.escape(str(h['board']))} ({html.escape(h['part'])}), {html.escape(h['io_type'])}; "
            f"C simulation compiled in {h['compile_s']:.1f} s. Project: {html.escape(h['project_dir'])}.</p>",
            _table(["layer", "precisions", "accumulator bits", "reuse factor"],
                   [[n, ", ".join(f"{k} {v}" for k, v in p.items()), h["accumulator_bits"].get(n, "-"), h["reuse_factors"].get(n, "-")]
                    for n, p in h["precisions"].items()]),
        ]
    return [
        "<h2>Hardware (FINN estimates)</h2>",
        f"<p>{hw.get('fps', 0):.1f} images/s, latency {hw.get('latency_cycles')} cycles ({hw.get('latency_ms', 0):.3f} ms) at {hw.get('clock_ns')} ns.</p>",
        _img(plots.resources(report), "resource use"),
    ]


def write_html(report: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / "report.html"
    path.write_text(render(report))
    return path
