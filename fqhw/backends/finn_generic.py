"""FINN (finn-plus) for timm models, estimate-free: how far the dataflow conversion gets.

`finn_dataflow_resnet` takes a QONNX file of a `fqhw.quant.generic.QuantResNet` through
FINN's transformations, called directly (as fqhw.backends.finn_build does for FairCNN),
with the streamlining a residual network needs on top of FINN's default:

    input_codes     the accelerator reads the uint8 pixel codes (finn_build's step)
    qonnx_to_finn   cleanup + ConvertQONNXtoFINN (finn_build's step)
    tidy_up         (finn_build's step)
    streamline      FINN's Streamline, repeated with the residual moves (scales past the
                    join adds and forks) until nothing changes; convs lowered to MatMul,
                    layouts made channels-last; the global average pool becomes an integer
                    GlobalAccPool whose 1/N joins the output scale
    convert_to_hw   MVAUs, sliding windows, thresholding, pooling, elementwise adds of the
                    residual joins and stream duplication at the forks; the float output
                    scale and classifier bias stay on the host

and checks that every op left outside the HW layers is layout or that float output tail.
`finn_dataflow_integer_trace` runs the HW graph in Python (FINN's own execute_node per
node, float64 containers) and returns the same keys as the Brevitas and QONNX traces for
the values FINN keeps: the input codes, every MVAU / Thresholding output that is a
quantized activation, and "fc.acc".

`finn_refusal` asks FINN to convert any QONNX model (a transformer's) and names the op
types it leaves outside HW layers, as one FqhwError line.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from fqhw.errors import FqhwError

# ops a FINN graph may keep outside the accelerator: data layout in front, and the float
# tail behind the last integer accumulator (output scale, classifier bias)
HOST_LAYOUT_OPS = ("Transpose", "Reshape", "Flatten")
HOST_TAIL_OPS = ("Mul", "Add")


@dataclass
class FinnResult:
    """How far FINN got: the saved model after each step, op counts, and what is not HW."""

    build_dir: str
    steps: list[dict] = field(default_factory=list)  # name, seconds, model path, op counts
    hw_model: str = ""  # the graph after convert_to_hw and threshold rounding (generic HW nodes)
    hw_op_counts: dict = field(default_factory=dict)
    non_hw: list[str] = field(default_factory=list)  # "name (op_type)" of compute ops left in software
    host_nodes: list[str] = field(default_factory=list)  # allowed: layout in front, float tail
    # with an allocation: the partitioned, specialized, folded dataflow graph and FINN's
    # analytical estimates (totals of LUT / BRAM_18K / URAM / DSP, cycles, fps)
    dataflow_model: str = ""
    folding: dict = field(default_factory=dict)  # MVAU node -> {layer, PE, SIMD}
    estimates: dict = field(default_factory=dict)

    # with an allocation: FINN's estimates per fqhw layer (its MVAU's cycles and resources,
    # PE / SIMD), as fqhw.backends.finn_build.FinnBuild.layer_estimates has them
    layer_estimates: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.non_hw

    # What a compile report reads from a build, the same as FinnBuild's (fqhw.report).
    @property
    def part(self) -> str:
        return self.estimates.get("part", "")

    @property
    def totals(self) -> dict[str, float]:
        return dict(self.estimates.get("total", {}))

    def summary(self) -> dict:
        from fqhw.backends.finn_build import RESOURCE_KEYS

        e = self.estimates
        clock = e.get("clock_ns", float("nan"))
        return {
            "part": self.part,
            "clock_ns": clock,
            "total": {k: float(self.totals.get(k, 0.0)) for k in RESOURCE_KEYS},
            "fps": e.get("fps"),
            "max_cycles": e.get("max_cycles"),
            "max_cycles_node": e.get("max_cycles_node"),
            "latency_cycles": e.get("critical_path_cycles"),
            "latency_ns": None if e.get("critical_path_cycles") is None else e["critical_path_cycles"] * clock,
            "latency_ms": None if e.get("critical_path_cycles") is None else e["critical_path_cycles"] * clock / 1e6,
            "outside_nodes": list(self.host_nodes),
            "steps_s": {st["name"]: st["seconds"] for st in self.steps},
            "hw_op_counts": dict(self.hw_op_counts),
            "thresholds_differing": None,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["complete"] = self.complete
        return d

    def save(self) -> Path:
        """build_dir/finn_result.json, its paths relative to build_dir so that the folder
        can be moved (the compile's step cache copies it)."""
        root = Path(self.build_dir)
        d = self.to_dict()
        d["build_dir"] = "."
        for key in ("hw_model", "dataflow_model"):
            if d[key]:
                d[key] = os.path.relpath(d[key], root)
        for st in d["steps"]:
            st["model"] = os.path.relpath(st["model"], root)
        path = root / "finn_result.json"
        path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, build_dir) -> "FinnResult":
        """Read `save`'s file from build_dir, its paths resolved against build_dir."""
        root = Path(build_dir).resolve()
        d = json.loads((root / "finn_result.json").read_text())
        d.pop("complete", None)
        d["build_dir"] = str(root)
        for key in ("hw_model", "dataflow_model"):
            if d.get(key):
                d[key] = os.path.normpath(str(root / d[key]))
        for st in d["steps"]:
            st["model"] = os.path.normpath(str(root / st["model"]))
        return cls(**d)


