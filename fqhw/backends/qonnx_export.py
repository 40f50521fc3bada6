"""QONNX export of the Brevitas model, and the integers its execution produces.

`export_qonnx` writes a cleaned QONNX file whose bytes depend only on the model;
`qonnx_integer_trace` runs it with qonnx's node-by-node executor (in float64, on a lowered
copy of the graph) and recovers the same integer codes `fqhw.quant.qmodel.integer_trace`
reports, from the Quant nodes' outputs and scales and from the head's MatMul/Gemm.
`qonnx_threshold_reference` computes, in float64 from the file's parameters, the integer
accumulator thresholds at which each activation code changes (what FINN's thresholds must
equal).
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from fqhw.errors import FqhwError
from fqhw.intcodes import CODES_SUFFIX, INT_TOL, LAYER_NAMES_KEY, int_range, to_int
from fqhw.onnxgraph import canonical, const_value, consumers_of, node_attrs, producer_of, quant_const, quant_nodes, quant_params
from fqhw.units import merge_group_keys


@contextlib.contextmanager
def _head_zero_bias(qmodel):
    """Temporarily give the bias-free head a zero bias (the export then has a 3-input Gemm).

    The fallback for exports where a bias-free QuantLinear becomes a two-input Gemm, which
    qonnx's GemmToMatMul cannot handle; FINN's streamlining removes the Add of zeros again.
    """
    head = qmodel.head
    if head.bias is not None:
        yield
        return
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features), requires_grad=False)
    try:
        yield
    finally:
        del head.bias
        head.register_parameter("bias", None)


def _brevitas_export(qmodel, shape, zero_bias: bool):
    from brevitas.export import export_qonnx as brevitas_export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    bias_cm = _head_zero_bias(qmodel) if zero_bias else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp, bias_cm, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            # the TorchScript exporter: its node and tensor names are deterministic
            brevitas_export_qonnx(
                qmodel, args=torch.zeros(shape), export_path=str(raw), dynamo=False, opset_version=13
            )
        model = ModelWrapper(str(raw))
    return cleanup_model(model)


def _two_input_gemms(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Gemm" and len(n.input) < 3]


def export_qonnx(qmodel, input_shape, path) -> Path:
    """Export `qmodel` (Brevitas) for inputs of shape `input_shape` (C, H, W or N, C, H, W)
    to a cleaned QONNX file at `path`. Same model -> same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4:
        raise FqhwError(f"input_shape must be (C, H, W) or (N, C, H, W), got {input_shape}")
    was_training = qmodel.training
    qmodel.eval()
    try:
        model = _brevitas_export(qmodel, shape, zero_bias=False)
        if _two_input_gemms(model):
            model = _brevitas_export(qmodel, shape, zero_bias=True)
    finally:
        qmodel.train(was_training)
    model = canonical(_conv_bias_quant_params_1d(model.model))
    names = list(qmodel.layers) if hasattr(qmodel, "layers") else None
    if names:
        model.metadata_props.add(key=LAYER_NAMES_KEY, value=json.dumps(names))
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def _conv_bias_quant_params_1d(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the scalar (shape ()) scale and zero point of a Quant node that feeds a Conv's bias
    the shape (1,).

    qonnx's ExtractBiasFromConv (run by LowerConvsToMatMul, and so by `qonnx_integer_trace`
    and FINN) reshapes a quantized bias' zero point to (1, C, 1, 1) unless its shape is
    exactly (1,), and fails on the () Brevitas exports. Same values, so the same arithmetic;
    graphs without a conv bias (the FINN scheme) are left byte for byte as they were.
    """
    inits = {i.name: i for i in model.graph.initializer}
    shared = {}
    for n in model.graph.node:
        for t in n.input:
            shared[t] = shared.get(t, 0) + 1
    for conv in model.graph.node:
        if conv.op_type not in ("Conv", "ConvTranspose") or len(conv.input) < 3:
            continue
        q = producer_of(model, conv.input[2])
        if q is None or q.op_type != "Quant":
            continue
        for t in q.input[1:3]:
            init = inits.get(t)
            if init is None or len(init.dims) != 0:
                continue
            if shared.get(t, 0) > 1:  # a constant other nodes read too: give this one its own
                new = onnx.TensorProto()
                new.CopyFrom(init)
                new.name = f"{q.name}_{t}_1d"
                model.graph.initializer.append(new)
                q.input[list(q.input).index(t)] = new.name
                init = new
            init.dims[:] = [1]
            for vi in model.graph.value_info:  # keep a recorded shape in step with the data
                if vi.name == init.name:
                    vi.CopyFrom(onnx.helper.make_tensor_value_info(init.name, init.data_type, [1]))
    return model


# ops between the last activation Quant and the head that keep integer codes unchanged
_CODE_PRESERVING = ("MaxPool", "Flatten", "Reshape", "Transpose", "Identity", "Concat")


def _through_concat(model: onnx.ModelProto, node) -> str:
    """The tensor to follow back through a code-preserving node: its first input, after
    checking, for a Concat (the join of a layer's channel groups, fqhw.quant.channel_groups),
    that every input comes, through code-preserving ops, from a Quant node with the same
    scale, zero point and width as the first, so that the concatenated floats are the
    concatenated codes times one scale."""
    if node.op_type != "Concat":
        return node.input[0]
    params = []
    for t in node.input:
        p = producer_of(model, t)
        while p is not None and p.op_type in _CODE_PRESERVING and p.op_type != "Quant":
            p = producer_of(model, _through_concat(model, p))
        if p is None or p.op_type != "Quant":
            raise FqhwError(f"Concat {node.name}: input {t} does not come from a Quant node")
        vals = [const_value(model, x) for x in p.input[1:4]]
        if any(v is None for v in vals):
            raise FqhwError(f"Concat {node.name}: the Quant feeding {t} has non-constant parameters")
        params.append((vals, node_attrs(p)))
    first_vals, first_attrs = params[0]
    for vals, attrs in params[1:]:
        if attrs != first_attrs or any(not np.array_equal(a, b) for a, b in zip(vals, first_vals)):
            raise FqhwError(f"Concat {node.name}: its inputs are quantized differently (they must share one quantizer)")
    return node.input[0]


class _QonnxLayout:
    """Which nodes of the exported graph carry which of our keys."""

    def __init__(self, model: onnx.ModelProto):
        act_quants = [n for n in quant_nodes(model) if const_value(model, n.input[0]) is None]
        if not act_quants:
            raise FqhwError("the QONNX graph has no activation Quant nodes")
        self.input_quant = act_quants[0]
        if self.input_quant.input[0] != model.graph.input[0].name:
            raise FqhwError("the first activation Quant of the QONNX graph does not read the graph input")
        self.act_quants = act_quants[1:]
        mm = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
        if len(mm) != 1:
            raise FqhwError(f"expected one MatMul/Gemm (the head) in the QONNX graph, found {len(mm)}")
        self.head = mm[0]
        meta = {p.key: p.value for p in model.metadata_props}
        if LAYER_NAMES_KEY in meta:
            names = json.loads(meta[LAYER_NAMES_KEY])
        else:
            names = [f"features.{i}.conv" for i in range(len(self.act_quants))] + ["head"]
        if len(names) != len(self.act_quants) + 1:
            raise FqhwError(
                f"QONNX graph has {len(self.act_quants) + 1} quantized layers, its names say {names}"
            )
        self.layer_names = names
        wq = producer_of(model, self.head.input[1])
        if wq is None or wq.op_type != "Quant":
            raise FqhwError("the head's weight does not come straight from a Quant node")
        self.head_weight_quant = wq
        self.head_transB = self.head.op_type == "Gemm" and any(
            a.name == "transB" and a.i == 1 for a in self.head.attribute
        )
        if self.head.op_type == "Gemm" and len(self.head.input) == 3:
            bias = const_value(model, self.head.input[2])
            if bias is None or np.any(bias != 0):
                raise FqhwError("the head's Gemm has a non-zero bias: its accumulator is not an integer")
        # the activation Quant that feeds the head, through pooling / layout ops only
        t, node = self.head.input[0], None
        while True:
            node = producer_of(model, t)
            if node is None or node.op_type == "Quant":
                break
            if node.op_type not in _CODE_PRESERVING:
                raise FqhwError(f"the head's input passes through {node.op_type}, which changes its codes")
            t = _through_concat(model, node)
        if node is None or node not in self.act_quants:
            raise FqhwError("cannot find the activation Quant node that feeds the head")
        self.head_input_quant = node


def float64_copy(path):
    """A copy of the QONNX model at `path` that qonnx's `execute_onnx` runs in float64.

    Rewrites (the file on disk is not touched), each leaving the arithmetic the graph
    defines unchanged, only carried out in float64:
    - batch size 1 (qonnx ChangeBatchSize), as before;
    - Conv -> Transpose, Im2Col, MatMul, Transpose (qonnx LowerConvsToMatMul: the weights
      are only reordered), because onnxruntime has no float64 Conv;
    - Quant(x, s, 0, b) -> Mul(Cast(Quant(Div(x, s), 1, 0, b)), s): qonnx's Quant computes
      clip(round(x / s)) * s (int_quant) but returns float32; split like this the division
      and the product run in float64 (onnxruntime Div / Mul, IEEE float64 like numpy) and
      the middle Quant returns the integer codes, exact in float32 (Cast to float64). Its
      output is named <Quant output> + CODES_SUFFIX;
    - every float32 initializer becomes float64, every float tensor type DOUBLE.
    """
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul

    wrapper = ModelWrapper(str(path))
    iname = wrapper.graph.input[0].name
    if wrapper.get_tensor_shape(iname)[0] != 1:
        wrapper = wrapper.transform(ChangeBatchSize(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = wrapper.transform(LowerConvsToMatMul())
    if wrapper.get_nodes_by_op_type("Conv"):
        raise FqhwError("qonnx could not lower every Conv to Im2Col + MatMul")
    graph = wrapper.graph
    one = "fqhw_f64_one"
    float32_codes: set[str] = set()  # qonnx's Quant returns float32: its codes, cast to float64
    graph.initializer.append(numpy_helper.from_array(np.asarray(1.0, dtype=np.float32), one))
    graph.value_info.append(helper.make_tensor_value_info(one, TensorProto.FLOAT, []))
    for q in [n for n in graph.node if n.op_type == "Quant"]:
        x, s, z, b = q.input
        out = q.output[0]
        if np.any(wrapper.get_initializer(z) != 0):
            raise FqhwError(f"Quant node {q.name}: non-zero zero point")
        div = helper.make_node("Div", [x, s], [out + "_div"], name=q.name + "_div")
        cast = helper.make_node("Cast", [out + CODES_SUFFIX], [out + "_f64"], to=TensorProto.DOUBLE, name=q.name + "_cast")
        mul = helper.make_node("Mul", [out + "_f64", s], [out], name=q.name + "_mul")
        q.input[:] = [out + "_div", one, z, b]
        q.output[:] = [out + CODES_SUFFIX]
        idx = list(graph.node).index(q)
        graph.node.insert(idx, div)
        graph.node.insert(idx + 2, cast)
        graph.node.insert(idx + 3, mul)
        float32_codes.add(out + CODES_SUFFIX)
    wrapper = wrapper.transform(InferShapes())  # shapes of the new tensors, still float32
    graph = wrapper.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT and vi.name not in float32_codes:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    names = {vi.name for vi in list(graph.input) + list(graph.output) + list(graph.value_info)}
    for n in graph.node:  # every tensor a one-node onnxruntime model reads needs a type
        for t in list(n.input) + list(n.output):
            if t and t not in names:
                raise FqhwError(f"float64 copy: tensor {t} has no type information")
    return wrapper


def qonnx_integer_trace(path, x, precision: str = "float64") -> dict[str, np.ndarray]:
    """Run the QONNX file at `path` on `x` (N, C, H, W floats = pixel/256), one image at a time,
    with qonnx's executor; return int64 codes: "input", "<layer>.act" (each ReLU's Quant
    codes), "head.acc" (integer head weights x integer head input, exact).

    precision="float64" (the default) runs `float64_copy` of the graph: every tensor in
    float64, so a code can only flip for a pre-activation within ~1e-15 (relative) of a
    rounding boundary. precision="float32" runs the file as it is (onnxruntime and qonnx's
    custom ops in float32): a pre-activation within float32 rounding of a boundary can round
    differently from exact arithmetic."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.change_batchsize import ChangeBatchSize

    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    model = onnx.load(str(path))
    lay = _QonnxLayout(model)
    if precision == "float64":
        wrapper, dtype, split = float64_copy(path), np.float64, True
    elif precision == "float32":
        wrapper, dtype, split = ModelWrapper(str(path)), np.float32, False
        if wrapper.get_tensor_shape(wrapper.graph.input[0].name)[0] != 1:
            wrapper = wrapper.transform(ChangeBatchSize(1))
    else:
        raise ValueError(f"precision must be 'float64' or 'float32', not {precision!r}")
    x = x.astype(dtype)
    iname = model.graph.input[0].name

    def codes(ctx, q, what):
        s, z = quant_params(ctx, model, q)
        value = to_int(ctx[q.output[0]], s, z, what)
        if split:  # the middle Quant's output is the codes themselves
            direct = to_int(ctx[q.output[0] + CODES_SUFFIX], np.ones(1), z, what)
            if not np.array_equal(direct, value):
                raise AssertionError(f"{what}: codes x scale / scale is not the codes")
        return value, s

    per_key: dict[str, list[np.ndarray]] = {}
    for i in range(x.shape[0]):
        ctx = execute_onnx(wrapper, {iname: x[i : i + 1]}, return_full_exec_context=True)
        per_key.setdefault("input", []).append(codes(ctx, lay.input_quant, "input")[0])
        for name, q in zip(lay.layer_names, lay.act_quants):
            c, s = codes(ctx, q, f"{name}.act")
            if s.size != 1:
                raise FqhwError(f"{name}: activation scale is not per-tensor")
            per_key.setdefault(f"{name}.act", []).append(c)
        # head accumulator: integer weights x integer input codes
        w_int, ws = codes(ctx, lay.head_weight_quant, "head weight")
        a_s, a_z = quant_params(ctx, model, lay.head_input_quant)
        a_int = to_int(ctx[lay.head.input[0]], a_s, a_z, "head input").reshape(1, -1)
        acc = a_int @ (w_int.T if lay.head_transB else w_int)
        # the graph's own float result must be that accumulator times the scales
        out = ctx[lay.head.output[0]].astype(np.float64)
        approx = out / (float(a_s.reshape(-1)[0]) * ws.astype(np.float64).reshape(-1))
        if not (np.abs(approx - acc) <= 1e-4 * np.maximum(1.0, np.abs(acc)) + INT_TOL).all():
            raise AssertionError("the QONNX head output is not its integer accumulator times the scales")
        per_key.setdefault("head.acc", []).append(acc)
    # channel groups: "<layer>:g<k>.act" concatenated into "<layer>.act"
    return merge_group_keys({k: np.concatenate(v, axis=0) for k, v in per_key.items()})


