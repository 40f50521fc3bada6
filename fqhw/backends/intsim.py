"""A fast integer simulator of the deployed model, built from a FINN dataflow graph.

`IntegerSimulator.from_build(build_dir)` reads the folded, specialised dataflow graph of an
estimate-only FINN build (fqhw.backends.finn_build) and the parent graph around it, and
turns every HW node into a numpy operation on int64 arrays that runs a whole batch at once:

    FMPadding                  zero padding of the NHWC feature map
    ConvolutionInputGenerator  im2col as a strided view: (N, OH, OW, KH*KW*C), channels fastest
    MVAU                       integer matmul with the integer weights (on BLAS in float64
                               while |acc| < 2^53, where it is exact), then (unless
                               noActivation) the integer thresholds: code = ActVal + the number
                               of thresholds t with acc >= t (a binary search per channel)
    Thresholding               the same thresholds on a stream
    Pool (MaxPool / AccPool)   max / sum over the KH*KW window axis of the generator's output
    StreamingMaxPool           max pooling by reshape (NHWC, kernel = stride)
    GlobalAccPool              sum over the pixels

Weights, thresholds and attributes come from the ONNX nodes (qonnx ModelWrapper,
getCustomOp), never from the Brevitas model, so the simulator checks the build on its own.
Every value is an integer until the parent graph's output Mul: "logits" = head accumulator times
that scale, in float64.

`run` returns the integer tensors `finn_integer_trace` returns ("input", "<layer>.act",
"<layer>.acc" for an MVAU without activation, i.e. "head.acc"; NCHW codes, int64) plus
"logits".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fqhw.errors import FqhwError

# thresholds beyond this are "never reached" / "always reached"; every accumulator the
# supported data types allow lies well inside (|acc| < 2^53 is checked per MVAU)
_THR_CLIP = 2**62


def _attr_ints(node, name):
    for a in node.attribute:
        if a.name == name:
            return list(a.ints)
    return None


def _exact_int_array(v, what: str) -> np.ndarray:
    """An integer-valued float initializer as int64 (refused if any value is not an integer)."""
    v = np.asarray(v, dtype=np.float64)
    if not np.isfinite(v).all():
        raise FqhwError(f"{what}: non-finite values")
    r = np.round(v)
    if not np.array_equal(r, v):
        raise FqhwError(f"{what}: values are not integers")
    if np.abs(r).max(initial=0.0) >= 2.0**53:
        raise FqhwError(f"{what}: values beyond float64's exact integers")
    return r.astype(np.int64)


def _int_thresholds(thr, channels: int, what: str) -> np.ndarray:
    """Thresholds (channels or 1, T) as sorted int64 rows, each the smallest integer
    accumulator that reaches it: acc >= t  <=>  acc >= ceil(t) for an integer acc; +-inf (or
    anything beyond +-2^62) becomes +-2^62, out of every accumulator's reach."""
    t = np.asarray(thr, dtype=np.float64)
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2 or t.shape[0] not in (1, channels):
        raise FqhwError(f"{what}: thresholds of shape {t.shape} for {channels} channels")
    if np.isnan(t).any():
        raise FqhwError(f"{what}: NaN thresholds")
    t = np.clip(np.ceil(t), -float(_THR_CLIP), float(_THR_CLIP))
    t = np.sort(t.astype(np.int64), axis=1)
    return np.broadcast_to(t, (channels, t.shape[1])).copy()


def _threshold(acc: np.ndarray, thr: np.ndarray, act_val: int) -> np.ndarray:
    """act_val + #{t in thr[c] : acc[..., c] >= t}, channels on the last axis (all int64):
    one binary search per channel over that channel's contiguous accumulators."""
    ch = thr.shape[0]
    by_channel = np.ascontiguousarray(np.moveaxis(acc, -1, 0)).reshape(ch, -1)
    out = np.empty_like(by_channel)
    for c in range(ch):
        out[c] = np.searchsorted(thr[c], by_channel[c], side="right")
    if act_val:
        out += act_val
    return np.moveaxis(out.reshape((ch, *acc.shape[:-1])), 0, -1)


