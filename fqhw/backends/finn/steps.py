"""FINN's flow as data: named steps `step(model, cfg) -> model`, lists of them per model
kind, and one loop that runs a list and saves each step's model (as FINN's own builder,
finn.builder.build_dataflow_steps, which cannot be imported without XILINX_VIVADO).

A step is registered by name (`@finn_step("name")`) in the module that holds it: the
conversion steps here, `apply_folding`, `fold_and_minimize` and `estimates` in
fqhw.backends.finn.folding, `streamline_groups` in fqhw.backends.finn.groups. `cfg` is the
run's `FinnFlow`: what the steps read (build folder, part, clock, allocation, QONNX file,
cost model) and what they leave besides the model (`products`: the partition's parent
graph, the folding, the estimates).

    PLAIN_STEPS     a FairCNN (fqhw.backends.finn.build.finn_build)
    GROUPS_STEPS    a FairCNN with output-channel groups: streamline_groups for streamline
    RESIDUAL_STEPS  a timm ResNet up to HW layers (fqhw.backends.finn.residual), then
                    RESIDUAL_DATAFLOW_STEPS with an allocation
    ANY_STEPS       any QONNX model, to see what FINN refuses
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fqhw.backends.finn.common import DEFAULT_PART, LAYOUT_OPS, is_hw, lower_convs_channels_last, tidy_graph, until_fixed
from fqhw.backends.finn.transforms import InputQuantToCodes
from fqhw.errors import FqhwError

STEPS: dict[str, Callable] = {}  # name -> step(model, cfg) -> model
CHECKS: set[str] = set()  # steps that only check the model: run_steps saves nothing after them


def finn_step(name: str, check: bool = False):
    """Register a step function under `name` (names are unique); `check`: it returns the
    model it was given, and the loop records nothing after it."""

    def register(fn):
        if name in STEPS:
            raise ValueError(f"FINN step {name!r} is registered twice")
        STEPS[name] = fn
        if check:
            CHECKS.add(name)
        return fn

    return register


@dataclass
class FinnFlow:
    """The `cfg` every step receives: what it reads, and `products`, what it leaves."""

    build_dir: Path
    part: str = DEFAULT_PART
    clock_ns: float = 10.0
    alloc: object = None  # the Allocation that folds the MVAUs (None: conversion only)
    qonnx_path: Path | None = None
    cost_model: object = None  # the FinnCostModel whose layer_units fold the units around an MVAU
    layer_names: list[str] = field(default_factory=list)
    products: dict = field(default_factory=dict)


def run_steps(model, names: list[str], cfg: FinnFlow, record: Callable | None = None):
    """Run the steps `names` in order; after each (but a check), record(name, model, t0)
    (t0: when it started)."""
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise FqhwError(f"unknown FINN step(s) {', '.join(unknown)}; known: {', '.join(sorted(STEPS))}")
    for name in names:
        t0 = time.perf_counter()
        model = STEPS[name](model, cfg)
        if record is not None and name not in CHECKS:
            record(name, model, t0)
    return model


CONVERT_STEPS = ["input_codes", "qonnx_to_finn", "tidy_up"]
PLAIN_STEPS = CONVERT_STEPS + [
    "streamline",
    "convert_to_hw",
    "minimize_bit_width_initial",
    "create_dataflow_partition",
    "specialize_layers",
    "apply_folding",
    "minimize_bit_width",
    "check_dataflow",
    "estimates",
]
GROUPS_STEPS = [("streamline_groups" if s == "streamline" else s) for s in PLAIN_STEPS]
RESIDUAL_STEPS = CONVERT_STEPS + ["streamline_residual", "convert_to_hw_residual", "round_thresholds"]
RESIDUAL_DATAFLOW_STEPS = ["create_dataflow_partition_residual", "specialize_layers", "fold_and_minimize", "estimates"]
ANY_STEPS = CONVERT_STEPS + ["streamline_residual", "convert_to_hw_any"]


@finn_step("input_codes")
def step_input_codes(model, cfg):
    """The accelerator's input made the uint8 pixel codes (`InputQuantToCodes`)."""
    return model.transform(InputQuantToCodes(), cleanup=False)


