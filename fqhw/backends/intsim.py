"""A fast integer simulator of the deployed model, built from a FINN dataflow graph or,
for an hls4ml build, from its power-of-two QONNX file (`IntegerSimulator.from_qonnx`: Conv,
ReLU + Quant, MaxPool, Flatten, MatMul on integer codes; see the section at the end).

`IntegerSimulator.from_build(build_dir)` reads the folded, specialised dataflow graph of an
estimate-only FINN build (fqhw.backends.finn_build) and the parent graph around it, and
turns every HW node into a numpy operation that runs a whole batch at once:

    FMPadding                  zero padding of the NHWC feature map
    ConvolutionInputGenerator  im2col: (N, OH, OW, KH*KW*C), channels fastest
    MVAU                       integer matmul with the integer weights, then (unless
                               noActivation) the integer thresholds: code = ActVal + the number
                               of thresholds t with acc >= t
    Thresholding               the same thresholds on a stream
    Pool (MaxPool / AccPool)   max / sum over the KH*KW window; a generator that only feeds a
                               Pool is fused with it (max / sum of KH*KW strided views, no im2col)
    StreamingMaxPool           max pooling by reshape (NHWC, kernel = stride)
    GlobalAccPool              sum over the pixels
    DuplicateStreams           a fork: its outputs are aliases of its input (no copy)
    StreamingConcat            a join: the streams side by side on the channel axis
    ElementwiseAdd             a join: the integer sum of two streams (a residual add)

The graph is a DAG, run in a topological order: the default CNN's is a chain, with
`fqhw compile --channel-groups` a grouped layer forks its shared window to one MVAU (+ pool)
per group and joins them with a StreamingConcat; a ResNet's (`from_finn_result`, the
finn_result.json of fqhw.backends.finn_generic) forks every block's input to its main
branch and shortcut and joins them with an ElementwiseAdd followed by Thresholding.

Weights, thresholds and attributes come from the ONNX nodes (qonnx ModelWrapper,
getCustomOp), never from the Brevitas model, so the simulator checks the build on its own.
Every value is an integer until the parent graph's output Mul: "logits" = head accumulator times
that scale (plus a ResNet's classifier bias, the parent's Add), in float64.

Why it is exact although it computes in floating point. The input pixel codes lie in [0, 255]
(`run` refuses anything else), so at construction every tensor gets a static integer interval
(interval arithmetic through the graph: the weights' positive and negative parts for an MVAU,
[ActVal, ActVal + #thresholds] after thresholds, window size times the input for a sum pool).
A tensor whose values stay below 2^24 in magnitude is carried as float32, below 2^53 as
float64 (both hold those integers exactly), else as int64. An MVAU multiplies on BLAS in the
narrowest float type whose exact range holds max_j sum_i |w_ij| * max|x|: every product and
every partial sum, in whatever order BLAS adds them, is an integer no larger than that, so no
rounding ever happens; beyond 2^53 it falls back to an int64 matmul.

The thresholds were the largest single cost (one binary search per channel: about 30 % of a
run of the previous version, the int64 <-> float64 conversions around its float64 matmuls
most of the rest; carrying float32 removed those). `_ThresholdTable` replaces the search by two table look-ups: the reachable thresholds of a
channel are split into buckets of width 2^k, with 2^k no larger than the smallest gap between
two distinct thresholds, so a bucket holds at most one distinct threshold value; the code is
the number of thresholds below the bucket, plus that value's multiplicity if acc reaches it.
The bucket index is (acc - base) * 2^-k, which is exact in floating point (an integer times a
power of two), floored. `_threshold_reference` is the plain per-channel binary search, kept as
the fallback and as the tests' reference.

`run` returns the integer tensors `finn_integer_trace` returns ("input", "<layer>.act",
"<layer>.acc" for an MVAU without activation, i.e. "head.acc"; NCHW codes, int64; channel
groups' "<layer>:g<k>.act" joined into "<layer>.act") plus "logits" (for a ResNet the keys
of finn_dataflow_integer_trace: "<block>.out", "<block>.shortcut", "fc.acc"); `run(..., trace=False)` returns only the output accumulator and "logits", which is
all a whole-data-set accuracy needs and spares writing every feature map out as int64.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fqhw.errors import FqhwError
from fqhw.onnxgraph import node_attr, node_attrs

# thresholds beyond this are "never reached" / "always reached"; every accumulator lies
# inside (|every partial sum| < 2^62 is checked per MVAU when it is built)
_THR_CLIP = 2**62

# the pixel codes `run` accepts: the origin of every static interval
_INPUT_RANGE = (0, 255)

# integers of magnitude below these are exact in float32 / float64
_EXACT = ((np.float32, 2**24), (np.float64, 2**53))

# at most this many entries (per table) for a layer's threshold buckets; beyond, the binary search
_MAX_TABLE_ENTRIES = 1 << 22

# values per chunk of an MVAU's output (accumulator + threshold temporaries stay in cache)
_CHUNK_VALUES = 1 << 17

# images per pass through the network when run() is not told (measured best on 2 cores:
# small enough that one pass's feature maps stay in the caches)
DEFAULT_BATCH_SIZE = 32


_BLAS_CONTROLLER = None


def _blas_threads(n: int | None):
    """A context that limits numpy's BLAS to `n` threads (None: leave it as it is).

    The simulator's products are tall and skinny (thousands of rows, 16-300 columns) and come
    in chunks; with OpenBLAS's default of one thread per core its threads spin between calls,
    and on a machine whose cores other processes also use that made a run 4-5x slower in
    wall-clock time (and 5x more CPU time) than one thread did. The products are a quarter of
    the work, so one thread gives up little even on an idle machine. threadpoolctl comes with
    scikit-learn (a dependency of finn-plus); without it the BLAS is left alone."""
    global _BLAS_CONTROLLER
    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - installed with finn-plus
        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=n, user_api="blas")


def _carrier(bound: int):
    """The narrowest dtype that holds every integer of magnitude <= bound exactly."""
    for dt, lim in _EXACT:
        if bound < lim:
            return dt
    return np.int64


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


def _threshold_reference(acc: np.ndarray, thr: np.ndarray, act_val: int) -> np.ndarray:
    """act_val + #{t in thr[c] : acc[..., c] >= t}, channels on the last axis (all int64):
    one binary search per channel over that channel's contiguous accumulators. The plain
    definition: the fallback of `_ThresholdTable` and the reference its tests compare with."""
    ch = thr.shape[0]
    by_channel = np.ascontiguousarray(np.moveaxis(acc, -1, 0)).reshape(ch, -1)
    out = np.empty_like(by_channel)
    for c in range(ch):
        out[c] = np.searchsorted(thr[c], by_channel[c], side="right")
    if act_val:
        out += act_val
    return np.moveaxis(out.reshape((ch, *acc.shape[:-1])), 0, -1)


class _ThresholdTable:
    """MultiThreshold by bucket look-up, equal to `_threshold_reference` on every accumulator
    inside the interval it was built for.

    Per channel c, with the accumulator known to lie in [lo_c, hi_c]: thresholds t <= lo_c
    are always reached (counted once, in the table), t > hi_c never; the reachable ones R_c,
    distinct values u_1 < ... < u_m, are cut into buckets [base + b*2^k, base + (b+1)*2^k)
    with base = u_1 and 2^k <= the smallest gap u_{i+1} - u_i, so that no bucket holds two
    distinct values. Slot 0 stands for acc < base, slot b + 1 for bucket b, and the slots past
    the last bucket for acc > u_m. With L[slot] = ActVal + #{t < start of slot} and V[slot] the
    one distinct threshold value in it (+inf when none),

        code = L[slot + (acc >= V[slot])]

    (the next slot's count adds that value's multiplicity). All channels share one flat table,
    channel c at offset c*S, so a batch is a few elementwise passes and two np.take calls:

        slot = int(clip((acc + 2^k_c - base_c) * 2^-k_c, 0, S - 1)) + c*S

    All of it is exact in the chosen float type when |acc| + |2^k_c - base_c| stays below its
    exact integer range (checked here; otherwise float64, otherwise the binary search): the sum
    is an integer in range, the product an integer times a power of two, clipping to
    non-negative integer bounds commutes with flooring, and the cast to int32 (truncation) is
    the floor of a non-negative value. The channel offset is added after the cast, on
    integers: added to the unfloored float it could round a fraction just below an integer up.
    Measured on one core, 255 thresholds per channel: about 3 ns per accumulator, against
    about 24 ns for the per-channel binary search with its transposes.
    """

    def __init__(self, thr: np.ndarray, act_val: int, acc_lo, acc_hi, acc_dtype, out_dtype):
        self.thr = np.asarray(thr, dtype=np.int64)
        self.act_val = int(act_val)
        self.out_dtype = out_dtype
        ch = self.thr.shape[0]
        lo = np.broadcast_to(np.asarray(acc_lo, dtype=np.int64), (ch,))
        hi = np.broadcast_to(np.asarray(acc_hi, dtype=np.int64), (ch,))
        below = (self.thr <= lo[:, None]).sum(axis=1)
        reach = (self.thr > lo[:, None]) & (self.thr <= hi[:, None])
        ks, bases, nb, rows = [], [], [], []
        for c in range(ch):
            r = self.thr[c][reach[c]]
            u = np.unique(r)
            k, base, b = 0, 0, 0
            if u.size:
                gap = int(np.diff(u).min()) if u.size > 1 else 1
                k = gap.bit_length() - 1  # 2^k <= gap
                base = int(u[0])
                b = ((int(u[-1]) - base) >> k) + 1
            ks.append(k)
            bases.append(base)
            nb.append(b)
            rows.append((r, u))
        slots = max(nb, default=0) + 2  # slot 0, the buckets, one past them
        self.mode = "reference"
        self.dtype = None
        if ch * slots > _MAX_TABLE_ENTRIES:
            return
        acc_abs = np.maximum(np.abs(lo), np.abs(hi))
        betas = [(1 << ks[c]) - bases[c] for c in range(ch)]
        need = max((int(acc_abs[c]) + abs(betas[c]) for c in range(ch)), default=0)
        for dt, lim in _EXACT:
            # float32 only where the accumulator already is: a cast up costs a pass, and
            # float64 arithmetic is not slower than a cast
            if need < lim and (dt is np.float64 or acc_dtype is np.float32):
                self.dtype = dt
                break
        if self.dtype is None:
            return
        self.mode = "bucket"
        L = np.empty((ch, slots), dtype=np.int64)
        V = np.full((ch, slots), np.inf, dtype=self.dtype)
        for c in range(ch):
            r, u = rows[c]
            first = self.act_val + int(below[c])
            L[c, :] = first + r.size
            L[c, 0] = first
            if u.size:
                k, base, b = ks[c], bases[c], nb[c]
                starts = base + (np.arange(b, dtype=np.int64) << k)  # slots 1..b
                L[c, 1 : b + 1] = first + np.searchsorted(r, starts, side="left")
                V[c, ((u - base) >> k) + 1] = u.astype(self.dtype)
        self.L = L.astype(out_dtype).ravel()
        self.V = V.ravel()
        self.beta = np.array(betas, dtype=self.dtype)
        self.inv = np.array([2.0**-k for k in ks], dtype=self.dtype)
        self.off = np.arange(ch, dtype=np.int32) * np.int32(slots)
        self.top = self.dtype(slots - 1)
        self.slots = slots

    def apply(self, acc: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Codes (out_dtype) of accumulators `acc` (..., C), channels last."""
        if self.mode == "reference":
            r = _threshold_reference(np.asarray(acc).astype(np.int64), self.thr, self.act_val)
            if out is None:
                return r.astype(self.out_dtype)
            out[...] = r
            return out
        a = acc if acc.dtype == self.dtype else acc.astype(self.dtype)
        t = a + self.beta
        t *= self.inv
        np.clip(t, 0, self.top, out=t)
        idx = t.astype(np.int32)
        idx += self.off
        # mode="wrap": every index is in range by construction, so skip numpy's range check
        idx += np.take(self.V, idx, mode="wrap") <= a
        return np.take(self.L, idx, out=out, mode="wrap")


