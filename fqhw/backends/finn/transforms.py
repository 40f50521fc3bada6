"""fqhw's own graph rewrites for FINN, as qonnx Transformations (`model.transform(T())`),
beside FINN's and qonnx's: the accelerator's input made the uint8 pixel codes, forked
Transposes after a MaxPool merged (a finn-plus pitfall), and the sliding windows of a
layer's channel groups shared."""
from __future__ import annotations

import numpy as np
from onnx import helper
from qonnx.transformation.base import Transformation

from fqhw.data.dataset import INPUT_SCALE
from fqhw.errors import FqhwError


class MergeForkedTransposesAfterMaxPool(Transformation):
    """A MaxPool whose output feeds several identical Transposes gets one Transpose in front
    of the fork instead.

    Why: FINN's MakeMaxPoolNHWC looks at the MaxPool's first consumer only. After a ResNet
    stem (MaxPool -> block conv1 and downsample conv), conv lowering leaves one Transpose
    per branch; MakeMaxPoolNHWC then rewires one branch and leaves the other reading the
    un-pooled map (a silently wrong graph: seen on finn-plus 1.6.1). With one Transpose
    the pattern is linear and the rewrite is right."""

    def apply(self, model):
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


class ShareWindows(Transformation):
    """One Im2Col per input tensor and geometry: the channel groups of a conv read the same
    tensor through identical Im2Cols; all but the first are removed and their consumers read
    the first's output (one sliding window per layer, forked). One pass."""

    def apply(self, model):
        first: dict[tuple, str] = {}
        for node in list(model.graph.node):
            if node.op_type != "Im2Col":
                continue
            attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute))
            key = (node.input[0], attrs)
            if key not in first:
                first[key] = node.output[0]
                continue
            keep = first[key]
            for other in model.graph.node:
                for i, t in enumerate(other.input):
                    if t == node.output[0]:
                        other.input[i] = keep
            model.graph.node.remove(node)
        return model, False


class InputQuantToCodes(Transformation):
    """Make the accelerator's input the 8-bit input codes (the uint8 pixels).

    The QONNX graph starts with Quant(x; scale 2^-8, zero point 0, 8 bit, unsigned, wide):
    on the model's inputs x = pixel / 256 it is the identity. FINN's own convention is an
    integer-typed graph input, so the Quant becomes Mul(codes, 2^-8) on a UINT8 input,
    which streamlining then folds into the first layer's thresholds. Anything other than
    that exact quantizer is refused.
    """

    def apply(self, model):
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
        return model, False

