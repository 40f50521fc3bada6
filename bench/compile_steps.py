"""Time each step of `fqhw compile` and write the figures to JSON.

    python bench/compile_steps.py [--budget 4] [--target pynq-z2] [--out bench/results/compile_steps.json]

Runs the compile twice into a temporary folder: the first run with an empty model cache
(the float model and uniform baselines are trained), the second with the cache warm (what a
user sees on every compile after the first). Prints a table and writes both runs' step times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fqhw.flow import CompileConfig, compile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="pynq-z2")
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile_steps.json")
    args = ap.parse_args()

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CompileConfig(target=args.target, budget=args.budget, out_dir=Path(tmp) / "out", cache_dir=Path(tmp) / "cache", progress=False)
        for label in ("cold_cache", "warm_cache"):
            t0 = time.perf_counter()
            res = compile(cfg)
            runs[label] = {"total_s": round(time.perf_counter() - t0, 2), "steps_s": res.timings}
        report = res.report
    figures = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "config": {"target": args.target, "budget": args.budget},
        "runs": runs,
        "result": {
            "avg_weight_bits": report["allocation"]["avg_weight_bits"],
            "solver": report["allocation"]["solver"],
            "bit_exact": report["bit_exact"]["ok"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    steps = list(runs["cold_cache"]["steps_s"])
    print(f"{'step':<14}" + "".join(f"{k:>14}" for k in runs))
    for s in steps:
        print(f"{s:<14}" + "".join(f"{runs[k]['steps_s'].get(s, 0):>14.2f}" for k in runs))
    print(f"{'total':<14}" + "".join(f"{runs[k]['total_s']:>14.2f}" for k in runs))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
