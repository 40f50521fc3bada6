"""QONNX export of the timm models' Brevitas models (fqhw.quant.generic: QuantResNet,
QuantTransformer), and the integer codes qonnx's execution of the file computes, under the
keys of `fqhw.quant.generic.integer_trace`: a ResNet's Quant nodes found by the layers they
follow (COMPUTE_LAYERS_KEY metadata), a transformer's per image; `compare_traces` compares
two traces key by key."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from fqhw.errors import FqhwError
from fqhw.intcodes import COMPUTE_LAYERS_KEY
from fqhw.quant.generic import QuantResNet, QuantTransformer, head_check, per_image

def _weight_source(model, node):
    """The float weight constant behind a Conv / Gemm / MatMul node (through its weight Quant)."""
    from fqhw.onnxgraph import const_value, producer_of

    t = node.input[1]
    q = producer_of(model, t)
    if q is not None and q.op_type == "Quant":
        t = q.input[0]
    return const_value(model, t)


def export_generic_qonnx(qmodel: nn.Module, input_shape, path):
    """Export a generic quant model to a cleaned QONNX file at `path` (fqhw's `export_qonnx`,
    the same exporter and clean-up as the default model) and record in its metadata which
    Conv / Gemm node is which allocation layer, found by its float weight constant (equal,
    element for element, to exactly one layer's weight): the integer trace of the file and
    the FINN build then name their values without any Brevitas object.

    First every weight is set to its dequantized value (fqhw.quant.snap.project_weights:
    codes unchanged): a weight whose weight / scale sat within float32 error of k + 0.5
    otherwise gets one code from Brevitas and FINN (float32 division) and another from a
    float64 execution (seen once in the 11 M weights of a ResNet-18)."""
    import json

    import onnx

    from fqhw.backends.qonnx_export import export_qonnx
    from fqhw.quant.snap import project_weights

    if isinstance(qmodel, QuantResNet):
        side = min(int(v) for v in tuple(input_shape)[-2:])
        if side < 64:
            raise FqhwError(
                f"a ResNet's QONNX export needs inputs of at least 64 x 64 px (got {side}): below that "
                "layer4's 3 x 3 convs see a 1 x 1 map, which qonnx's Im2Col (and FINN's conv lowering) refuses"
            )
    project_weights(qmodel)
    path = export_qonnx(qmodel, input_shape, path)
    model = onnx.load(str(path))
    weights = {n: l.compute.weight.detach().cpu().numpy() for n, l in qmodel.layers.items()}
    found: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = _weight_source(model, node)
        if w is None:
            continue  # an activation x activation product (attention)
        hits = [n for n, lw in weights.items() if lw.shape == w.shape and np.array_equal(lw, w)]
        if len(hits) != 1:
            raise FqhwError(f"QONNX node {node.name}: its weight matches {len(hits)} layers ({hits}), not one")
        found[node.name] = hits[0]
    missing = [n for n in weights if n not in found.values()]
    if missing:
        raise FqhwError(f"QONNX export: no Conv/Gemm/MatMul node found for layers {missing}")
    model.metadata_props.add(key=COMPUTE_LAYERS_KEY, value=json.dumps(found, sort_keys=True))
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def _float64_exec_copy(path):
    """qonnx_export's float64 copy of the graph (convs lowered, Quant split so the codes are
    an output), with each GlobalAveragePool as ReduceMean over H, W: onnxruntime has no
    float64 GlobalAveragePool, and the two define the same mean."""
    from onnx import helper

    from fqhw.backends.qonnx_export import float64_copy

    from onnx import TensorProto

    wrapper = float64_copy(path)
    for n in wrapper.graph.node:
        if n.op_type == "GlobalAveragePool":
            n.op_type = "ReduceMean"
            n.attribute.extend([helper.make_attribute("axes", [2, 3]), helper.make_attribute("keepdims", 1)])
    # onnxruntime has no float64 Erf (a transformer's GELU): it runs in float32 between two
    # Casts, the one op of the graph that is not float64 (its error, ~1e-7 relative, moves a
    # code only for a value that close to a rounding boundary; the check would show it)
    for i, n in reversed(list(enumerate(wrapper.graph.node))):
        if n.op_type != "Erf":
            continue
        x32, y32 = n.input[0] + "_f32", n.output[0] + "_f32"
        shape = wrapper.get_tensor_shape(n.input[0])
        wrapper.set_tensor_shape(x32, shape, TensorProto.FLOAT)
        wrapper.set_tensor_shape(y32, shape, TensorProto.FLOAT)
        cast_in = helper.make_node("Cast", [n.input[0]], [x32], to=TensorProto.FLOAT, name=n.name + "_cast_in")
        cast_out = helper.make_node("Cast", [y32], [n.output[0]], to=TensorProto.DOUBLE, name=n.name + "_cast_out")
        n.input[0], n.output[0] = x32, y32
        wrapper.graph.node.insert(i + 1, cast_out)
        wrapper.graph.node.insert(i, cast_in)
    return wrapper


def _resnet_quant_keys(model, layer_of: dict[str, str]) -> "OrderedDict[str, object]":
    """Key (as `integer_trace` names them) -> activation Quant node of an exported QuantResNet,
    from the graph's structure: each activation Quant is traced back through BN / Relu /
    MaxPool to what produced it (the graph input, a Conv of a known layer, an Add, or
    another Quant: an identity shortcut's requantization)."""
    from fqhw.onnxgraph import const_value, consumers_of, producer_of

    gin = model.graph.input[0].name
    keys: OrderedDict[str, object] = OrderedDict()
    pending_shortcut = []
    for q in model.graph.node:
        if q.op_type != "Quant" or const_value(model, q.input[0]) is not None:
            continue
        t, src = q.input[0], None
        while True:
            if t == gin:
                src = "input"
                break
            p = producer_of(model, t)
            if p is None:
                raise FqhwError(f"Quant node {q.name}: cannot trace its input")
            if p.op_type in ("BatchNormalization", "Relu", "MaxPool"):
                t = p.input[0]
                continue
            src = p
            break
        if src == "input":
            keys["input"] = q
        elif src.op_type == "Conv":
            keys[f"{layer_of[src.name]}.act"] = q
        elif src.op_type == "Add":
            main = [producer_of(model, i) for i in src.input]
            owners = [k for k, v in keys.items() if v in main and k.endswith(".act")]
            main_key = [k for k in owners if ".downsample." not in k]
            if len(main_key) != 1:
                raise FqhwError(f"Add node {src.name}: cannot tell its residual branch")
            block = main_key[0].rsplit(".", 2)[0]
            keys[f"{block}.out"] = q
        elif src.op_type == "Quant":
            pending_shortcut.append(q)
        else:
            raise FqhwError(f"Quant node {q.name} follows {src.op_type}, which a QuantResNet does not have")
    for q in pending_shortcut:  # named by the add it feeds: the one whose other operand is known
        adds = [c for c in consumers_of(model, q.output[0]) if c.op_type == "Add"]
        if len(adds) != 1:
            raise FqhwError(f"identity-shortcut Quant {q.name} does not feed one Add")
        other = [producer_of(model, i) for i in adds[0].input if i != q.output[0]]
        owner = [k for k, v in keys.items() if v in other]
        if len(owner) != 1:
            raise FqhwError(f"identity-shortcut Quant {q.name}: cannot tell its block")
        keys[f"{owner[0].rsplit('.', 2)[0]}.shortcut"] = q
    return keys


def qonnx_integer_trace_generic(path, x) -> "OrderedDict[str, np.ndarray]":
    """Run a QONNX file exported by `export_generic_qonnx` from a QuantResNet on `x` (N, C, H,
    W floats = pixel/256) with qonnx's executor in float64, one image at a time; return the
    int64 codes under the keys `integer_trace` uses ("input", "<layer>.act",
    "<block>.shortcut", "<block>.out", "fc.acc"). The Quant nodes' codes are read directly
    (the float64 copy splits each Quant so that its integer output is a tensor); "fc.acc" is
    the integer classifier weights x the summed codes of the last block, checked against
    the Gemm's float output."""
    import json

    import onnx

    from fqhw.intcodes import CODES_SUFFIX, to_int
    from fqhw.onnxgraph import const_value, node_attrs, producer_of, quant_params
    from qonnx.core.onnx_exec import execute_onnx

    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if COMPUTE_LAYERS_KEY not in meta:
        raise FqhwError(f"{path}: not exported by export_generic_qonnx (no {COMPUTE_LAYERS_KEY} metadata)")
    layer_of = json.loads(meta[COMPUTE_LAYERS_KEY])
    keys = _resnet_quant_keys(model, layer_of)
    heads = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and layer_of.get(n.name) == "fc"]
    if len(heads) != 1:
        raise FqhwError("the QONNX graph has no single classifier Gemm named fc")
    head = heads[0]
    wq = producer_of(model, head.input[1])
    t = head.input[0]
    while True:  # Flatten / GlobalAveragePool back to the last block's Quant
        p = producer_of(model, t)
        if p is None or p.op_type == "Quant":
            break
        if p.op_type not in ("Flatten", "Reshape", "GlobalAveragePool"):
            raise FqhwError(f"the classifier input passes through {p.op_type}")
        t = p.input[0]
    if p is None:
        raise FqhwError("cannot find the Quant node that feeds the classifier")
    head_q = p
    transB = node_attrs(head).get("transB", 0) == 1
    bias = const_value(model, head.input[2]).astype(np.float64) if len(head.input) > 2 else None
    wrapper = _float64_exec_copy(path)
    iname = model.graph.input[0].name
    per_key: dict[str, list[np.ndarray]] = {}
    for i in range(x.shape[0]):
        ctx = execute_onnx(wrapper, {iname: x[i : i + 1].astype(np.float64)}, return_full_exec_context=True)

        def codes(q, what):
            s, z = quant_params(ctx, model, q)
            direct = to_int(ctx[q.output[0] + CODES_SUFFIX], np.ones(1), z, what)
            via_scale = to_int(ctx[q.output[0]], s, z, what)
            if not np.array_equal(direct, via_scale):
                raise AssertionError(f"{what}: codes x scale / scale is not the codes")
            return direct, s

        for key, q in keys.items():
            per_key.setdefault(key, []).append(codes(q, key)[0])
        w_int, ws = codes(wq, "fc weight")
        a_int, a_s = codes(head_q, "fc input")
        n_pix = int(a_int.shape[-1] * a_int.shape[-2])
        acc = a_int.sum(axis=(-1, -2)) @ (w_int.T if transB else w_int)
        scale = float(a_s.reshape(-1)[0]) * ws.astype(np.float64).reshape(-1) / n_pix
        head_check(ctx[head.output[0]].astype(np.float64), acc, scale, bias, "QONNX Gemm")
        per_key.setdefault("fc.acc", []).append(acc)
    return OrderedDict((k, np.concatenate(v, axis=0)) for k, v in per_key.items())