def _im2col(x: np.ndarray, k, stride, dilation) -> np.ndarray:
    """NHWC -> (N, OH, OW, KH*KW*C) with the window's (ky, kx, c) flattened, c fastest: the
    layout of FINN's ConvolutionInputGenerator and of its MVAU weight rows. One copy of a
    strided view; with no dilation along x a window row's KW*C values are contiguous in x,
    which numpy's copy moves as one run (3-5x faster than a copy per window position)."""
    kh, kw = k
    sh, sw = stride
    dh, dw = dilation
    x = np.ascontiguousarray(x)
    n, h, w, c = x.shape
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    oh, ow = (h - eh) // sh + 1, (w - ew) // sw + 1
    if oh < 1 or ow < 1:
        raise FqhwError(f"a {kh}x{kw} window (dilation {dh}x{dw}) does not fit a {h}x{w} feature map")
    s0, s1, s2, s3 = x.strides
    win = np.lib.stride_tricks.as_strided(
        x, (n, oh, ow, kh, kw, c), (s0, sh * s1, sw * s2, dh * s1, dw * s2, s3), writeable=False
    )
    return np.ascontiguousarray(win).reshape(n, oh, ow, kh * kw * c)


def _window_reduce(x: np.ndarray, k, stride, dilation, fn: str, dtype) -> np.ndarray:
    """Max / sum over each KH x KW window of an NHWC map, as a running np.maximum / np.add of
    the KH*KW strided views: the same values as im2col followed by Pool, without writing the
    im2col matrix out."""
    kh, kw = k
    sh, sw = stride
    dh, dw = dilation
    n, h, w, c = x.shape
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    oh, ow = (h - eh) // sh + 1, (w - ew) // sw + 1
    out = None
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            v = x[:, y0 : y0 + (oh - 1) * sh + 1 : sh, x0 : x0 + (ow - 1) * sw + 1 : sw, :]
            if out is None:
                out = v.astype(dtype, copy=True)
            elif fn == "MaxPool":
                np.maximum(out, v, out=out)
            else:
                np.add(out, v, out=out, casting="unsafe")
    return out


