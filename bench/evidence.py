"""The evidence for fqhw's claim: every method of `fqhw sidebyside` on FINN's CNV, at budgets 3
and 4, over seeds, with paired statistics against fqhw.

    python bench/evidence.py [--budgets 3,4] [--seeds 0,1,2] [--cache-dir DIR] [--readme]

Runs (or, from the step cache, reuses) one `fqhw sidebyside` per budget:

    fqhw sidebyside --model cnv --model-arg width=0.25 --budget B --seeds 0,1,2 --no-tune

(built-in data: training split skewed like Fitzpatrick17k, validation and test splits
500 / 1000 images per skin type), reads bench/results/sensitivity_fidelity.json (written by
bench/sensitivity_fidelity.py) and writes bench/results/evidence.json: per budget and
method avg_bits, worst_group (mean over seeds of each seed's lowest group accuracy),
worst_group_ci (95 % bootstrap over seeds and images), mean_group and, for every method
but fqhw, diff_vs_fqhw (fqhw minus method, points), its interval, p_vs_fqhw (exact McNemar
on the worst group, pooled over seeds) and p_holm (Holm-adjusted over the methods of that
budget); plus test_counts and fidelity_spearman. bench/results/evidence.md is the table
rendered from it; `--readme` also writes that table into README.md between its evidence
markers (tests/test_evidence.py checks that README and evidence.json agree).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- evidence table: begin (python bench/evidence.py --readme) -->", "<!-- evidence table: end -->"
MODEL_ARGS = ["--model", "cnv", "--model-arg", "width=0.25"]


def sidebyside_args(budget: str, seeds: str, out: Path | str, cache_dir: Path | None, tune: bool) -> list[str]:
    return ["sidebyside", *MODEL_ARGS, "--budget", budget, "--seeds", seeds, "--out", str(out), "--quiet",
            *([] if tune else ["--no-tune"]), *(["--cache-dir", str(cache_dir)] if cache_dir else [])]


def evidence_from(sbs: dict[str, dict], fidelity: dict | None, command: dict) -> dict:
    """evidence.json's content from each budget's sidebyside.json."""
    budgets = {}
    counts = None
    for budget, res in sbs.items():
        ref = res["reference"]
        comps = res["comparisons"]
        rows = {}
        for m in res["methods"]:
            s = res["summary"][m]
            row = {
                "label": res["labels"][m],
                "avg_bits": s["avg_weight_bits"]["mean"],
                "worst_group": s["worst_group_acc"]["mean"],
                "worst_group_std": s["worst_group_acc"]["std"],
                "mean_group": s["mean_group_acc"]["mean"],
                "overall": s["overall_acc"]["mean"],
            }
            if m == ref:
                row["worst_group_ci"] = next(iter(comps.values()))["worst_group_ref_ci"]
            else:
                c = comps[m]
                row.update(worst_group_ci=c["worst_group_method_ci"], diff_vs_fqhw=100 * c["diff"],
                           diff_vs_fqhw_ci=[100 * v for v in c["diff_ci"]], p_vs_fqhw=c["p_mcnemar"], p_holm=c["p_holm"],
                           mcnemar_group=c["group"], fqhw_only_right=c["ref_only_right"], method_only_right=c["method_only_right"])
            rows[m] = row
        budgets[budget] = {"reference": ref, "seeds": res["seeds"], "wall_time_s": res["wall_time_s"], "methods": rows}
        counts = res["test_counts"]
    out = {"command": command, "budgets": budgets, "test_counts": counts}
    if fidelity is not None:
        out["fidelity_spearman"] = {
            stage: {k: v["rho"] for k, v in s.items()} | {"n": s["worst_loss"]["n"]} for stage, s in fidelity["spearman"].items()
        }
    return out


def render(ev: dict) -> str:
    """The README's evidence table."""
    lines = [
        "| budget | method | avg bits | worst group [95 % CI] | mean group | fqhw minus method, worst group [95 % CI] | McNemar p (Holm) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for budget, b in ev["budgets"].items():
        for m, r in b["methods"].items():
            lo, hi = r["worst_group_ci"]
            cells = [budget, r["label"], f"{r['avg_bits']:.2f}", f"{100 * r['worst_group']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                     f"{100 * r['mean_group']:.1f}"]
            if "diff_vs_fqhw" in r:
                dl, dh = r["diff_vs_fqhw_ci"]
                cells += [f"{r['diff_vs_fqhw']:+.1f} [{dl:+.1f}, {dh:+.1f}]", f"{r['p_vs_fqhw']:.2g} ({r['p_holm']:.2g})"]
            else:
                cells += ["(reference)", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_readme(table: str, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no evidence markers ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + table + END + tail)


def main() -> None:
    from fqhw.cli import main as fqhw_main

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="3,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("fqhw-evidence"), help="where each budget's sidebyside folder goes")
    ap.add_argument("--tune", action="store_true", help="choose QAT's settings on validation (4x the QAT time)")
    ap.add_argument("--readme", action="store_true", help="also write the table into README.md")
    ap.add_argument("--out", type=Path, default=RESULTS / "evidence.json")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once (fqhw sidebyside --jobs; the same numbers as 1)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    sbs = {}
    for b in args.budgets.split(","):
        out = args.work / f"budget{b}"
        rc = fqhw_main([*sidebyside_args(b, args.seeds, out, args.cache_dir, args.tune), "--jobs", str(args.jobs)])
        if rc != 0:
            sys.exit(rc)
        sbs[b] = json.loads((out / "sidebyside.json").read_text())
        (RESULTS / f"evidence_sidebyside_budget{b}.md").write_text((out / "sidebyside.md").read_text())
    fid_path = RESULTS / "sensitivity_fidelity.json"
    fidelity = json.loads(fid_path.read_text()) if fid_path.exists() else None
    command = {"sidebyside": " ".join(["fqhw", *sidebyside_args("B", args.seeds, "OUT", None, args.tune)]),
               "fidelity": "python bench/sensitivity_fidelity.py"}
    ev = evidence_from(sbs, fidelity, command)
    ev["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(ev, indent=2) + "\n")
    table = render(ev)
    (RESULTS / "evidence.md").write_text(table)
    if args.readme:
        write_readme(table)
    print(table, end="")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
