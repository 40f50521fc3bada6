"""QONNX export of the Brevitas model, and the integers its execution produces.

`export_qonnx` writes a cleaned QONNX file whose bytes depend only on the model;
`qonnx_integer_trace` runs it with qonnx's node-by-node executor and recovers the same
integer codes `fqhw.quant.qmodel.integer_trace` reports, from the Quant nodes' outputs and
scales and from the head's MatMul/Gemm.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from fqhw.errors import FqhwError

INT_TOL = 1e-3


def _give_head_zero_bias(qmodel) -> contextlib.AbstractContextManager:
    """Temporarily give the bias-free head a zero bias (exported Gemm then has 3 inputs).

    A bias-free QuantLinear exports as a two-input Gemm, which qonnx's GemmToMatMul cannot
    handle; a float zero bias is removed again by FINN's streamlining (Add of zeros).
    """

    @contextlib.contextmanager
    def cm():
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

    return cm()


def export_qonnx(qmodel, input_shape, path) -> Path:
    """Export `qmodel` (Brevitas) for inputs of shape `input_shape` (C, H, W or N, C, H, W)
    to a cleaned QONNX file at `path`. Same model -> same bytes."""
    from brevitas.export import export_qonnx as brevitas_export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

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
        with tempfile.TemporaryDirectory() as tmp, _give_head_zero_bias(qmodel), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = Path(tmp) / "raw.onnx"
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                brevitas_export_qonnx(
                    qmodel,
                    args=torch.zeros(shape),
                    export_path=str(raw),
                    dynamo=False,
                    opset_version=13,
                )
            model = ModelWrapper(str(raw))
    finally:
        qmodel.train(was_training)
    model = cleanup_model(model)
    model = _canonical(model.model)
    data = model.SerializeToString(deterministic=True)
    path.write_bytes(data)
    return path


def _canonical(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strip the metadata that differs between otherwise identical exports."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.producer_version = ""
    model.doc_string = ""
    del model.metadata_props[:]
    for node in model.graph.node:
        node.doc_string = ""
    model.graph.doc_string = ""
    return model


def _quant_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.op_type == "Quant"]


def _const(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def _consumers(model: onnx.ModelProto, tensor: str):
    return [n for n in model.graph.node if tensor in n.input]


def _producer(model: onnx.ModelProto, tensor: str):
    for n in model.graph.node:
        if tensor in n.output:
            return n
    return None


def _to_int(value: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, what: str) -> np.ndarray:
    pre = value.astype(np.float64) / scale.astype(np.float64) + zero_point.astype(np.float64)
    rounded = np.round(pre)
    err = float(np.abs(pre - rounded).max()) if pre.size else 0.0
    if err > INT_TOL:
        raise AssertionError(f"{what}: Quant output / scale is {err:.3g} away from an integer")
    return rounded.astype(np.int64)


class _QonnxLayout:
    """Which tensors of the exported graph carry which of our keys."""

    def __init__(self, model: onnx.ModelProto, layer_names: list[str] | None = None):
        act_quants = []  # Quant nodes on activations, in graph order
        weight_quants = []
        for n in _quant_nodes(model):
            if _const(model, n.input[0]) is not None:
                weight_quants.append(n)
            else:
                act_quants.append(n)
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
        n_layers = len(self.act_quants) + 1
        if layer_names is None:
            layer_names = [f"features.{i}.conv" for i in range(len(self.act_quants))] + ["head"]
        if len(layer_names) != n_layers:
            raise FqhwError(f"QONNX graph has {n_layers} quantized layers, expected {len(layer_names)}")
        self.layer_names = layer_names
        # the head's weight Quant and its input activation
        wq = _producer(model, self.head.input[1])
        if wq is None or wq.op_type != "Quant":
            # Gemm with transB: the weight may pass through a Transpose first
            t = _producer(model, self.head.input[1])
            wq = _producer(model, t.input[0]) if t is not None else None
        if wq is None or wq.op_type != "Quant":
            raise FqhwError("cannot find the head's weight Quant node")
        self.head_weight_quant = wq
        self.head_transB = any(a.name == "transB" and a.i == 1 for a in self.head.attribute)
        if self.head.op_type == "Gemm" and len(self.head.input) == 3:
            bias = _const(model, self.head.input[2])
            if bias is None or np.any(bias != 0):
                raise FqhwError("the head's Gemm has a non-zero bias; the accumulator would not be integer")


def qonnx_integer_trace(path, x) -> dict[str, np.ndarray]:
    """Run the QONNX file at `path` on `x` (N, C, H, W floats = pixel/256), one image at a time,
    with qonnx's executor; return int64 codes: "input", "<layer>.act", "head.acc"."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = x.astype(np.float32)
    wrapper = ModelWrapper(str(path))
    model = wrapper.model
    lay = _QonnxLayout(model)
    iname = model.graph.input[0].name
    exp_shape = wrapper.get_tensor_shape(iname)
    if exp_shape[0] != 1:
        from qonnx.transformation.change_batchsize import ChangeBatchSize

        wrapper = wrapper.transform(ChangeBatchSize(1))
    per_key: dict[str, list[np.ndarray]] = {}

    def add(key, arr):
        per_key.setdefault(key, []).append(arr)

    # head weight codes (constant)
    def quant_params(ctx, node):
        scale = ctx[node.input[1]] if node.input[1] in ctx else _const(model, node.input[1])
        zp = ctx[node.input[2]] if node.input[2] in ctx else _const(model, node.input[2])
        return np.asarray(scale), np.asarray(zp)

    for i in range(x.shape[0]):
        ctx = execute_onnx(wrapper, {iname: x[i : i + 1]}, return_full_exec_context=True)
        s, z = quant_params(ctx, lay.input_quant)
        add("input", _to_int(ctx[lay.input_quant.output[0]], s, z, "input"))
        for name, q in zip(lay.layer_names, lay.act_quants):
            s, z = quant_params(ctx, q)
            if np.asarray(s).size != 1:
                raise FqhwError(f"{name}: activation scale is not per-tensor")
            add(f"{name}.act", _to_int(ctx[q.output[0]], s, z, f"{name}.act"))
        # head accumulator: integer weights x integer input codes
        wq = lay.head_weight_quant
        s, z = quant_params(ctx, wq)
        w_int = _to_int(ctx[wq.output[0]], s, z, "head weight")  # (out, in) as exported
        head_in = lay.head.input[0]
        in_q = _producer(model, head_in)
        # walk back through layout ops (Reshape/Flatten/MaxPool) to the activation Quant
        in_scale = None
        t = head_in
        while True:
            p = _producer(model, t)
            if p is None:
                break
            if p.op_type == "Quant":
                in_scale, in_zp = quant_params(ctx, p)
                break
            t = p.input[0]
        if in_scale is None:
            raise FqhwError("cannot find the Quant node that feeds the head")
        a_int = _to_int(ctx[head_in], in_scale, in_zp, "head input")
        a_int = a_int.reshape(a_int.shape[0], -1)
        if lay.head.op_type == "Gemm" and lay.head_transB:
            acc = a_int @ w_int.T
        else:
            acc = a_int @ w_int
        # the graph's own float result must be that accumulator times the scales
        out = ctx[lay.head.output[0]].astype(np.float64)
        w_scale = np.asarray(s, dtype=np.float64).reshape(-1)
        approx = out / (float(np.asarray(in_scale).reshape(-1)[0]) * w_scale)
        slack = 1e-4 * np.maximum(1.0, np.abs(acc)) + INT_TOL
        if not (np.abs(approx - acc) <= slack).all():
            raise AssertionError("QONNX head output is not integer accumulator x scales")
        add("head.acc", acc)
        del in_q
    return {k: np.concatenate(v, axis=0) for k, v in per_key.items()}
