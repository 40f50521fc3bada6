"""Deployed accuracy of a compiled model on a whole data set, with the fast integer simulator.

`simulate(build_dir, data)` runs fqhw.backends.intsim.IntegerSimulator (built from the FINN
dataflow graph of a compile output folder) on every image, computes the per-group metrics of
its predictions, and cross-checks the first `cross_check` images bit for bit against the
other backends present in the folder (FINN's Python execution of the dataflow graph, qonnx's
execution of model.qonnx.onnx).

`fqhw simulate BUILD_DIR` regenerates the build's test split from its config.json and prints
the deployed accuracy per group.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fqhw.data.dataset import INPUT_SCALE, GroupedImages
from fqhw.errors import FqhwError


@dataclass
class SimulationResult:
    build_dir: str
    n_images: int
    metrics: dict  # fqhw.fairness.metrics.group_metrics of the simulator's predictions
    predictions: np.ndarray  # int64, N: argmax of the logits
    seconds: float  # the simulator's run over all images
    bitexact: object | None  # fqhw.backends.verify.BitExact, None when nothing was cross-checked
    cross_check_backends: list[str]

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {
            "build_dir": self.build_dir,
            "n_images": self.n_images,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "metrics": self.metrics,
            "bit_exact": None if self.bitexact is None else self.bitexact.to_dict(),
            "cross_check_backends": list(self.cross_check_backends),
        }


def _output_root(build_dir: Path) -> tuple[Path, Path]:
    """(compile output folder, FINN build folder) for either of the two."""
    build_dir = Path(build_dir)
    if (build_dir / "finn" / "finn_build.json").exists():
        return build_dir, build_dir / "finn"
    if (build_dir / "finn_build.json").exists():
        return build_dir.parent, build_dir
    raise FqhwError(f"{build_dir} is not a compile output folder: it holds no finn/finn_build.json")


def simulate(build_dir, data: GroupedImages, cross_check: int = 32, batch_size: int | None = None) -> SimulationResult:
    """Run the simulator over every image (only the head accumulator and logits are kept:
    writing every feature map of a whole data set out as int64 would cost more than the
    simulation), then the full integer trace of the first `cross_check` images against the
    other backends. `batch_size`: the simulator's images per pass (its default when None)."""
    from fqhw.backends.finn_build import FinnBuild, finn_integer_trace
    from fqhw.backends.intsim import IntegerSimulator
    from fqhw.backends.qonnx_export import qonnx_integer_trace
    from fqhw.backends.verify import check_bit_exact
    from fqhw.fairness.metrics import group_metrics

    root, finn_dir = _output_root(build_dir)
    sim = IntegerSimulator.from_build(finn_dir)
    t0 = time.perf_counter()
    out = sim.run(data.images, batch_size=batch_size, trace=False)
    seconds = time.perf_counter() - t0
    logits = out["logits"]
    if logits.ndim != 2 or logits.shape[1] != data.num_classes:
        raise FqhwError(f"the build outputs {logits.shape[1:]} values per image, the data has {data.num_classes} classes")
    # argmax of the logits, not of head.acc: a channel with a negative scale reverses its order
    pred = np.argmax(logits, axis=1).astype(np.int64)
    metrics = group_metrics(data.labels, pred, data.groups, data.group_names, data.num_classes)

    bitexact, backends = None, []
    n = min(int(cross_check), len(data))
    if n > 0:
        x = data.images[:n].astype(np.float64) * INPUT_SCALE
        full = sim.run(data.images[:n], batch_size=batch_size)
        for k, v in out.items():  # the untraced run computed the same numbers (a bug if not)
            if not np.array_equal(full[k], v[:n]):
                raise RuntimeError(f"the simulator's traced and untraced runs disagree on {k}")
        traces = {"intsim": {k: v for k, v in full.items() if k != "logits"}}
        traces["finn"] = finn_integer_trace(FinnBuild.load(finn_dir), x)
        qonnx_path = root / "model.qonnx.onnx"
        if qonnx_path.exists():
            traces["qonnx"] = qonnx_integer_trace(qonnx_path, x)
        backends = list(traces)
        bitexact = check_bit_exact(traces)
    return SimulationResult(str(root), len(data), metrics, pred, seconds, bitexact, backends)


def build_test_data(build_dir) -> GroupedImages:
    """The test split the compile in `build_dir` used, regenerated from its config.json."""
    from fqhw.data.synthetic import SyntheticDermConfig, generate
    from fqhw.flow import CompileConfig

    root, _ = _output_root(build_dir)
    path = root / "config.json"
    if not path.exists():
        raise FqhwError(f"{path} is missing: the test data cannot be regenerated")
    cfg = json.loads(path.read_text())
    known = {f for f in CompileConfig.__dataclass_fields__}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise FqhwError(f"{path}: unknown field(s) {', '.join(unknown)}")
    return generate(SyntheticDermConfig.from_dict(cfg["data"])).test


def add_simulate_parser(subparsers) -> None:
    """Register `fqhw simulate` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "simulate",
        help="deployed (integer) accuracy per group of a compile output folder, with the fast integer simulator",
    )
    p.add_argument("build_dir", type=Path, metavar="BUILD_DIR", help="a compile output folder (holding finn/ and config.json)")
    p.add_argument("--cross-check", type=int, default=32, metavar="N",
                   help="images checked bit for bit against FINN's and qonnx's execution (default 32; 0: none)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    if args.cross_check < 0:
        raise FqhwError("--cross-check must be at least 0")
    data = build_test_data(args.build_dir)
    res = simulate(args.build_dir, data, cross_check=args.cross_check)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, sort_keys=True))
    else:
        m = res.metrics
        print(f"{res.build_dir}: {res.n_images} test images in {res.seconds:.2f} s ({res.images_per_s:.0f} images/s)")
        print(f"  overall acc {100 * m['overall_acc']:.2f} %, mean-group {100 * m['mean_group_acc']:.2f} %, "
              f"worst-group {100 * m['worst_group_acc']:.2f} % ({m['worst_group']})")
        for g, acc in m["group_acc"].items():
            print(f"  {g:>12}: {'-' if acc is None else f'{100 * acc:6.2f} %'}  (n={m['group_n'][g]})")
        if res.bitexact is not None:
            print(f"  cross-check on {res.bitexact.n_images} images: {res.bitexact.summary()}")
    if res.bitexact is not None and not res.bitexact.ok:
        print(f"fqhw: error: the simulator disagrees with {', '.join(res.cross_check_backends[1:])}: "
              f"{res.bitexact.first_mismatch}", file=sys.stderr)
        return 1
    return 0
