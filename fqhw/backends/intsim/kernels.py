"""The integer simulator's numpy kernels: the exact carriers (float32 / float64 below
their exact integer range, int64 beyond), integer thresholds (`ThresholdTable`, and
`threshold_reference`, the plain binary search), im2col and window reductions, and
`SimNode`, one operation of a simulated graph (see fqhw.backends.intsim)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from fqhw.errors import FqhwError

# thresholds beyond this are "never reached" / "always reached"; every accumulator lies
# inside (|every partial sum| < 2^62 is checked per MVAU when it is built)
THR_CLIP = 2**62

# the pixel codes `run` accepts: the origin of every static interval
INPUT_RANGE = (0, 255)

# integers of magnitude below these are exact in float32 / float64
EXACT = ((np.float32, 2**24), (np.float64, 2**53))

# at most this many entries (per table) for a layer's threshold buckets; beyond, the binary search
MAX_TABLE_ENTRIES = 1 << 22

# values per chunk of an MVAU's output (accumulator + threshold temporaries stay in cache)
CHUNK_VALUES = 1 << 17


def carrier(bound: int):
    """The narrowest dtype that holds every integer of magnitude <= bound exactly."""
    for dt, lim in EXACT:
        if bound < lim:
            return dt
    return np.int64


def exact_int_array(v, what: str) -> np.ndarray:
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


def int_thresholds(thr, channels: int, what: str) -> np.ndarray:
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
    t = np.clip(np.ceil(t), -float(THR_CLIP), float(THR_CLIP))
    t = np.sort(t.astype(np.int64), axis=1)
    return np.broadcast_to(t, (channels, t.shape[1])).copy()


def threshold_reference(acc: np.ndarray, thr: np.ndarray, act_val: int) -> np.ndarray:
    """act_val + #{t in thr[c] : acc[..., c] >= t}, channels on the last axis (all int64):
    one binary search per channel over that channel's contiguous accumulators. The plain
    definition: the fallback of `ThresholdTable` and the reference its tests compare with."""
    ch = thr.shape[0]
    by_channel = np.ascontiguousarray(np.moveaxis(acc, -1, 0)).reshape(ch, -1)
    out = np.empty_like(by_channel)
    for c in range(ch):
        out[c] = np.searchsorted(thr[c], by_channel[c], side="right")
    if act_val:
        out += act_val
    return np.moveaxis(out.reshape((ch, *acc.shape[:-1])), 0, -1)


class ThresholdTable:
    """MultiThreshold by bucket look-up, equal to `threshold_reference` on every accumulator
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
        if ch * slots > MAX_TABLE_ENTRIES:
            return
        acc_abs = np.maximum(np.abs(lo), np.abs(hi))
        betas = [(1 << ks[c]) - bases[c] for c in range(ch)]
        need = max((int(acc_abs[c]) + abs(betas[c]) for c in range(ch)), default=0)
        for dt, lim in EXACT:
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
            r = threshold_reference(np.asarray(acc).astype(np.int64), self.thr, self.act_val)
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


def im2col(x: np.ndarray, k, stride, dilation) -> np.ndarray:
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


def window_reduce(x: np.ndarray, k, stride, dilation, fn: str, dtype) -> np.ndarray:
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


def by_rows(x: np.ndarray, mh: int, in_dtype, out_dtype, step: Callable[[np.ndarray, np.ndarray], None]) -> np.ndarray:
    """The vectors of x (..., MW) through `step(chunk, out)`, CHUNK_VALUES output values at a
    time (so that each chunk stays in cache), each chunk cast to `in_dtype` first; `step`
    writes the chunk's (rows, mh) result into `out`. Returns (..., mh) of `out_dtype`."""
    rows = max(1, CHUNK_VALUES // max(mh, 1))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    res = np.empty((x2.shape[0], mh), dtype=out_dtype)
    for i in range(0, x2.shape[0], rows):
        xa = x2[i : i + rows]
        step(xa if xa.dtype == in_dtype else xa.astype(in_dtype), res[i : i + rows])
    return res.reshape((*lead, mh))


def column_sums(w: np.ndarray) -> tuple[list[int], list[int]]:
    """(sum of the positive entries, sum of the negative entries) of each column of the int64
    matrix `w`, as Python integers: in int64 where no sum can overflow it, else exactly in
    Python integers (slow, for weights no real model has)."""
    pos = np.where(w > 0, w, 0)
    neg = w - pos
    if float(np.abs(w).sum(axis=0, dtype=np.float64).max(initial=0.0)) >= 2.0**62:
        pos, neg = pos.astype(object), neg.astype(object)
    return [int(v) for v in pos.sum(axis=0)], [int(v) for v in neg.sum(axis=0)]


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

