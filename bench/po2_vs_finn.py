"""What the hls4ml backend's power-of-two quantization costs in accuracy against FINN's
float-scale scheme, on the same float model, data and allocations.

    python bench/po2_vs_finn.py [--qat-epochs 3] [--out bench/results/po2_vs_finn.json]

Uses the default compile's float model (the built-in synthetic set at 32x32, FairCNN
16/32/64, from the model cache, trained on a miss) and, for each allocation, quantizes it
with both schemes (fqhw.quant.qmodel for FINN, fqhw.quant.po2 for hls4ml), calibrates and
fine-tunes each with the flow's QAT settings, and reports test accuracy overall, mean over
groups and of the worst group, after calibration and after QAT
(`fqhw.quant.po2.compare_schemes`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.flow import CompileConfig, step_data, step_float_model
from fqhw.quant.po2 import compare_schemes

NAMES = ["features.0.conv", "features.1.conv", "features.2.conv", "head"]
# (weight bits, activation bits) per layer; the head has no activation
ALLOCATIONS = {
    "uniform8": [(8, 8), (8, 8), (8, 8), (8, None)],
    "readme_budget4": [(8, 8), (7, 8), (3, 8), (8, None)],  # fqhw's budget-4 allocation (README)
    "uniform4": [(4, 4), (4, 4), (4, 4), (4, None)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "po2_vs_finn.json")
    args = ap.parse_args()
    cfg = CompileConfig(progress=False, qat_epochs=args.qat_epochs)
    t0 = time.perf_counter()
    splits = step_data(cfg)
    fm = step_float_model(cfg, splits)
    allocs = {
        name: Allocation("pynq-z2", [LayerAllocation(n, w, a) for n, (w, a) in zip(NAMES, layers)])
        for name, layers in ALLOCATIONS.items()
    }
    res = compare_schemes(fm.model, splits, allocs, qat_epochs=cfg.qat_epochs, qat_lr=cfg.qat_lr, fairness_lambda=cfg.fairness_lambda, seed=cfg.seed)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    res["allocations"] = {k: [list(v) for v in layers] for k, layers in ALLOCATIONS.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    f = res["float"]
    print(f"float: overall {100 * f['overall_acc']:.1f}  mean-group {100 * f['mean_group_acc']:.1f}  worst {100 * f['worst_group_acc']:.1f}")
    print(f"{'allocation':<16} {'scheme':<6} {'stage':<11} {'overall':>8} {'mean grp':>9} {'worst grp':>10}")
    for name in ALLOCATIONS:
        for scheme in ("finn", "po2"):
            for stage in ("calibrated", "qat"):
                m = res[name][scheme][stage]
                print(f"{name:<16} {scheme:<6} {stage:<11} {100 * m['overall_acc']:8.1f} {100 * m['mean_group_acc']:9.1f} {100 * m['worst_group_acc']:10.1f}")
        d = res[name]["delta_qat"]
        print(f"{name:<16} po2 - finn after QAT: overall {d['overall_acc']:+.1f}  mean-group {d['mean_group_acc']:+.1f}  worst {d['worst_group_acc']:+.1f} points")
    print(f"wrote {args.out} ({res['total_s']} s)")


if __name__ == "__main__":
    main()
