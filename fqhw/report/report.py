"""report.json (the result object) and report.md (the same, for people)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fqhw.outputs import plain

MODEL_ROWS = [("float", "Float"), ("uniform8", "Uniform 8-bit"), ("uniform4", "Uniform 4-bit"), ("compiled", "fqhw (compiled)")]


def build_report(*, cfg, splits, fm, sens, alloc, baselines, qm, finn, predicted, bitexact, timings, steps=None, baq=None) -> dict:
    net = fm.net
    # a FINN build, else an hls4ml project (--backend hls4ml), or nothing (an ASIC target)
    is_finn = hasattr(finn, "layer_estimates")
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
                "finn": finn.layer_estimates.get(la.name) if is_finn else None,
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
                "part": None if finn is None else finn.part,
                "predicted": predicted["total"],
                "finn": finn.summary() if is_finn else None,
                **({} if is_finn or finn is None else {"hls4ml": finn.summary()}),
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


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def group_cell(m: dict, group: str) -> str:
    """A group's accuracy with its 95 % Wilson interval, in percent: "74.2 [71.4, 76.8]"."""
    ci = m.get("group_acc_ci95", {}).get(group)
    acc = _pct(m["group_acc"].get(group))
    return acc if ci is None else f"{acc} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def solver_line(solver: dict) -> str:
    """The solver's verdict; when a time limit stopped a stage short of a proof, the best
    allocation found was used and how far it may be from the optimum is said."""
    line = f"Solver: {solver.get('status', '?')} in {solver.get('wall_time_s', float('nan')):.3f} s"
    if solver.get("status") == "OPTIMAL":
        return line + " (every stage proven optimal)"
    open_stages = [st for st in solver.get("stages", []) if st.get("status") != "OPTIMAL"]
    gaps = []
    for st in open_stages:
        obj, bound = st.get("objective"), st.get("bound")
        if obj is None or bound is None:
            gaps.append(f"{st['name']} (no solution or bound)")
        else:
            gaps.append(f"{st['name']} gap {100 * abs(obj - bound) / max(abs(obj), 1e-12):.2f} % (objective {obj:.6g}, bound {bound:.6g})")
    return (line + f"; the time limit ({solver.get('time_limit_s', '?')} s) stopped the search: the best allocation found is used. "
            f"Worst-group loss gap to its bound {100 * solver.get('gap', 0.0):.2f} %" + (f"; stages not proven: {'; '.join(gaps)}" if gaps else ""))


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
            f"| {label} | {_pct(m['overall_acc'])} | {_pct(m['mean_group_acc'])} | {_pct(m['worst_group_acc'])} ({m['worst_group']}) "
            f"| {_pct(m['gap_mean_worst'])} | " + " | ".join(per) + " |"
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