def op_counts(model) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _is_hw(node) -> bool:
    return node.domain.startswith("finn.custom_op.fpgadataflow")


def _tidy(model, readable: bool = False):
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
            model = _tidy(model)
        if _signature(model) == before:
            return model
    if unsettled is not None:
        raise FqhwError(unsettled)
    return model


def _merge_forked_transposes_after_maxpool(model):
    """A MaxPool whose output feeds several identical Transposes gets one Transpose in front
    of the fork instead.

    Why: FINN's MakeMaxPoolNHWC looks at the MaxPool's first consumer only. After a ResNet
    stem (MaxPool -> block conv1 and downsample conv), conv lowering leaves one Transpose
    per branch; MakeMaxPoolNHWC then rewires one branch and leaves the other reading the
    un-pooled map (a silently wrong graph: seen on finn-plus 1.6.1). With one Transpose
    the pattern is linear and the rewrite is right."""
    changed = False
    for node in list(model.graph.node):
        if node.op_type != "MaxPool":
            continue
        cons = model.find_consumers(node.output[0]) or []
        if len(cons) < 2 or any(c.op_type != "Transpose" for c in cons):
            continue
        perms = {tuple(helper.get_attribute_value(a)) for c in cons for a in c.attribute if a.name == "perm"}
        if len(perms) != 1:
            continue
        keep, rest = cons[0], cons[1:]
        for c in rest:
            for n2 in model.graph.node:
                for i, t in enumerate(n2.input):
                    if t == c.output[0]:
                        n2.input[i] = keep.output[0]
            for o in model.graph.output:
                if o.name == c.output[0]:
                    raise FqhwError("a forked MaxPool Transpose is a graph output")
            model.graph.node.remove(c)
        changed = True
    return model, changed