def compare_traces(ref: dict, other: dict, names=("brevitas", "qonnx")) -> dict:
    """Per key: element count and number of differing integers (keys must be the same)."""
    if set(ref) != set(other):
        raise FqhwError(
            f"{names[0]} and {names[1]} report different values: only in {names[0]} "
            f"{sorted(set(ref) - set(other))}, only in {names[1]} {sorted(set(other) - set(ref))}"
        )
    out = {}
    for k in ref:
        a, b = np.asarray(ref[k]), np.asarray(other[k])
        if a.shape != b.shape:
            raise FqhwError(f"{k}: shape {a.shape} in {names[0]}, {b.shape} in {names[1]}")
        out[k] = {"n": int(a.size), "differ": int((a != b).sum())}
    return out


def export_transformer_qonnx(qmodel: QuantTransformer, input_shape, path, opset: int = 17):
    """Export a QuantTransformer to a cleaned QONNX file with Brevitas' exporter directly.

    Why not fqhw.backends.qonnx_export.export_qonnx: it exports at opset 13, where
    LayerNormalization does not exist (it would be decomposed into ReduceMean / Pow / Sqrt
    / Div); at opset 17 it stays one op, which is what finn-plus' LayerNorm conversion
    looks for. The layer metadata is the same as `export_generic_qonnx` writes."""
    import contextlib
    import io
    import json
    import tempfile
    import warnings
    from pathlib import Path

    from brevitas.export import export_qonnx as brevitas_export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    from fqhw.onnxgraph import canonical
    from fqhw.quant.snap import project_weights

    project_weights(qmodel)  # see export_generic_qonnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (1,) + tuple(int(s) for s in input_shape)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            raw = Path(tmp) / "raw.onnx"
            brevitas_export_qonnx(qmodel, args=torch.zeros(shape), export_path=str(raw), dynamo=False, opset_version=opset)
            model = cleanup_model(ModelWrapper(str(raw)))
    finally:
        qmodel.train(was_training)
    proto = canonical(model.model)
    weights = {n: l.compute.weight.detach().cpu().numpy() for n, l in qmodel.layers.items()}
    found = {}
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            w = _weight_source(proto, node)
            if w is None:
                continue
            hits = [n for n, lw in weights.items() if lw.shape == w.shape and np.array_equal(lw, w)]
            if len(hits) != 1:
                # timm's linear layers export as MatMul with the weight transposed
                hits = [n for n, lw in weights.items() if lw.T.shape == w.shape and np.array_equal(lw.T, w)]
            if len(hits) == 1:
                found[node.name] = hits[0]
    proto.metadata_props.add(key=COMPUTE_LAYERS_KEY, value=json.dumps(found, sort_keys=True))
    path.write_bytes(proto.SerializeToString(deterministic=True))
    return path


