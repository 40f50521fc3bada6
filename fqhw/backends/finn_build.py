"""FINN (finn-plus) dataflow build of a QONNX model, estimate-only, without Xilinx tools.

`finn_build` runs, as named sub-steps, the transformations of FINN's estimate-only builder
flow (finn.builder.build_dataflow_steps, which cannot be imported without XILINX_VIVADO),
calling them directly:

    input_codes               fqhw: the accelerator's input is the uint8 pixel codes
    qonnx_to_finn             cleanup + ConvertQONNXtoFINN
    tidy_up                   shapes, constant folding, names, datatypes
    streamline                scales / BN / ReLU into thresholds, convs lowered to MatMul
    convert_to_hw             HW layers (MVAU, sliding window, padding, pooling, ...)
    minimize_bit_width_initial
    create_dataflow_partition the HW layers become one StreamingDataflowPartition
    specialize_layers         HLS / RTL variants for the part
    apply_folding             PE / SIMD from the Allocation; sliding windows etc. folded as
                              the FINN cost model's layer_units() says
    minimize_bit_width
    estimates                 res_estimation, exp_cycles_per_layer, dataflow_performance
    threshold_check           fqhw: FINN's integer thresholds vs float64 ones from the QONNX file

Every sub-step saves its model as build_dir/<nn>_<name>.onnx; the estimate reports (in the
file names and layout FINN's builder uses, plus fqhw's per-layer view) go to build_dir/report/.

`finn_integer_trace` runs the folded dataflow graph in Python, one image at a time, and
returns the integers the hardware computes.

The rest of FINN's flow (HLS / RTL code generation, IP stitching, synthesis, bitfile) needs
Vivado. `finn_build` therefore also leaves in build_dir what FINN needs to finish there:
FINN's build configuration (dataflow_build_config.json, a DataflowBuildConfig), its folding
configuration (folding_config.json), the folded dataflow_model.onnx the remaining steps
start from, finish_build.sh and FINISH_BUILD.md. `finn_synth` runs those steps through
finn-plus's own `finn build` where the Xilinx tools are installed, and otherwise stops,
before writing anything, with a one-line error naming what is missing.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from fqhw.allocator.allocation import Allocation
from fqhw.data.dataset import INPUT_SCALE
from fqhw.errors import FqhwError
from fqhw.intcodes import INT_TOL
from fqhw.onnxgraph import node_attr
from fqhw.outputs import json_default
from fqhw.units import merge_group_keys, parse_unit

DEFAULT_PART = "xc7z020clg400-1"
# ops allowed to stay outside the dataflow partition: data layout and the final output scale
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten")
MVAU_TYPES = ("MVAU", "MVAU_hls", "MVAU_rtl")
POOL_TYPES = ("Pool", "Pool_hls", "StreamingMaxPool", "StreamingMaxPool_hls", "GlobalAccPool", "GlobalAccPool_hls")
RESOURCE_KEYS = ("LUT", "BRAM_18K", "URAM", "DSP")


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


# --------------------------------------------------------------------------- environment


@contextlib.contextmanager
def _finn_env(build_dir: Path):
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


# --------------------------------------------------------------------------- sub-steps


def _step_input_codes(model):
    """Make the accelerator's input the 8-bit input codes (the uint8 pixels).

    The QONNX graph starts with Quant(x; scale 2^-8, zero point 0, 8 bit, unsigned, wide):
    on the model's inputs x = pixel / 256 it is the identity. FINN's own convention is an
    integer-typed graph input, so the Quant becomes Mul(codes, 2^-8) on a UINT8 input,
    which streamlining then folds into the first layer's thresholds. Anything other than
    that exact quantizer is refused.
    """
    from qonnx.core.datatype import DataType
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.transformation.infer_shapes import InferShapes

    model = model.transform(ChangeBatchSize(1))
    gin = model.graph.input[0].name
    consumers = model.find_consumers(gin)
    if len(consumers) != 1 or consumers[0].op_type != "Quant":
        raise FqhwError("the QONNX graph input must feed exactly one Quant node (the 8-bit input quantizer)")
    q = consumers[0]
    scale = model.get_initializer(q.input[1])
    zp = model.get_initializer(q.input[2])
    bw = model.get_initializer(q.input[3])
    attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute}
    ok = (
        scale is not None
        and zp is not None
        and bw is not None
        and np.asarray(scale).size == 1
        and float(np.asarray(scale).reshape(-1)[0]) == INPUT_SCALE
        and float(np.asarray(zp).reshape(-1)[0]) == 0.0
        and float(np.asarray(bw).reshape(-1)[0]) == 8.0
        and int(attrs.get("signed", 1)) == 0
        and int(attrs.get("narrow", 0)) == 0
    )
    if not ok:
        raise FqhwError(
            "the input quantizer must be 8-bit unsigned with scale exactly 2^-8 and zero point 0 "
            f"(found scale={scale}, zero point={zp}, bits={bw}, attributes={attrs})"
        )
    scale_name = model.make_new_valueinfo_name()
    model.set_initializer(scale_name, np.asarray(INPUT_SCALE, dtype=np.float32))
    mul = helper.make_node("Mul", [gin, scale_name], [q.output[0]], name="InputScale")
    graph = model.graph
    idx = list(graph.node).index(q)
    graph.node.remove(q)
    graph.node.insert(idx, mul)
    model.set_tensor_datatype(gin, DataType["UINT8"])
    model = model.transform(InferShapes())
    return model


def _step_qonnx_to_finn(model):
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
    from finn.transformation.qonnx.quant_act_to_multithreshold import default_filter_function_generator
    from qonnx.util.cleanup import cleanup_model

    model = cleanup_model(model)
    return model.transform(
        ConvertQONNXtoFINN(filter_function=default_filter_function_generator(max_multithreshold_bit_width=8))
    )


def _step_tidy_up(model):
    from finn.transformation.qonnx.give_unique_node_names_recursive import GiveUniqueNodeNamesRecursive
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import GiveReadableTensorNames, RemoveStaticGraphInputs
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    model = model.transform(InferShapes())
    model = model.transform(FoldConstants())
    model = model.transform(GiveUniqueNodeNamesRecursive())
    model = model.transform(GiveReadableTensorNames())
    model = model.transform(InferDataTypes())
    return model.transform(RemoveStaticGraphInputs())


def _step_streamline(model):
    from fqhw.backends.finn_groups import is_grouped_graph, streamline_groups

    if is_grouped_graph(model):  # channel groups: forks and Concat joins to streamline
        return streamline_groups(model)
    import finn.transformation.streamline.absorb as absorb
    from finn.transformation.streamline import Streamline
    from finn.transformation.streamline.reorder import MakeMaxPoolNHWC
    from qonnx.transformation.bipolar_to_xnor import ConvertBipolarMatMulToXnorPopcount
    from qonnx.transformation.general import RemoveUnusedTensors
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul

    model = model.transform(absorb.AbsorbScalarBiasIntoMultiThreshold())
    model = model.transform(Streamline())
    if model.get_nodes_by_op_type("Conv"):
        model = model.transform(LowerConvsToMatMul())
        model = model.transform(MakeMaxPoolNHWC())
        model = model.transform(absorb.AbsorbTransposeIntoMultiThreshold())
        model = model.transform(MakeMaxPoolNHWC())
        model = model.transform(absorb.AbsorbConsecutiveTransposes())
    model = model.transform(ConvertBipolarMatMulToXnorPopcount())
    model = model.transform(Streamline())
    model = model.transform(absorb.AbsorbScalarMulAddIntoTopK())
    model = model.transform(InferDataLayouts())
    return model.transform(RemoveUnusedTensors())


def _step_convert_to_hw(model):
    """The builder's step_convert_to_hw with its defaults (thresholds inside the MVAUs)."""
    import finn.transformation.streamline.absorb as absorb
    from finn.transformation.fpgadataflow.absorb_into_requant import AbsorbElementwiseOpsIntoRequant
    from finn.transformation.fpgadataflow.convert_to_hw.binary_matrix_vector_activation import (
        InferBinaryMatrixVectorActivation,
    )
    from finn.transformation.fpgadataflow.convert_to_hw.concat import InferConcatLayer
    from finn.transformation.fpgadataflow.convert_to_hw.conv_inp_gen import InferConvInpGen
    from finn.transformation.fpgadataflow.convert_to_hw.duplicate_streams import InferDuplicateStreamsLayer
    from finn.transformation.fpgadataflow.convert_to_hw.elementwise_binary_operation import (
        InferElementwiseBinaryOperation,
    )
    from finn.transformation.fpgadataflow.convert_to_hw.fm_padding import InferFMPadding
    from finn.transformation.fpgadataflow.convert_to_hw.global_acc_pool import InferGlobalAccPoolLayer
    from finn.transformation.fpgadataflow.convert_to_hw.label_select import InferLabelSelectLayer
    from finn.transformation.fpgadataflow.convert_to_hw.pool import InferPool
    from finn.transformation.fpgadataflow.convert_to_hw.pool_from_reduce import InferPoolFromReduce
    from finn.transformation.fpgadataflow.convert_to_hw.quantized_matrix_vector_activation import (
        InferQuantizedMatrixVectorActivation,
    )
    from finn.transformation.fpgadataflow.convert_to_hw.relu_as_elementwise_max import (
        InferReLUAsElementwiseMax,
    )
    from finn.transformation.fpgadataflow.convert_to_hw.requant import InferRequantLayer
    from finn.transformation.fpgadataflow.convert_to_hw.reshape import InferReshape
    from finn.transformation.fpgadataflow.convert_to_hw.shuffle import InferShuffle
    from finn.transformation.fpgadataflow.convert_to_hw.split import InferSplitLayer
    from finn.transformation.fpgadataflow.convert_to_hw.thresholding import InferThresholdingLayer
    from finn.transformation.fpgadataflow.convert_to_hw.upsample import InferUpsample
    from finn.transformation.fpgadataflow.convert_to_hw.vector_vector_activation import (
        InferVectorVectorActivation,
    )
    from finn.transformation.move_reshape import RemoveCNVtoFCFlatten
    from finn.transformation.qonnx.give_unique_node_names_recursive import GiveUniqueNodeNamesRecursive
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    def if_any(model, op_types, transform):
        if any(model.get_nodes_by_op_type(t) for t in op_types):
            model = model.transform(transform)
        return model

    model = if_any(model, ["XnorPopcountMatMul"], InferBinaryMatrixVectorActivation())
    model = if_any(model, ["MatMul"], InferQuantizedMatrixVectorActivation())
    model = if_any(model, ["MatMul"], InferVectorVectorActivation())
    model = if_any(model, ["TopK"], InferLabelSelectLayer())
    model = if_any(model, ["MultiThreshold", "Quant"], InferRequantLayer(bitwidth_threshold=9))
    model = if_any(model, ["MultiThreshold"], InferThresholdingLayer())
    model = if_any(model, ["Pad"], InferFMPadding())
    model = if_any(model, ["MaxPool", "AveragePool", "MaxPoolNHWC", "QuantAvgPool2d"], InferPool())
    model = if_any(model, ["ReduceMax", "ReduceSum", "ReduceMean"], InferPoolFromReduce())
    model = if_any(model, ["Im2Col"], InferConvInpGen())
    model = if_any(model, ["ConvolutionInputGenerator"], RemoveCNVtoFCFlatten())
    model = if_any(model, ["Concat"], InferConcatLayer())
    model = if_any(model, ["Split"], InferSplitLayer())
    model = if_any(
        model,
        ["Mul", "Div", "Sub", "Add", "And", "Or", "Xor", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"],
        # FINN's own filter: the float output de-quantization Mul stays off-chip
        InferElementwiseBinaryOperation(InferElementwiseBinaryOperation.reject_output_dequant),
    )
    model = if_any(model, ["Relu"], InferReLUAsElementwiseMax())
    model = if_any(model, ["Upsample"], InferUpsample())
    model = if_any(model, ["GlobalAveragePool"], InferGlobalAccPoolLayer())
    model = model.transform(InferDuplicateStreamsLayer())
    model = if_any(model, ["Requant"], AbsorbElementwiseOpsIntoRequant())
    model = model.transform(absorb.AbsorbConsecutiveTransposes())
    model = model.transform(RemoveCNVtoFCFlatten())
    model = model.transform(GiveUniqueNodeNamesRecursive())
    model = model.transform(InferDataLayouts())
    model = model.transform(InferDataTypes())
    model = model.transform(InferShapes())
    model = model.transform(InferReshape())
    # like the builder's default (infer_shuffle_skip_first): the input layout transpose
    # stays in software, in front of the accelerator
    model = if_any(model, ["Transpose"], InferShuffle())
    return model


def _minimize_bit_width(model):
    from finn.transformation.fpgadataflow.minimize_accumulator_width import MinimizeAccumulatorWidth
    from finn.transformation.fpgadataflow.minimize_weight_bit_width import MinimizeWeightBitWidth
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds
    from qonnx.transformation.infer_datatypes import InferDataTypes

    model = model.transform(MinimizeWeightBitWidth(), apply_to_subgraphs=True)
    model = model.transform(MinimizeAccumulatorWidth(), apply_to_subgraphs=True)
    model = model.transform(InferDataTypes(), apply_to_subgraphs=True)
    model = model.transform(RoundAndClipThresholds(), apply_to_subgraphs=True)
    model = model.transform(InferDataTypes(), apply_to_subgraphs=True)
    model = model.transform(MinimizeWeightBitWidth(), apply_to_subgraphs=True)
    return model.transform(InferDataTypes(), apply_to_subgraphs=True)


def _is_hw(node) -> bool:
    return node.domain.startswith("finn.custom_op.fpgadataflow")


def _outside_compute_nodes(model) -> list[str]:
    """Non-HW nodes other than layout ops and a final output Mul (the only allowed ones)."""
    bad = []
    for node in model.graph.node:
        if _is_hw(node) and node.op_type != "StreamingDataflowPartition":
            continue
        if node.op_type == "StreamingDataflowPartition" or node.op_type in LAYOUT_OPS:
            continue
        if node.op_type == "Mul" and node.output[0] in [o.name for o in model.graph.output]:
            continue
        bad.append(f"{node.name} ({node.op_type})")
    return bad


def _step_create_dataflow_partition(model, build_dir: Path):
    from finn.analysis.fpgadataflow.unsupported_layers import unsupported_layers
    from finn.transformation.fpgadataflow.create_dataflow_partition import CreateDataflowPartition
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    outside = [f"{n.name} ({n.op_type})" for n in model.graph.node if not _is_hw(n)]
    ok, first_bad = model.analysis(unsupported_layers)
    first_bad = f"{first_bad.name} ({first_bad.op_type})" if first_bad is not None else None
    bad = _outside_compute_nodes(model)
    if bad or not ok:
        raise FqhwError(
            "FINN could not map every compute op onto a HW layer; left outside the dataflow "
            f"partition: {', '.join(bad) or first_bad}. Change the model so that these ops map "
            "(see fqhw.models.cnn for a FINN-friendly structure)."
        )
    part_dir = build_dir / "partitions"
    part_dir.mkdir(parents=True, exist_ok=True)
    parent = model.transform(CreateDataflowPartition(partition_model_dir=str(part_dir)))
    sdps = parent.get_nodes_by_op_type("StreamingDataflowPartition")
    if len(sdps) != 1:
        raise FqhwError(f"expected one dataflow partition, FINN made {len(sdps)}")
    child = ModelWrapper(getCustomOp(sdps[0]).get_nodeattr("model"))
    return parent, child, outside


def _step_specialize_layers(model, part: str):
    from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers
    from finn.transformation.qonnx.give_unique_node_names_recursive import GiveUniqueNodeNamesRecursive
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    model = model.transform(SpecializeLayers(part))
    model = model.transform(GiveUniqueNodeNamesRecursive())
    model = model.transform(InferShapes())
    return model.transform(InferDataTypes())


def _mvau_nodes(model):
    return [n for n in model.graph.node if n.op_type in MVAU_TYPES]


def _layer_of_nodes(model, layer_names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Assign each HW node to an fqhw layer: the padding / sliding window / other nodes in
    front of the i-th MVAU belong to layer i, pooling right after an MVAU to that MVAU's layer."""
    mvaus = _mvau_nodes(model)
    if len(mvaus) != len(layer_names):
        raise FqhwError(
            f"the dataflow graph has {len(mvaus)} MVAUs but the allocation has {len(layer_names)} layers"
        )
    mvau_of_layer = {ln: n.name for ln, n in zip(layer_names, mvaus)}
    layer_of = {}
    seen = 0  # MVAUs seen so far (graph order is topological)
    after_mvau = False  # still in the run of pooling nodes right after an MVAU
    for node in model.graph.node:
        if node.op_type in MVAU_TYPES:
            layer_of[node.name] = layer_names[seen]
            seen += 1
            after_mvau = True
            continue
        pooling = node.op_type in POOL_TYPES or (
            # the depthwise sliding window that feeds a pool
            node.op_type.startswith("ConvolutionInputGenerator")
            and node_attr(node, "depthwise") == 1
        )
        after_mvau = after_mvau and pooling
        if seen == len(layer_names) or (seen > 0 and after_mvau):
            layer_of[node.name] = layer_names[seen - 1]
        else:
            layer_of[node.name] = layer_names[seen]
    return layer_of, mvau_of_layer


def _node_units(model, layer_names: list[str], groups_mvaus: dict[str, str] | None):
    """(layer_of, mvau_of_layer): `_layer_of_nodes` for a chain of whole layers; for channel
    groups, the MVAUs matched to their units by weight (fqhw.backends.finn_groups)."""
    if groups_mvaus is None:
        return _layer_of_nodes(model, layer_names)
    from fqhw.backends.finn_groups import layer_of_nodes

    mvaus = {ln: groups_mvaus[ln] for ln in layer_names}
    return layer_of_nodes(model, mvaus), mvaus


def _finn_cost_model(part: str):
    """The FINN cost model of a board with this FPGA part (the folding rule it holds does
    not depend on the board; pynq-z2 stands in for a part no known board has)."""
    from fqhw.hwmodels.finn import BOARDS, FinnCostModel

    board = next((b.name for b in BOARDS.values() if b.part == part), "pynq-z2")
    return FinnCostModel(board)


def _dt_bits(inst, attr: str) -> int:
    from qonnx.core.datatype import DataType

    return int(DataType[inst.get_nodeattr(attr)].bitwidth())


def _layer_spec_from_graph(model, node, name: str):
    """The fqhw LayerSpec of the layer around MVAU `node`, read from the HW graph: the
    padding / sliding window in front of it (kernel, stride, padding, input size) and the
    pooling window + Pool behind it. Returns (spec, {role: node}) with roles "padding",
    "window", "pool_window", "pool" for the nodes found."""
    from qonnx.custom_op.registry import getCustomOp

    from fqhw.network import LayerSpec

    inst = getCustomOp(node)
    mw, mh = int(inst.get_nodeattr("MW")), int(inst.get_nodeattr("MH"))
    vecs = [int(v) for v in inst.get_nodeattr("numInputVectors")]
    out_pixels = int(np.prod(vecs[1:])) if len(vecs) > 1 else 1
    roles: dict = {}
    kw: dict = {"kind": "linear", "in_channels": mw}
    swg_node = model.find_producer(node.input[0])
    if swg_node is not None and swg_node.op_type.startswith("DuplicateStreams"):
        # channel groups share one window, forked to their MVAUs (fqhw.backends.finn_groups)
        swg_node = model.find_producer(swg_node.input[0])
    if swg_node is not None and swg_node.op_type.startswith("ConvolutionInputGenerator"):
        swg = getCustomOp(swg_node)
        roles["window"] = swg_node
        k, st = list(swg.get_nodeattr("ConvKernelDim")), list(swg.get_nodeattr("Stride"))
        if k[0] != k[1] or st[0] != st[1]:
            raise FqhwError(f"{name}: non-square kernel {k} or stride {st} is not supported")
        in_hw = tuple(int(v) for v in swg.get_nodeattr("IFMDim"))
        pad = 0
        pad_node = model.find_producer(swg_node.input[0])
        if pad_node is not None and pad_node.op_type.startswith("FMPadding"):
            roles["padding"] = pad_node
            pads = list(getCustomOp(pad_node).get_nodeattr("Padding"))
            if len(set(pads)) != 1:
                raise FqhwError(f"{name}: asymmetric padding {pads} is not supported")
            pad = int(pads[0])
            in_hw = tuple(int(v) for v in getCustomOp(pad_node).get_nodeattr("ImgDim"))
        kw.update(
            kind="conv", kernel=int(k[0]), stride=int(st[0]), padding=pad,
            in_channels=int(swg.get_nodeattr("IFMChannels")), in_hw=in_hw,
            out_hw=tuple(int(v) for v in swg.get_nodeattr("OFMDim")),
        )
    elif len(vecs) == 3:
        kw.update(kind="conv", in_channels=mw, in_hw=(vecs[1], vecs[2]), out_hw=(vecs[1], vecs[2]))
    for cons in model.find_consumers(node.output[0]) or []:
        if cons.op_type.startswith("ConvolutionInputGenerator") and node_attr(cons, "depthwise") == 1:
            nxt = model.find_consumers(cons.output[0]) or []
            pools = [n for n in nxt if n.op_type in POOL_TYPES]
            if len(pools) != 1:
                continue
            pw, pool = getCustomOp(cons), getCustomOp(pools[0])
            roles["pool_window"], roles["pool"] = cons, pools[0]
            kw.update(
                pool_kernel=int(list(pool.get_nodeattr("KernelSize"))[0]),
                pool_stride=int(list(pw.get_nodeattr("Stride"))[0]),
                pool_out_hw=tuple(int(v) for v in pool.get_nodeattr("OutImgDims")),
                out_hw=tuple(int(v) for v in pw.get_nodeattr("IFMDim")),
            )
        elif cons.op_type in POOL_TYPES:
            raise FqhwError(f"{name}: a Pool without its sliding window ({cons.name}) is not supported")
    spec = LayerSpec(name, mw=mw, mh=mh, out_pixels=out_pixels, has_output_act=int(inst.get_nodeattr("noActivation")) == 0, **kw)
    return spec, roles


def _step_apply_folding(
    model, alloc: Allocation, layer_names: list[str], cost=None, part: str = DEFAULT_PART, mvau_of_layer: dict[str, str] | None = None
):
    """PE / SIMD of each MVAU from the allocation; the nodes around it folded as the FINN
    cost model prices them.

    The allocation folds the MVAUs. The padding, sliding window and pooling units of each
    layer take the folding `FinnCostModel.layer_units` gives them (fqhw.hwmodels.finn
    holds the one copy of that rule: just enough parallelism that none is slower than the
    layer's MVAU, with widths that are multiples of the MVAU's); the layer is read from the
    HW graph as a LayerSpec. Channel groups ("<layer>:g<k>"; `mvau_of_layer` says which MVAU
    is which unit, see fqhw.backends.finn_groups): the shared window is folded with group 0,
    as the cost model prices it. Every other HW node keeps FINN's default folding. Data width
    converters, which FINN inserts only when it generates hardware, are not in the estimates
    (as in FINN's own estimate reports).
    """
    from finn.util.basic import MAX_ALLOWED_AP_INT_W
    from qonnx.custom_op.registry import getCustomOp

    cost = cost if cost is not None else _finn_cost_model(part)
    mvaus = _mvau_nodes(model)
    if len(mvaus) != len(layer_names):
        raise FqhwError(
            f"the dataflow graph has {len(mvaus)} MVAUs ({', '.join(n.name for n in mvaus)}) "
            f"but the allocation has {len(layer_names)} layers ({', '.join(layer_names)})"
        )
    folding: dict[str, dict] = {}
    if mvau_of_layer is not None:
        by_name = {n.name: n for n in mvaus}
        mvaus = [by_name[mvau_of_layer[ln]] for ln in layer_names]

    def set_attrs(node, **attrs):
        inst = getCustomOp(node)
        types = inst.get_nodeattr_types()
        attrs = {k: int(v) for k, v in attrs.items() if k in types}
        for k, v in attrs.items():
            inst.set_nodeattr(k, v)
        folding.setdefault(node.name, {}).update(attrs)
        return inst

    for ln, node in zip(layer_names, mvaus):
        la = alloc.layer(ln)
        inst = getCustomOp(node)
        mw, mh = int(inst.get_nodeattr("MW")), int(inst.get_nodeattr("MH"))
        if la.pe < 1 or la.simd < 1 or mh % la.pe or mw % la.simd:
            raise FqhwError(
                f"{ln}: folding PE={la.pe}, SIMD={la.simd} must divide the matrix of FINN node "
                f"{node.name}: MH={mh} outputs (PE), MW={mw} inputs (SIMD)"
            )
        inst = set_attrs(node, PE=la.pe, SIMD=la.simd)
        if node.op_type == "MVAU_hls" and inst.get_instream_width(1) > MAX_ALLOWED_AP_INT_W:
            raise FqhwError(
                f"{ln}: the weight stream of FINN node {node.name} is {inst.get_instream_width(1)} bits "
                f"wide at PE={la.pe}, SIMD={la.simd}, more than HLS allows ({MAX_ALLOWED_AP_INT_W})"
            )
        spec, roles = _layer_spec_from_graph(model, node, ln)
        layer, k = parse_unit(ln)
        if k is not None:  # a channel group: the window in front is group 0's
            spec = replace(spec, group=layer, group_index=k)
            if k > 0:
                roles = {r: n for r, n in roles.items() if r not in ("padding", "window")}
        out_bits = _dt_bits(inst, "outputDataType") if spec.has_output_act else None
        units = cost.layer_units(
            spec, _dt_bits(inst, "weightDataType"), _dt_bits(inst, "inputDataType"), out_bits, la.pe, la.simd
        )
        by_role = {u["role"]: u for u in units}
        if by_role["mvau"]["cycles"] != inst.get_exp_cycles():
            raise FqhwError(
                f"{ln}: the cost model's MVAU cycles ({by_role['mvau']['cycles']}) are not FINN's "
                f"({inst.get_exp_cycles()}) for node {node.name}"
            )
        expected = {r for r in by_role if r != "mvau"}
        if expected != set(roles):
            raise FqhwError(
                f"{ln}: the cost model prices units {sorted(expected)} around the MVAU, the FINN graph "
                f"has {sorted(roles)}"
            )
        for role, n in roles.items():
            a = by_role[role]["attrs"]
            if role == "pool":
                set_attrs(n, PE=a["PE"])
            elif role == "padding":
                set_attrs(n, SIMD=a["SIMD"])
            else:  # sliding windows
                set_attrs(n, SIMD=a["SIMD"], parallel_window=a["parallel_window"])
    for node in model.graph.node:
        if node.name not in folding and _is_hw(node):
            inst = getCustomOp(node)
            types = inst.get_nodeattr_types()
            folding[node.name] = {a: int(inst.get_nodeattr(a)) for a in ("PE", "SIMD") if a in types}
    return model, folding


def _estimates(model, part: str, clock_ns: float, report_dir: Path):
    from finn.analysis.fpgadataflow.dataflow_performance import dataflow_performance
    from finn.analysis.fpgadataflow.exp_cycles_per_layer import exp_cycles_per_layer
    from finn.analysis.fpgadataflow.op_and_param_counts import aggregate_dict_keys, op_and_param_counts
    from finn.analysis.fpgadataflow.res_estimation import res_estimation, res_estimation_complete
    from finn.transformation.fpgadataflow.annotate_cycles import AnnotateCycles

    report_dir.mkdir(parents=True, exist_ok=True)

    def dump(name, obj):
        (report_dir / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")

    dump("op_and_param_counts.json", model.analysis(op_and_param_counts))
    cycles = {k: int(v) for k, v in model.analysis(exp_cycles_per_layer).items()}
    dump("estimate_layer_cycles.json", cycles)
    res = model.analysis(lambda m: res_estimation(m, fpgapart=part))
    res_total = dict(res)
    res_total["total"] = aggregate_dict_keys(res)
    dump("estimate_layer_resources.json", res_total)
    dump("estimate_layer_config_alternatives.json", model.analysis(lambda m: res_estimation_complete(m, fpgapart=part)))
    model = model.transform(AnnotateCycles())
    perf = dict(model.analysis(dataflow_performance))
    fps = (1e9 / clock_ns) / float(perf["max_cycles"])
    perf["estimated_throughput_fps"] = fps
    perf["estimated_latency_ns"] = float(perf["critical_path_cycles"]) * clock_ns
    dump("estimate_network_performance.json", perf)
    return model, cycles, res, res_total["total"], perf




def finn_build(
    qonnx_path,
    alloc: Allocation,
    build_dir,
    part: str = DEFAULT_PART,
    clock_ns: float = 10.0,
    cost_model=None,
    board: str | None = None,
) -> FinnBuild:
    """Estimate-only FINN dataflow build of the QONNX file at `qonnx_path` folded as `alloc` says.

    cost_model: the FinnCostModel whose `layer_units` folds the units around each MVAU
    (default: the one of a board with this part). After the estimates, `threshold_check`
    compares FINN's integer thresholds with float64 ones from the QONNX file; its result is
    in `FinnBuild.threshold_check` and build_dir/report/threshold_check.json (a record: the
    build does not fail on it).

    The folder also gets what FINN needs to finish the build where Vivado is installed
    (`write_synth_inputs`: FINN's build and folding configurations, a README and a run
    script next to dataflow_model.onnx); `finn_synth` runs it. board: FINN's board name for
    the bitfile (e.g. "Pynq-Z2"); default: the cost model's board, else the board with
    this part."""
    from qonnx.core.modelwrapper import ModelWrapper

    board = _resolve_board(part, board, cost_model)
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    qonnx_path = Path(qonnx_path).resolve()
    if not qonnx_path.exists():
        raise FqhwError(f"QONNX file {qonnx_path} does not exist: run export_qonnx first")
    layer_names = [la.name for la in alloc.layers]
    meta = {p.key: p.value for p in onnx.load(str(qonnx_path), load_external_data=False).metadata_props}
    if "fqhw_layer_names" in meta and json.loads(meta["fqhw_layer_names"]) != layer_names:
        raise FqhwError(
            f"the allocation's layers {layer_names} are not the exported model's "
            f"{json.loads(meta['fqhw_layer_names'])}"
        )
    steps: list[FinnStep] = []
    counter = [0]

    def record(name, model, t0):
        counter[0] += 1
        path = build_dir / f"{counter[0]:02d}_{name}.onnx"
        model.save(str(path))
        steps.append(FinnStep(name, round(time.perf_counter() - t0, 4), str(path)))

    from fqhw.backends.finn_groups import fold_joins, group_units, match_mvaus

    with _finn_env(build_dir):
        model = ModelWrapper(str(qonnx_path))
        t0 = time.perf_counter()
        model = _step_input_codes(model)
        record("input_codes", model, t0)
        for name, fn in (
            ("qonnx_to_finn", _step_qonnx_to_finn),
            ("tidy_up", _step_tidy_up),
            ("streamline", _step_streamline),
            ("convert_to_hw", _step_convert_to_hw),
            ("minimize_bit_width_initial", _minimize_bit_width),
        ):
            t0 = time.perf_counter()
            model = fn(model)
            record(name, model, t0)
        t0 = time.perf_counter()
        parent, model, outside = _step_create_dataflow_partition(model, build_dir)
        record("create_dataflow_partition", model, t0)
        parent_path = build_dir / "dataflow_parent.onnx"
        t0 = time.perf_counter()
        model = _step_specialize_layers(model, part)
        record("specialize_layers", model, t0)
        t0 = time.perf_counter()
        grouped = group_units(layer_names)
        groups_mvaus = match_mvaus(model, qonnx_path, layer_names) if grouped else None
        model, folding = _step_apply_folding(model, alloc, layer_names, cost=cost_model, part=part, mvau_of_layer=groups_mvaus)
        if grouped:
            folding.update(fold_joins(model, groups_mvaus))
        record("apply_folding", model, t0)
        t0 = time.perf_counter()
        model = _minimize_bit_width(model)
        record("minimize_bit_width", model, t0)
        if model.get_nodes_by_op_type("Shuffle"):
            raise FqhwError("the dataflow graph contains a Shuffle (a transpose inside the accelerator)")
        non_hw = [f"{n.name} ({n.op_type})" for n in model.graph.node if not _is_hw(n)]
        if non_hw:
            raise FqhwError(f"non-HW nodes inside the dataflow partition: {', '.join(non_hw)}")
        t0 = time.perf_counter()
        model, cycles, res, totals, perf = _estimates(model, part, clock_ns, build_dir / "report")
        record("estimates", model, t0)
        dataflow_path = build_dir / "dataflow_model.onnx"
        model.save(str(dataflow_path))
        t0 = time.perf_counter()
        thr_check = threshold_check(qonnx_path, model, _node_units(model, layer_names, groups_mvaus)[1])
        steps.append(FinnStep("threshold_check", round(time.perf_counter() - t0, 4), str(dataflow_path)))
        # the parent graph, pointing at the final dataflow graph
        from qonnx.custom_op.registry import getCustomOp

        sdp = parent.get_nodes_by_op_type("StreamingDataflowPartition")[0]
        getCustomOp(sdp).set_nodeattr("model", str(dataflow_path))
        parent.save(str(parent_path))
        synth = write_synth_inputs(build_dir, model, part=part, clock_ns=clock_ns, board=board)

    layer_of, mvau_of_layer = _node_units(model, layer_names, groups_mvaus)
    node_est: dict[str, dict] = {}
    for node in model.graph.node:
        r = res.get(node.name, {})
        e = {"op_type": node.op_type, "layer": layer_of.get(node.name), "cycles": int(cycles.get(node.name, 0))}
        for k in RESOURCE_KEYS:
            e[k] = float(r.get(k, 0))
        for k, v in r.items():
            if k not in e:
                e[k] = v
        e.update({f"fold_{k}": v for k, v in folding.get(node.name, {}).items()})
        node_est[node.name] = e
    layer_est: dict[str, dict] = {}
    for ln in layer_names:
        nodes = [n for n, l in layer_of.items() if l == ln]
        d = {
            "nodes": nodes,
            "mvau": mvau_of_layer[ln],
            "mvau_cycles": node_est[mvau_of_layer[ln]]["cycles"],
            "cycles": max(node_est[n]["cycles"] for n in nodes),
            "pe": int(folding[mvau_of_layer[ln]]["PE"]),
            "simd": int(folding[mvau_of_layer[ln]]["SIMD"]),
        }
        for k in RESOURCE_KEYS:
            d[k] = float(sum(node_est[n][k] for n in nodes))
        layer_est[ln] = d
    tot = {k: float(totals.get(k, 0.0)) for k in RESOURCE_KEYS}
    tot.update({k: float(v) for k, v in totals.items() if k not in tot})
    build = FinnBuild(
        build_dir=str(build_dir),
        qonnx_path=str(qonnx_path),
        part=part,
        clock_ns=float(clock_ns),
        dataflow_model=str(dataflow_path),
        parent_model=str(parent_path),
        steps=steps,
        node_estimates=node_est,
        layer_estimates=layer_est,
        layer_of_node=layer_of,
        mvau_of_layer=mvau_of_layer,
        totals=tot,
        max_cycles=int(perf["max_cycles"]),
        max_cycles_node=str(perf["max_cycles_node_name"]),
        critical_path_cycles=int(perf["critical_path_cycles"]),
        fps=float(perf["estimated_throughput_fps"]),
        latency_ns=float(perf["estimated_latency_ns"]),
        outside_nodes=outside,
        folding=folding,
        threshold_check=thr_check,
        board=board,
        synth_config=str(synth["config"]),
        folding_config=str(synth["folding"]),
    )
    report = build_dir / "report"
    (report / "threshold_check.json").write_text(json.dumps(thr_check, indent=2, sort_keys=True) + "\n")
    (report / "estimate_fqhw_layers.json").write_text(json.dumps(layer_est, indent=2, sort_keys=True) + "\n")
    (report / "finn_steps.json").write_text(
        json.dumps([asdict(s) for s in steps], indent=2) + "\n"
    )
    build.save()
    return build


# --------------------------------------------------------------------------- finishing the build
#
# finn_build stops at FINN's estimates because everything after them (HLS / RTL code
# generation, FIFO sizing, IP stitching, synthesis, bitfile) needs Xilinx tools. The build
# folder carries what FINN needs to take over on a machine that has them: FINN's own build
# configuration and folding configuration, the folded dataflow model the remaining steps
# start from, a run script and a README. `finn_synth` runs that script's command here, when
# the tools are here.

SYNTH_CONFIG = "dataflow_build_config.json"  # FINN's DataflowBuildConfig, as JSON
FOLDING_CONFIG = "folding_config.json"  # FINN's folding configuration (ApplyConfig format)
SYNTH_MODEL = "dataflow_model.onnx"  # the folded, specialized HW graph: where FINN resumes
SYNTH_SCRIPT = "finish_build.sh"
SYNTH_README = "FINISH_BUILD.md"
SYNTH_OUTPUT = "vivado_build"  # FINN's output_dir, relative to the build folder
SYNTH_TMP = SYNTH_OUTPUT + "/finn_tmp"  # FINN_BUILD_DIR of the remaining steps
SUPPORTED_VIVADO = "2022.2 or 2024.2"  # the Xilinx tool versions finn-plus 1.6.1 names
# The node attributes FINN's step_apply_folding_config writes back to
# report/applied_folding_config.json (FINN keeps the list inside that step function), so
# that the folding file holds everything FINN itself would call folding.
FOLDING_ATTRS = (
    "PE", "SIMD", "EmbFold", "SeqFold", "parallel_window", "ram_style", "ram_style_thresholds",
    "ram_style_mask", "depth", "impl_style", "resType", "mac_resource", "mem_mode",
    "runtime_writeable_weights", "depth_trigger_uram", "depth_trigger_bram",
)
# FINN's default steps from this one on finish the build; the ones before it are what
# finn_build ran. Applying folding_config.json again leaves the folded model as it is,
# and keeps the file the one place to change the folding by hand.
FIRST_SYNTH_STEP = "step_apply_folding_config"


def _resolve_board(part: str, board: str | None, cost_model) -> str | None:
    """FINN's board name for a bitfile: the one given, else the cost model's board, else
    fqhw's board with this part (the PYNQ-Z2 for the xc7z020, which the PYNQ-Z1 shares);
    None for a part no known board has (then only the stitched IP can be built)."""
    from finn.util.basic import part_map

    from fqhw.hwmodels.finn import BOARDS

    if board is not None:
        if board not in part_map:
            raise FqhwError(f"unknown FINN board {board!r}: FINN knows {', '.join(sorted(part_map))}")
        if part_map[board] != part:
            raise FqhwError(f"FINN board {board} has part {part_map[board]}, not {part}")
        return board
    b = getattr(getattr(cost_model, "board", None), "finn_board", None)
    if b is not None and part_map.get(b) == part:
        return b
    names = [x.finn_board for x in BOARDS.values() if x.part == part and part_map.get(x.finn_board) == part]
    if "Pynq-Z2" in names:
        return "Pynq-Z2"
    return names[0] if names else None


def synth_command(finn: str = "finn", skip_dep_update: bool = False) -> list[str]:
    """The command, run in the build folder, that finishes the build with FINN's own CLI
    (finn-plus's `finn build`): FINN's remaining steps on dataflow_model.onnx, configured by
    dataflow_build_config.json. --batch: no setup wizard. skip_dep_update: do not let FINN
    fetch or update its HLS libraries (it does by default, which needs the network)."""
    argv = [finn, "build", "--batch"]
    if skip_dep_update:
        argv.append("--skip-dep-update")
    return argv + ["--build-path", SYNTH_TMP, SYNTH_CONFIG, SYNTH_MODEL]


def write_synth_inputs(build_dir, model, part: str, clock_ns: float, board: str | None) -> dict[str, Path]:
    """Write, next to build_dir/dataflow_model.onnx (the folded `model`), FINN's folding
    configuration (FINN's own extract_model_config_to_json over FOLDING_ATTRS), FINN's build
    configuration (checked by loading it with DataflowBuildConfig.construct_from, as `finn
    build` does), the run script and a README. All paths in them are relative, so that the
    folder can be copied to another machine. Returns {"config", "folding", "script",
    "readme"} paths."""
    from finn.builder.build_dataflow_config import DataflowBuildConfig, default_build_dataflow_steps
    from finn.util.basic import alveo_part_map
    from finn.util.config import extract_model_config_to_json

    build_dir = Path(build_dir)
    if not (build_dir / SYNTH_MODEL).exists():
        raise FqhwError(f"{build_dir / SYNTH_MODEL} does not exist: save the dataflow model first")
    folding_path = build_dir / FOLDING_CONFIG
    extract_model_config_to_json(model, folding_path, FOLDING_ATTRS)
    steps = list(default_build_dataflow_steps[default_build_dataflow_steps.index(FIRST_SYNTH_STEP) :])
    cfg: dict = {
        "output_dir": SYNTH_OUTPUT,
        "synth_clk_period_ns": float(clock_ns),
        "fpga_part": part,
        "folding_config_file": FOLDING_CONFIG,
        "steps": steps,
        "save_intermediate_models": True,
    }
    if board is not None:
        shell = "vitis_alveo" if board in alveo_part_map else "vivado_zynq"
        cfg.update(board=board, shell_flow_type=shell)
        cfg["generate_outputs"] = ["estimate_reports", "stitched_ip", "bitfile", "pynq_driver", "deployment_package"]
    else:  # no board: no shell to put the accelerator into; out-of-context synthesis instead
        cfg["generate_outputs"] = ["estimate_reports", "stitched_ip", "out_of_context_synth"]
    config_path = build_dir / SYNTH_CONFIG
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")
    DataflowBuildConfig.construct_from(config_path)  # FINN's loader: field names and files

    script = build_dir / SYNTH_SCRIPT
    script.write_text(
        "#!/usr/bin/env bash\n"
        "# Finish this FINN build: FINN's steps after the estimates (HLS/RTL code generation,\n"
        f"# FIFO sizing, IP stitching, synthesis, bitfile). Needs Vivado and Vitis HLS {SUPPORTED_VIVADO}\n"
        "# (source Vivado's settings64.sh first) and finn-plus 1.6.1 (pip install finn-plus==1.6.1).\n"
        "# FINN=/path/to/finn picks another finn command; FINN fetches its HLS libraries on the\n"
        "# first run (add --skip-dep-update once they are there).\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f'exec "${{FINN:-finn}}" {shlex.join(synth_command()[1:])} "$@"\n'
    )
    script.chmod(0o755)
    readme = build_dir / SYNTH_README
    readme.write_text(_synth_readme(model, cfg, steps))
    return {"config": config_path, "folding": folding_path, "script": script, "readme": readme}


def _synth_readme(model, cfg: dict, steps: list[str]) -> str:
    from qonnx.custom_op.registry import getCustomOp

    out = SYNTH_OUTPUT
    board = cfg.get("board")
    if board:
        target = f"board {board} ({cfg['fpga_part']}, shell flow {cfg['shell_flow_type']})"
        products = [
            f"- `{out}/bitfile/finn-accel.bit` and `.hwh` (`.xclbin` on Alveo): the bitfile",
            f"- `{out}/driver/`, `{out}/deploy/`: FINN's PYNQ driver and the deployment package",
            f"- `{out}/report/post_synth_resources.json`, `post_route_timing.rpt`: Vivado's numbers",
        ]
    else:
        target = f"part {cfg['fpga_part']} (no known board: stitched IP and out-of-context synthesis only)"
        products = [f"- `{out}/stitched_ip/`, `{out}/report/ooc_synth_and_timing.json`"]
    lines = [
        "# Finishing this FINN build",
        "",
        "fqhw ran FINN's steps up to its estimate reports in Python (no Xilinx tools); `fqhw compile`",
        "checks this folded dataflow graph bit for bit against Brevitas and QONNX (bitexact.json",
        "in the compile output). What is left needs",
        f"Vivado and Vitis HLS {SUPPORTED_VIVADO} (finn-plus 1.6.1 reads XILINX_VIVADO, XILINX_HLS and",
        "PATH: source Vivado's `settings64.sh`). On such a machine, in this folder:",
        "",
        f"    bash {SYNTH_SCRIPT}",
        "",
        "which runs FINN's own command line here:",
        "",
        f"    {shlex.join(synth_command())}",
        "",
        "or, with fqhw installed, `fqhw.backends.finn_build.finn_synth('.')`, which first checks for",
        "the tools and names what is missing.",
        "",
        f"Target: {target}, clock {cfg['synth_clk_period_ns']:g} ns.",
        "",
        "## What is here",
        "",
        f"- `{SYNTH_MODEL}`: the folded, specialized HW graph; FINN's remaining steps start from it",
        f"- `{SYNTH_CONFIG}`: FINN's build configuration (`DataflowBuildConfig`); its steps are",
        f"  FINN's default ones from `{steps[0]}` on:",
        *[f"  - {st}" for st in steps],
        f"- `{FOLDING_CONFIG}`: FINN's folding configuration (PE/SIMD from fqhw's allocation);",
        "  edit it to change the folding (FINN applies it first), though fqhw's estimates then no",
        "  longer describe the build",
        "- `report/`: FINN's estimate reports for this folding, `threshold_check.json`",
        "",
        f"## What comes out (in `{out}/`)",
        "",
        *products,
        "",
        "## Folding",
        "",
        "| node | op | folding |",
        "| --- | --- | --- |",
    ]
    for node in model.graph.node:
        if not _is_hw(node):
            continue
        inst = getCustomOp(node)
        types = inst.get_nodeattr_types()
        fold = ", ".join(f"{a}={inst.get_nodeattr(a)}" for a in ("PE", "SIMD") if a in types)
        lines.append(f"| {node.name} | {node.op_type} | {fold or '-'} |")
    return "\n".join(lines) + "\n"


@dataclass
class FinnSynth:
    """What FINN's remaining steps produced (`finn_synth`); paths absolute, None where FINN
    did not make the product (e.g. no bitfile for a part without a board)."""

    build_dir: str
    output_dir: str
    log: str
    seconds: float
    bitfile: str | None
    deploy_dir: str | None
    resources: dict = field(default_factory=dict)  # FINN's post_synth_resources.json


def _synth_dir(path) -> Path:
    """The FINN build folder: `path` itself, or the finn/ folder of a compile output."""
    path = Path(path).resolve()
    if not (path / SYNTH_CONFIG).exists() and (path / "finn" / "finn_build.json").exists():
        return path / "finn"
    return path


def _finn_executable() -> str | None:
    """finn-plus's `finn` command: next to this Python (a virtual environment), else on PATH."""
    import shutil
    import sys

    here = Path(sys.executable).parent / "finn"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("finn")


def synth_tools_missing(shell_flow_type: str | None = "vivado_zynq", env=None) -> list[str]:
    """What FINN's remaining steps need and this machine lacks, one phrase each ([] when
    nothing is missing). Read as finn-plus reads it: XILINX_VIVADO (it parses the tool
    version from that path), the tools on PATH or in FINN_TOOL_DIR_OVERRIDE (vivado;
    vitis_hls, or vitis-run after 2024.2), XILINX_VITIS and v++ for Alveo, a C++ compiler
    for its XSI simulator module, and the finn command itself."""
    import re
    import shutil

    env = os.environ if env is None else env
    override = env.get("FINN_TOOL_DIR_OVERRIDE")

    def tool(name: str) -> str | None:  # finn.util.basic.resolve_xilinx_tool's rule
        if override:
            p = Path(override) / name
            return str(p) if p.is_file() and os.access(p, os.X_OK) else None
        return shutil.which(name, path=env.get("PATH", ""))

    missing = []
    root = env.get("XILINX_VIVADO")
    vivado = tool("vivado")
    where = f"in FINN_TOOL_DIR_OVERRIDE={override}" if override else "on PATH"
    if not vivado and not root:
        hint = ""
        if env.get("FINN_XILINX_PATH"):
            hint = (
                f" (FINN_XILINX_PATH={env['FINN_XILINX_PATH']} is upstream FINN's docker setting, "
                "finn-plus does not read it: source Vivado's settings64.sh from there)"
            )
        missing.append(f"vivado not {where} and XILINX_VIVADO unset{hint}")
    elif not root:
        missing.append(f"vivado is {where} ({vivado}) but XILINX_VIVADO is unset")
    elif not vivado:
        missing.append(f"XILINX_VIVADO={root} but vivado is not {where}")
    version = None
    if root:
        m = re.search(r"\b(20\d{2})\.(1|2)\b", root)
        if m:
            version = (int(m.group(1)), int(m.group(2)))
        else:
            missing.append(f"XILINX_VIVADO={root} names no version such as 2022.2 (finn-plus reads it from that path)")
    hls = ["vitis-run"] if version is not None and version > (2024, 2) else ["vitis_hls"]
    if version is None:
        hls = ["vitis_hls", "vitis-run"]
    if not any(tool(h) for h in hls):
        missing.append(f"{' or '.join(hls)} (Vitis HLS) not {where}")
    if shell_flow_type == "vitis_alveo":
        if not env.get("XILINX_VITIS"):
            missing.append("XILINX_VITIS unset (Alveo builds use Vitis)")
        if not tool("v++"):
            missing.append(f"v++ not {where}")
    if not (shutil.which("g++", path=env.get("PATH", "")) or shutil.which("clang++", path=env.get("PATH", ""))):
        missing.append("no C++ compiler (g++ or clang++) for FINN's XSI simulator")
    if _finn_executable() is None:
        missing.append("the finn command of finn-plus is missing (pip install finn-plus==1.6.1)")
    return missing


def check_synth_tools(build_dir=None, shell_flow_type: str | None = "vivado_zynq", env=None) -> None:
    """Raise FqhwError, one line, naming what `finn_synth` needs and this machine lacks and
    how to get it (or where to run the build instead); return quietly when all is there."""
    missing = synth_tools_missing(shell_flow_type, env)
    if not missing:
        return
    vitis = " and Vitis" if shell_flow_type == "vitis_alveo" else ""
    where = f"`bash {SYNTH_SCRIPT}` in {build_dir}" if build_dir is not None else f"`bash {SYNTH_SCRIPT}` in the build folder"
    raise FqhwError(
        f"--synth needs Vivado and Vitis HLS{vitis} ({'; '.join(missing)}): install Vivado {SUPPORTED_VIVADO} "
        f"with Vitis HLS and source its settings64.sh (it sets XILINX_VIVADO, XILINX_HLS and PATH), "
        f"or run {where} on a machine that has them"
    )


def finn_synth(build_dir, *, skip_dep_update: bool = False, timeout_s: float | None = None, finn_command: str | None = None) -> FinnSynth:
    """Finish a FINN build made by `finn_build`: run FINN's remaining steps (HLS/RTL code
    generation, FIFO sizing, IP stitching, synthesis, bitfile, driver, deployment package)
    with finn-plus's own `finn build`, as the folder's finish_build.sh does.

    build_dir: the FINN build folder, or a compile output folder holding it as finn/.
    Before anything is written, checks the folder has what FINN needs and the machine has
    the Xilinx tools (`check_synth_tools`); either missing is a one-line FqhwError and the
    folder is left as it was. FINN writes into build_dir/vivado_build/ (its log:
    vivado_build/finn_synth.log). skip_dep_update: pass --skip-dep-update to FINN (no
    fetching of its HLS libraries). timeout_s: stop FINN (its whole process group) after
    this long. finn_command: the finn executable (default: next to this Python, else PATH).
    """
    import signal
    import subprocess

    build_dir = _synth_dir(build_dir)
    lacking = [n for n in (SYNTH_CONFIG, FOLDING_CONFIG, SYNTH_MODEL) if not (build_dir / n).is_file()]
    if lacking:
        raise FqhwError(
            f"{build_dir} is not a FINN build folder fqhw can finish: it lacks {', '.join(lacking)} "
            "(run `fqhw compile` again; builds made before fqhw wrote FINN's configurations lack them)"
        )
    cfg = json.loads((build_dir / SYNTH_CONFIG).read_text())
    shell = cfg.get("shell_flow_type")
    check_synth_tools(build_dir, shell)
    finn = finn_command or _finn_executable()
    out = build_dir / SYNTH_OUTPUT
    out.mkdir(parents=True, exist_ok=True)
    log = out / "finn_synth.log"
    argv = synth_command(finn, skip_dep_update=skip_dep_update)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        # a session of its own, so that a timeout stops FINN and the Vivado runs it started
        proc = subprocess.Popen(argv, cwd=build_dir, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise FqhwError(f"FINN did not finish the build in {out} within {timeout_s:g} s: see {log}") from None
    seconds = round(time.perf_counter() - t0, 1)
    # `finn build` exits 0 even when a step failed: FINN's own verdict is in its report
    meta = out / "report" / "metadata_builder.json"
    status = json.loads(meta.read_text()).get("status") if meta.exists() else None
    if rc != 0 or status != "ok":
        raise FqhwError(
            f"FINN could not finish the build in {out} (exit code {rc}, FINN status {status}): "
            f"see {log} and {out / 'build_dataflow.log'}"
        )
    bitfile = None
    if "bitfile" in cfg.get("generate_outputs", []):
        found = sorted((out / "bitfile").glob("finn-accel*.bit")) + sorted((out / "bitfile").glob("finn-accel*.xclbin"))
        if not found:
            raise FqhwError(f"FINN reported success but wrote no bitfile to {out / 'bitfile'}: see {log}")
        bitfile = str(found[0])
    deploy = out / "deploy"
    res_path = out / "report" / "post_synth_resources.json"
    resources = json.loads(res_path.read_text()) if res_path.exists() else {}
    return FinnSynth(
        build_dir=str(build_dir),
        output_dir=str(out),
        log=str(log),
        seconds=seconds,
        bitfile=bitfile,
        deploy_dir=str(deploy) if deploy.is_dir() else None,
        resources=resources,
    )


# --------------------------------------------------------------------------- execution


def _python_exec_model(model):
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


def _execute_dataflow(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an all-HW graph node by node with each node's own Python execute_node, like
    qonnx's execute_onnx, but with float64 containers: FINN's Python MVAU multiplies with
    np.matmul in the inputs' dtype, and float32 (qonnx's default) stops being exact once an
    accumulator passes 2^24. float64 is exact for any integer below 2^53."""
    from qonnx.custom_op.registry import getCustomOp

    ctx = model.make_empty_exec_context()
    ctx.update(inputs)
    for node in model.graph.node:
        for name in node.input:
            v = ctx.get(name)
            if isinstance(v, np.ndarray) and v.dtype != np.float64:
                ctx[name] = v.astype(np.float64)
        getCustomOp(node).execute_node(ctx, model.graph)
    return ctx


def finn_integer_trace(build: FinnBuild, x) -> dict[str, np.ndarray]:
    """Run the folded dataflow graph in Python on `x` (N, C, H, W floats = pixel/256), one
    image at a time, each _hls/_rtl node through its generic Python implementation; return
    int64 NCHW codes: "input" (what the accelerator was fed), "<layer>.act" (each MVAU's
    thresholded output) and "<layer>.acc" for an MVAU without activation ("head.acc", the
    head's accumulator)."""
    import torch
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    codes_f = x.astype(np.float64) / INPUT_SCALE
    codes = np.round(codes_f)
    if np.abs(codes_f - codes).max(initial=0.0) > INT_TOL or codes.min(initial=0) < 0 or codes.max(initial=0) > 255:
        raise FqhwError("FINN's input is the uint8 pixel codes: x must be pixel / 256")
    codes = codes.astype(np.int64)

    parent = ModelWrapper(build.parent_model)
    df = ModelWrapper(build.dataflow_model)
    sim = _python_exec_model(df)
    # the layout ops the parent applies in front of the accelerator
    sdp = parent.get_nodes_by_op_type("StreamingDataflowPartition")[0]
    front = []
    t = sdp.input[0]
    while t != parent.graph.input[0].name:
        p = parent.find_producer(t)
        if p is None or p.op_type not in LAYOUT_OPS:
            raise FqhwError(f"unexpected node in front of the accelerator: {p.op_type if p else None}")
        front.append(p)
        t = p.input[0]
    front.reverse()

    mvau_nodes = {n.name: n for n in df.graph.node if n.name in set(build.mvau_of_layer.values())}
    keys = {}
    for ln, node_name in build.mvau_of_layer.items():
        no_act = int(getCustomOp(mvau_nodes[node_name]).get_nodeattr("noActivation")) == 1
        keys[node_name] = f"{ln}.acc" if no_act else f"{ln}.act"
    in_name = df.graph.input[0].name
    in_shape = tuple(df.get_tensor_shape(in_name))
    per_key: dict[str, list[np.ndarray]] = {}
    for i in range(codes.shape[0]):
        a = codes[i : i + 1].astype(np.float64)
        undo = []  # how to map the accelerator's input back to NCHW
        for node in front:
            if node.op_type == "Transpose":
                perm = list(node_attr(node, "perm"))
                a = np.transpose(a, perm)
                undo.append(("T", list(np.argsort(perm))))
            else:
                undo.append(("R", a.shape))
                a = a.reshape(parent.get_tensor_shape(node.output[0]))
        a = a.reshape(in_shape)
        ctx = _execute_dataflow(sim, {in_name: a})
        seen = np.asarray(ctx[in_name], dtype=np.float64)
        for kind, arg in reversed(undo):
            seen = np.transpose(seen, arg) if kind == "T" else seen.reshape(arg)
        per_key.setdefault("input", []).append(_exact_int(seen, "the accelerator's input"))
        for node_name, key in keys.items():
            r = _exact_int(np.asarray(ctx[mvau_nodes[node_name].output[0]]), f"FINN node {node_name}")
            if r.ndim == 4:
                r = r.transpose(0, 3, 1, 2)  # NHWC -> NCHW
            per_key.setdefault(key, []).append(r)
    # channel groups: "<layer>:g<k>.act" / ".acc" concatenated into the layer's key
    return merge_group_keys({k: np.concatenate(v, axis=0) for k, v in per_key.items()})


def _exact_int(v: np.ndarray, what: str) -> np.ndarray:
    v = v.astype(np.float64)
    r = np.round(v)
    if np.abs(v - r).max(initial=0.0) > INT_TOL:
        raise AssertionError(f"{what}: values are not integers")
    if np.abs(r).max(initial=0.0) >= 2.0**53:
        raise AssertionError(f"{what}: values beyond float64's exact integers")
    return r.astype(np.int64)


# --------------------------------------------------------------------------- threshold check


def threshold_check(qonnx_path, dataflow_model, mvau_of_layer: dict[str, str]) -> dict:
    """Compare each MVAU's final integer thresholds (FINN derives them in float32 while
    streamlining, then rounds them up) with thresholds computed in float64 from the QONNX
    file's parameters (`qonnx_threshold_reference`). FINN's thresholds are not changed.

    FINN flips the sign of a channel's weights where its scale is negative (then acc >=
    thr counts codes of -acc). Both sides are compared as the MVAU uses them, clipped to the
    accumulator range the channel can reach (a threshold outside it acts like the range's
    end): a differing threshold means some accumulator value gets a different code.

    Returns {"ok", "differing" (total), "layers": {layer: {"node", "thresholds" (count),
    "differing", "channels_differing", "weights_differing" (codes that are neither the
    QONNX codes nor their negation), "sign_flipped_channels", "max_abs_diff",
    "min_abs_acc_differing" (the smallest |accumulator| that gets a different code)}}}.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    from fqhw.backends.qonnx_export import qonnx_threshold_reference

    ref = qonnx_threshold_reference(qonnx_path)
    df = dataflow_model if not isinstance(dataflow_model, (str, Path)) else ModelWrapper(str(dataflow_model))
    nodes = {n.name: n for n in df.graph.node}
    layers: dict[str, dict] = {}
    for ln, node_name in mvau_of_layer.items():
        node = nodes[node_name]
        inst = getCustomOp(node)
        if int(inst.get_nodeattr("noActivation")) == 1:
            continue
        if ln not in ref:
            raise FqhwError(f"{ln}: FINN node {node_name} has thresholds, the QONNX model has no activation there")
        r = ref[ln]
        c_out = r["w_int"].shape[0]
        expect_w = r["w_int"].transpose(0, 2, 3, 1).reshape(c_out, -1).T  # FINN's (MW, MH) layout
        w = np.asarray(df.get_initializer(node.input[1]), dtype=np.float64)
        thr = np.asarray(df.get_initializer(node.input[2]), dtype=np.float64)
        if w.shape != expect_w.shape:
            raise FqhwError(f"{ln}: FINN weights {w.shape}, QONNX weights {expect_w.shape}")
        if thr.shape[-1] != r["levels"]:
            raise FqhwError(f"{ln}: FINN has {thr.shape[-1]} thresholds per channel, the QONNX quantizer {r['levels']}")
        thr = np.broadcast_to(thr, (c_out, r["levels"]))
        same = (w == expect_w).all(axis=0)
        negated = (w == -expect_w).all(axis=0)
        sign = np.where(same & ~negated, 1.0, np.where(negated & ~same, -1.0, np.sign(r["A"])))
        bad_w = ~(same | negated)
        w_codes_bad = int(((w != sign * expect_w) & bad_w[None, :]).sum())
        # FINN's accumulator is sign * acc; expected integer thresholds for it
        t = r["thresholds"]
        with np.errstate(invalid="ignore"):
            expect = np.where((sign * r["A"])[:, None] > 0, np.ceil(sign[:, None] * t), np.nan)
        # A == 0: a constant pre-activation B, code k + 1 reached for every acc or none
        const = r["A"] == 0
        if const.any():
            k = np.arange(r["levels"]) + 0.5
            expect[const] = np.where(k[None, :] * r["s_a"] < r["B"][const][:, None], -np.inf, np.inf)
        wf = expect_w * sign[None, :]
        lo = r["in_max"] * np.minimum(wf, 0).sum(axis=0)
        hi = r["in_max"] * np.maximum(wf, 0).sum(axis=0)
        a = np.clip(expect, lo[:, None], hi[:, None] + 1)
        b = np.clip(thr, lo[:, None], hi[:, None] + 1)
        differ = ~(a == b)  # NaN (a channel whose sign FINN did not follow) counts as differing
        differ |= bad_w[:, None]
        diff = np.abs(np.nan_to_num(a - b, nan=np.inf))
        # the accumulator values that get different codes lie in [min(a, b), max(a, b) - 1]
        lo_d, hi_d = np.fmin(a, b)[differ], np.fmax(a, b)[differ] - 1
        near0 = np.where((lo_d <= 0) & (hi_d >= 0), 0.0, np.fmin(np.abs(lo_d), np.abs(hi_d)))
        layers[ln] = {
            "node": node_name,
            "thresholds": int(differ.size),
            "differing": int(differ.sum()),
            "channels_differing": int(differ.any(axis=1).sum()),
            "weights_differing": w_codes_bad,
            "sign_flipped_channels": int((sign < 0).sum()),
            # None: some channel's FINN thresholds do not follow its sign at all
            "max_abs_diff": (float(diff[differ].max()) if np.isfinite(diff[differ].max()) else None) if differ.any() else 0.0,
            # the smallest |accumulator| at which FINN's code differs (None: nowhere)
            "min_abs_acc_differing": float(np.nan_to_num(near0, nan=0.0).min()) if differ.any() else None,
        }
    total = int(sum(l["differing"] for l in layers.values()))
    return {"ok": total == 0, "differing": total, "layers": layers}