def _step_streamline_residual(model):
    import finn.transformation.streamline.absorb as absorb
    import finn.transformation.streamline.reorder as reorder
    from finn.transformation.fpgadataflow.convert_to_hw.global_acc_pool import InferGlobalAccPoolLayer
    from finn.transformation.streamline.collapse_repeated import CollapseRepeatedAdd, CollapseRepeatedMul
    from qonnx.transformation.general import RemoveUnusedTensors
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul

    from finn.transformation.streamline.reorder import (
        MoveAddPastConv,
        MoveAddPastMul,
        MoveMulPastMaxPool,
        MoveScalarAddPastMatMul,
        MoveScalarMulPastConv,
        MoveScalarMulPastMatMul,
        MoveScalesPastIm2Col,
    )
    from finn.transformation.streamline.sign_to_thres import ConvertSignToThres
    from qonnx.transformation.batchnorm_to_affine import BatchNormToAffine
    from qonnx.transformation.general import ConvertDivToMul, ConvertSubToAdd

    model = model.transform(absorb.AbsorbScalarBiasIntoMultiThreshold())
    # the rewrites of FINN's Streamline (in its order) and the residual ones (scales past
    # the join adds and the forks), repeated to a fixed point. Streamline itself tidies
    # the graph (names, datatypes, layouts) after each of its ~20 rewrites, which took
    # 46 s of a ResNet-18's streamlining; tidying once per round gives the same graph
    residual = [
        ConvertSubToAdd(),
        ConvertDivToMul(),
        BatchNormToAffine(),
        ConvertSignToThres(),
        MoveMulPastMaxPool(),
        absorb.AbsorbScalarBiasIntoMultiThreshold(),
        MoveScalesPastIm2Col(),
        reorder.MoveScalarLinearPastInvariants(),
        MoveAddPastMul(),
        MoveScalarAddPastMatMul(),
        MoveAddPastConv(),
        MoveScalarMulPastMatMul(),
        MoveScalarMulPastConv(),
        reorder.MoveLinearPastEltwiseAdd(),
        reorder.MoveScalarLinearPastFork(),
        reorder.MoveChannelwiseLinearPastFork(),
        reorder.MoveLinearPastFork(),
        reorder.MoveMulPastJoinAdd(),
        reorder.MoveAddPastJoinAdd(),
        CollapseRepeatedMul(),
        CollapseRepeatedAdd(),
        absorb.AbsorbAddIntoMultiThreshold(),
        absorb.FactorOutMulSignMagnitude(),
        absorb.AbsorbMulIntoMultiThreshold(),
        absorb.Absorb1BitMulIntoMatMul(),
        absorb.Absorb1BitMulIntoConv(),
        absorb.AbsorbSignBiasIntoMultiThreshold(),
    ]
    model = until_fixed(model, residual)
    if model.get_nodes_by_op_type("Conv"):
        model = _tidy(model.transform(LowerConvsToMatMul()))
        model, _ = _merge_forked_transposes_after_maxpool(model)
        model = until_fixed(
            model,
            [
                reorder.MakeMaxPoolNHWC(),
                absorb.AbsorbTransposeIntoMultiThreshold(),
                reorder.MoveTransposePastFork(),
                reorder.MoveTransposePastJoinAdd(),
                absorb.AbsorbConsecutiveTransposes(),
            ],
        )
    if model.get_nodes_by_op_type("GlobalAveragePool"):
        # the pool becomes an integer sum (GlobalAccPool) and a Mul by 1/N, which moves
        # through the classifier into the float output scale
        model = _tidy(model.transform(InferGlobalAccPoolLayer()))
        model = until_fixed(
            model,
            [
                reorder.MoveScalarLinearPastInvariants(),
                absorb.AbsorbConsecutiveTransposes(),
                reorder.MoveScalarMulPastMatMul(),
                CollapseRepeatedMul(),
            ],
        )
    model = _tidy(model, readable=True)
    return model.transform(RemoveUnusedTensors())


def _integer_elementwise_only(model, node) -> bool:
    """Filter for InferElementwiseBinaryOperation: only ops on integer tensors become HW.
    A float elementwise op (the output scale, the classifier bias) is host arithmetic."""
    for t in list(node.input) + list(node.output):
        if model.get_initializer(t) is not None:
            continue
        if not model.get_tensor_datatype(t).is_integer():
            return False
    return True


def _step_convert_to_hw_residual(model):
    """finn_build's conversion list, with elementwise ops restricted to integer tensors."""
    from finn.transformation.fpgadataflow.convert_to_hw.elementwise_binary_operation import (
        InferElementwiseBinaryOperation,
    )

    import fqhw.backends.finn_build as fb

    original = InferElementwiseBinaryOperation.reject_output_dequant
    try:
        # finn_build filters with InferElementwiseBinaryOperation.reject_output_dequant; for
        # a ResNet the float tail is a Mul and an Add, so the integer-only filter is used
        InferElementwiseBinaryOperation.reject_output_dequant = staticmethod(_integer_elementwise_only)
        return fb._step_convert_to_hw(model)
    finally:
        InferElementwiseBinaryOperation.reject_output_dequant = original


def _classify(model) -> tuple[list[str], list[str]]:
    """(non-HW compute nodes, allowed host nodes) of a converted graph: layout ops in front
    of the first HW node and float Mul/Add behind the last are host work."""
    non_hw, host = [], []
    outputs = {o.name for o in model.graph.output}
    tail: set[str] = set()
    # walk back from the graph outputs through float Mul / Add / layout ops
    frontier = [model.find_producer(o) for o in outputs]
    while frontier:
        n = frontier.pop()
        if n is None or _is_hw(n) or n.name in tail:
            continue
        if n.op_type in HOST_TAIL_OPS + HOST_LAYOUT_OPS:
            tail.add(n.name)
            frontier += [model.find_producer(i) for i in n.input if model.get_initializer(i) is None]
    gin = {i.name for i in model.graph.input}
    for n in model.graph.node:
        if _is_hw(n):
            continue
        front = n.op_type in HOST_LAYOUT_OPS and all(i in gin or model.get_initializer(i) is not None for i in n.input)
        if n.name in tail or front:
            host.append(f"{n.name} ({n.op_type})")
        else:
            non_hw.append(f"{n.name} ({n.op_type})")
    return non_hw, host