@dataclass
class SimNode:
    """One step of the simulator: `fn` of the tensors named by `inp` (one name, or a tuple
    of names for a join: StreamingConcat, ElementwiseAdd) writing the tensor `out`. The
    nodes are kept in a topological order of the graph, so a run is one pass over them."""

    name: str
    op_type: str
    inp: str | tuple[str, ...]
    out: str
    fn: Callable[..., np.ndarray]
    out_shape: tuple  # the graph's shape of the output, without the batch axis
    interval: tuple = (None, None)  # static (lo, hi) of every output value
    dtype: type = np.int64  # the carrier of the output values

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.inp,) if isinstance(self.inp, str) else tuple(self.inp)


class IntegerSimulator:
    """The deployed integer model of one FINN build, vectorised over a batch with numpy."""

    def __init__(self, nodes, in_name, out_name, front, in_shape, record, out_scale, back, build_dir=None, in_dtype=np.int64,
                 key_signs: dict[str, np.ndarray] | None = None):
        self.nodes: list[SimNode] = nodes
        self.in_name = in_name  # the dataflow graph's input tensor
        self.out_name = out_name  # its output (the head accumulator)
        self.front = front  # layout ops in front of the accelerator: ("T", perm) / ("R", shape)
        self.in_shape = tuple(in_shape)  # the accelerator's input shape, batch 1
        self.record = record  # tensor name -> trace key ("<layer>.act" / "<layer>.acc")
        self.out_scale = out_scale  # float64 array broadcasting against the accumulator
        self.back = back  # layout ops after the accelerator, before/after the scale
        self.build_dir = build_dir
        self.in_dtype = in_dtype  # the carrier of the pixel codes
        # trace key -> int64 +-1 per output column, multiplied into that key's values
        self.key_signs = {k: np.asarray(v, dtype=np.int64).reshape(-1) for k, v in (key_signs or {}).items()}

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_build(cls, build_dir) -> "IntegerSimulator":
        """From a compile output folder (holding finn/) or a FINN build folder: the default
        CNN's (finn_build.json, fqhw.backends.finn_build, with or without channel groups) or
        a ResNet's (finn_result.json, fqhw.backends.finn_generic; see `from_finn_result`)."""
        from fqhw.backends.finn.common import FinnBuild

        build_dir = Path(build_dir)
        for fb in (build_dir, build_dir / "finn"):
            if (fb / "finn_build.json").exists():
                build = FinnBuild.load(fb)
                return cls.from_models(build.dataflow_model, build.parent_model, build.mvau_of_layer, build_dir=str(build_dir))
            if (fb / "finn_result.json").exists():
                return cls.from_finn_result(fb)
        raise FqhwError(
            f"{build_dir} holds no finn_build.json or finn_result.json (nor finn/finn_build.json, finn/finn_result.json): "
            "pass a compile output folder"
        )

    @classmethod
    def from_finn_result(cls, build_dir, qonnx_path=None) -> "IntegerSimulator":
        """From a ResNet's FINN build folder (finn_result.json of
        fqhw.backends.finn_generic.finn_dataflow_resnet with an allocation): its folded,
        specialised dataflow partition (MVAUs, Thresholding, ElementwiseAdd joins,
        DuplicateStreams forks, pooling, GlobalAccPool) and dataflow_parent.onnx around it.

        `qonnx_path` (default: model.qonnx.onnx beside the build folder, where fqhw compile
        writes it) is read for the MVAUs' weight codes only: FINN renames every node, so
        each MVAU is found by its weights, as finn_dataflow_integer_trace finds it, and the
        trace keys are that function's ("<layer>.act", "<block>.shortcut", "<block>.out",
        "fc.acc" with FINN's column signs undone)."""
        from qonnx.core.modelwrapper import ModelWrapper

        from fqhw.backends.finn.folding import match_mvaus_by_codes, qonnx_weight_codes
        from fqhw.backends.finn.residual import FinnResult, hw_keys

        build_dir = Path(build_dir)
        res = FinnResult.load(build_dir)
        if not res.dataflow_model:
            raise FqhwError(f"{build_dir / 'finn_result.json'} has no dataflow graph (FINN was run without an allocation); re-run fqhw compile")
        parent = build_dir / "dataflow_parent.onnx"
        for need in (Path(res.dataflow_model), parent):
            if not need.is_file():
                raise FqhwError(f"{need} is missing: the simulator of a ResNet build reads it; re-run fqhw compile")
        qonnx_path = Path(qonnx_path) if qonnx_path is not None else Path(build_dir).resolve().parent / "model.qonnx.onnx"
        if not qonnx_path.is_file():
            raise FqhwError(f"{qonnx_path} is missing: the simulator finds a ResNet build's MVAUs by the weights in it; re-run fqhw compile")
        df = ModelWrapper(res.dataflow_model)
        mvau_layer = match_mvaus_by_codes(df, qonnx_weight_codes(qonnx_path))
        keys = hw_keys(df, mvau_layer)
        signs = {keys[node]: sign for node, (_, sign) in mvau_layer.items() if keys[node].endswith(".acc")}
        mvau_of_layer = {layer: node for node, (layer, _) in mvau_layer.items()}
        return cls.from_models(df, ModelWrapper(str(parent)), mvau_of_layer, build_dir=str(build_dir), node_keys=keys, key_signs=signs)

    @classmethod
    def from_models(cls, dataflow, parent, mvau_of_layer: dict[str, str], build_dir=None,
                    node_keys: dict[str, str] | None = None, key_signs: dict[str, np.ndarray] | None = None) -> "IntegerSimulator":
        """From the dataflow graph and its parent (paths or qonnx ModelWrappers) and the map
        fqhw layer name -> MVAU node name (FinnBuild.mvau_of_layer).

        The graph is a DAG, not necessarily a chain: a DuplicateStreams fork makes its
        outputs aliases of its input (no copy: no simulator node writes into its input),
        a StreamingConcat / ElementwiseAdd join reads several tensors, and the nodes run in
        a topological order. `node_keys` (node name -> trace key) names tensors the MVAU
        rule does not (a ResNet's "<block>.out" Thresholding) or overrides it; `key_signs`
        (trace key -> +-1 per output column) undoes the column signs FINN moved into an
        MVAU's weights, for keys that must equal the QONNX trace (a ResNet's "fc.acc")."""
        from qonnx.core.modelwrapper import ModelWrapper

        df = dataflow if isinstance(dataflow, ModelWrapper) else ModelWrapper(str(dataflow))
        par = parent if isinstance(parent, ModelWrapper) else ModelWrapper(str(parent))
        layer_of_mvau = {v: k for k, v in mvau_of_layer.items()}
        node_keys = dict(node_keys or {})
        if len(df.graph.input) != 1 or len(df.graph.output) != 1:
            raise FqhwError("the dataflow graph must have one input and one output")
        in_name, out_name = df.graph.input[0].name, df.graph.output[0].name

        in_dtype = _carrier(max(abs(v) for v in _INPUT_RANGE))
        interval = {in_name: _INPUT_RANGE}
        dtype = {in_name: in_dtype}
        alias: dict[str, str] = {}  # a DuplicateStreams output -> the tensor it copies
        nodes: list[SimNode] = []
        record: dict[str, str] = {}
        fused = set()

        def stream(node, t):
            src = alias.get(t, t)
            if src not in interval:
                raise FqhwError(f"FINN node {node.name}: its input {t} is not computed by the nodes before it")
            return src

        for node in _topological(df):
            if node.name in fused:
                continue
            op = _base_op(node.op_type)
            if op == "DuplicateStreams":
                src = stream(node, node.input[0])
                for o in node.output:
                    alias[o] = src
                continue
            if op in _JOIN_OPS:
                srcs = tuple(stream(node, t) for t in node.input if df.get_initializer(t) is None)
                fn, iv, dt = _join_fn(df, node, [interval[t] for t in srcs], [dtype[t] for t in srcs])
                out_t, name, op_type, inp, key = node.output[0], node.name, node.op_type, srcs, None
            else:
                src = stream(node, node.input[0])
                inp = src
                pool = _fusable_pool(df, node)
                if pool is not None:
                    fn, iv, dt = _fused_pool_fn(df, node, pool, interval[src], dtype[src])
                    fused.add(pool.name)
                    out_t, name, op_type = pool.output[0], f"{node.name}+{pool.name}", f"{node.op_type}+{pool.op_type}"
                    key = None
                else:
                    fn, key, iv, dt = _node_fn(df, node, layer_of_mvau, interval[src], dtype[src])
                    out_t, name, op_type = node.output[0], node.name, node.op_type
            key = node_keys.get(node.name, key)
            oshape = tuple(df.get_tensor_shape(out_t))[1:]
            nodes.append(SimNode(name, op_type, inp, out_t, fn, oshape, iv, dt))
            interval[out_t], dtype[out_t] = iv, dt
            if key is not None:
                record[out_t] = key
        names = {n for sn in nodes for n in sn.name.split("+")}
        missing = set(mvau_of_layer.values()) - names
        if missing:
            raise FqhwError(f"MVAU nodes {sorted(missing)} of the build are not in its dataflow graph")
        out_name = alias.get(out_name, out_name)
        if out_name not in interval:
            raise FqhwError(f"the dataflow graph's output {out_name} is not computed by its nodes")

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
                front.append(("T", node_attr(p, "perm")))
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
            elif c.op_type == "Add" and scale is not None:
                # the classifier bias a ResNet's float tail adds after the output scale
                b = par.get_initializer(c.input[1])
                if b is None:
                    raise FqhwError(f"unexpected Add {c.name} behind the accelerator: its second operand is not a constant")
                back.append(("B", np.asarray(b, dtype=np.float64)))
            elif c.op_type in ("Reshape", "Flatten"):
                back.append(("R", tuple(par.get_tensor_shape(c.output[0]))[1:]))
            else:
                raise FqhwError(f"unexpected node behind the accelerator: {c.name} ({c.op_type})")
            t = c.output[0]
        if scale is None:
            scale = np.ones(1, dtype=np.float64)
            back.append(("S", None))
        return cls(nodes, in_name, out_name, front, df.get_tensor_shape(in_name), record, scale, back, build_dir, in_dtype,
                   key_signs=key_signs)

    @classmethod
    def from_qonnx(cls, path) -> "IntegerSimulator":
        """From a power-of-two QONNX file: the `model.qonnx.onnx` of an hls4ml build
        (fqhw.quant.po2), where every Quant node has one power-of-two scale and zero point 0.

        Why the QONNX file and not the hls4ml project: it is the model every backend of such a
        build starts from, it states the integer arithmetic exactly (codes times 2^e), and
        reading it needs neither hls4ml nor the compiled C simulation, so the simulator checks
        the C simulation instead of repeating it. A FINN build's QONNX file has float scales
        (absorbed into FINN's thresholds) and is refused here: simulate it with `from_build`.
        See `_po2_graph` for the ops and why every value is exact."""
        return _po2_graph(cls, Path(path))

    # ----------------------------------------------------------------- execution

    def run(self, images, batch_size: int | None = None, trace: bool = True, blas_threads: int | None = 1) -> dict[str, np.ndarray]:
        """`images`: uint8 (or integer) pixel codes, N x C x H x W. Returns int64 NCHW codes
        "input", "<layer>.act", the head accumulator "head.acc" (N, classes) and float64
        "logits" (accumulator times the output scale); with trace=False only the output
        accumulator and "logits". `batch_size`: images per pass (DEFAULT_BATCH_SIZE when
        None); `blas_threads`: numpy's BLAS threads during the run (None: as they are; see
        _blas_threads). Both change the speed, never a value."""
        images = np.asarray(images)
        if not np.issubdtype(images.dtype, np.integer):
            raise FqhwError(f"the simulator takes the uint8 pixel codes, not {images.dtype} values")
        if images.ndim != 4:
            raise FqhwError(f"images must be N x C x H x W, got shape {images.shape}")
        if images.size and (images.min() < _INPUT_RANGE[0] or images.max() > _INPUT_RANGE[1]):
            raise FqhwError("pixel codes must lie in [0, 255]")
        if batch_size is None:
            batch_size = DEFAULT_BATCH_SIZE
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        n = images.shape[0]
        if n == 0:
            raise FqhwError("no images")
        out: dict[str, np.ndarray] = {}
        with _blas_threads(blas_threads):
            for i in range(0, n, batch_size):
                self._run_batch(images[i : i + batch_size], i, n, out, trace)
        if any(":g" in k for k in out):
            from fqhw.units import merge_group_keys

            # channel groups: "<layer>:g<k>.act" joined into "<layer>.act", as FINN's and
            # qonnx's traces have them
            out = merge_group_keys(out)
        return out

    def _run_batch(self, x: np.ndarray, start: int, total: int, out: dict, trace: bool) -> None:
        """Run images start .. start + len(x) and write their results into `out` (allocated
        on the first batch, for all `total` images)."""
        n = x.shape[0]
        stop = start + n

        def put(key, value, dtype=np.int64):
            # value: (n, ...) in any layout; written as C-ordered `dtype` (exact: integers)
            if key not in out:
                out[key] = np.empty((total, *value.shape[1:]), dtype=dtype)
            np.copyto(out[key][start:stop], value, casting="unsafe")

        a = x
        undo = []
        for kind, arg in self.front:
            if kind == "T":
                a = a.transpose(arg)
                undo.append(("T", list(np.argsort(arg))))
            else:
                undo.append(("R", a.shape[1:]))
                a = a.reshape((n, *arg))
        a = np.ascontiguousarray(a, dtype=self.in_dtype).reshape((n, *self.in_shape[1:]))
        if trace:
            seen = a
            for kind, arg in reversed(undo):
                seen = seen.transpose(arg) if kind == "T" else seen.reshape((n, *arg))
            put("input", seen)
        ctx = {self.in_name: a}
        for node in self.nodes:
            r = node.fn(*[ctx[t] for t in node.inputs])
            if r.size != n * int(np.prod(node.out_shape)):
                raise FqhwError(f"FINN node {node.name}: {r.shape[1:]} values per image, the graph says {node.out_shape}")
            r = r.reshape((n, *node.out_shape))
            ctx[node.out] = r
            key = self.record.get(node.out)
            if key is not None and (trace or node.out == self.out_name):
                if key.endswith(".acc") and r.ndim == 4 and r.shape[1:3] == (1, 1):
                    r = r.reshape(n, -1)  # an accumulator behind a global pool: (N, classes)
                sign = self.key_signs.get(key)
                if sign is not None:
                    r = r.astype(np.int64) * sign  # exact: integers, |values| < 2^62
                put(key, r.transpose(0, 3, 1, 2) if r.ndim == 4 else r)
        y = ctx[self.out_name]
        for kind, arg in self.back:
            if kind == "R":
                y = y.reshape((n, *arg))
            elif kind == "B":
                y = y + arg
            else:
                y = y.astype(np.float64) * self.out_scale
        put("logits", np.asarray(y, dtype=np.float64).reshape(n, -1), np.float64)


