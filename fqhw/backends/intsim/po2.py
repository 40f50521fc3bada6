"""The integer simulator of a power-of-two QONNX model (`po2_graph`: an hls4ml build's
model, `IntegerSimulator.from_qonnx`).

A QONNX model quantized with power-of-two scales (fqhw.quant.po2, the hls4ml scheme) is
already integer arithmetic: every tensor is integer codes times 2^e. A Conv / MatMul of
codes c_x * 2^ex and c_w * 2^ew is the integer accumulator sum c_x c_w times 2^(ex + ew)
(plus the bias, whose codes sit on that grid); a Quant of it to 2^eq is
clip(round_half_even(acc * 2^(ex + ew - eq))), and acc * 2^k is an integer times a power
of two, exact in floating point whenever acc is; max pooling, flattening and ReLU act on
the codes. So the simulator carries codes only, in the same carriers as the FINN route
(float32 / float64 below their exact integer range, from static intervals; int64 beyond),
and the rounding is numpy's rint, which rounds half to even like qonnx, Brevitas and
hls4ml's AP_RND_CONV.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fqhw.backends.intsim.kernels import EXACT, INPUT_RANGE, THR_CLIP, SimNode, by_rows, carrier, column_sums, im2col, window_reduce
from fqhw.errors import FqhwError
from fqhw.onnxgraph import node_attrs


@dataclass
class _Dyadic:
    """A tensor of the graph as the simulator carries it: integer codes times 2^exp."""

    src: str  # the simulator tensor holding the codes (an alias shares its source's)
    exp: int
    interval: tuple[int, int]  # static (lo, hi) of the codes
    dtype: type  # their carrier
    shape: tuple  # per image: (H, W, C) for "nhwc", (K,) for "flat"
    layout: str  # "nhwc" | "flat"
    relu: bool = False  # max(., 0) still to apply (folded into the Quant that consumes it)
    producer: str = ""  # op type of the node that computed it


@dataclass
class _Const:
    """A constant behind a Quant node: int64 codes times 2^exp."""

    codes: np.ndarray
    exp: int


def _po2_quant_info(init: dict, node, what: str) -> dict:
    """Exponent and code range of a Quant node; FqhwError unless its scale is one power of
    two, its zero point 0, its bit width a constant integer and its rounding half to even."""
    import math

    vals = [init.get(t) for t in node.input[1:4]]
    if any(v is None for v in vals):
        raise FqhwError(f"{what}: the Quant node's scale, zero point and bit width must be constants; re-export the model")
    scale, zp, bits = (np.asarray(v, dtype=np.float64).reshape(-1) for v in vals)
    if np.any(zp != 0):
        raise FqhwError(f"{what}: non-zero zero point; the integer simulator reads power-of-two (po2 scheme) QONNX models")
    if scale.size == 0 or np.any(scale != scale[0]) or not scale[0] > 0 or math.frexp(float(scale[0]))[0] != 0.5:
        raise FqhwError(
            f"{what}: scale {scale[:4].tolist()} is not one power of two: the QONNX route of the integer simulator reads "
            "power-of-two (hls4ml) models; simulate a FINN build from its dataflow graph (IntegerSimulator.from_build)"
        )
    if bits.size != 1 or bits[0] != np.round(bits[0]) or not 1 <= bits[0] <= 32:
        raise FqhwError(f"{what}: bit width {bits.tolist()} is not one integer in 1..32")
    a = node_attrs(node)
    rounding = a.get("rounding_mode", b"ROUND")
    rounding = rounding.decode() if isinstance(rounding, bytes) else str(rounding)
    if rounding.upper() != "ROUND":
        raise FqhwError(f"{what}: rounding mode {rounding} is not supported (ROUND, half to even, is)")
    b, signed, narrow = int(bits[0]), bool(a.get("signed", 1)), bool(a.get("narrow", 0))
    lo = -(2 ** (b - 1)) + int(narrow) if signed else 0
    hi = 2 ** (b - 1) - 1 if signed else 2**b - 1 - int(narrow)
    return {"exp": int(round(math.log2(float(scale[0])))), "lo": lo, "hi": hi}


def _shift_round(v: int, d: int) -> int:
    """round_half_even(v * 2^-d) of a Python integer, exactly."""
    if d <= 0:
        return v << -d
    q, r = v >> d, v & ((1 << d) - 1)
    half = 1 << (d - 1)
    return q + (1 if r > half or (r == half and q & 1) else 0)


def _shift_round_int64(a: np.ndarray, d: int) -> np.ndarray:
    """round_half_even(a * 2^-d) of int64 codes, exactly (the fallback beyond float64's
    exact integers)."""
    if d <= 0:
        return a << np.int64(-d)
    q = a >> np.int64(d)
    r = a - (q << np.int64(d))
    half = np.int64(1 << (d - 1))
    return q + ((r > half) | ((r == half) & ((q & 1) == 1))).astype(np.int64)


def _requant_fn(x: _Dyadic, q: dict, what: str):
    """(fn, interval, dtype) of a Quant of the live tensor `x` (ReLU folded in when pending)."""
    d = q["exp"] - x.exp  # codes_out = round(codes_in * 2^-d)
    if abs(d) > 100:
        raise FqhwError(f"{what}: a rescale by 2^{-d} is out of range")
    lo = max(q["lo"], 0) if x.relu else q["lo"]
    hi = q["hi"]
    if hi < lo:
        raise FqhwError(f"{what}: empty code range after the ReLU")
    r_lo, r_hi = _shift_round(int(x.interval[0]), d), _shift_round(int(x.interval[1]), d)
    iv = (min(max(r_lo, lo), hi), max(min(r_hi, hi), lo))
    out_dtype = carrier(max(abs(iv[0]), abs(iv[1])))
    bound = max(abs(int(x.interval[0])), abs(int(x.interval[1])))
    scaled = bound if d >= 0 else bound << -d
    work = None
    for dt, lim in EXACT:
        # the input's own float type when it holds both the input and the scaled values
        # (no cast), else float64, else the integer path
        if max(bound, scaled) < lim and (dt is np.float64 or x.dtype is np.float32):
            work = dt
            break
    if work is None and scaled >= THR_CLIP:
        raise FqhwError(f"{what}: the rescaled values may exceed 2^62 in magnitude")

    if work is not None:
        factor = work(2.0**-d)

        def requant(a):
            t = a.astype(work) if a.dtype != work else a.copy()
            if d:
                t *= factor  # an integer times a power of two: exact
            np.rint(t, out=t)  # half to even, exact
            np.clip(t, lo, hi, out=t)
            return t if t.dtype == out_dtype else t.astype(out_dtype)
    else:

        def requant(a):
            t = _shift_round_int64(np.asarray(a).astype(np.int64), d)
            np.clip(t, lo, hi, out=t)
            return t.astype(out_dtype)

    return requant, iv, out_dtype


def _linear_fn(wm: np.ndarray, bias: np.ndarray | None, x_iv, what: str):
    """(fn of an (..., K) code matrix, interval, dtype): the integer accumulator x @ wm + bias,
    on BLAS in the narrowest float type that holds every partial sum exactly (the FINN
    route's argument, see the module docstring), in chunks that stay in cache."""
    xlo, xhi = int(x_iv[0]), int(x_iv[1])
    pos, neg = column_sums(wm)
    b = [0] * wm.shape[1] if bias is None else [int(v) for v in bias]
    acc_lo = [p * xlo + q * xhi + c for p, q, c in zip(pos, neg, b)]
    acc_hi = [p * xhi + q * xlo + c for p, q, c in zip(pos, neg, b)]
    xabs = max(abs(xlo), abs(xhi))
    partial = max((p - q for p, q in zip(pos, neg)), default=0) * xabs
    bound = max([partial] + [abs(v) for v in acc_lo + acc_hi])
    if bound >= THR_CLIP:
        raise FqhwError(f"{what}: the accumulator may exceed 2^62 in magnitude")
    dt = carrier(bound)
    wg = wm.astype(dt)
    bg = None if bias is None or not np.any(bias) else np.asarray(bias, dtype=np.int64).astype(dt)
    mh = wm.shape[1]

    def chunk(xa, out):
        np.matmul(xa, wg, out=out)
        if bg is not None:
            out += bg

    def linear(x):
        if x.shape[-1] != wg.shape[0]:
            raise FqhwError(f"{what}: input of {x.shape[-1]} values per vector, the weights take {wg.shape[0]}")
        return by_rows(x, mh, dt, dt, chunk)

    return linear, (min(acc_lo, default=0), max(acc_hi, default=0)), dt


def po2_graph(cls, path: Path):
    """IntegerSimulator of the power-of-two QONNX file at `path` (see `from_qonnx`).

    Ops: Quant (of constants: weight and bias codes; of tensors: the input quantizer, which
    must be the identity on pixel codes, and the activation quantizers), Conv (group 1, zero
    padding), Relu (folded into the Quant after it), MaxPool (no padding), GlobalMaxPool,
    Flatten / Reshape to (N, K), Identity, MatMul / Gemm (the head). Anything else is
    refused by name. Trace keys as `qonnx_integer_trace`: "input", "<layer>.act" for the
    activation Quants in graph order, "<head>.acc" for the graph's output accumulator."""
    import onnx
    from onnx import numpy_helper

    from fqhw.data.dataset import INPUT_SCALE
    from fqhw.intcodes import LAYER_NAMES_KEY

    if not path.is_file():
        raise FqhwError(f"QONNX file {path} does not exist; run the compile's export step (fqhw compile) first")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it
        raise FqhwError(f"{path} is not a readable ONNX model ({type(e).__name__}); re-run fqhw compile to write it again") from e
    g = model.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise FqhwError(f"{path}: the graph must have one input and one output")
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    gin = g.input[0].name
    dims = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(v <= 0 for v in dims[1:]):
        raise FqhwError(f"{path}: the input must be N x C x H x W images, the graph says {dims}")
    c_in, h_in, w_in = dims[1:]
    act_quants = [n for n in g.node if n.op_type == "Quant" and n.input[0] not in init]
    if not act_quants or act_quants[0].input[0] != gin:
        raise FqhwError(f"{path}: the graph input does not go straight into a Quant node (the input quantizer)")
    meta = {p.key: p.value for p in model.metadata_props}
    names = json.loads(meta[LAYER_NAMES_KEY]) if LAYER_NAMES_KEY in meta else [f"features.{i}.conv" for i in range(len(act_quants) - 1)] + ["head"]
    if len(names) != len(act_quants):
        raise FqhwError(f"{path}: {len(act_quants) - 1} activation quantizers and a head, but the layer names say {names}")
    act_key = {q.output[0]: f"{nm}.act" for q, nm in zip(act_quants[1:], names)}  # by tensor: node names may be empty

    in_q = _po2_quant_info(init, act_quants[0], "input quantizer")
    if 2.0 ** in_q["exp"] != INPUT_SCALE or in_q["lo"] > INPUT_RANGE[0] or in_q["hi"] < INPUT_RANGE[1]:
        raise FqhwError(f"{path}: the input quantizer (scale 2^{in_q['exp']}, codes {in_q['lo']}..{in_q['hi']}) is not the identity on pixel codes")
    in_dtype = carrier(max(abs(v) for v in INPUT_RANGE))
    in_name = act_quants[0].output[0]
    live: dict[str, _Dyadic] = {in_name: _Dyadic(in_name, in_q["exp"], INPUT_RANGE, in_dtype, (h_in, w_in, c_in), "nhwc", producer="Quant")}
    const: dict[str, _Const] = {}
    nodes: list[SimNode] = []
    record: dict[str, str] = {}

    def emit(node, fn, src: _Dyadic, exp, iv, dt, shape, layout) -> None:
        out = node.output[0]
        nodes.append(SimNode(node.name, node.op_type, src.src, out, fn, tuple(shape), iv, dt))
        live[out] = _Dyadic(out, exp, (int(iv[0]), int(iv[1])), dt, tuple(shape), layout, producer=node.op_type)

    def get_live(node, i=0) -> _Dyadic:
        t = node.input[i]
        if t not in live:
            raise FqhwError(f"{path}: node {node.name} ({node.op_type}) reads {t}, which is not a computed tensor before it")
        x = live[t]
        if x.relu and node.op_type != "Quant":
            raise FqhwError(f"{path}: node {node.name} reads a ReLU output that is not quantized first")
        return x

    def get_const(node, i, what) -> _Const:
        t = node.input[i]
        if t not in const:
            raise FqhwError(f"{path}: {what} ({t}) does not come from a Quant of a constant; export the po2 model with fqhw.backends.qonnx_export")
        return const[t]

    for node in g.node:
        op, what = node.op_type, f"{path.name}: node {node.name} ({node.op_type})"
        a = node_attrs(node)
        if op == "Quant":
            q = _po2_quant_info(init, node, what)
            if node.input[0] in init:
                v = np.asarray(init[node.input[0]], dtype=np.float64)
                codes = np.clip(np.round(v / 2.0 ** q["exp"]), q["lo"], q["hi"])
                const[node.output[0]] = _Const(codes.astype(np.int64), q["exp"])
            elif node is not act_quants[0]:
                x = get_live(node)
                fn, iv, dt = _requant_fn(x, q, what)
                emit(node, fn, x, q["exp"], iv, dt, x.shape, x.layout)
                record[node.output[0]] = act_key[node.output[0]]
        elif op == "Relu":
            x = get_live(node)
            cons = consumers.get(node.output[0], [])
            if len(cons) == 1 and cons[0].op_type == "Quant" and node.output[0] not in {o.name for o in g.output}:
                live[node.output[0]] = _Dyadic(x.src, x.exp, (max(x.interval[0], 0), max(x.interval[1], 0)), x.dtype, x.shape, x.layout, relu=True)
            else:
                iv = (max(x.interval[0], 0), max(x.interval[1], 0))
                emit(node, lambda t: np.maximum(t, 0, dtype=t.dtype), x, x.exp, iv, x.dtype, x.shape, x.layout)
        elif op == "Conv":
            x = get_live(node)
            if x.layout != "nhwc":
                raise FqhwError(f"{what}: its input is not a feature map")
            w = get_const(node, 1, f"{node.name} weight")
            if int(a.get("group", 1)) != 1:
                raise FqhwError(f"{what}: grouped / depthwise convolutions are not supported")
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise FqhwError(f"{what}: auto_pad is not supported; export with explicit pads")
            c_out, c_w, kh, kw = w.codes.shape
            if c_w != x.shape[2]:
                raise FqhwError(f"{what}: weights for {c_w} input channels, the input has {x.shape[2]}")
            k = list(a.get("kernel_shape", [kh, kw]))
            s = list(a.get("strides", [1, 1]))
            dl = list(a.get("dilations", [1, 1]))
            top, left, bottom, right = list(a.get("pads", [0, 0, 0, 0]))
            if k != [kh, kw]:
                raise FqhwError(f"{what}: kernel_shape {k}, weights {kh}x{kw}")
            exp = x.exp + w.exp
            bias = None
            if len(node.input) > 2 and node.input[2]:
                b = get_const(node, 2, f"{node.name} bias")
                if b.exp < exp:
                    raise FqhwError(f"{what}: the bias grid 2^{b.exp} is finer than the accumulator's 2^{exp}; quantize the bias with Int32Bias")
                bias = np.array([_shift_round(int(v), exp - b.exp) for v in b.codes.reshape(-1)], dtype=object)
            wm = np.ascontiguousarray(w.codes.transpose(2, 3, 1, 0)).reshape(kh * kw * c_w, c_out)  # (ky, kx, c) rows
            padded = bool(top or left or bottom or right)
            xiv = (min(x.interval[0], 0), max(x.interval[1], 0)) if padded else x.interval
            lin, iv, dt = _linear_fn(wm, bias, xiv, what)
            h, wd = x.shape[0] + top + bottom, x.shape[1] + left + right
            oh = (h - (dl[0] * (kh - 1) + 1)) // s[0] + 1
            ow = (wd - (dl[1] * (kw - 1) + 1)) // s[1] + 1
            if oh < 1 or ow < 1:
                raise FqhwError(f"{what}: a {kh}x{kw} kernel does not fit the {x.shape[0]}x{x.shape[1]} input")

            def conv(t, pads=(top, left, bottom, right), k=(kh, kw), s=tuple(s), dl=tuple(dl), lin=lin):
                if any(pads):
                    n, hh, ww, cc = t.shape
                    p = np.zeros((n, hh + pads[0] + pads[2], ww + pads[1] + pads[3], cc), dtype=t.dtype)
                    p[:, pads[0] : pads[0] + hh, pads[1] : pads[1] + ww, :] = t
                    t = p
                return lin(im2col(t, k, s, dl))

            emit(node, conv, x, exp, iv, dt, (oh, ow, c_out), "nhwc")
        elif op in ("MaxPool", "GlobalMaxPool"):
            x = get_live(node)
            if x.layout != "nhwc":
                raise FqhwError(f"{what}: its input is not a feature map")
            if op == "GlobalMaxPool":
                emit(node, lambda t: t.max(axis=(1, 2), keepdims=True), x, x.exp, x.interval, x.dtype, (1, 1, x.shape[2]), "nhwc")
                continue
            if any(int(v) for v in a.get("pads", [0, 0, 0, 0])) or int(a.get("ceil_mode", 0)):
                raise FqhwError(f"{what}: padded or ceil-mode max pooling is not supported")
            k = list(a["kernel_shape"])
            s = list(a.get("strides", [1, 1]))
            dl = list(a.get("dilations", [1, 1]))
            oh = (x.shape[0] - (dl[0] * (k[0] - 1) + 1)) // s[0] + 1
            ow = (x.shape[1] - (dl[1] * (k[1] - 1) + 1)) // s[1] + 1
            if oh < 1 or ow < 1:
                raise FqhwError(f"{what}: a {k[0]}x{k[1]} window does not fit the {x.shape[0]}x{x.shape[1]} input")
            fn = (lambda t, k=k, s=s, dl=dl, dt=x.dtype: window_reduce(t, k, s, dl, "MaxPool", dt))
            emit(node, fn, x, x.exp, x.interval, x.dtype, (oh, ow, x.shape[2]), "nhwc")
        elif op in ("Flatten", "Reshape"):
            x = get_live(node)
            size = int(np.prod(x.shape))
            if op == "Flatten" and int(a.get("axis", 1)) != 1:
                raise FqhwError(f"{what}: only axis 1 is supported")
            if op == "Reshape":
                tgt = init.get(node.input[1])
                if tgt is None or len(tgt) != 2 or int(tgt[1]) not in (-1, size) or int(tgt[0]) not in (-1, 0, 1):
                    raise FqhwError(f"{what}: only a reshape to (N, {size}) is supported")
            if x.layout == "nhwc":  # ONNX flattens NCHW: channels outermost
                fn = (lambda t: t.transpose(0, 3, 1, 2).reshape(t.shape[0], -1))
            else:
                fn = (lambda t: t)
            emit(node, fn, x, x.exp, x.interval, x.dtype, (size,), "flat")
        elif op == "Identity":
            live[node.output[0]] = get_live(node)
        elif op in ("MatMul", "Gemm"):
            x = get_live(node)
            if x.layout != "flat":
                raise FqhwError(f"{what}: its input is not flattened")
            w = get_const(node, 1, f"{node.name} weight")
            wm = w.codes
            if op == "Gemm":
                if int(a.get("transA", 0)) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
                    raise FqhwError(f"{what}: transA / alpha / beta other than the defaults are not supported")
                if int(a.get("transB", 0)):
                    wm = wm.T
            if wm.ndim != 2 or wm.shape[0] != x.shape[0]:
                raise FqhwError(f"{what}: weights of shape {wm.shape} for {x.shape[0]} inputs")
            exp = x.exp + w.exp
            bias = None
            if len(node.input) > 2 and node.input[2]:
                if node.input[2] in init and not np.any(init[node.input[2]]):
                    bias = None  # the zero bias qonnx_export gives a bias-free head
                else:
                    b = get_const(node, 2, f"{node.name} bias")
                    if b.exp < exp:
                        raise FqhwError(f"{what}: the bias grid 2^{b.exp} is finer than the accumulator's 2^{exp}")
                    bias = np.array([_shift_round(int(v), exp - b.exp) for v in b.codes.reshape(-1)], dtype=object)
            lin, iv, dt = _linear_fn(np.ascontiguousarray(wm), bias, x.interval, what)
            emit(node, lin, x, exp, iv, dt, (wm.shape[1],), "flat")
        else:
            raise FqhwError(f"{what}: the integer simulator does not support {op} in a power-of-two QONNX graph")

    gout = g.output[0].name
    if gout not in live:
        raise FqhwError(f"{path}: the graph output {gout} is not computed by the supported ops")
    y = live[gout]
    if y.layout != "flat" or y.relu:
        raise FqhwError(f"{path}: the graph output must be the head's accumulator (N, classes)")
    if y.producer in ("MatMul", "Gemm"):
        record[y.src] = f"{names[-1]}.acc"
    back = [("S", None)]
    scale = np.array([2.0**y.exp], dtype=np.float64)
    front = [("T", [0, 2, 3, 1])]  # NCHW images -> the simulator's NHWC
    return cls(nodes, in_name, y.src, front, (1, h_in, w_in, c_in), record, scale, back, str(path), in_dtype)