def _step_round_thresholds(model):
    """Thresholds rounded up to integers and clipped to their input's range (FINN's
    RoundAndClipThresholds): exact for integer inputs (x >= t exactly when x >= ceil(t)),
    and needed before FINN sizes the threshold memories, which asserts non-negative
    thresholds on an unsigned input (an identity shortcut's requantization to the signed
    join scale has negative ones)."""
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds
    from qonnx.transformation.infer_datatypes import InferDataTypes

    return model.transform(RoundAndClipThresholds()).transform(InferDataTypes())


def _fold_mvaus(model, alloc, codes) -> dict:
    """PE / SIMD of each MVAU from the allocation, the MVAU found by its weight codes; other
    HW nodes keep FINN's default folding (PE = SIMD = 1)."""
    from qonnx.custom_op.registry import getCustomOp

    folding = {}
    for node_name, (layer, _) in match_mvaus_by_codes(model, codes).items():
        la = alloc.layer(layer)
        node = next(n for n in model.graph.node if n.name == node_name)
        inst = getCustomOp(node)
        mw, mh = int(inst.get_nodeattr("MW")), int(inst.get_nodeattr("MH"))
        if la.pe < 1 or la.simd < 1 or mh % la.pe or mw % la.simd:
            raise FqhwError(f"{layer}: folding PE={la.pe}, SIMD={la.simd} must divide MH={mh} (PE) and MW={mw} (SIMD)")
        inst.set_nodeattr("PE", int(la.pe))
        inst.set_nodeattr("SIMD", int(la.simd))
        folding[node_name] = {"layer": layer, "PE": int(la.pe), "SIMD": int(la.simd)}
    return folding


def finn_dataflow_resnet(qonnx_path, build_dir, alloc=None, part: str | None = None, clock_ns: float = 10.0) -> FinnResult:
    """Run FINN's conversion of a QuantResNet QONNX file up to HW layers; returns a
    FinnResult (every step's model saved in build_dir). Raises nothing when ops stay
    non-HW: `FinnResult.non_hw` names them (see `require_all_hw`).

    With an Allocation `alloc` and every compute op in HW, it goes on as FINN's estimate
    flow does: one dataflow partition (host Transpose in front, the float output scale and
    bias behind), SpecializeLayers for `part` (default xc7z020), the MVAUs folded with the
    allocation's PE / SIMD, bit widths minimized, and FINN's analytical estimates
    (`FinnResult.estimates`)."""
    from qonnx.core.modelwrapper import ModelWrapper

    import fqhw.backends.finn_build as fb

    part = part or fb.DEFAULT_PART
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    res = FinnResult(build_dir=str(build_dir))
    counter = [0]

    def record(name, model, t0):
        counter[0] += 1
        path = build_dir / f"{counter[0]:02d}_{name}.onnx"
        model.save(str(path))
        res.steps.append({"name": name, "seconds": round(time.perf_counter() - t0, 3), "model": str(path), "ops": op_counts(model)})
        return str(path)

    with fb._finn_env(build_dir):
        model = ModelWrapper(str(qonnx_path))
        for name, fn in (
            ("input_codes", fb._step_input_codes),
            ("qonnx_to_finn", fb._step_qonnx_to_finn),
            ("tidy_up", fb._step_tidy_up),
            ("streamline", _step_streamline_residual),
            ("convert_to_hw", _step_convert_to_hw_residual),
            ("round_thresholds", _step_round_thresholds),
        ):
            t0 = time.perf_counter()
            model = fn(model)
            res.hw_model = record(name, model, t0)
        res.hw_op_counts = op_counts(model)
        res.non_hw, res.host_nodes = _classify(model)
        if alloc is not None and not res.non_hw:
            from finn.transformation.fpgadataflow.create_dataflow_partition import CreateDataflowPartition
            from qonnx.custom_op.registry import getCustomOp

            t0 = time.perf_counter()
            (build_dir / "partitions").mkdir(exist_ok=True)
            parent = model.transform(CreateDataflowPartition(partition_model_dir=str(build_dir / "partitions")))
            sdps = parent.get_nodes_by_op_type("StreamingDataflowPartition")
            if len(sdps) != 1:
                raise FqhwError(f"expected one dataflow partition, FINN made {len(sdps)}")
            child = ModelWrapper(getCustomOp(sdps[0]).get_nodeattr("model"))
            record("create_dataflow_partition", child, t0)
            t0 = time.perf_counter()
            child = fb._step_specialize_layers(child, part)
            record("specialize_layers", child, t0)
            t0 = time.perf_counter()
            res.folding = _fold_mvaus(child, alloc, qonnx_weight_codes(qonnx_path))
            child = fb._minimize_bit_width(child)
            record("fold_and_minimize", child, t0)
            t0 = time.perf_counter()
            child, cycles, node_res, totals, perf = fb._estimates(child, part, clock_ns, build_dir / "report")
            res.dataflow_model = record("estimates", child, t0)
            getCustomOp(parent.get_nodes_by_op_type("StreamingDataflowPartition")[0]).set_nodeattr("model", res.dataflow_model)
            parent.save(str(build_dir / "dataflow_parent.onnx"))
            res.estimates = {
                "part": part,
                "clock_ns": clock_ns,
                "total": {k: float(v) for k, v in totals.items()},
                "max_cycles": int(perf["max_cycles"]),
                "max_cycles_node": str(perf["max_cycles_node_name"]),
                "critical_path_cycles": int(perf["critical_path_cycles"]),
                "fps": float(perf["estimated_throughput_fps"]),
            }
            for node, f in res.folding.items():
                r = node_res.get(node, {})
                res.layer_estimates[f["layer"]] = {
                    "mvau": node, "pe": f["PE"], "simd": f["SIMD"], "cycles": int(cycles.get(node, 0)),
                    **{k: float(r.get(k, 0)) for k in fb.RESOURCE_KEYS},
                }
    res.save()
    return res