_JOIN_OPS = ("StreamingConcat", "ElementwiseAdd")


def _base_op(op_type: str) -> str:
    """The generic FINN op of a specialised node type (MVAU_hls -> MVAU)."""
    for suffix in ("_hls", "_rtl"):
        if op_type.endswith(suffix):
            return op_type[: -len(suffix)]
    return op_type


def _topological(df) -> list:
    """The graph's nodes in a topological order, the graph's own order wherever it already
    is one (FINN keeps its graphs sorted; a fork's branches may come in any order)."""
    produced = {o for n in df.graph.node for o in n.output}
    ready = {i.name for i in df.graph.input}
    todo, order = list(df.graph.node), []
    while todo:
        rest = []
        for n in todo:
            if all(t in ready or t not in produced for t in n.input if t):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(todo):
            raise FqhwError(f"the dataflow graph has a cycle through {', '.join(n.name for n in rest[:3])}")
        todo = rest
    return order


def _join_fn(df, node, in_ivs: list, in_dtypes: list):
    """(fn of the stream inputs, output interval, output carrier) of a join node:

    StreamingConcat  the streams side by side on the channel (last) axis, in input order
    ElementwiseAdd   the integer sum of two streams of one shape (a residual join), or of a
                     stream and an integer constant broadcast against it

    FINN's Python execution of both is plain numpy (np.concatenate; lhs + rhs in int64), no
    wrap-around or saturation, so the output interval is the union / the sum of the
    inputs' and the carrier the narrowest that holds it."""
    from qonnx.custom_op.registry import getCustomOp

    op = _base_op(node.op_type)
    what = f"FINN node {node.name} ({node.op_type})"
    g = getCustomOp(node).get_nodeattr
    if op == "StreamingConcat":
        chans = [int(c) for c in g("ChannelsPerStream")]
        if len(chans) != len(in_ivs) or len(in_ivs) != len(node.input):
            raise FqhwError(f"{what}: {len(node.input)} inputs ({len(in_ivs)} streams), ChannelsPerStream {chans}")
        iv = (min(int(v[0]) for v in in_ivs), max(int(v[1]) for v in in_ivs))
        dt = _carrier(max(abs(iv[0]), abs(iv[1])))

        def concat(*xs):
            for x, c in zip(xs, chans):
                if x.shape[-1] != c:
                    raise FqhwError(f"{what}: a stream of {x.shape[-1]} channels, ChannelsPerStream says {c}")
            return np.concatenate([x if x.dtype == dt else x.astype(dt) for x in xs], axis=-1)

        return concat, iv, dt

    if op == "ElementwiseAdd":
        consts = [t for t in node.input if df.get_initializer(t) is not None]
        if len(node.input) != 2 or len(in_ivs) + len(consts) != 2 or not in_ivs:
            raise FqhwError(f"{what}: an add of {len(in_ivs)} streams and {len(consts)} constants is not supported")
        if consts:
            c = _exact_int_array(df.get_initializer(consts[0]), f"{what} constant")
            lo = int(in_ivs[0][0]) + int(c.min(initial=0))
            hi = int(in_ivs[0][1]) + int(c.max(initial=0))
        else:
            c = None
            lo, hi = int(in_ivs[0][0]) + int(in_ivs[1][0]), int(in_ivs[0][1]) + int(in_ivs[1][1])
        bound = max(abs(lo), abs(hi))
        if bound >= _THR_CLIP:
            raise FqhwError(f"{what}: the sum may exceed 2^62 in magnitude")
        dt = _carrier(bound)
        cd = None if c is None else c.astype(dt)

        def add(*xs):
            if cd is not None:
                return np.add(xs[0], cd, dtype=dt, casting="unsafe")  # integers in range: exact
            if xs[0].shape != xs[1].shape:
                raise FqhwError(f"{what}: operands of shapes {xs[0].shape[1:]} and {xs[1].shape[1:]}")
            return np.add(xs[0], xs[1], dtype=dt, casting="unsafe")

        return add, (lo, hi), dt

    raise FqhwError(f"{what}: the integer simulator does not support this join")