@finn_step("qonnx_to_finn")
def step_qonnx_to_finn(model, cfg):
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
    from finn.transformation.qonnx.quant_act_to_multithreshold import default_filter_function_generator
    from qonnx.util.cleanup import cleanup_model

    model = cleanup_model(model)
    return model.transform(
        ConvertQONNXtoFINN(filter_function=default_filter_function_generator(max_multithreshold_bit_width=8))
    )


@finn_step("tidy_up")
def step_tidy_up(model, cfg):
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


@finn_step("streamline")
def step_streamline(model, cfg):
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


@finn_step("convert_to_hw")
def step_convert_to_hw(model, cfg):
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


@finn_step("minimize_bit_width_initial")
@finn_step("minimize_bit_width")
def step_minimize_bit_width(model, cfg):
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


def _outside_compute_nodes(model) -> list[str]:
    """Non-HW nodes other than layout ops and a final output Mul (the only allowed ones)."""
    bad = []
    for node in model.graph.node:
        if is_hw(node) and node.op_type != "StreamingDataflowPartition":
            continue
        if node.op_type == "StreamingDataflowPartition" or node.op_type in LAYOUT_OPS:
            continue
        if node.op_type == "Mul" and node.output[0] in [o.name for o in model.graph.output]:
            continue
        bad.append(f"{node.name} ({node.op_type})")
    return bad


def _partition(model, cfg):
    """The HW layers as one StreamingDataflowPartition: returns the partition's graph, the
    graph around it in cfg.products["parent"]."""
    from finn.transformation.fpgadataflow.create_dataflow_partition import CreateDataflowPartition
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    part_dir = cfg.build_dir / "partitions"
    part_dir.mkdir(parents=True, exist_ok=True)
    parent = model.transform(CreateDataflowPartition(partition_model_dir=str(part_dir)))
    sdps = parent.get_nodes_by_op_type("StreamingDataflowPartition")
    if len(sdps) != 1:
        raise FqhwError(f"expected one dataflow partition, FINN made {len(sdps)}")
    cfg.products["parent"] = parent
    return ModelWrapper(getCustomOp(sdps[0]).get_nodeattr("model"))


@finn_step("create_dataflow_partition")
def step_create_dataflow_partition(model, cfg):
    """Refuses a compute op left outside the HW layers (layout ops and a final output Mul
    may stay on the host: cfg.products["outside"]), then `_partition`."""
    from finn.analysis.fpgadataflow.unsupported_layers import unsupported_layers

    outside = [f"{n.name} ({n.op_type})" for n in model.graph.node if not is_hw(n)]
    ok, first_bad = model.analysis(unsupported_layers)
    first_bad = f"{first_bad.name} ({first_bad.op_type})" if first_bad is not None else None
    bad = _outside_compute_nodes(model)
    if bad or not ok:
        raise FqhwError(
            "FINN could not map every compute op onto a HW layer; left outside the dataflow "
            f"partition: {', '.join(bad) or first_bad}. Change the model so that these ops map "
            "(see fqhw.models.cnn for a FINN-friendly structure)."
        )
    cfg.products["outside"] = outside
    return _partition(model, cfg)


@finn_step("create_dataflow_partition_residual")
def step_create_dataflow_partition_residual(model, cfg):
    """`_partition` of a residual network's converted graph, whose host work (layout in
    front, the float output scale and bias behind) was checked by its classification."""
    return _partition(model, cfg)


@finn_step("check_dataflow", check=True)
def step_check_dataflow(model, cfg):
    """Refuses a dataflow graph with a Shuffle or a non-HW node inside (a check: nothing saved)."""
    if model.get_nodes_by_op_type("Shuffle"):
        raise FqhwError("the dataflow graph contains a Shuffle (a transpose inside the accelerator)")
    non_hw = [f"{n.name} ({n.op_type})" for n in model.graph.node if not is_hw(n)]
    if non_hw:
        raise FqhwError(f"non-HW nodes inside the dataflow partition: {', '.join(non_hw)}")
    return model


