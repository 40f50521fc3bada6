"""Why the quantile baselines of `fqhw sidebyside` land on the same allocation.

    python bench/quantile_rankings.py [--seed 0] [--budgets 3,4] [--cache-dir DIR]

For the evidence model (cnv at width 0.25, built-in data) and each quantile method of
fqhw.sidebyside (FairGRAPE-, FairQuantize-, HAWQ-style, FairQuant gradient + balanced),
it ranks the output channels by the method's reduced score, as the quantile allocation
does, and reports: how far the channel rankings of two methods agree (Spearman over all
channels, scipy), how much of each ranking is the layer a channel sits in (the share of
the rank variance between layers, an ANOVA-style ratio), the per-layer mean rank, and each
method's allocation per budget. Writes bench/results/quantile_rankings.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from fqhw.allocator.quantile import quantile_baseline
from fqhw.config import CompileConfig, pinned_edges
from fqhw.flow import step_data, step_float_model
from fqhw.sidebyside import METHODS, _two_groups


def main() -> None:
    from scipy.stats import rankdata, spearmanr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default="3,4")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantile_rankings.json")
    args = ap.parse_args()
    cfg = CompileConfig(model="cnv", model_kwargs={"width": 0.25}, seed=args.seed, progress=False,
                        **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    splits = step_data(cfg)
    fm = step_float_model(cfg, splits)
    pinned = pinned_edges(cfg, fm.net)
    names = [m for m, meth in METHODS.items() if meth.allocator == "quantile" and not meth.baq]
    ranks, layer_of, allocs = {}, None, {}
    for name in names:
        meth = METHODS[name]
        data = _two_groups(splits.val) if meth.reducer == "subtractive" else splits.val
        for b in args.budgets.split(","):
            res = quantile_baseline(fm.model, fm.net, data, float(b), method=meth.importance, reducer=meth.reducer, unit="channel",
                                    per_weight=True, pinned=pinned, act_bits=8, max_per_group=cfg.importance_samples, seed=cfg.seed)
            allocs.setdefault(name, {})[b] = {la.name: la.weight_bits for la in res.allocation.layers}
        free = [u for u in res.units if u.pinned is None]
        ranks[name] = rankdata([-u.score for u in free])  # 1 = most important
        layer_of = [u.spec for u in free]
    layers = list(dict.fromkeys(layer_of))
    lid = np.array([layers.index(s) for s in layer_of])

    def between_share(r):
        grand = r.mean()
        between = sum((lid == i).sum() * (r[lid == i].mean() - grand) ** 2 for i in range(len(layers)))
        return float(between / ((r - grand) ** 2).sum())

    out = {
        "model": "cnv width 0.25", "seed": args.seed, "free_channels": len(lid), "layers": layers,
        "spearman": {a: {b: float(spearmanr(ranks[a], ranks[b]).statistic) for b in names} for a in names},
        "between_layer_share": {m: between_share(ranks[m]) for m in names},
        "mean_rank_per_layer": {m: {s: float(ranks[m][lid == i].mean()) for i, s in enumerate(layers)} for m in names},
        "allocations": allocs,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for m in names:
        print(f"{m:13s} between-layer share of rank variance {out['between_layer_share'][m]:.3f}; mean rank per layer "
              + ", ".join(f"{v:.0f}" for v in out["mean_rank_per_layer"][m].values()))
        print(f"{'':13s} allocations " + "; ".join(f"budget {b}: {list(a.values())}" for b, a in allocs[m].items()))
    print("Spearman between methods' channel rankings:")
    for a in names:
        print(f"  {a:13s} " + " ".join(f"{out['spearman'][a][b]:+.2f}" for b in names))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