def qonnx_integer_trace_transformer(path, x) -> "OrderedDict[str, np.ndarray]":
    """The integer codes a QONNX file exported by `export_transformer_qonnx` computes on `x`
    (N, C, H, W floats = pixel/256), under `integer_trace`'s transformer keys: "input" and
    "<layer>.out" (each quantized layer's output quantizer). Run with qonnx's executor in
    float64 (fqhw.backends.qonnx_export's float64 copy: Quant split so that its codes are a
    tensor), one image at a time, like the ResNet trace; the float ops between quantizers
    (attention, softmax, LayerNorm, GELU) run in float64 in both this and Brevitas' float64
    twin, so the codes agree unless a value falls within float64 error of a rounding
    boundary."""
    import json

    import onnx

    from fqhw.intcodes import CODES_SUFFIX, to_int
    from fqhw.onnxgraph import consumers_of, quant_params
    from qonnx.core.onnx_exec import execute_onnx

    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if COMPUTE_LAYERS_KEY not in meta:
        raise FqhwError(f"{path}: not exported by export_transformer_qonnx (no {COMPUTE_LAYERS_KEY} metadata)")
    layer_of = json.loads(meta[COMPUTE_LAYERS_KEY])
    gin = model.graph.input[0].name
    keys: OrderedDict[str, object] = OrderedDict()
    inputs = [n for n in consumers_of(model, gin) if n.op_type == "Quant"]
    if len(inputs) != 1:
        raise FqhwError(f"{path}: the graph input does not feed one Quant node")
    keys["input"] = inputs[0]
    for node in model.graph.node:
        layer = layer_of.get(node.name)
        if layer is None:
            continue
        t, q = node.output[0], None
        for _ in range(4):  # the bias Add (a MatMul's), then the layer's output quantizer
            nxt = consumers_of(model, t)
            if len(nxt) != 1:
                break
            if nxt[0].op_type == "Quant":
                q = nxt[0]
                break
            if nxt[0].op_type != "Add":
                break
            t = nxt[0].output[0]
        if q is not None:
            keys[f"{layer}.out"] = q
    wrapper = _float64_exec_copy(path)
    per_key: dict[str, list[np.ndarray]] = {}
    for i in range(x.shape[0]):
        ctx = execute_onnx(wrapper, {gin: x[i : i + 1].astype(np.float64)}, return_full_exec_context=True)
        for key, q in keys.items():
            _s, z = quant_params(ctx, model, q)
            per_key.setdefault(key, []).append(to_int(ctx[q.output[0] + CODES_SUFFIX], np.ones(1), z, key))
    return per_image(OrderedDict((k, np.concatenate(v, axis=0)) for k, v in per_key.items()), x.shape[0])


def qonnx_execute(path, x) -> np.ndarray:
    """The output of the QONNX file at `path` on `x` (N, C, H, W), run image by image with
    qonnx's executor as the file is (float32): a check that the export runs and computes
    the model's function, not an integer comparison."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.change_batchsize import ChangeBatchSize

    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    wrapper = ModelWrapper(str(path))
    iname = wrapper.graph.input[0].name
    if wrapper.get_tensor_shape(iname)[0] != 1:
        wrapper = wrapper.transform(ChangeBatchSize(1))
    oname = wrapper.graph.output[0].name
    outs = [execute_onnx(wrapper, {iname: x[i : i + 1].astype(np.float32)})[oname] for i in range(x.shape[0])]
    return np.concatenate(outs, axis=0)

