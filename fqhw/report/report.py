"""report.json (the result object) and report.md (the same, for people)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fqhw.outputs import plain
from fqhw.report.cells import MODEL_ROWS, group_cell, pct, solver_line



def build_report(*, cfg, splits, fm, sens, alloc, baselines, qm, build, backend, predicted, bitexact, timings, steps=None, baq=None) -> dict:
    """`build`: the backend's build (None for an ASIC target), summarised under the
    backend's name in "hardware"; a build with per-layer estimates (FINN's) gives them per
    layer."""
    net = fm.net
    estimates = getattr(build, "layer_estimates", None)
    accuracy = {**baselines, "compiled": qm.test_metrics}
    predicted_loss = sens.predicted(
        {la.name: la.weight_bits for la in alloc.layers}, {la.name: la.act_bits for la in alloc.layers}
    )
    layers = []
    for la, spec in zip(alloc.layers, net.layers):
        layers.append(
            {
                "name": la.name,
                "kind": spec.kind,
                "mw": spec.mw,
                "mh": spec.mh,
                "params": spec.params,
                "weight_bits": la.weight_bits,
                "in_bits": alloc.input_bits_of(net, la.name),
                "act_bits": la.act_bits,
                "pe": la.pe,
                "simd": la.simd,
                "predicted": predicted["layers"].get(la.name),
                "finn": estimates.get(la.name) if estimates is not None else None,
            }
        )
    return plain(
        {
            "target": cfg.target,
            "budget": cfg.budget,
            "config": cfg.to_dict(),
            "data": {"name": splits.name, "groups": splits.test.group_names, "classes": splits.test.class_names,
                     "n_train": len(splits.train), "n_val": len(splits.val), "n_test": len(splits.test)},
            "float_model": {"cache_hit": fm.cache_hit, **fm.info},
            "accuracy": accuracy,
            "allocation": {
                "avg_weight_bits": alloc.avg_weight_bits(net),
                "input_bits": alloc.input_bits,
                "layers": layers,
                "solver": alloc.solver,
                "predicted_group_loss_increase": dict(zip(sens.groups, predicted_loss.tolist())),
            },
            "hardware": {
                "part": None if build is None else build.part,
                "predicted": predicted["total"],
                "finn": None,  # every report has the key; a FINN build fills it
                **({} if build is None else {backend: build.summary()}),
            },
            "qat": qm.qat,
            # learned bits (--baq-epochs): warm start, learned and projected widths
            "baq": baq,
            "bit_exact": bitexact.to_dict(),
            "timings_s": timings,
            # per step: seconds, whether its output was reused from the cache, its input key
            "steps": steps or {},
        }
    )


def markdown(report: dict) -> str:
    acc = report["accuracy"]
    groups = report["data"]["groups"]
    lines = [
        f"# fqhw compile: {report['target']}, budget {report['budget']:g} bits",
        "",
        "## Accuracy on the test split (%)",
        "",
        "Per group: accuracy [95 % Wilson interval]; test images per group: "
        + ", ".join(f"{g} {acc['float']['group_n'].get(g, 0)}" for g in groups if "float" in acc) + ".",
        "",
        "| model | overall | mean group | worst group | gap | " + " | ".join(groups) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in groups) + " |",
    ]
    for key, label in MODEL_ROWS:
        m = acc.get(key)
        if m is None:
            continue
        per = [group_cell(m, g) for g in groups]
        lines.append(
            f"| {label} | {pct(m['overall_acc'])} | {pct(m['mean_group_acc'])} | {pct(m['worst_group_acc'])} ({m['worst_group']}) "
            f"| {pct(m['gap_mean_worst'])} | " + " | ".join(per) + " |"
        )
    a = report["allocation"]
    lines += [
        "",
        f"## Allocation (average weight width {a['avg_weight_bits']:.3f} bits, input {a['input_bits']} bits)",
        "",
        solver_line(a["solver"]),
        *([] if not report.get("baq") else [
            "",
            "Learned bits (BAQ): warm start " + ", ".join(f"{k} {v}" for k, v in report["baq"]["warm_start"].items())
            + "; learned " + ", ".join(f"{k} {v:.2f}" for k, v in report["baq"]["learned_bits"].items())
            + "; projected by the solver onto the budget and the board: " + ", ".join(f"{k} {v}" for k, v in report["baq"]["projected"].items()),
        ]),
        "",
        "| layer | MW x MH | params | W bits | in bits | out bits | PE | SIMD | cycles (FINN) | LUT (FINN) | BRAM_18K (FINN) | DSP (FINN) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for la in a["layers"]:
        f = la.get("finn") or {}
        lines.append(
            f"| {la['name']} | {la['mw']} x {la['mh']} | {la['params']} | {la['weight_bits']} | {la['in_bits']} | {la['act_bits'] or 'acc'} "
            f"| {la['pe']} | {la['simd']} | {f.get('cycles', '-')} | {f.get('LUT', '-')} | {f.get('BRAM_18K', '-')} | {f.get('DSP', '-')} |"
        )
    hw = report["hardware"]["finn"]
    if hw is None and "hls4ml" not in report["hardware"]:  # an ASIC target: its cost model only
        pred = report["hardware"]["predicted"]
        lines += ["", f"## {report['target']} (cost model only: no accelerator is built for an ASIC target)", "",
                  "| quantity | predicted |", "| --- | --- |"]
        lines += [f"| {k} | {v:g} |" for k, v in pred.items() if isinstance(v, (int, float))]
        hw = {}
    elif hw is None:  # --backend hls4ml
        h = report["hardware"]["hls4ml"]
        lines += ["", f"## hls4ml project ({h['backend']}, board {h['board']}, {h['part']}, {h['io_type']})", "",
                  f"Project in {h['project_dir']}; C simulation compiled in {h['compile_s']:.1f} s. The allocation was priced by "
                  f"the FINN cost model: {report['hardware']['predicted'].get('fps', float('nan')):.1f} images/s predicted there.", "",
                  "| layer | precisions | accumulator bits | reuse factor |", "| --- | --- | --- | --- |"]
        for name, prec in h["precisions"].items():
            lines.append(f"| {name} | {', '.join(f'{k} {v}' for k, v in prec.items())} | {h['accumulator_bits'].get(name, '-')} | {h['reuse_factors'].get(name, '-')} |")
        hw = {}
    else:
        lines += [
            "",
            f"## FINN estimates ({report['hardware']['part']})",
            "",
            "| resource | used | available (after FINN's utilisation limit) |",
            "| --- | --- | --- |",
        ]
        for res, used in hw.get("total", {}).items():
            if res not in report["hardware"]["predicted"].get("caps", {}):
                continue
            cap = report["hardware"]["predicted"].get("caps", {}).get(res)
            lines.append(f"| {res} | {used:g} | {cap if cap is not None else '-'} |")
        lines += [
            "",
            f"Estimated throughput {hw.get('fps', float('nan')):.1f} images/s, latency {hw.get('latency_cycles', '-')} cycles "
            f"({hw.get('latency_ms', float('nan')):.3f} ms) at {hw.get('clock_ns', '-')} ns.",
        ]
    lines += [
        "",
        "## Bit-exactness",
        "",
    ]
    be = report["bit_exact"]
    verdict = "PASS" if be["ok"] else "FAIL"
    thr = hw.get("thresholds_differing")
    lines.append(
        f"{verdict}: integer values of {', '.join(be['backends'])} compared on {be['n_images']} test images, "
        f"{len(be['keys'])} tensors ({', '.join(be['keys'])})."
    )
    if thr is not None:
        lines.append(
            f"\nFINN's integer thresholds against float64 thresholds from the QONNX file: {thr} differ "
            "(0 means the dataflow graph gives the same codes as the QONNX model for every accumulator value, not only on the images tried)."
        )
    steps = report.get("steps") or {}
    lines += ["", "## Step times (s)", "", "| step | s | reused |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:.2f} | {'yes' if steps.get(k, {}).get('reused') else 'no'} |" for k, v in report["timings_s"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> None:
    Path(out_dir, "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    Path(out_dir, "report.md").write_text(markdown(report))
    from fqhw.report.html import write_html
    from fqhw.report.screenshot import find_chromium, screenshot

    html_path = write_html(report, out_dir)
    if find_chromium() is not None:  # a picture of the page, for people and for CI
        try:
            screenshot(html_path, Path(out_dir, "report.png"))
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:  # a broken browser costs the picture only
            print(f"fqhw: warning: no report.png: {e}", file=sys.stderr)
