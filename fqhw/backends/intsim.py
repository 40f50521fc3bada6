"""A fast integer simulator of the deployed model, built from a FINN dataflow graph.

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

Weights, thresholds and attributes come from the ONNX nodes (qonnx ModelWrapper,
getCustomOp), never from the Brevitas model, so the simulator checks the build on its own.
Every value is an integer until the parent graph's output Mul: "logits" = head accumulator times
that scale, in float64.

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
"<layer>.acc" for an MVAU without activation, i.e. "head.acc"; NCHW codes, int64) plus
"logits"; `run(..., trace=False)` returns only the output accumulator and "logits", which is
all a whole-data-set accuracy needs and spares writing every feature map out as int64.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fqhw.errors import FqhwError

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
    name: str
    op_type: str
    inp: str
    out: str
    fn: Callable[[np.ndarray], np.ndarray]
    out_shape: tuple  # the graph's shape of the output, without the batch axis
    interval: tuple = (None, None)  # static (lo, hi) of every output value
    dtype: type = np.int64  # the carrier of the output values


class IntegerSimulator:
    """The deployed integer model of one FINN build, vectorised over a batch with numpy."""

    def __init__(self, nodes, in_name, out_name, front, in_shape, record, out_scale, back, build_dir=None, in_dtype=np.int64):
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
        if len(df.graph.input) != 1 or len(df.graph.output) != 1:
            raise FqhwError("the dataflow graph must have one input and one output")
        in_name, out_name = df.graph.input[0].name, df.graph.output[0].name

        in_dtype = _carrier(max(abs(v) for v in _INPUT_RANGE))
        interval = {in_name: _INPUT_RANGE}
        dtype = {in_name: in_dtype}
        nodes: list[SimNode] = []
        record: dict[str, str] = {}
        graph_nodes = list(df.graph.node)
        fused = set()
        for i, node in enumerate(graph_nodes):
            if node.name in fused:
                continue
            src = node.input[0]
            if src not in interval:
                raise FqhwError(f"FINN node {node.name}: its input {src} is not computed before it (graph not in order)")
            pool = _fusable_pool(df, node)
            if pool is not None:
                fn, iv, dt = _fused_pool_fn(df, node, pool, interval[src], dtype[src])
                fused.add(pool.name)
                out_t, name, op_type = pool.output[0], f"{node.name}+{pool.name}", f"{node.op_type}+{pool.op_type}"
                key = None
            else:
                fn, key, iv, dt = _node_fn(df, node, layer_of_mvau, interval[src], dtype[src])
                out_t, name, op_type = node.output[0], node.name, node.op_type
            oshape = tuple(df.get_tensor_shape(out_t))[1:]
            nodes.append(SimNode(name, op_type, src, out_t, fn, oshape, iv, dt))
            interval[out_t], dtype[out_t] = iv, dt
            if key is not None:
                record[out_t] = key
        names = {n for sn in nodes for n in sn.name.split("+")}
        missing = set(mvau_of_layer.values()) - names
        if missing:
            raise FqhwError(f"MVAU nodes {sorted(missing)} of the build are not in its dataflow graph")
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
        return cls(nodes, in_name, out_name, front, df.get_tensor_shape(in_name), record, scale, back, build_dir, in_dtype)

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
            r = node.fn(ctx[node.inp])
            if r.size != n * int(np.prod(node.out_shape)):
                raise FqhwError(f"FINN node {node.name}: {r.shape[1:]} values per image, the graph says {node.out_shape}")
            r = r.reshape((n, *node.out_shape))
            ctx[node.out] = r
            key = self.record.get(node.out)
            if key is not None and (trace or node.out == self.out_name):
                put(key, r.transpose(0, 3, 1, 2) if r.ndim == 4 else r)
        y = ctx[self.out_name]
        for kind, arg in self.back:
            if kind == "R":
                y = y.reshape((n, *arg))
            else:
                y = y.astype(np.float64) * self.out_scale
        put("logits", np.asarray(y, dtype=np.float64), np.float64)


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