def require_all_hw(res: FinnResult, what: str = "the model") -> FinnResult:
    """`res` if every compute op became a HW layer, else one FqhwError line naming the rest."""
    if res.non_hw:
        kinds = Counter(s.split(" (")[1].rstrip(")") for s in res.non_hw)
        ops = ", ".join(f"{k} x{v}" for k, v in kinds.most_common())
        raise FqhwError(f"FINN could not map {what} onto HW layers: {ops} left in software ({', '.join(res.non_hw[:5])}{', ...' if len(res.non_hw) > 5 else ''})")
    return res


# --------------------------------------------------------------------------- execution


def qonnx_weight_codes(qonnx_path) -> dict[str, np.ndarray]:
    """Per allocation layer: its integer weight codes from the QONNX file, laid out as FINN's
    MVAU weight matrix (MW, MH): a conv's (C_out, C_in, kh, kw) as rows (kh, kw, C_in)
    (qonnx LowerConvsToMatMul's im2col order), a Gemm's with its transB undone."""
    from fqhw.intcodes import COMPUTE_LAYERS_KEY, int_range
    from fqhw.onnxgraph import const_value, node_attrs, producer_of, quant_const

    model = onnx.load(str(qonnx_path))
    meta = {p.key: p.value for p in model.metadata_props}
    if COMPUTE_LAYERS_KEY not in meta:
        raise FqhwError(f"{qonnx_path}: not exported by export_generic_qonnx (no {COMPUTE_LAYERS_KEY} metadata)")
    layer_of = json.loads(meta[COMPUTE_LAYERS_KEY])
    out = {}
    for node in model.graph.node:
        if node.name not in layer_of:
            continue
        name = layer_of[node.name]
        q = producer_of(model, node.input[1])
        if q is None or q.op_type != "Quant":
            raise FqhwError(f"{name}: its weight is not quantized")
        w = const_value(model, q.input[0]).astype(np.float64)
        s, _, bits, signed, narrow = quant_const(model, q, f"{name} weight")
        lo, hi = int_range(bits, signed, narrow)
        codes = np.round(np.clip(w / s, lo, hi)).astype(np.int64)
        if node.op_type == "Conv":
            if node_attrs(node).get("group", 1) != 1:
                raise FqhwError(f"{name}: grouped convs are not supported by the FINN trace")
            codes = codes.transpose(0, 2, 3, 1).reshape(codes.shape[0], -1).T
        elif node.op_type == "Gemm":
            codes = codes.T if node_attrs(node).get("transB", 0) == 1 else codes
        out[name] = codes
    return out


