"""Solver allocation + QAT against solver + BAQ + projection + recovery QAT.

    python bench/baq_compare.py [--budget 4] [--target pynq-z2] [--baq-epochs 3] [--qat-epochs 3]

On the built-in synthetic data (default compile settings, image size 32): trains (or reuses
from --cache-dir) the float model, computes the importance and the solver's allocation,
then
  A  QAT at the solver's allocation (what `fqhw compile` deploys),
  A+ the same with baq-epochs + qat-epochs of QAT (A with BAQ's extra training time),
  B  BAQ from the solver's allocation, projection by the solver, recovery QAT,
and, for reference with the paper, the weight-only fake-quant model at the solver's and at
the projected allocation (no fine-tuning; not deployable). Reports test mean- and
worst-group accuracy, average weight bits and wall times; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from fqhw.flow import CompileConfig, quantize_finetune, step_allocate, step_data, step_float_model, step_importance
from fqhw.quant.baq import learn_bits
from fqhw.quant.baq_model import weight_only_model
from fqhw.quant.projection import check_budget_met
from fqhw.quant.qat import evaluate_groups


def row(metrics: dict, bits: float, seconds: float) -> dict:
    return {
        "mean_group_acc": round(100 * metrics["mean_group_acc"], 2),
        "worst_group_acc": round(100 * metrics["worst_group_acc"], 2),
        "overall_acc": round(100 * metrics["overall_acc"], 2),
        "avg_weight_bits": round(bits, 4),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="pynq-z2")
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--baq-epochs", type=int, default=3)
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--bitrate-lambda", type=float, default=2.0)
    ap.add_argument("--bit-lr", type=float, default=0.05)
    ap.add_argument("--no-longer-qat", action="store_true", help="skip A+ (QAT for baq + qat epochs)")
    ap.add_argument("--only-baq", action="store_true", help="skip A and A+")
    ap.add_argument("--fill-budget", action="store_true", help="project with fill_budget=True")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fqhw-baq-bench-cache")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "baq_compare.json")
    args = ap.parse_args()

    cfg = CompileConfig(target=args.target, budget=args.budget, qat_epochs=args.qat_epochs, cache_dir=args.cache_dir, progress=False)
    t0 = time.perf_counter()
    splits = step_data(cfg)
    fm = step_float_model(cfg, splits)
    t_float = time.perf_counter() - t0
    sens = step_importance(cfg, fm, splits)
    alloc = step_allocate(cfg, fm.net, sens)
    t_setup = time.perf_counter() - t0
    rows: dict[str, dict] = {"float": row(evaluate_groups(fm.model, splits.test), 32.0, t_float)}

    if not args.only_baq:
        t = time.perf_counter()
        qa = quantize_finetune(cfg, fm, alloc, splits, desc="QAT")
        rows["A: solver + QAT"] = row(qa.test_metrics, alloc.avg_weight_bits(fm.net), time.perf_counter() - t)

    if not (args.no_longer_qat or args.only_baq):
        t = time.perf_counter()
        long_cfg = replace(cfg, qat_epochs=args.baq_epochs + args.qat_epochs)
        ql = quantize_finetune(long_cfg, fm, alloc, splits, desc="QAT long")
        rows[f"A+: solver + QAT x{args.baq_epochs + args.qat_epochs}"] = row(ql.test_metrics, alloc.avg_weight_bits(fm.net), time.perf_counter() - t)

    t = time.perf_counter()
    res = learn_bits(
        fm.model, alloc, splits, fm.net, budget=cfg.budget, epochs=args.baq_epochs, lr=cfg.qat_lr, bit_lr=args.bit_lr,
        fairness_lambda=cfg.fairness_lambda, bitrate_lambda=args.bitrate_lambda, seed=cfg.seed, time_limit_s=cfg.solver_time_limit_s,
        fill_budget=args.fill_budget,
    )
    t_baq = time.perf_counter() - t
    fm_baq = replace(fm, model=res.float_model(fm.model))
    qb = quantize_finetune(cfg, fm_baq, res.allocation, splits, desc="QAT after BAQ")
    check_budget_met(fm.net, qb.allocation, cfg.budget)
    b_label = "B: solver + BAQ + projection" + (" (fill)" if args.fill_budget else "") + " + QAT"
    rows[b_label] = row(qb.test_metrics, res.allocation.avg_weight_bits(fm.net), time.perf_counter() - t)
    rows[b_label]["baq_seconds"] = round(t_baq, 1)
    twin_val = res.history[-1]
    rows["BAQ twin (learned widths, before projection)"] = row(
        evaluate_groups(res.model, splits.test), res.model.avg_bits(rounded=True).item(), t_baq
    )

    for label, a in (("solver", alloc), ("projected", res.allocation)):
        wo = weight_only_model(fm.model, a, fm.net)
        rows[f"weight-only fake-quant at {label} widths, no QAT (not deployable)"] = row(evaluate_groups(wo, splits.test), a.avg_weight_bits(fm.net), 0.0)

    out = {
        "target": args.target,
        "budget": args.budget,
        "data": "builtin synthetic, image size 32, 6000/1500/5000",
        "settings": {"qat_epochs": args.qat_epochs, "baq_epochs": args.baq_epochs, "bitrate_lambda": args.bitrate_lambda,
                     "bit_lr": args.bit_lr, "fill_budget": args.fill_budget, "fairness_lambda": cfg.fairness_lambda, "seed": cfg.seed},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "setup_seconds": round(t_setup, 1),
        "float_cached": fm.cache_hit,
        "solver_allocation": {la.name: [la.weight_bits, la.act_bits, la.pe, la.simd] for la in alloc.layers},
        "baq": {
            "learned_bits": {k: round(v, 3) for k, v in res.learned_bits.items()},
            "dead_zone": {k: round(v, 5) for k, v in res.dead_zone.items()},
            "projected_allocation": {la.name: [la.weight_bits, la.act_bits, la.pe, la.simd] for la in res.allocation.layers},
            "projection_distance": res.allocation.solver["projection"]["distance"],
            "history": [{k: v for k, v in h.items()} for h in res.history],
            "twin_val_last_epoch": {k: twin_val[k] for k in ("val_mean_group_acc", "val_worst_group_acc")},
        },
        "rows": rows,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'model':<72} {'mean':>6} {'worst':>6} {'bits':>6} {'s':>6}")
    for k, r in rows.items():
        print(f"{k:<72} {r['mean_group_acc']:>6.2f} {r['worst_group_acc']:>6.2f} {r['avg_weight_bits']:>6.3f} {r['seconds']:>6.1f}")
    print(f"solver widths {out['solver_allocation']}")
    print(f"BAQ learned {out['baq']['learned_bits']} -> projected {out['baq']['projected_allocation']}")
    print(f"total {out['total_seconds']} s (setup {out['setup_seconds']} s, float cached: {fm.cache_hit})")


if __name__ == "__main__":
    main()