@finn_step("specialize_layers")
def step_specialize_layers(model, cfg):
    from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers
    from finn.transformation.qonnx.give_unique_node_names_recursive import GiveUniqueNodeNamesRecursive
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    model = model.transform(SpecializeLayers(cfg.part))
    model = model.transform(GiveUniqueNodeNamesRecursive())
    model = model.transform(InferShapes())
    return model.transform(InferDataTypes())


@finn_step("streamline_residual")
def step_streamline_residual(model, cfg):
    import finn.transformation.streamline.absorb as absorb
    import finn.transformation.streamline.reorder as reorder
    from finn.transformation.fpgadataflow.convert_to_hw.global_acc_pool import InferGlobalAccPoolLayer
    from finn.transformation.streamline.collapse_repeated import CollapseRepeatedAdd, CollapseRepeatedMul
    from qonnx.transformation.general import RemoveUnusedTensors

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
        model = lower_convs_channels_last(model, reorder.MoveTransposePastJoinAdd(), until_fixed)
    if model.get_nodes_by_op_type("GlobalAveragePool"):
        # the pool becomes an integer sum (GlobalAccPool) and a Mul by 1/N, which moves
        # through the classifier into the float output scale
        model = tidy_graph(model.transform(InferGlobalAccPoolLayer()))
        model = until_fixed(
            model,
            [
                reorder.MoveScalarLinearPastInvariants(),
                absorb.AbsorbConsecutiveTransposes(),
                reorder.MoveScalarMulPastMatMul(),
                CollapseRepeatedMul(),
            ],
        )
    model = tidy_graph(model, readable=True)
    return model.transform(RemoveUnusedTensors())


def integer_elementwise_only(model, node) -> bool:
    """Filter for InferElementwiseBinaryOperation: only ops on integer tensors become HW.
    A float elementwise op (the output scale, the classifier bias) is host arithmetic."""
    for t in list(node.input) + list(node.output):
        if model.get_initializer(t) is not None:
            continue
        if not model.get_tensor_datatype(t).is_integer():
            return False
    return True


@finn_step("convert_to_hw_residual")
def step_convert_to_hw_residual(model, cfg):
    """finn_build's conversion list, with elementwise ops restricted to integer tensors."""
    from finn.transformation.fpgadataflow.convert_to_hw.elementwise_binary_operation import (
        InferElementwiseBinaryOperation,
    )

    original = InferElementwiseBinaryOperation.reject_output_dequant
    try:
        # finn_build filters with InferElementwiseBinaryOperation.reject_output_dequant; for
        # a ResNet the float tail is a Mul and an Add, so the integer-only filter is used
        InferElementwiseBinaryOperation.reject_output_dequant = staticmethod(integer_elementwise_only)
        return step_convert_to_hw(model, cfg)
    finally:
        InferElementwiseBinaryOperation.reject_output_dequant = original


@finn_step("round_thresholds")
def step_round_thresholds(model, cfg):
    """Thresholds rounded up to integers and clipped to their input's range (FINN's
    RoundAndClipThresholds): exact for integer inputs (x >= t exactly when x >= ceil(t)),
    and needed before FINN sizes the threshold memories, which asserts non-negative
    thresholds on an unsigned input (an identity shortcut's requantization to the signed
    join scale has negative ones)."""
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds
    from qonnx.transformation.infer_datatypes import InferDataTypes

    return model.transform(RoundAndClipThresholds()).transform(InferDataTypes())


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


@finn_step("convert_to_hw_any")
def step_convert_to_hw_any(model, cfg):
    """Every HW conversion FINN has, each tried on its own: one that raises (FINN refusing
    a pattern it half-recognises) leaves its ops in software instead of stopping the rest.
    Elementwise ops are converted on integer tensors only (see `integer_elementwise_only`)."""
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
        t = klass(integer_elementwise_only) if cls == "InferElementwiseBinaryOperation" else klass()
        try:
            new = model.transform(t)
            new = new.transform(InferShapes()).transform(InferDataTypes())
        except Exception:  # noqa: BLE001 - FINN's refusal of this pattern: its ops stay non-HW
            continue
        model = new
    return tidy_graph(model)

