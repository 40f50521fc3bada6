"""Does the solver's objective predict what quantization does to the worst group?

    python bench/sensitivity_fidelity.py [--draws 36] [--qat 12] [--jobs N] [--out bench/results/sensitivity_fidelity.json]

The CP-SAT allocator minimises the worst group's *predicted* loss increase: the sum, over
layers, of the per-group tables in sensitivity.json (fqhw.fairness.sensitivity: Fisher
second-order estimates, additive across layers). This benchmark draws random allocations
that meet budgets 3, 4 and 5 (parameter-weighted average weight width within 0.5 bits
under the budget; first and last layer at 8 bits, as the flow pins them; every other
layer's weights 2..8 bits, activations 3..8 bits, uniformly at random), and for each one

- predicts the per-group loss increase from the sensitivity tables (what the solver sees);
- measures it after post-training quantization (the flow's Brevitas model, calibrated on
  8 training batches, no fine-tuning): per group, mean cross-entropy on the test split
  minus the float model's;
- for the first `--qat` draws, measures it again after the flow's normal QAT.

It reports Spearman's rank correlation (scipy) of the predicted worst-group loss increase
against the measured worst-group loss increase and against the measured worst-group
accuracy (a good objective gives a strong positive and a strong negative correlation),
and the same over all (allocation, group) cells. The model is the evidence runs' one: cnv
at width 0.25 on the built-in data, seed 0 (the float model and the importance come from
the step cache when `--cache-dir` holds them, else they are computed).

Each draw is a job of fqhw's executor (fqhw.executor: `--jobs N` worker processes,
`--executor ray`, every job at `--threads-per-job` torch threads) and a step-cache entry
("fidelity_draw"), so a rerun reuses the draws it finished and `--jobs 2` gives the numbers
of `--jobs 1`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.cliargs import add_executor_args
from fqhw.config import CompileConfig, pinned_edges
from fqhw.executor import Executor
from fqhw.flow import calibrated_quant_model, quantize_finetune, step_data, step_float_model, step_importance
from fqhw.sidebyside import seed_state
from fqhw.stepcache import StepCache

BUDGETS = (3, 4, 5)
WEIGHT_BITS = range(2, 9)
ACT_BITS = range(3, 9)


@torch.no_grad()
def group_losses(model, data, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Per group: mean cross-entropy and accuracy on `data`."""
    model.eval()
    x, y, g = data.tensors()
    ce, hit = [], []
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        ce.append(torch.nn.functional.cross_entropy(out, y[i : i + batch_size], reduction="none").numpy())
        hit.append((out.argmax(1) == y[i : i + batch_size]).numpy())
    ce, hit, groups = np.concatenate(ce), np.concatenate(hit), g.numpy()
    G = data.num_groups
    n = np.bincount(groups, minlength=G)
    return np.bincount(groups, weights=ce, minlength=G) / n, np.bincount(groups, weights=hit, minlength=G) / n


def draw_allocations(net, pinned: dict[str, int], per_budget: int, rng: np.random.Generator) -> list[tuple[int, Allocation]]:
    """Random allocations meeting each budget (average weight width in (budget - 0.5, budget])."""
    free = [s.name for s in net.layers if s.name not in pinned]
    out = []
    for budget in BUDGETS:
        got, tries = 0, 0
        while got < per_budget:
            tries += 1
            if tries > 200_000:
                raise RuntimeError(f"could not draw {per_budget} allocations at budget {budget}")
            w = {**pinned, **{n: int(rng.choice(WEIGHT_BITS)) for n in free}}
            layers = [LayerAllocation(s.name, w[s.name], int(rng.choice(ACT_BITS)) if s.has_output_act else None) for s in net.layers]
            alloc = Allocation(f"random-{budget}-{got}", layers)
            if budget - 0.5 < alloc.avg_weight_bits(net) <= budget:
                out.append((budget, alloc))
                got += 1
    return out


def spearman(x, y) -> dict:
    from scipy.stats import spearmanr

    r = spearmanr(x, y)
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n": int(len(x))}


def measure(cfg: CompileConfig, alloc: Allocation, qat: bool, float_loss: np.ndarray) -> dict:
    """One draw's measured losses (over the float model's `float_loss`) and accuracies:
    after PTQ, and after QAT when `qat`."""
    splits, fm, _ = seed_state(cfg)
    qm = calibrated_quant_model(cfg, fm, alloc, splits)
    ptq_loss, ptq_acc = group_losses(qm, splits.test)
    row = {"ptq_loss_increase": (ptq_loss - float_loss).tolist(), "ptq_acc": ptq_acc.tolist()}
    if qat:
        q = quantize_finetune(cfg, fm, alloc, splits, desc="QAT draw")
        qat_loss, qat_acc = group_losses(q.model, splits.test)
        row.update(qat_loss_increase=(qat_loss - float_loss).tolist(), qat_acc=qat_acc.tolist())
    return row