def _fusable_pool(df, node):
    """The Pool node a ConvolutionInputGenerator feeds, when it is that generator's only
    consumer (and the generator's output is not the graph's output); else None."""
    if node.op_type.replace("_hls", "").replace("_rtl", "") != "ConvolutionInputGenerator":
        return None
    cons = df.find_consumers(node.output[0]) or []
    if len(cons) != 1 or cons[0].op_type.replace("_hls", "").replace("_rtl", "") != "Pool":
        return None
    if node.output[0] in {o.name for o in df.graph.output}:
        return None
    return cons[0]


def _conv_geometry(g, what):
    k, s, d = list(g("ConvKernelDim")), list(g("Stride")), list(g("Dilation"))
    ifm, ofm = list(g("IFMDim")), list(g("OFMDim"))
    if len(k) != 2 or len(s) != 2 or len(d) != 2:
        raise FqhwError(f"{what}: kernel {k}, stride {s}, dilation {d}: 2-D expected")
    return k, s, d, ifm, ofm


def _check_geometry(x, r, ifm, ofm, what):
    if list(r.shape[1:3]) != ofm or list(x.shape[1:3]) != ifm:
        raise FqhwError(f"{what}: {x.shape[1:3]} -> {r.shape[1:3]}, attributes say {ifm} -> {ofm}")


