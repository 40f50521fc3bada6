"""Small helpers that read an ONNX graph (onnx.ModelProto and its nodes): attributes,
constant initializers, producers and consumers, a Quant node's parameters. Export, the
quant models' QONNX traces and every backend read graphs through these."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from fqhw.errors import FqhwError


def node_attrs(node) -> dict:
    """{name: value} of a node's attributes."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_attr(node, name):
    """The value of one attribute of a node, None if it has none of that name."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def const_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The initializer `name` as an array, None if `name` is not an initializer."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def producer_of(model: onnx.ModelProto, tensor: str):
    for n in model.graph.node:
        if tensor in n.output:
            return n
    return None


def consumers_of(model: onnx.ModelProto, tensor: str):
    return [n for n in model.graph.node if tensor in n.input]


def quant_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.op_type == "Quant"]


def quant_const(model, node, what: str):
    """(scale, zero point, bit width, signed, narrow) of a Quant node, all float64 constants."""
    vals = [const_value(model, t) for t in node.input[1:4]]
    if any(v is None for v in vals):
        raise FqhwError(f"{what}: the Quant node's scale / zero point / bit width are not constants")
    a = node_attrs(node)
    scale, zp, bits = (np.asarray(v, dtype=np.float64) for v in vals)
    if np.any(zp != 0):
        raise FqhwError(f"{what}: non-zero zero point")
    return scale, zp, int(bits.reshape(-1)[0]), bool(a.get("signed", 1)), bool(a.get("narrow", 0))


def quant_params(ctx, model, node):
    """(scale, zero point) of a Quant node, from an execution context or the initializers."""
    scale = ctx[node.input[1]] if node.input[1] in ctx else const_value(model, node.input[1])
    zp = ctx[node.input[2]] if node.input[2] in ctx else const_value(model, node.input[2])
    return np.asarray(scale), np.asarray(zp)


def canonical(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strip the metadata that differs between otherwise identical exports."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.producer_version = ""
    model.doc_string = ""
    del model.metadata_props[:]
    for node in model.graph.node:
        node.doc_string = ""
    model.graph.doc_string = ""
    return model