def _im2col(x: np.ndarray, k, stride, dilation) -> np.ndarray:
    """NHWC -> (N, OH, OW, KH*KW*C) with the window's (ky, kx, c) flattened, c fastest: the
    layout of FINN's ConvolutionInputGenerator and of its MVAU weight rows."""
    kh, kw = k
    sh, sw = stride
    dh, dw = dilation
    n, h, w, c = x.shape
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    oh, ow = (h - eh) // sh + 1, (w - ew) // sw + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (eh, ew), axis=(1, 2))  # N, H', W', C, eh, ew
    win = win[:, : (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw, :, ::dh, ::dw]
    win = win.transpose(0, 1, 2, 4, 5, 3)  # N, OH, OW, KH, KW, C
    return np.ascontiguousarray(win).reshape(n, oh, ow, kh * kw * c)


@dataclass
class SimNode:
    name: str
    op_type: str
    inp: str
    out: str
    fn: Callable[[np.ndarray], np.ndarray]
    out_shape: tuple  # the graph's shape of the output, without the batch axis


class IntegerSimulator:
    """The deployed integer model of one FINN build, vectorised over a batch with numpy."""

    def __init__(self, nodes, in_name, out_name, front, in_shape, record, out_scale, back, build_dir=None):
        self.nodes: list[SimNode] = nodes
        self.in_name = in_name  # the dataflow graph's input tensor
        self.out_name = out_name  # its output (the head accumulator)
        self.front = front  # layout ops in front of the accelerator: ("T", perm) / ("R", shape)
        self.in_shape = tuple(in_shape)  # the accelerator's input shape, batch 1
        self.record = record  # tensor name -> trace key ("<layer>.act" / "<layer>.acc")
        self.out_scale = out_scale  # float64 array broadcasting against the accumulator
        self.back = back  # layout ops after the accelerator, before/after the scale
        self.build_dir = build_dir

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_build(cls, build_dir) -> "IntegerSimulator":
        """From a compile output folder (holding finn/) or a FINN build folder (holding
        finn_build.json)."""
        from fqhw.backends.finn_build import FinnBuild

        build_dir = Path(build_dir)
        if (build_dir / "finn_build.json").exists():
            fb = build_dir
        elif (build_dir / "finn" / "finn_build.json").exists():
            fb = build_dir / "finn"
        else:
            raise FqhwError(f"{build_dir} holds no finn_build.json (nor finn/finn_build.json): pass a compile output folder")
        build = FinnBuild.load(fb)
        return cls.from_models(build.dataflow_model, build.parent_model, build.mvau_of_layer, build_dir=str(build_dir))

    @classmethod
    def from_models(cls, dataflow, parent, mvau_of_layer: dict[str, str], build_dir=None) -> "IntegerSimulator":
        """From the dataflow graph and its parent (paths or qonnx ModelWrappers) and the map
        fqhw layer name -> MVAU node name (FinnBuild.mvau_of_layer)."""
        from qonnx.core.modelwrapper import ModelWrapper

        df = dataflow if isinstance(dataflow, ModelWrapper) else ModelWrapper(str(dataflow))
        par = parent if isinstance(parent, ModelWrapper) else ModelWrapper(str(parent))
        layer_of_mvau = {v: k for k, v in mvau_of_layer.items()}

        nodes: list[SimNode] = []
        record: dict[str, str] = {}
        for node in df.graph.node:
            fn, key = _node_fn(df, node, layer_of_mvau)
            oshape = tuple(df.get_tensor_shape(node.output[0]))[1:]
            nodes.append(SimNode(node.name, node.op_type, node.input[0], node.output[0], fn, oshape))
            if key is not None:
                record[node.output[0]] = key
        missing = set(mvau_of_layer.values()) - {n.name for n in nodes}
        if missing:
            raise FqhwError(f"MVAU nodes {sorted(missing)} of the build are not in its dataflow graph")
        if len(df.graph.input) != 1 or len(df.graph.output) != 1:
            raise FqhwError("the dataflow graph must have one input and one output")
        in_name, out_name = df.graph.input[0].name, df.graph.output[0].name

        # the parent graph: layout ops in front, the partition, then the output Mul
        sdps = par.get_nodes_by_op_type("StreamingDataflowPartition")
        if len(sdps) != 1:
            raise FqhwError(f"the parent graph has {len(sdps)} dataflow partitions, expected 1")
        sdp = sdps[0]
        front = []
        t = sdp.input[0]
        while t != par.graph.input[0].name:
            p = par.find_producer(t)
            if p is None or p.op_type not in ("Transpose", "Reshape", "Flatten"):
                raise FqhwError(f"unexpected node in front of the accelerator: {p.op_type if p else None}")
            if p.op_type == "Transpose":
                front.append(("T", _attr_ints(p, "perm")))
            else:
                front.append(("R", tuple(par.get_tensor_shape(p.output[0]))[1:]))
            t = p.input[0]
        front.reverse()
        scale = None
        back = []
        t = sdp.output[0]
        gout = par.graph.output[0].name
        while t != gout:
            cons = par.find_consumers(t) or []
            if len(cons) != 1:
                raise FqhwError(f"the parent graph's tensor {t} has {len(cons)} consumers, expected 1")
            c = cons[0]
            if c.op_type == "Mul":
                s = par.get_initializer(c.input[1])
                if s is None or scale is not None:
                    raise FqhwError(f"unexpected Mul {c.name} behind the accelerator")
                scale = np.asarray(s, dtype=np.float64)
                back.append(("S", None))
            elif c.op_type in ("Reshape", "Flatten"):
                back.append(("R", tuple(par.get_tensor_shape(c.output[0]))[1:]))
            else:
                raise FqhwError(f"unexpected node behind the accelerator: {c.name} ({c.op_type})")
            t = c.output[0]
        if scale is None:
            scale = np.ones(1, dtype=np.float64)
            back.append(("S", None))
        return cls(nodes, in_name, out_name, front, df.get_tensor_shape(in_name), record, scale, back, build_dir)

    # ----------------------------------------------------------------- execution

    def run(self, images, batch_size: int = 256) -> dict[str, np.ndarray]:
        """`images`: uint8 (or integer) pixel codes, N x C x H x W. Returns int64 NCHW codes
        "input", "<layer>.act", the head accumulator "head.acc" (N, classes) and float64
        "logits" (accumulator times the output scale)."""
        images = np.asarray(images)
        if not np.issubdtype(images.dtype, np.integer):
            raise FqhwError(f"the simulator takes the uint8 pixel codes, not {images.dtype} values")
        if images.ndim != 4:
            raise FqhwError(f"images must be N x C x H x W, got shape {images.shape}")
        if images.size and (images.min() < 0 or images.max() > 255):
            raise FqhwError("pixel codes must lie in [0, 255]")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, images.shape[0], batch_size):
            for k, v in self._run_batch(images[i : i + batch_size]).items():
                parts.setdefault(k, []).append(v)
        if not parts:
            raise FqhwError("no images")
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}

    def _run_batch(self, x: np.ndarray) -> dict[str, np.ndarray]:
        n = x.shape[0]
        a = x.astype(np.int64)
        undo = []
        for kind, arg in self.front:
            if kind == "T":
                a = a.transpose(arg)
                undo.append(("T", list(np.argsort(arg))))
            else:
                undo.append(("R", a.shape[1:]))
                a = a.reshape((n, *arg))
        a = np.ascontiguousarray(a).reshape((n, *self.in_shape[1:]))
        seen = a
        for kind, arg in reversed(undo):
            seen = seen.transpose(arg) if kind == "T" else seen.reshape((n, *arg))
        out: dict[str, np.ndarray] = {"input": np.ascontiguousarray(seen)}
        ctx = {self.in_name: a}
        for node in self.nodes:
            r = node.fn(ctx[node.inp])
            if r.size != n * int(np.prod(node.out_shape)):
                raise FqhwError(f"FINN node {node.name}: {r.shape[1:]} values per image, the graph says {node.out_shape}")
            ctx[node.out] = r.reshape((n, *node.out_shape))
            key = self.record.get(node.out)
            if key is not None:
                r = ctx[node.out]
                out[key] = np.ascontiguousarray(r.transpose(0, 3, 1, 2)) if r.ndim == 4 else r
        acc = ctx[self.out_name]
        y = acc
        for kind, arg in self.back:
            if kind == "R":
                y = y.reshape((n, *arg))
            else:
                y = y.astype(np.float64) * self.out_scale
        out["logits"] = np.asarray(y, dtype=np.float64)
        return out