def _pool_interval(fnx, kk, iv):
    lo, hi = iv
    return (lo, hi) if fnx == "MaxPool" else (kk * lo, kk * hi)


def _fused_pool_fn(df, gen, pool, in_iv, in_dtype):
    """ConvolutionInputGenerator + Pool as one windowed max / sum."""
    from qonnx.custom_op.registry import getCustomOp

    what = f"FINN nodes {gen.name} + {pool.name}"
    gg, pg = getCustomOp(gen).get_nodeattr, getCustomOp(pool).get_nodeattr
    k, s, d, ifm, ofm = _conv_geometry(gg, what)
    fnx = pg("Function")
    if fnx not in ("MaxPool", "AccPool"):
        raise FqhwError(f"{what}: pooling function {fnx} is not supported")
    if list(pg("KernelSize")) != k:
        raise FqhwError(f"{what}: pool kernel {list(pg('KernelSize'))}, generator kernel {k}")
    iv = _pool_interval(fnx, k[0] * k[1], in_iv)
    dt = in_dtype if fnx == "MaxPool" else _carrier(max(abs(iv[0]), abs(iv[1])))

    def pool_fn(x):
        r = _window_reduce(x, k, s, d, fnx, dt)
        _check_geometry(x, r, ifm, ofm, what)
        return r

    return pool_fn, iv, dt


