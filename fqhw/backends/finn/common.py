"""What every part of the FINN backend shares: op-type names, the record of a build
(`FinnBuild`), the environment FINN runs in, graph tidying and the fixed-point loop of
repeated rewrites, and the Python-executable copy of a specialized dataflow graph."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from fqhw.errors import FqhwError

DEFAULT_PART = "xc7z020clg400-1"
# ops allowed to stay outside the dataflow partition: data layout and the final output scale
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten")
MVAU_TYPES = ("MVAU", "MVAU_hls", "MVAU_rtl")
POOL_TYPES = ("Pool", "Pool_hls", "StreamingMaxPool", "StreamingMaxPool_hls", "GlobalAccPool", "GlobalAccPool_hls")
RESOURCE_KEYS = ("LUT", "BRAM_18K", "URAM", "DSP")
# ops a FINN graph may keep outside the accelerator: data layout in front, and the float
# tail behind the last integer accumulator (output scale, classifier bias)
HOST_LAYOUT_OPS = ("Transpose", "Reshape", "Flatten")
HOST_TAIL_OPS = ("Mul", "Add")


@contextlib.contextmanager
def finn_env(build_dir: Path):
    """While FINN runs: FINN_BUILD_DIR inside build_dir, FINN's warnings, prints and
    logging below ERROR kept quiet; all restored afterwards."""
    finn_tmp = build_dir / "finn_tmp"
    finn_tmp.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("FINN_BUILD_DIR")
    os.environ["FINN_BUILD_DIR"] = str(finn_tmp)
    loggers = [logging.getLogger(n) for n in ("finn", "qonnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if old is None:
            os.environ.pop("FINN_BUILD_DIR", None)
        else:
            os.environ["FINN_BUILD_DIR"] = old


def is_hw(node) -> bool:
    return node.domain.startswith("finn.custom_op.fpgadataflow")


def python_exec_model(model):
    """A copy of the dataflow graph whose _hls / _rtl nodes run their generic Python
    execute_node (the specialized ones only know cppsim / rtlsim, which need Xilinx tools)."""
    import finn.custom_op.fpgadataflow as fdf
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    m = ModelWrapper(onnx.ModelProto.FromString(model.model.SerializeToString()))
    for node in m.graph.node:
        if not (node.domain.endswith(".hls") or node.domain.endswith(".rtl")):
            continue
        inst = getCustomOp(node)
        generic = None
        for cls in type(inst).__mro__[1:]:
            mod = cls.__module__
            if (
                mod.startswith("finn.custom_op.fpgadataflow.")
                and not mod.startswith(("finn.custom_op.fpgadataflow.hls", "finn.custom_op.fpgadataflow.rtl"))
                and fdf.custom_op.get(cls.__name__) is cls
            ):
                generic = cls.__name__
                break
        if generic is None:
            raise FqhwError(f"no generic Python implementation for FINN node {node.name} ({node.op_type})")
        node.op_type = generic
        node.domain = "finn.custom_op.fpgadataflow"
    return m


def op_counts(model) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def tidy_graph(model, readable: bool = False):
    """Identity ops removed, unique node names, datatypes and layouts inferred; readable
    tensor names only when asked (renaming every tensor is the slowest part)."""
    from qonnx.transformation.general import GiveReadableTensorNames, GiveUniqueNodeNames
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.remove import RemoveIdentityOps

    ts = [RemoveIdentityOps(), GiveUniqueNodeNames()] + ([GiveReadableTensorNames()] if readable else [])
    for t in ts + [InferDataTypes(), InferDataLayouts()]:
        model = model.transform(t)
    return model


def _signature(model) -> tuple:
    return tuple((n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node)


def until_fixed(model, transforms, max_rounds: int = 12, tidy: bool = True, unsettled: str | None = None):
    """Apply `transforms` in turn (then tidy, unless `tidy` is False) until a round changes
    nothing. After `max_rounds` the model as it is, or, given `unsettled`, an FqhwError
    with that message."""
    for _ in range(max_rounds):
        before = _signature(model)
        for t in transforms:
            model = model.transform(t)
        if tidy:
            model = tidy_graph(model)
        if _signature(model) == before:
            return model
    if unsettled is not None:
        raise FqhwError(unsettled)
    return model


@dataclass
class FinnStep:
    name: str
    seconds: float
    model: str  # path of the .onnx saved after the step


@dataclass
class FinnBuild:
    """What an estimate-only FINN build produced.

    node_estimates: FINN node name -> {op_type, layer, cycles, LUT, BRAM_18K, URAM, DSP, ...}
    layer_estimates: fqhw layer name (e.g. "features.0.conv", "head") -> {nodes, mvau,
      cycles (the slowest of its nodes), mvau_cycles, LUT, BRAM_18K, URAM, DSP (sums)};
      a layer owns its MVAU, the padding / sliding window in front of it and the pooling
      right after it.
    """

    build_dir: str
    qonnx_path: str
    part: str
    clock_ns: float
    dataflow_model: str  # the folded, specialized HW graph (child of the partition)
    parent_model: str  # the graph around it: layout ops in front, the output Mul behind
    steps: list[FinnStep]
    node_estimates: dict[str, dict]
    layer_estimates: dict[str, dict]
    layer_of_node: dict[str, str]
    mvau_of_layer: dict[str, str]
    totals: dict[str, float]
    max_cycles: int
    max_cycles_node: str
    critical_path_cycles: int
    fps: float
    latency_ns: float
    outside_nodes: list[str]  # "name (op_type)" of the nodes left outside the partition
    folding: dict[str, dict] = field(default_factory=dict)  # node -> applied PE/SIMD/...
    # FINN's integer thresholds against float64 ones from the QONNX file (threshold_check)
    threshold_check: dict = field(default_factory=dict)
    # what a machine with Vivado needs to finish the build (see `finn_synth`): FINN's board
    # name (None: a part no known board has, no bitfile), FINN's build configuration and
    # folding configuration files ("" in builds saved before they were written)
    board: str | None = None
    synth_config: str = ""
    folding_config: str = ""

    @property
    def latency_cycles(self) -> int:
        return self.critical_path_cycles

    def summary(self) -> dict:
        """The build in a few numbers (what a report shows)."""
        return {
            "part": self.part,
            "clock_ns": self.clock_ns,
            "total": {k: float(self.totals.get(k, 0.0)) for k in RESOURCE_KEYS},
            "fps": self.fps,
            "max_cycles": self.max_cycles,
            "max_cycles_node": self.max_cycles_node,
            "latency_cycles": self.critical_path_cycles,
            "latency_ns": self.latency_ns,
            "latency_ms": self.latency_ns / 1e6,
            "outside_nodes": list(self.outside_nodes),
            "steps_s": {st.name: st.seconds for st in self.steps},
            "thresholds_differing": self.threshold_check.get("differing"),
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path=None) -> Path:
        """Write the build as JSON (default build_dir/finn_build.json), with its file paths
        relative to build_dir so that the folder can be moved."""
        root = Path(self.build_dir)
        path = Path(path) if path is not None else root / "finn_build.json"
        d = self.to_dict()
        d["build_dir"] = "."
        for key in _PATH_FIELDS:
            if d[key]:
                d[key] = os.path.relpath(d[key], root)
        for st in d["steps"]:
            st["model"] = os.path.relpath(st["model"], root)
        path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "FinnBuild":
        """Read a build saved by `save` (a finn_build.json or the folder holding it); its
        paths are resolved against that folder."""
        path = Path(path)
        if path.is_dir():
            path = path / "finn_build.json"
        root = path.parent.resolve()
        d = json.loads(path.read_text())
        d["build_dir"] = str(root)
        for key in _PATH_FIELDS:
            if d.get(key):
                d[key] = os.path.normpath(str(root / d[key]))
        d["steps"] = [FinnStep(st["name"], st["seconds"], os.path.normpath(str(root / st["model"]))) for st in d["steps"]]
        return cls(**d)


_PATH_FIELDS = ("qonnx_path", "dataflow_model", "parent_model", "synth_config", "folding_config")


def lower_convs_channels_last(model, join_move, fixed):
    """Convs lowered to MatMul (Im2Col), one Transpose per MaxPool fork, and the layouts
    made channels-last: MakeMaxPoolNHWC and the Transposes moved past forks and joins
    (`join_move`: FINN's MoveTransposePastJoinAdd or ...JoinConcat) and absorbed, repeated
    by `fixed(model, transforms)` (the caller's until_fixed) until nothing changes."""
    import finn.transformation.streamline.absorb as absorb
    import finn.transformation.streamline.reorder as reorder
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul

    from fqhw.backends.finn.transforms import MergeForkedTransposesAfterMaxPool

    model = tidy_graph(model.transform(LowerConvsToMatMul()))
    # MakeMaxPoolNHWC follows a MaxPool's first consumer only: one Transpose per fork
    model = model.transform(MergeForkedTransposesAfterMaxPool(), cleanup=False)
    return fixed(
        model,
        [
            reorder.MakeMaxPoolNHWC(),
            absorb.AbsorbTransposeIntoMultiThreshold(),
            reorder.MoveTransposePastFork(),
            join_move,
            absorb.AbsorbConsecutiveTransposes(),
        ],
    )
