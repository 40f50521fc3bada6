"""Images/s of the fast integer simulator against qonnx's execute_onnx on one compile output.

    fqhw compile --out /tmp/simbench --quiet          # once (about a minute, cached float model)
    python bench/simulator_speed.py [--build /tmp/simbench] [--n-qonnx 64] [--out bench/results/simulator_speed.json]

Both run on the same first `--n-qonnx` test images (regenerated from the build's
config.json): qonnx as fqhw runs it (qonnx_integer_trace, precision float32: the file as it
is, one image at a time through execute_onnx), the simulator batched. The simulator's rate is
also measured on the whole test split; its integers are checked against qonnx's on the shared
images (bit-exact, or the benchmark fails).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from fqhw.backends.intsim import IntegerSimulator
from fqhw.backends.qonnx_export import qonnx_integer_trace
from fqhw.backends.verify import check_bit_exact
from fqhw.data.dataset import INPUT_SCALE
from fqhw.simulate import build_test_data


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=Path, default=Path("/tmp/simbench"))
    ap.add_argument("--n-qonnx", type=int, default=64, help="images run through qonnx (and the simulator, for the ratio)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "simulator_speed.json")
    args = ap.parse_args()

    data = build_test_data(args.build)
    n = min(args.n_qonnx, len(data))
    imgs = data.images[:n]
    x = imgs.astype(np.float32) * np.float32(INPUT_SCALE)  # exact: pixel / 256

    t0 = time.perf_counter()
    sim = IntegerSimulator.from_build(args.build)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    q = qonnx_integer_trace(args.build / "model.qonnx.onnx", x, precision="float32")
    qonnx_s = time.perf_counter() - t0

    sim_same_s = _best_of(lambda: sim.run(imgs, batch_size=args.batch_size), 5)
    sim_all_s = _best_of(lambda: sim.run(data.images, batch_size=args.batch_size), 3)
    s = sim.run(imgs, batch_size=args.batch_size)
    be = check_bit_exact({"intsim": {k: v for k, v in s.items() if k != "logits"}, "qonnx_float32": q})
    if not be.ok:
        raise SystemExit(f"the simulator and qonnx (float32) disagree: {be.first_mismatch}")

    qonnx_rate = n / qonnx_s
    sim_same_rate = n / sim_same_s
    sim_all_rate = len(data) / sim_all_s
    cfg = json.loads((args.build / "config.json").read_text())
    figures = {
        "build": str(args.build),
        "model": {"channels": cfg["channels"], "image_size": cfg["data"]["image_size"], "budget": cfg["budget"], "target": cfg["target"]},
        "n_images_shared": n,
        "n_images_all": len(data),
        "batch_size": args.batch_size,
        "simulator_build_s": round(build_s, 3),
        "qonnx_float32_images_per_s": round(qonnx_rate, 2),
        "simulator_images_per_s_same_images": round(sim_same_rate, 1),
        "simulator_images_per_s_all_test_images": round(sim_all_rate, 1),
        "ratio_same_images": round(sim_same_rate / qonnx_rate, 1),
        "ratio_all_test_images": round(sim_all_rate / qonnx_rate, 1),
        "bit_exact_vs_qonnx_float32": be.ok,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "note": "qonnx: qonnx_integer_trace(precision='float32'), execute_onnx one image at a time; "
                "simulator: IntegerSimulator.run, best of several runs; wall-clock seconds on this machine",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"qonnx execute_onnx (float32): {qonnx_rate:8.1f} images/s ({n} images)")
    print(f"integer simulator, same images: {sim_same_rate:8.1f} images/s  -> {figures['ratio_same_images']:.1f}x")
    print(f"integer simulator, {len(data)} images: {sim_all_rate:8.1f} images/s  -> {figures['ratio_all_test_images']:.1f}x")
    print(f"bit-exact vs qonnx float32 on {n} images: {be.ok}; wrote {args.out}")


if __name__ == "__main__":
    main()