def draw_job(job: tuple) -> dict:
    """An executor job: one draw, from the step cache or measured and stored there (the
    seed's data and float model: fqhw.sidebyside.seed_state, kept per worker)."""
    cfg, alloc_dict, qat, float_loss = job
    _splits, fm, _ = seed_state(cfg)
    inputs = {"float": fm.key, "allocation": alloc_dict, "qat": qat, "threads": torch.get_num_threads(), "version": 1}
    return StepCache(cfg.cache_dir).run(
        "fidelity_draw", inputs, lambda: measure(cfg, Allocation.from_dict(alloc_dict), qat, np.asarray(float_loss)),
        lambda row, d: (d / "row.json").write_text(json.dumps(row)), lambda d: json.loads((d / "row.json").read_text()),
    ).value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=36, help="random allocations in all, spread over budgets 3, 4, 5 (default 36)")
    ap.add_argument("--qat", type=int, default=12, help="how many of them also get the normal QAT (default 12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sensitivity_fidelity.json")
    add_executor_args(ap)
    args = ap.parse_args()
    ex = Executor.from_args(args)
    cfg = CompileConfig(model="cnv", model_kwargs={"width": 0.25}, seed=args.seed, progress=False,
                        **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    t0 = time.perf_counter()
    splits = step_data(cfg)
    fm = step_float_model(cfg, splits)
    sens = step_importance(cfg, fm, splits)
    float_loss, float_acc = group_losses(fm.model, splits.test)
    rng = np.random.default_rng(args.seed)
    per_budget = -(-args.draws // len(BUDGETS))
    drawn = draw_allocations(fm.net, pinned_edges(cfg, fm.net), per_budget, rng)
    # interleave budgets so that the QAT subset covers all three
    drawn = [drawn[b * per_budget + i] for i in range(per_budget) for b in range(len(BUDGETS))]
    measured = ex.map(draw_job, [(cfg, alloc.to_dict(), k < args.qat, float_loss.tolist()) for k, (_b, alloc) in enumerate(drawn)])
    rows = []
    for k, ((budget, alloc), got) in enumerate(zip(drawn, measured)):
        wb = {la.name: la.weight_bits for la in alloc.layers}
        ab = {la.name: la.act_bits for la in alloc.layers}
        pred = sens.predicted(wb, ab)
        row = {"budget": budget, "avg_weight_bits": alloc.avg_weight_bits(fm.net), "weight_bits": wb, "act_bits": ab,
               "predicted": pred.tolist(), **got}
        rows.append(row)
        print(f"draw {k:2d} budget {budget} avg {row['avg_weight_bits']:.2f}: predicted worst {max(pred):.4f}, "
              f"PTQ worst loss +{max(row['ptq_loss_increase']):.4f}, worst acc {100 * min(row['ptq_acc']):.1f}"
              + (f"; QAT worst acc {100 * min(row['qat_acc']):.1f}" if "qat_acc" in row else ""), flush=True)

    def summary(loss_key: str, acc_key: str) -> dict:
        rs = [r for r in rows if loss_key in r]
        pw = [max(r["predicted"]) for r in rs]
        return {
            "worst_loss": spearman(pw, [max(r[loss_key]) for r in rs]),
            "worst_acc": spearman(pw, [min(r[acc_key]) for r in rs]),
            "cells_loss": spearman([v for r in rs for v in r["predicted"]], [v for r in rs for v in r[loss_key]]),
        }

    res = {
        "model": "cnv width 0.25", "data": "built-in, seed 0 data, test split", "seed": args.seed, "sensitivity_method": sens.method,
        "groups": sens.groups, "test_counts": np.bincount(splits.test.groups, minlength=splits.test.num_groups).tolist(),
        "float_loss": float_loss.tolist(), "float_acc": float_acc.tolist(),
        "spearman": {"ptq": summary("ptq_loss_increase", "ptq_acc"), "qat": summary("qat_loss_increase", "qat_acc")},
        "draws": rows, "total_s": round(time.perf_counter() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "torch_threads_per_draw": ex.threads_per_job, "jobs": ex.jobs, "executor": ex.kind,
                    "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    for stage, s in res["spearman"].items():
        print(f"{stage}: Spearman predicted worst-group loss vs measured worst-group loss {s['worst_loss']['rho']:+.2f} "
              f"(p {s['worst_loss']['p']:.2g}, n {s['worst_loss']['n']}), vs worst-group accuracy {s['worst_acc']['rho']:+.2f} "
              f"(p {s['worst_acc']['p']:.2g}); all cells {s['cells_loss']['rho']:+.2f}")
    print(f"wrote {args.out} ({res['total_s']} s)")


if __name__ == "__main__":
    main()
