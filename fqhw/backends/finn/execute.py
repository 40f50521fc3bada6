"""Running a FINN build: the folded dataflow graph in Python, one image at a time
(`finn_integer_trace`: the integers the hardware computes), and FINN's integer thresholds
checked against float64 ones from the QONNX file (`threshold_check`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fqhw.backends.finn.common import FinnBuild, LAYOUT_OPS, python_exec_model
from fqhw.data.dataset import INPUT_SCALE
from fqhw.errors import FqhwError
from fqhw.intcodes import INT_TOL
from fqhw.onnxgraph import node_attr
from fqhw.units import merge_group_keys


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
    sim = python_exec_model(df)
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