# --------------------------------------------------------------------------- float64 thresholds


def qonnx_threshold_reference(path) -> "dict[str, dict]":
    """The integer-accumulator thresholds of every conv layer with an output activation,
    computed in float64 from the parameters in the QONNX file (not from any Brevitas object,
    so an edit to the file shows up here).

    Per layer: {"w_int" (C_out, C_in, K, K) int64 weight codes, "A", "B" (per channel; the
    pre-activation is A * acc + B), "s_a", "levels" (2^a - 1), "in_max" (largest input
    code), "acc_lo", "acc_hi" (reachable accumulator range per channel), "thresholds"
    (C_out, levels) float64: code >= k + 1 exactly where A * acc + B > (k + 0.5) * s_a, i.e.
    acc > thresholds[:, k] for A > 0 and acc < thresholds[:, k] for A < 0}.
    """
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    names = json.loads(meta[LAYER_NAMES_KEY]) if LAYER_NAMES_KEY in meta else [f"features.{i}.conv" for i in range(len(convs))]
    out: dict[str, dict] = {}
    for name, conv in zip(names, convs):
        if len(conv.input) > 2:
            raise FqhwError(f"{name}: conv with a bias is not supported by the threshold reference")
        wq = producer_of(model, conv.input[1])
        if wq is None or wq.op_type != "Quant" or const_value(model, wq.input[0]) is None:
            raise FqhwError(f"{name}: the conv weight does not come from a Quant of a constant")
        w = const_value(model, wq.input[0]).astype(np.float64)
        s_w, _, wbits, wsigned, wnarrow = quant_const(model, wq, f"{name} weight")
        lo, hi = int_range(wbits, wsigned, wnarrow)
        w_int = np.round(np.clip(w / s_w, lo, hi)).astype(np.int64)  # qonnx Quant: clip, round
        # input codes: the Quant in front, through code-preserving ops
        t = conv.input[0]
        while True:
            p = producer_of(model, t)
            if p is None or p.op_type == "Quant" or p.op_type not in _CODE_PRESERVING:
                break
            t = _through_concat(model, p)
        if p is None or p.op_type != "Quant":
            raise FqhwError(f"{name}: the conv input does not come from a Quant through pooling / layout ops")
        s_in, _, ibits, isigned, inarrow = quant_const(model, p, f"{name} input")
        if isigned or s_in.size != 1:
            raise FqhwError(f"{name}: the conv input must be unsigned with a per-tensor scale")
        in_max = int_range(ibits, isigned, inarrow)[1]
        # BN (optional), Relu, activation Quant
        node = consumers_of(model, conv.output[0])
        c_out = w_int.shape[0]
        inv, mean, beta = np.ones(c_out), np.zeros(c_out), np.zeros(c_out)
        if len(node) == 1 and node[0].op_type == "BatchNormalization":
            bn = node[0]
            gamma, beta, mean, var = (const_value(model, x).astype(np.float64) for x in bn.input[1:5])
            eps = float(node_attrs(bn).get("epsilon", 1e-5))
            inv = gamma / np.sqrt(var + eps)
            node = consumers_of(model, bn.output[0])
        if len(node) != 1 or node[0].op_type != "Relu":
            raise FqhwError(f"{name}: expected Conv [-> BatchNormalization] -> Relu -> Quant")
        aq = consumers_of(model, node[0].output[0])
        if len(aq) != 1 or aq[0].op_type != "Quant":
            raise FqhwError(f"{name}: the Relu does not feed a Quant")
        s_a, _, abits, asigned, anarrow = quant_const(model, aq[0], f"{name} activation")
        if asigned or anarrow or s_a.size != 1:
            raise FqhwError(f"{name}: the activation quantizer must be unsigned, wide, per-tensor")
        s_a = float(s_a.reshape(-1)[0])
        levels = 2**abits - 1
        A = float(s_in.reshape(-1)[0]) * s_w.reshape(-1) * inv
        B = beta - mean * inv
        k = np.arange(levels, dtype=np.float64) + 0.5
        with np.errstate(divide="ignore", invalid="ignore"):
            thr = (k[None, :] * s_a - B[:, None]) / A[:, None]
        flat = w_int.reshape(c_out, -1)
        out[name] = {
            "w_int": w_int,
            "A": A,
            "B": B,
            "s_a": s_a,
            "levels": levels,
            "in_max": in_max,
            "acc_lo": in_max * np.minimum(flat, 0).sum(axis=1),
            "acc_hi": in_max * np.maximum(flat, 0).sum(axis=1),
            "thresholds": thr,
        }
    return out