def _column_sums(w: np.ndarray) -> tuple[list[int], list[int]]:
    """(sum of the positive entries, sum of the negative entries) of each column of the int64
    matrix `w`, as Python integers: in int64 where no sum can overflow it, else exactly in
    Python integers (slow, for weights no real model has)."""
    pos = np.where(w > 0, w, 0)
    neg = w - pos
    if float(np.abs(w).sum(axis=0, dtype=np.float64).max(initial=0.0)) >= 2.0**62:
        pos, neg = pos.astype(object), neg.astype(object)
    return [int(v) for v in pos.sum(axis=0)], [int(v) for v in neg.sum(axis=0)]


def _node_fn(df, node, layer_of_mvau: dict[str, str], in_iv, in_dtype):
    """(numpy function of the node's input, trace key or None, static output interval,
    output carrier dtype) for one HW node, given its input's interval and carrier."""
    from qonnx.custom_op.registry import getCustomOp

    op = node.op_type.replace("_hls", "").replace("_rtl", "")
    inst = getCustomOp(node)
    g = inst.get_nodeattr
    what = f"FINN node {node.name} ({node.op_type})"
    xlo, xhi = int(in_iv[0]), int(in_iv[1])

    if op == "FMPadding":
        pad = list(g("Padding"))  # [top, left, bottom, right]
        if len(pad) != 4:
            raise FqhwError(f"{what}: padding {pad}")
        top, left, bottom, right = pad

        def fmpad(x):
            n, h, w_, c = x.shape
            r = np.zeros((n, h + top + bottom, w_ + left + right, c), dtype=x.dtype)
            r[:, top : top + h, left : left + w_, :] = x
            return r

        return fmpad, None, (min(xlo, 0), max(xhi, 0)), in_dtype

    if op == "ConvolutionInputGenerator":
        k, s, d, ifm, ofm = _conv_geometry(g, what)

        def im2col(x):
            r = _im2col(x, k, s, d)
            _check_geometry(x, r, ifm, ofm, what)
            return r

        return im2col, None, (xlo, xhi), in_dtype

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
            # per output column: the accumulator's interval (positive weights times the low
            # end of x plus negative weights times the high end, and the other way round),
            # and the bound on |every partial sum|, all in Python integers
            pos, neg = _column_sums(w)
            acc_lo = [p * xlo + q * xhi for p, q in zip(pos, neg)]
            acc_hi = [p * xhi + q * xlo for p, q in zip(pos, neg)]
            xabs = max(abs(xlo), abs(xhi))
            partial = max((p - q for p, q in zip(pos, neg)), default=0) * xabs
            if partial >= _THR_CLIP:
                raise FqhwError(f"{what}: the accumulator may exceed 2^62 in magnitude")
            gemm_dtype = _carrier(partial)
            wg = w.astype(gemm_dtype)
        else:
            if g("outputDataType") == "BIPOLAR":
                raise FqhwError(f"{what}: bipolar outputs are not supported")
            w, no_act, thr_name, key = None, False, node.input[1], None
            mh = int(g("NumChannels"))
            if max(abs(xlo), abs(xhi)) >= _THR_CLIP:
                raise FqhwError(f"{what}: the input may exceed 2^62 in magnitude")
            acc_lo, acc_hi = [xlo] * mh, [xhi] * mh
            gemm_dtype = in_dtype
        act_val = int(g("ActVal"))
        if no_act:
            table = None
            out_iv = (min(acc_lo, default=0), max(acc_hi, default=0))
            out_dtype = gemm_dtype
        else:
            thr = _int_thresholds(df.get_initializer(thr_name), mh, f"{what} thresholds")
            out_iv = (act_val, act_val + thr.shape[1])
            out_dtype = _carrier(max(abs(out_iv[0]), abs(out_iv[1])))
            # bounds of the accumulator as int64 for the table (|acc| < 2^62 checked above)
            table = _ThresholdTable(thr, act_val, np.array(acc_lo, dtype=np.int64),
                                    np.array(acc_hi, dtype=np.int64), gemm_dtype, out_dtype)
        rows = max(1, _CHUNK_VALUES // max(mh, 1))

        def mvau(x):
            if w is not None and x.shape[-1] != w.shape[0]:
                raise FqhwError(f"{what}: input of {x.shape[-1]} values per vector, MW = {w.shape[0]}")
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            res = np.empty((x2.shape[0], mh), dtype=out_dtype)
            for i in range(0, x2.shape[0], rows):
                xa = x2[i : i + rows]
                if xa.dtype != gemm_dtype:
                    xa = xa.astype(gemm_dtype)
                # float32 / float64 on BLAS: exact, every partial sum is an integer below the
                # type's exact range (see the module docstring); int64 otherwise
                acc = xa @ wg if w is not None else xa
                if table is None:
                    res[i : i + rows] = acc
                else:
                    table.apply(acc, out=res[i : i + rows])
            return res.reshape((*lead, mh))

        return mvau, key, out_iv, out_dtype

    if op == "Pool":
        fnx = g("Function")
        k = list(g("KernelSize"))
        ch = int(g("Channels"))
        if fnx not in ("MaxPool", "AccPool"):
            raise FqhwError(f"{what}: pooling function {fnx} is not supported")
        iv = _pool_interval(fnx, k[0] * k[1], (xlo, xhi))
        dt = in_dtype if fnx == "MaxPool" else _carrier(max(abs(iv[0]), abs(iv[1])))

        def pool(x):
            t = x.reshape((*x.shape[:-1], k[0] * k[1], ch))
            return t.max(axis=-2) if fnx == "MaxPool" else t.sum(axis=-2, dtype=dt)

        return pool, None, iv, dt

    if op == "StreamingMaxPool":
        pd = list(g("PoolDim"))
        if any(int(v) for v in (_safe(g, "CeilMode") or 0,)):
            raise FqhwError(f"{what}: ceil mode is not supported")

        def maxpool(x):
            n, h, w_, c = x.shape
            oh, ow = h // pd[0], w_ // pd[1]
            x = x[:, : oh * pd[0], : ow * pd[1], :]
            return x.reshape(n, oh, pd[0], ow, pd[1], c).max(axis=(2, 4))

        return maxpool, None, (xlo, xhi), in_dtype

    if op == "GlobalAccPool":
        shp = df.get_tensor_shape(node.input[0])
        pix = int(np.prod(shp[1:-1]))
        iv = (pix * xlo, pix * xhi)
        dt = _carrier(max(abs(iv[0]), abs(iv[1])))

        def gap(x):
            return x.sum(axis=(1, 2), keepdims=True, dtype=dt)

        return gap, None, iv, dt

    raise FqhwError(f"{what}: the integer simulator does not support this node")


def _safe(g, name):
    try:
        return g(name)
    except Exception:  # noqa: BLE001 - an attribute this FINN version does not define
        return None


# --------------------------------------------------------------------------- power-of-two QONNX
#
# A QONNX model quantized with power-of-two scales (fqhw.quant.po2, the hls4ml scheme) is
# already integer arithmetic: every tensor is integer codes times 2^e. A Conv / MatMul of
# codes c_x * 2^ex and c_w * 2^ew is the integer accumulator sum c_x c_w times 2^(ex + ew)
# (plus the bias, whose codes sit on that grid); a Quant of it to 2^eq is
# clip(round_half_even(acc * 2^(ex + ew - eq))), and acc * 2^k is an integer times a power
# of two, exact in floating point whenever acc is; max pooling, flattening and ReLU act on
# the codes. So the simulator carries codes only, in the same carriers as the FINN route
# (float32 / float64 below their exact integer range, from static intervals; int64 beyond),
# and the rounding is numpy's rint, which rounds half to even like qonnx, Brevitas and
# hls4ml's AP_RND_CONV.


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
    out_dtype = _carrier(max(abs(iv[0]), abs(iv[1])))
    bound = max(abs(int(x.interval[0])), abs(int(x.interval[1])))
    scaled = bound if d >= 0 else bound << -d
    work = None
    for dt, lim in _EXACT:
        # the input's own float type when it holds both the input and the scaled values
        # (no cast), else float64, else the integer path
        if max(bound, scaled) < lim and (dt is np.float64 or x.dtype is np.float32):
            work = dt
            break
    if work is None and scaled >= _THR_CLIP:
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
    pos, neg = _column_sums(wm)
    b = [0] * wm.shape[1] if bias is None else [int(v) for v in bias]
    acc_lo = [p * xlo + q * xhi + c for p, q, c in zip(pos, neg, b)]
    acc_hi = [p * xhi + q * xlo + c for p, q, c in zip(pos, neg, b)]
    xabs = max(abs(xlo), abs(xhi))
    partial = max((p - q for p, q in zip(pos, neg)), default=0) * xabs
    bound = max([partial] + [abs(v) for v in acc_lo + acc_hi])
    if bound >= _THR_CLIP:
        raise FqhwError(f"{what}: the accumulator may exceed 2^62 in magnitude")
    dt = _carrier(bound)
    wg = wm.astype(dt)
    bg = None if bias is None or not np.any(bias) else np.asarray(bias, dtype=np.int64).astype(dt)
    mh = wm.shape[1]
    rows = max(1, _CHUNK_VALUES // max(mh, 1))

    def linear(x):
        if x.shape[-1] != wg.shape[0]:
            raise FqhwError(f"{what}: input of {x.shape[-1]} values per vector, the weights take {wg.shape[0]}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        res = np.empty((x2.shape[0], mh), dtype=dt)
        for i in range(0, x2.shape[0], rows):
            xa = x2[i : i + rows]
            if xa.dtype != dt:
                xa = xa.astype(dt)
            np.matmul(xa, wg, out=res[i : i + rows])
            if bg is not None:
                res[i : i + rows] += bg
        return res.reshape((*lead, mh))

    return linear, (min(acc_lo, default=0), max(acc_hi, default=0)), dt


def _po2_graph(cls, path: Path):
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
    if 2.0 ** in_q["exp"] != INPUT_SCALE or in_q["lo"] > _INPUT_RANGE[0] or in_q["hi"] < _INPUT_RANGE[1]:
        raise FqhwError(f"{path}: the input quantizer (scale 2^{in_q['exp']}, codes {in_q['lo']}..{in_q['hi']}) is not the identity on pixel codes")
    in_dtype = _carrier(max(abs(v) for v in _INPUT_RANGE))
    in_name = act_quants[0].output[0]
    live: dict[str, _Dyadic] = {in_name: _Dyadic(in_name, in_q["exp"], _INPUT_RANGE, in_dtype, (h_in, w_in, c_in), "nhwc", producer="Quant")}
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
                return lin(_im2col(t, k, s, dl))

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
            fn = (lambda t, k=k, s=s, dl=dl, dt=x.dtype: _window_reduce(t, k, s, dl, "MaxPool", dt))
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
