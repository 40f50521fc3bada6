"""Deployed accuracy of a compiled model on a whole data set, with the fast integer simulator.

`simulate(build_dir, data)` runs fqhw.backends.intsim.IntegerSimulator on every image,
computes the per-group metrics of its predictions, and cross-checks the first `cross_check`
images bit for bit against every other backend present in the compile output folder:

    finn/       (fqhw compile, the default backend): the simulator is built from FINN's
                dataflow graph and checked against FINN's Python execution of that graph
                and qonnx's execution of model.qonnx.onnx. finn/finn_build.json is the
                default CNN's build (with --channel-groups its graph forks and joins the
                groups' streams); finn/finn_result.json a ResNet's (fqhw.backends.finn.residual:
                residual adds, forks, global pooling), whose traces are compared on the
                tensors FINN materialises (a join's operands may not be);
    hls4ml/     (fqhw compile --backend hls4ml): the simulator is built from the
                power-of-two model.qonnx.onnx (IntegerSimulator.from_qonnx) and checked
                against qonnx's execution of that file and the hls4ml C simulation.

Why the QONNX file for an hls4ml build: with power-of-two scales it states the integer
arithmetic exactly, and the simulator then neither needs nor repeats the C simulation it
checks. A FINN build's QONNX file has float scales that only FINN's thresholds make integer,
so a FINN build keeps its dataflow-graph simulator.

`fqhw simulate BUILD_DIR [--data SPEC]` prints the deployed accuracy per group: by default on
the build's own test split, regenerated from its config.json; `--data` names another data set
(fqhw.data.registry specs), loaded at the build's image size.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fqhw.data.dataset import INPUT_SCALE, GroupedImages
from fqhw.errors import FqhwError

SPLITS = ("test", "val", "train")


@dataclass
class SimulationResult:
    build_dir: str
    n_images: int
    metrics: dict  # fqhw.fairness.metrics.group_metrics of the simulator's predictions
    predictions: np.ndarray  # int64, N: argmax of the logits
    seconds: float  # the simulator's run over all images
    bitexact: object | None  # fqhw.backends.verify.BitExact, None when nothing was cross-checked
    cross_check_backends: list[str]
    simulator_source: str = "finn"  # "finn" (dataflow graph) or "qonnx" (power-of-two QONNX file)
    notes: list[str] = field(default_factory=list)  # what the run had to do or leave out, in words

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
            "simulator_source": self.simulator_source,
            "notes": list(self.notes),
        }


@dataclass
class BuildFolder:
    """What a compile output folder holds, found from the folder or from its finn/ or
    hls4ml/ subfolder."""

    root: Path
    finn_dir: Path | None  # holding finn_build.json (default CNN) or finn_result.json (ResNet)
    hls4ml_dir: Path | None  # holding hls4ml_build.json
    qonnx_path: Path | None  # model.qonnx.onnx, when present
    finn_kind: str | None = None  # "build" (finn_build.json) | "result" (finn_result.json)

    @property
    def backends(self) -> list[str]:
        return [b for b, d in (("finn", self.finn_dir), ("hls4ml", self.hls4ml_dir)) if d is not None]


def _config_fields(root: Path) -> dict:
    """config.json of a compile output folder, or {} when it is missing or unreadable (only
    used to word an error)."""
    try:
        return json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _build_classes(root: Path) -> list[str] | None:
    """The sorted class names of the data the build was compiled on (its data.json), or None
    when the folder has no readable data.json."""
    try:
        return sorted(json.loads((root / "data.json").read_text())["train"]["per_class"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def locate_build(build_dir) -> BuildFolder:
    """The compile output folder `build_dir` is (or is the finn/ or hls4ml/ folder of)."""
    p = Path(build_dir)
    if not p.is_dir():
        raise FqhwError(f"{p} is not a folder: pass a compile output folder (fqhw compile --out DIR)")
    if any((p / f).is_file() for f in ("finn_build.json", "finn_result.json", "hls4ml_build.json")):
        p = p.parent
    finn, kind = None, None
    for k, f in (("build", "finn_build.json"), ("result", "finn_result.json")):
        if finn is None and (p / "finn" / f).is_file():
            finn, kind = p / "finn", k
    hls = p / "hls4ml" if (p / "hls4ml" / "hls4ml_build.json").is_file() else None
    if finn is None and hls is None:
        cfg = _config_fields(p)
        if cfg:  # a compile ran here but built no accelerator the simulator reads
            raise FqhwError(
                f"{p} holds no FINN or hls4ml build (model {cfg.get('model', '?')}, target {cfg.get('target', '?')}): "
                "fqhw simulate runs the accelerator build of an FPGA target, which an ASIC-style target's compile does not write; "
                "compile for an FPGA target (e.g. --target pynq-z2), or re-run the compile if its finn/ or hls4ml/ folder was removed"
            )
        raise FqhwError(
            f"{p} is not a compile output folder: it holds neither finn/finn_build.json, finn/finn_result.json "
            "nor hls4ml/hls4ml_build.json; pass the folder fqhw compile --out wrote"
        )
    q = p / "model.qonnx.onnx"
    return BuildFolder(p, finn, hls, q if q.is_file() else None, kind)


def _simulator(folder: BuildFolder):
    """(IntegerSimulator, its source): FINN's dataflow graph where there is one, else the
    power-of-two QONNX file of an hls4ml build. A file of the build that cannot be read (a
    folder without manifest.json, damaged) is one FqhwError line."""
    from google.protobuf.message import DecodeError

    try:
        return _read_simulator(folder)
    except (OSError, ValueError, KeyError, DecodeError, AssertionError) as e:
        if isinstance(e, AssertionError) and "not found" not in str(e):  # qonnx's ModelWrapper asserts the file exists
            raise
        raise FqhwError(f"the build in {folder.root} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]}): "
                        "the folder is damaged; re-run fqhw compile") from None


def _read_simulator(folder: BuildFolder):
    from fqhw.backends.intsim import IntegerSimulator

    if folder.finn_kind == "result":
        if folder.qonnx_path is None:
            raise FqhwError(f"{folder.root / 'model.qonnx.onnx'} is missing: the simulator of a ResNet build finds its MVAUs by "
                            "the weights in it; re-run fqhw compile")
        return IntegerSimulator.from_finn_result(folder.finn_dir, folder.qonnx_path), "finn"
    if folder.finn_dir is not None:
        return IntegerSimulator.from_build(folder.finn_dir), "finn"
    if folder.qonnx_path is None:
        raise FqhwError(f"{folder.root / 'model.qonnx.onnx'} is missing: the simulator of an hls4ml build reads it; re-run fqhw compile --backend hls4ml")
    return IntegerSimulator.from_qonnx(folder.qonnx_path), "qonnx"


def _hls4ml_trace(folder: BuildFolder, x: np.ndarray, notes: list[str]) -> dict:
    """The hls4ml C simulation's integer trace of `x`, its library rebuilt first if it was
    compiled in another folder (see fqhw.backends.hls4ml.csim.ensure_csim_here)."""
    from fqhw.backends.hls4ml.csim import ensure_csim_here, hls4ml_integer_trace
    from fqhw.backends.hls4ml.record import Hls4mlBuild

    build = Hls4mlBuild.load(folder.hls4ml_dir)
    if ensure_csim_here(build):
        notes.append(f"rebuilt the hls4ml C simulation in {build.project_dir}: it had been compiled in another folder")
    try:
        return hls4ml_integer_trace(build, x)
    except OSError as e:  # a library the loader refuses (damaged, another architecture)
        raise FqhwError(f"the hls4ml C simulation {build.library} cannot be loaded ({e}); re-run fqhw compile --backend hls4ml") from e


def simulate(build_dir, data: GroupedImages, cross_check: int = 32, batch_size: int | None = None) -> SimulationResult:
    """Run the simulator over every image (only the head accumulator and logits are kept:
    writing every feature map of a whole data set out as int64 would cost more than the
    simulation), then the full integer trace of the first `cross_check` images against the
    other backends of the folder (see the module docstring). `batch_size`: the simulator's
    images per pass (its default when None)."""
    from fqhw.backends.verify import check_bit_exact
    from fqhw.fairness.metrics import group_metrics

    from fqhw.outputs import check_manifest

    folder = locate_build(build_dir)
    notes: list[str] = []
    if not check_manifest(folder.root):
        notes.append("the folder has no manifest.json (an older fqhw, or deleted): its files were not checked against the compile")
    built_for = _build_classes(folder.root)
    if built_for is not None and sorted(data.class_names) != built_for:
        raise FqhwError(f"the data's classes ({', '.join(data.class_names)}) are not the ones the build was compiled for "
                        f"({', '.join(built_for)}, {folder.root / 'data.json'}): its outputs would be read as the wrong classes; "
                        "pass data with exactly those classes")
    sim, source = _simulator(folder)
    per_image = int(np.prod(sim.in_shape[1:]))
    if int(np.prod(data.images.shape[1:])) != per_image:
        raise FqhwError(
            f"the data's images are {'x'.join(map(str, data.images.shape[1:]))}, the build takes {per_image} pixel values per image "
            f"({'x'.join(map(str, sim.in_shape[1:]))}, channels last); load the data at the build's image size"
        )
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
        partial: tuple[str, ...] = ()
        if folder.finn_kind == "result":  # a ResNet: FINN's own execution and the generic QONNX trace
            from fqhw.backends.finn.residual import FinnResult, finn_dataflow_integer_trace

            res = FinnResult.load(folder.finn_dir)
            traces["finn"] = finn_dataflow_integer_trace(res, folder.qonnx_path, x, graph="dataflow")
            if folder.qonnx_path is not None:
                from fqhw.backends.qonnx_generic import qonnx_integer_trace_generic

                traces["qonnx"] = qonnx_integer_trace_generic(folder.qonnx_path, x)
            # FINN adds the operands of a residual join without materialising every one;
            # the simulator computes what FINN's graph computes
            partial = ("finn", "intsim")
        elif folder.finn_dir is not None:
            from fqhw.backends.finn.common import FinnBuild
            from fqhw.backends.finn.execute import finn_integer_trace

            traces["finn"] = finn_integer_trace(FinnBuild.load(folder.finn_dir), x)
        if folder.qonnx_path is not None and folder.finn_kind != "result":
            from fqhw.backends.qonnx_export import qonnx_integer_trace

            traces["qonnx"] = qonnx_integer_trace(folder.qonnx_path, x)
        if folder.hls4ml_dir is not None:
            traces["hls4ml"] = _hls4ml_trace(folder, x, notes)
        if len(traces) < 2:
            notes.append("no other backend in the folder to cross-check against")
        else:
            backends = list(traces)
            bitexact = check_bit_exact(traces, partial=partial)
    return SimulationResult(str(folder.root), len(data), metrics, pred, seconds, bitexact, backends, source, notes)


def build_test_data(build_dir, spec: str | None = None, split: str = "test") -> GroupedImages:
    """A split of the data the compile in `build_dir` used (spec None: the data set its
    config.json names, regenerated or reloaded the same way), or of the data set `spec`
    names (fqhw.data.registry; "builtin" is the build's own synthetic configuration), at the
    build's image size and seed."""
    from fqhw.data.registry import load_data
    from fqhw.data.synthetic import SyntheticDermConfig
    from fqhw.config import CompileConfig

    folder = locate_build(build_dir)
    path = folder.root / "config.json"
    if not path.exists():
        raise FqhwError(f"{path} is missing: the test data cannot be regenerated; pass the folder fqhw compile --out wrote")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise FqhwError(f"{path} cannot be read ({e}): the folder is damaged; re-run fqhw compile") from None
    known = {f for f in CompileConfig.__dataclass_fields__}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise FqhwError(f"{path}: unknown field(s) {', '.join(unknown)}")
    if split not in SPLITS:
        raise FqhwError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    synthetic = SyntheticDermConfig.from_dict(cfg["data"])
    spec = cfg.get("data_spec", "builtin") if spec is None else spec
    splits = load_data(spec, image_size=synthetic.image_size, seed=int(cfg.get("seed", 0)), builtin=synthetic)
    return getattr(splits, split)


def add_simulate_parser(subparsers) -> None:
    """Register `fqhw simulate` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "simulate",
        help="deployed (integer) accuracy per group of a compile output folder, with the fast integer simulator",
    )
    p.add_argument("build_dir", type=Path, metavar="BUILD_DIR",
                   help="a compile output folder (holding finn/ or hls4ml/, and config.json)")
    p.add_argument("--data", metavar="SPEC", default=None,
                   help="builtin | fitzpatrick17k:PATH | isic2019:PATH | csv:CSV[,IMAGE_DIR] (as fqhw compile --data), "
                        "loaded at the build's image size (default: the build's own data set)")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split of the data to run (default test)")
    p.add_argument("--cross-check", type=int, default=32, metavar="N",
                   help="images checked bit for bit against every other backend in the folder: FINN and qonnx, "
                        "or qonnx and the hls4ml C simulation (default 32; 0: none)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    if args.cross_check < 0:
        raise FqhwError("--cross-check must be at least 0")
    data = build_test_data(args.build_dir, spec=getattr(args, "data", None), split=getattr(args, "split", "test"))
    res = simulate(args.build_dir, data, cross_check=args.cross_check)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, sort_keys=True))
    else:
        m = res.metrics
        src = "FINN's dataflow graph" if res.simulator_source == "finn" else "model.qonnx.onnx (power-of-two)"
        print(f"{res.build_dir}: {res.n_images} images in {res.seconds:.2f} s ({res.images_per_s:.0f} images/s), simulator built from {src}")
        print(f"  overall acc {100 * m['overall_acc']:.2f} %, mean-group {100 * m['mean_group_acc']:.2f} %, "
              f"worst-group {100 * m['worst_group_acc']:.2f} % ({m['worst_group']})")
        for g, acc in m["group_acc"].items():
            print(f"  {g:>12}: {'-' if acc is None else f'{100 * acc:6.2f} %'}  (n={m['group_n'][g]})")
        if res.bitexact is not None:
            print(f"  cross-check on {res.bitexact.n_images} images: {res.bitexact.summary()}")
        for note in res.notes:
            print(f"  note: {note}")
    if res.bitexact is not None and not res.bitexact.ok:
        print(f"fqhw: error: the simulator disagrees with {', '.join(res.cross_check_backends[1:])}: "
              f"{res.bitexact.first_mismatch}", file=sys.stderr)
        return 1
    return 0