def _node_fn(df, node, layer_of_mvau: dict[str, str]):
    """(numpy function of the node's input, trace key or None) for one HW node."""
    from qonnx.custom_op.registry import getCustomOp

    op = node.op_type.replace("_hls", "").replace("_rtl", "")
    inst = getCustomOp(node)
    g = inst.get_nodeattr
    what = f"FINN node {node.name} ({node.op_type})"

    if op == "FMPadding":
        pad = list(g("Padding"))  # [top, left, bottom, right]
        if len(pad) != 4:
            raise FqhwError(f"{what}: padding {pad}")
        top, left, bottom, right = pad

        def fmpad(x):
            return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))

        return fmpad, None

    if op == "ConvolutionInputGenerator":
        k, s, d = list(g("ConvKernelDim")), list(g("Stride")), list(g("Dilation"))
        ifm, ofm = list(g("IFMDim")), list(g("OFMDim"))

        def im2col(x):
            r = _im2col(x, k, s, d)
            if list(r.shape[1:3]) != ofm or list(x.shape[1:3]) != ifm:
                raise FqhwError(f"{what}: {x.shape[1:3]} -> {r.shape[1:3]}, attributes say {ifm} -> {ofm}")
            return r

        return im2col, None

    if op in ("MVAU", "Thresholding"):
        if op == "MVAU":
            if int(g("binaryXnorMode")) or "BIPOLAR" in (g("inputDataType"), g("weightDataType"), g("outputDataType")):
                raise FqhwError(f"{what}: binary / bipolar MVAUs are not supported")
            mw, mh = int(g("MW")), int(g("MH"))
            w = _exact_int_array(df.get_initializer(node.input[1]), f"{what} weights")
            if w.shape != (mw, mh):
                raise FqhwError(f"{what}: weights of shape {w.shape}, MW x MH = {mw} x {mh}")
            no_act = int(g("noActivation")) == 1
            thr_name = node.input[2] if not no_act else None
            ln = layer_of_mvau.get(node.name)
            key = None if ln is None else (f"{ln}.acc" if no_act else f"{ln}.act")
        else:
            if g("outputDataType") == "BIPOLAR":
                raise FqhwError(f"{what}: bipolar outputs are not supported")
            w, no_act, thr_name, key = None, False, node.input[1], None
            mh = int(g("NumChannels"))
        thr = None
        if not no_act:
            thr = _int_thresholds(df.get_initializer(thr_name), mh, f"{what} thresholds")
        act_val = int(g("ActVal"))
        wmax = None if w is None else int(np.abs(w).sum(axis=0).max(initial=0))
        w64 = None if w is None or wmax >= 2**53 else w.astype(np.float64)

        def mvau(x):
            if w is not None:
                if x.shape[-1] != w.shape[0]:
                    raise FqhwError(f"{what}: input of {x.shape[-1]} values per vector, MW = {w.shape[0]}")
                # the largest |accumulator| any column can reach on this batch
                bound = wmax * max(-int(x.min(initial=0)), int(x.max(initial=0)))
                if bound >= 2**62:
                    raise FqhwError(f"{what}: accumulator may exceed int64")
                lead = x.shape[:-1]
                x2 = x.reshape(-1, x.shape[-1])
                if bound < 2**53 and w64 is not None:
                    # Exact in float64: every product and every partial sum, in any order, is
                    # an integer of magnitude <= bound < 2^53, which float64 holds exactly; this
                    # runs on BLAS, which numpy's integer matmul does not have.
                    acc = (x2.astype(np.float64) @ w64).astype(np.int64)
                else:
                    acc = np.einsum("nk,km->nm", x2, w)
                acc = acc.reshape((*lead, w.shape[1]))
            else:
                acc = x
            return acc if thr is None else _threshold(acc, thr, act_val)

        return mvau, key

    if op == "Pool":
        fnx = g("Function")
        k = list(g("KernelSize"))
        ch = int(g("Channels"))
        if fnx not in ("MaxPool", "AccPool"):
            raise FqhwError(f"{what}: pooling function {fnx} is not supported")

        def pool(x):
            t = x.reshape((*x.shape[:-1], k[0] * k[1], ch))
            return t.max(axis=-2) if fnx == "MaxPool" else t.sum(axis=-2)

        return pool, None

    if op == "StreamingMaxPool":
        pd = list(g("PoolDim"))
        if any(int(v) for v in (_safe(g, "CeilMode") or 0,)):
            raise FqhwError(f"{what}: ceil mode is not supported")

        def maxpool(x):
            n, h, w_, c = x.shape
            oh, ow = h // pd[0], w_ // pd[1]
            x = x[:, : oh * pd[0], : ow * pd[1], :]
            return x.reshape(n, oh, pd[0], ow, pd[1], c).max(axis=(2, 4))

        return maxpool, None

    if op == "GlobalAccPool":

        def gap(x):
            return x.sum(axis=(1, 2), keepdims=True)

        return gap, None

    raise FqhwError(f"{what}: the integer simulator does not support this node")


def _safe(g, name):
    try:
        return g(name)
    except Exception:  # noqa: BLE001 - an attribute this FINN version does not define
        return None
