"""Why solver + BAQ + projection loses to solver + QAT on cnv: the bits, or the weights?

    python bench/baq_start.py [--budget 4] [--seeds 0,1,2] [--cache-dir DIR]

`fqhw sidebyside`'s fqhw method learns widths with BAQ (its own fake-quant twin: learned
dead zone, LSQ-style rounding), projects them onto the budget, and then runs QAT starting
from the weights BAQ trained. This benchmark separates the two things BAQ changes: for
each seed it takes the projected allocation from the sidebyside record in the step cache
and runs the same QAT from the *original* float model. If that recovers solver + QAT's
worst group, the loss comes from carrying BAQ's weights over, not from its widths. Paired
statistics as in sidebyside (fqhw.fairness.stats). Writes bench/results/baq_start.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.fairness.stats import compare_paired
from fqhw.flow import CompileConfig, quantize_finetune, step_data, step_float_model
from fqhw.quant.qat import predict
from fqhw.sidebyside import METHODS, SideBySideConfig, run_inputs
from fqhw.stepcache import StepCache


def cached_record(cache: StepCache, cfg, fm, method: str) -> dict:
    sc = SideBySideConfig(compile=cfg)

    def missing():
        raise SystemExit(f"no sidebyside record of {method} at budget {cfg.budget:g}, seed {cfg.seed}: run bench/evidence.py first")

    got = cache.run("sidebyside", run_inputs(cfg, METHODS[method], fm.key, sc), missing, lambda r, f: None,
                    lambda f: json.loads((f / "run.json").read_text()))
    return got.value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "baq_start.json")
    args = ap.parse_args()
    base = CompileConfig(model="cnv", model_kwargs={"width": 0.25}, budget=args.budget, progress=False,
                         **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    cache = StepCache(base.cache_dir)
    preds = {"solver_qat": {}, "baq_weights": {}, "baq_bits_float_start": {}}
    rows, test = [], None
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = dataclasses.replace(base, seed=seed)
        splits = step_data(cfg)
        test = splits.test
        fm = step_float_model(cfg, splits)
        ref, baq = cached_record(cache, cfg, fm, "fqhw_qat"), cached_record(cache, cfg, fm, "fqhw")
        alloc = Allocation("baq-projected", [LayerAllocation(k, b, baq["act_bits"][k]) for k, b in baq["weight_bits"].items()])
        qm = quantize_finetune(cfg, fm, alloc, splits, desc=f"QAT from float, seed {seed}")
        preds["solver_qat"][seed] = np.asarray(ref["test_pred"])
        preds["baq_weights"][seed] = np.asarray(baq["test_pred"])
        preds["baq_bits_float_start"][seed] = predict(qm.model, splits.test)
        rows.append({"seed": seed, "projected_bits": baq["weight_bits"], "solver_bits": ref["weight_bits"],
                     "worst_group": {"solver_qat": ref["test"]["worst_group_acc"], "baq_weights": baq["test"]["worst_group_acc"],
                                     "baq_bits_float_start": qm.test_metrics["worst_group_acc"]}})
        print(f"seed {seed}: worst group solver+QAT {100 * ref['test']['worst_group_acc']:.1f}, BAQ (its weights) "
              f"{100 * baq['test']['worst_group_acc']:.1f}, BAQ's bits from the float model {100 * qm.test_metrics['worst_group_acc']:.1f}",
              flush=True)
    comps = {name: compare_paired(test.labels, test.groups, test.group_names, preds["solver_qat"], preds[name], "solver_qat", name).to_dict()
             for name in ("baq_weights", "baq_bits_float_start")}
    comps["float_start_vs_baq_weights"] = compare_paired(test.labels, test.groups, test.group_names, preds["baq_bits_float_start"],
                                                         preds["baq_weights"], "baq_bits_float_start", "baq_weights").to_dict()
    args.out.write_text(json.dumps({"budget": args.budget, "runs": rows, "comparisons": comps}, indent=2) + "\n")
    for name, c in comps.items():
        print(f"{c['reference']} minus {c['method']}: worst group {100 * c['diff']:+.1f} [{100 * c['diff_ci'][0]:+.1f}, "
              f"{100 * c['diff_ci'][1]:+.1f}], McNemar p {c['p_mcnemar']:.2g}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