def match_mvaus_by_codes(model, codes: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """MVAU node name -> (layer, column signs): the layer whose weight codes the MVAU holds,
    up to a sign per output column (FINN's FactorOutMulSignMagnitude moves a negative
    BatchNorm scale into the weights). Each layer must match exactly one MVAU."""
    out, used = {}, set()
    for node in model.graph.node:
        if not node.op_type.startswith("MVAU"):
            continue
        wf = model.get_initializer(node.input[1])
        hits = []
        for name, wl in codes.items():
            if wl.shape != wf.shape:
                continue
            same = (wf == wl).all(axis=0)
            neg = (wf == -wl).all(axis=0)
            if (same | neg).all():
                hits.append((name, np.where(same, 1, -1)))
        if len(hits) != 1:
            raise FqhwError(f"FINN node {node.name}: its weights match {len(hits)} layers, not one")
        if hits[0][0] in used:
            raise FqhwError(f"layer {hits[0][0]} matches two MVAUs")
        used.add(hits[0][0])
        out[node.name] = hits[0]
    missing = sorted(set(codes) - used)
    if missing:
        raise FqhwError(f"no MVAU holds the weights of layers {missing}")
    return out


def hw_keys(model, mvau_layer: dict) -> dict[str, str]:
    """HW node name -> trace key: an MVAU's output is "<layer>.act" (thresholded) or
    "<layer>.acc"; the Thresholding after a residual ElementwiseAdd is "<block>.out", one
    that feeds such an add (an identity shortcut's requantization) "<block>.shortcut",
    the block named by the add's main-branch MVAU (a layer of the block that is not its
    downsample)."""
    from qonnx.custom_op.registry import getCustomOp

    keys = {}
    for node in model.graph.node:
        if node.name in mvau_layer:
            layer = mvau_layer[node.name][0]
            no_act = int(getCustomOp(node).get_nodeattr("noActivation")) == 1
            keys[node.name] = f"{layer}.acc" if no_act else f"{layer}.act"
    for add in model.graph.node:
        if not add.op_type.startswith("ElementwiseAdd"):
            continue
        prods = [model.find_producer(i) for i in add.input]
        mains = [mvau_layer[p.name][0] for p in prods if p is not None and p.name in mvau_layer and ".downsample." not in mvau_layer[p.name][0]]
        if len(mains) != 1:
            raise FqhwError(f"FINN node {add.name}: cannot tell the residual branch of this add")
        block = mains[0].rsplit(".", 1)[0]
        for p in prods:
            if p is not None and p.op_type.startswith("Thresholding"):
                keys[p.name] = f"{block}.shortcut"
        for c in model.find_consumers(add.output[0]) or []:
            if c.op_type.startswith("Thresholding"):
                keys[c.name] = f"{block}.out"
    return keys


def finn_dataflow_integer_trace(res: FinnResult | str, qonnx_path, x, graph: str = "hw") -> "OrderedDict[str, np.ndarray]":
    """Run FINN's HW graph (after convert_to_hw) in Python on `x` (N, C, H, W floats =
    pixel/256), one image at a time: the host Transpose in front in numpy, every HW node
    with its own execute_node on float64 tensors (exact for integers below 2^53; FINN's
    MVAU multiplies in its inputs' dtype, and float32 stops being exact past 2^24), the
    float tail skipped. Returns int64 NCHW codes under the keys of
    `fqhw.quant.generic.integer_trace` ("input", "<layer>.act", "<block>.shortcut",
    "<block>.out", "fc.acc"); MVAUs are identified by their weight codes (from the QONNX
    file), so no name has to survive FINN's renaming.

    graph="hw" runs `FinnResult.hw_model` (generic HW nodes, before partitioning);
    graph="dataflow" the specialized, folded, bit-width-minimized partition
    (`FinnResult.dataflow_model`, each _hls / _rtl node through its generic Python
    execute_node, its input the NHWC codes the host Transpose would give it)."""
    import torch
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    from fqhw.intcodes import INT_TOL
    from fqhw.data.dataset import INPUT_SCALE

    if graph not in ("hw", "dataflow"):
        raise ValueError(f"graph must be 'hw' or 'dataflow', not {graph!r}")
    if isinstance(res, FinnResult):
        path = res.hw_model if graph == "hw" else res.dataflow_model
        if not path:
            raise FqhwError("no dataflow graph: run finn_dataflow_resnet with an allocation")
    else:
        path = str(res)
    model = ModelWrapper(path)
    if graph == "dataflow":
        from fqhw.backends.finn_build import _python_exec_model

        model = _python_exec_model(model)
    mvau_layer = match_mvaus_by_codes(model, qonnx_weight_codes(qonnx_path))
    keys = hw_keys(model, mvau_layer)
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    codes_f = x.astype(np.float64) / INPUT_SCALE
    codes = np.round(codes_f)
    if np.abs(codes_f - codes).max(initial=0.0) > INT_TOL or codes.min(initial=0) < 0 or codes.max(initial=0) > 255:
        raise FqhwError("FINN's input is the uint8 pixel codes: x must be pixel / 256")
    gin = model.graph.input[0].name
    per_key: dict[str, list[np.ndarray]] = {"input": [codes[i : i + 1].astype(np.int64) for i in range(len(codes))]}
    for i in range(codes.shape[0]):
        ctx = model.make_empty_exec_context()  # FINN's execute_node writes into allocated outputs
        a = codes[i : i + 1].astype(np.float64)
        want = tuple(model.get_tensor_shape(gin))
        if a.shape != want and a.transpose(0, 2, 3, 1).shape == want:
            a = a.transpose(0, 2, 3, 1)  # the partition reads NHWC: the host Transpose's output
        ctx[gin] = a
        for node in model.graph.node:
            if _is_hw(node):
                for t in node.input:
                    v = ctx.get(t)
                    if isinstance(v, np.ndarray) and v.dtype != np.float64 and model.get_initializer(t) is None:
                        ctx[t] = v.astype(np.float64)
                getCustomOp(node).execute_node(ctx, model.graph)
            elif node.op_type == "Transpose" and node.input[0] in ctx:
                perm = [a.ints for a in node.attribute if a.name == "perm"][0]
                ctx[node.output[0]] = np.transpose(ctx[node.input[0]], list(perm))
            # the float tail (output scale, bias) is host arithmetic: not an integer value
        for node_name, key in keys.items():
            node = next(n for n in model.graph.node if n.name == node_name)
            v = ctx[node.output[0]]
            r = np.round(v)
            if np.abs(v - r).max(initial=0.0) > INT_TOL:
                raise AssertionError(f"FINN node {node_name} ({key}): output is not integer")
            r = r.astype(np.int64)
            if key.endswith(".acc"):
                r = r.reshape(1, -1) * mvau_layer[node_name][1].reshape(1, -1)
            elif r.ndim == 4:
                r = r.transpose(0, 3, 1, 2)  # NHWC -> NCHW
            per_key.setdefault(key, []).append(r)
    return OrderedDict((k, np.concatenate(v, axis=0)) for k, v in per_key.items())


# --------------------------------------------------------------------------- any model: what FINN refuses


_CONVERSIONS = (
    # (module under finn.transformation.fpgadataflow.convert_to_hw, class, ops that trigger it):
    # finn_build's list in its order, then finn-plus' conversions for transformer ops
    ("binary_matrix_vector_activation", "InferBinaryMatrixVectorActivation", ("XnorPopcountMatMul",)),
    ("quantized_matrix_vector_activation", "InferQuantizedMatrixVectorActivation", ("MatMul",)),
    ("vector_vector_activation", "InferVectorVectorActivation", ("MatMul",)),
    ("label_select", "InferLabelSelectLayer", ("TopK",)),
    ("thresholding", "InferThresholdingLayer", ("MultiThreshold",)),
    ("fm_padding", "InferFMPadding", ("Pad",)),
    ("pool", "InferPool", ("MaxPool", "AveragePool", "MaxPoolNHWC", "QuantAvgPool2d")),
    ("pool_from_reduce", "InferPoolFromReduce", ("ReduceMax", "ReduceSum", "ReduceMean")),
    ("conv_inp_gen", "InferConvInpGen", ("Im2Col",)),
    ("concat", "InferConcatLayer", ("Concat",)),
    ("split", "InferSplitLayer", ("Split",)),
    ("elementwise_binary_operation", "InferElementwiseBinaryOperation", ("Mul", "Div", "Sub", "Add")),
    ("relu_as_elementwise_max", "InferReLUAsElementwiseMax", ("Relu",)),
    ("global_acc_pool", "InferGlobalAccPoolLayer", ("GlobalAveragePool",)),
    ("duplicate_streams", "InferDuplicateStreamsLayer", ()),
    ("hw_softmax", "InferHWSoftmax", ("Softmax",)),
    ("layer_norm", "InferLayerNorm", ("LayerNormalization",)),
    ("pwpolyf", "InferPWPolyFLayer", ("Erf", "Sigmoid", "PWPolyFunction")),
    ("lookup", "InferLookupLayer", ("Gather",)),
    ("squeeze", "InferSqueeze", ("Squeeze",)),
    ("unsqueeze", "InferUnsqueeze", ("Unsqueeze",)),
    ("reshape", "InferReshape", ("Reshape",)),
    ("shuffle", "InferShuffle", ("Transpose",)),
)


def _step_convert_to_hw_any(model):
    """Every HW conversion FINN has, each tried on its own: one that raises (FINN refusing
    a pattern it half-recognises) leaves its ops in software instead of stopping the rest.
    Elementwise ops are converted on integer tensors only (see `_integer_elementwise_only`)."""
    import importlib

    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    base = "finn.transformation.fpgadataflow.convert_to_hw."
    for mod, cls, ops in _CONVERSIONS:
        if ops and not any(model.get_nodes_by_op_type(o) for o in ops):
            continue
        try:
            klass = getattr(importlib.import_module(base + mod), cls)
        except (ImportError, AttributeError):
            continue
        t = klass(_integer_elementwise_only) if cls == "InferElementwiseBinaryOperation" else klass()
        try:
            new = model.transform(t)
            new = new.transform(InferShapes()).transform(InferDataTypes())
        except Exception:  # noqa: BLE001 - FINN's refusal of this pattern: its ops stay non-HW
            continue
        model = new
    return _tidy(model)


def finn_convert_any(qonnx_path, build_dir) -> tuple[FinnResult, str | None]:
    """Ask FINN to convert any QONNX model (fqhw's 8-bit input quantizer in front): the
    steps of `finn_dataflow_resnet` (its streamlining holds all of FINN's default rewrites,
    bounded to a fixed number of rounds), and every HW conversion FINN has. Returns the result and, if a step
    raised, "step: first line of the error" (the result then describes the last graph that
    was reached)."""
    from qonnx.core.modelwrapper import ModelWrapper

    import fqhw.backends.finn_build as fb

    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    res = FinnResult(build_dir=str(build_dir))
    failed = None
    with fb._finn_env(build_dir):
        model = ModelWrapper(str(qonnx_path))
        for i, (name, fn) in enumerate(
            (
                ("input_codes", fb._step_input_codes),
                ("qonnx_to_finn", fb._step_qonnx_to_finn),
                ("tidy_up", fb._step_tidy_up),
                ("streamline", _step_streamline_residual),
                ("convert_to_hw", _step_convert_to_hw_any),
            )
        ):
            t0 = time.perf_counter()
            try:
                model = fn(model)
            except Exception as e:  # noqa: BLE001 - FINN's refusal is the result here
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                failed = f"{name}: {type(e).__name__}: {first}"
                break
            path = build_dir / f"{i + 1:02d}_{name}.onnx"
            model.save(str(path))
            res.steps.append({"name": name, "seconds": round(time.perf_counter() - t0, 3), "model": str(path), "ops": op_counts(model)})
    res.hw_model = res.steps[-1]["model"] if res.steps else ""
    res.hw_op_counts = op_counts(model)
    res.non_hw, res.host_nodes = _classify(model)
    return res, failed


def refusal_error(res: FinnResult, failed: str | None, model_name: str) -> FqhwError | None:
    """The one-line FqhwError for a `finn_convert_any` result (None if all is HW): the op
    types left outside HW layers with their counts, most frequent first."""
    if not res.non_hw and failed is None:
        return None
    kinds = Counter(s.rsplit(" (", 1)[1].rstrip(")") for s in res.non_hw)
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    where = f" (FINN stopped in {failed.split(':')[0]}: {failed.split(':')[1].strip()})" if failed else ""
    return FqhwError(
        f"FINN cannot build {model_name}: unsupported ops {ops or 'none identified'}{where}; "
        "QONNX export and the ASIC cost models still work"
    )


def finn_refusal(qonnx_path, model_name: str, build_dir) -> FqhwError | None:
    """None if FINN maps every compute op of the QONNX model onto HW layers; otherwise the
    one-line FqhwError that says which op types it leaves in software (with counts), e.g.
    "FINN cannot build deit_tiny_patch16_224: unsupported ops MatMul x13, Mul x15, ...;
    QONNX export and the ASIC cost models still work". The error is returned, not raised:
    the caller decides whether a model FINN cannot build stops its run."""
    res, failed = finn_convert_any(qonnx_path, build_dir)
    return refusal_error(res, failed, model_name)
