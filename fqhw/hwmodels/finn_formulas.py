"""FINN's analytical estimates, one formula each (cycles, BRAM, URAM, LUT, DSP of an MVAU, a
sliding window, padding, pooling, thresholding), as finn-plus computes them for
estimate_layer_cycles.json / estimate_layer_resources.json. FinnCostModel
(fqhw.hwmodels.finn) prices layers with them; tests/test_hwmodels.py checks them node by
node against the installed finn-plus."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


# finn.util.basic.MAX_ALLOWED_AP_INT_W: widest ap_int an HLS node may use
MAX_ALLOWED_AP_INT_W = 8191


def divisors(n: int) -> list[int]:
    return list(_divisors(n))


@lru_cache(maxsize=None)
def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def dsp_block(part: str) -> str:
    """finn.util.basic.get_dsp_block."""
    if part[0:4] in ("xcvc", "xcve", "xcvp", "xcvm", "xqvc", "xqvm") or part[0:5] in ("xqrvc", "xcv80"):
        return "DSP58"  # Versal (finn.util.basic.is_versal); not one of the boards above
    if part[2] == "7":
        return "DSP48E1"
    return "DSP48E2"


def dsp_datapath_limits(block: str) -> tuple[int, int, int]:
    """finn.util.basic.get_dsp_datapath_limits: (activation, weight, accumulator) widths."""
    if block == "DSP58":
        return 24, 27, 58
    if block == "DSP48E2":
        return 18, 27, 48
    return 18, 25, 48


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@lru_cache(maxsize=None)
def acc_bits_worst_case(mw: int, w_bits: int, in_bits: int, in_signed: bool, last_node: bool = False) -> int:
    """Accumulator width from the data types alone, as MVAU.minimize_accumulator_width
    with datatype_only=True: signed weights of w_bits times inputs of in_bits, MW terms.
    A no-activation MVAU that is the last node is rounded up to a multiple of 8."""
    wmin, wmax = int_range(w_bits, True)
    vmin, vmax = int_range(in_bits, in_signed)
    # calculate_matvec_accumulator_range on all-wmin and all-wmax matrices
    lower = (mw * wmin * vmax, mw * wmin * vmin)
    upper = (mw * wmax * vmin, mw * wmax * vmax)
    acc_min = min(min(lower), min(upper))
    acc_max = max(max(lower), max(upper))
    if acc_min >= 0:
        bits = math.ceil(np.log2(acc_max + 1))
    else:
        bits = math.ceil(np.log2(max(-acc_min, 1 + acc_max)) + 1)
    if last_node and bits % 8:
        bits += 8 - bits % 8
    return int(bits)


def mvau_cycles(mw: int, mh: int, pe: int, simd: int, n_vectors: int) -> int:
    """MVAU.get_exp_cycles (TH = MMV = 1)."""
    return int((mh / pe) * (mw / simd) * n_vectors)


def mvau_bram(mw: int, mh: int, pe: int, simd: int, w_bits: int, mem_mode: str = "internal_decoupled", ram_style: str = "auto") -> int:
    """MVAU.bram_estimation (RAMB18 count for the weight memory)."""
    omega = (mw * mh) / (simd * pe)
    width = simd * w_bits * pe
    wmem = mw * mh // (pe * simd)
    if (
        (mem_mode == "internal_decoupled" and ram_style in ("distributed", "ultra"))
        or (mem_mode == "internal_embedded" and wmem <= 128)
        or mem_mode in ("external", "external_mem")
    ):
        return 0
    if width == 1:
        return math.ceil(omega / 16384)
    if width == 2:
        return math.ceil(omega / 8192)
    if width <= 4:
        return math.ceil(omega / 4096) * math.ceil(width / 4)
    if width <= 9:
        return math.ceil(omega / 2048) * math.ceil(width / 9)
    if width <= 18 or omega > 512:
        return math.ceil(omega / 1024) * math.ceil(width / 18)
    return math.ceil(omega / 512) * math.ceil(width / 36)


def mvau_uram(mw: int, mh: int, pe: int, simd: int, w_bits: int, mem_mode: str = "internal_decoupled", ram_style: str = "auto") -> int:
    """MVAU.uram_estimation."""
    omega = (mw * mh) / (simd * pe)
    width = simd * w_bits * pe
    wmem = mw * mh // (pe * simd)
    if (
        (mem_mode == "internal_decoupled" and ram_style != "ultra")
        or (mem_mode == "internal_embedded" and wmem <= 128)
        or mem_mode in ("external", "external_mem")
    ):
        return 0
    return math.ceil(width / 72) * math.ceil(omega / 4096)


def mvau_hls_lut(
    mw: int,
    mh: int,
    pe: int,
    simd: int,
    w_bits: int,
    in_bits: int,
    in_signed: bool,
    acc_dt_bits: int,
    out_bits: int | None,
    *,
    mem_mode: str = "internal_decoupled",
    ram_style: str = "auto",
    ram_style_thresholds: str = "auto",
    res_type: str = "lut",
) -> int:
    """MVAU_hls.lut_estimation (the FINN-R model: c0 + c1 * P * (mult + adder tree + acc +
    thresholds + comparators) + c2). out_bits None: no activation (no thresholds)."""
    P, Q, W, A = pe, simd, w_bits, in_bits
    c0, c1, c2 = 300, 1.1, 0
    wmem = mw * mh // (pe * simd)
    if (mem_mode == "internal_decoupled" and ram_style == "distributed") or (mem_mode == "internal_embedded" and wmem <= 128):
        c2 = (P * Q * W) * math.ceil(wmem / 64)
    mult_luts = 0 if res_type == "dsp" else Q * (2 * math.ceil((W + A) / 6) - 1) * (W + A)
    addertree_luts = (W + A) * (2 * Q - 1)
    alpha = math.log(mw, 2) + W + A - 1 - int(in_signed)
    acc_bits = min(acc_dt_bits, np.ceil(alpha + math.log(1 + pow(2, -alpha), 2) + 1))
    thr_luts = comp_luts = 0
    if out_bits is not None and ram_style_thresholds == "distributed":
        tmem = mh // pe
        thr_luts = (2**out_bits - 1) * acc_bits * math.ceil(tmem / 64)
        comp_luts = (2**out_bits - 1) * acc_bits
    return int(c0 + c1 * (P * (mult_luts + addertree_luts + acc_bits + thr_luts + comp_luts)) + c2)


def mvau_hls_dsp(pe: int, simd: int, w_bits: int, in_bits: int, res_type: str = "lut") -> int:
    """MVAU_hls.dsp_estimation."""
    if res_type == "dsp":
        return int(pe * simd * np.ceil((w_bits + in_bits) / 48))
    return 0


def mvau_rtl_dsp(pe: int, simd: int, block: str) -> int:
    """MVAU_rtl.dsp_estimation (its LUT estimate is 0)."""
    if block == "DSP58":
        return int(pe * np.ceil(simd / 3))
    return int(np.ceil(pe / 4) * simd)


def mvau_rtl_possible(
    has_act: bool, w_bits: int, in_bits: int, in_signed: bool, acc_out_bits: int, narrow_weights: bool, block: str
) -> bool:
    """SpecializeLayers' choice for an MVAU with no preferred_impl_style: RTL only without
    embedded thresholds, with weights and input of at least 4 bits, signed weights (narrow
    on DSP48E1) and widths inside the DSP datapath (_mvu_rtl_possible)."""
    if has_act:
        return False
    if w_bits < 4 or in_bits < 4:
        return False
    if not narrow_weights and block == "DSP48E1":
        return False
    max_act, max_weight, max_acc = dsp_datapath_limits(block)
    act_fits = (in_bits - int(in_signed)) < max_act
    return act_fits and w_bits <= max_weight and acc_out_bits <= max_acc


# sliding window (ConvolutionInputGenerator_rtl) -------------------------------------


@dataclass(frozen=True)
class SWG:
    """One ConvolutionInputGenerator_rtl (attributes as FINN names them)."""

    ifm_ch: int
    ifm_dim: tuple[int, int]
    ofm_dim: tuple[int, int]
    k: tuple[int, int]
    stride: tuple[int, int]
    simd: int
    in_bits: int
    depthwise: bool = False
    parallel_window: bool = False
    dilation: tuple[int, int] = (1, 1)
    ram_style: str = "distributed"

    def impl_style(self) -> str:
        kh, kw = self.k
        mmv_out = kh * kw if self.parallel_window else 1
        if mmv_out > 1 or (kh == 1 and kw == 1):
            return "parallel"
        return "default"

    def buffer_depth(self) -> int:
        kh, kw = self.k
        _, w = self.ifm_dim
        sh, sw = self.stride
        dh, dw = self.dilation
        cf = self.ifm_ch // self.simd
        if self.impl_style() == "default":
            min_size = ((kh - 1) * dh * w + (kw - 1) * dw + 1) * cf
            return min_size + max(0, ((sw - 1) - kh * kw) * cf) + max(0, ((sh - 1) * w - kh * kw) * cf)
        min_size = ((kh - 1) * dh * w + (kw - 1) * dw) * cf + 1
        return min_size + 1

    def cycles(self) -> int:
        cf = self.ifm_ch // self.simd
        ifm_h, ifm_w = self.ifm_dim
        ofm_h, ofm_w = self.ofm_dim
        kh, kw = self.k
        sh, sw = self.stride
        dh, dw = self.dilation
        if self.impl_style() == "parallel":
            return int(ifm_h * ifm_w * cf + 2)
        if ifm_h == 1 or ifm_w == 1:
            # 1D: normalise (D, 1) to (1, D)
            if ifm_w == 1:
                ifm_h, ifm_w = ifm_w, ifm_h
                ofm_h, ofm_w = ofm_w, ofm_h
                kh, kw = kw, kh
                sh, sw = sw, sh
            if self.depthwise:
                c_out = ofm_w * kw * cf + (cf - 1) * kw
                c_in = ifm_w * cf + cf * (kw - 1) * (sw - 1)
                return int(max(c_out, c_in) + 2)
            return int(ofm_w * kw * cf + 2)
        min_size = ((kh - 1) * dh * ifm_w + (kw - 1) * dw + 1) * cf
        write = ofm_w * kw * kh * cf
        read = sw * ifm_w * cf
        mx = max(write, read)
        if self.depthwise:
            mx += ofm_w * (sw - 1) * (cf - 1)
        cyc = min_size + ofm_h * mx
        if self.depthwise:
            cyc += (sh - 1) * ifm_w * cf
        return int(cyc)

    def lut(self) -> int:
        ram = 0
        if self.ram_style == "distributed":
            ram = int(self.simd * self.in_bits * math.ceil(self.buffer_depth() / 38))
        return 300 + ram

    def _line_buffers(self) -> tuple[int, int] | None:
        """(depth, count) of the buffers FINN estimates, None for none."""
        kh, kw = self.k
        ifm_h, ifm_w = self.ifm_dim
        dh, dw = self.dilation
        if self.impl_style() == "default":
            return self.buffer_depth(), 1
        if ifm_h == 1 or ifm_w == 1:
            return None
        kernel_width = (kw - 1) * dw + 1
        return (ifm_w - kernel_width) + ifm_w * (dh - 1), kh - 1

    def bram(self) -> int:
        if self.ram_style not in ("block", "auto"):
            return 0
        lb = self._line_buffers()
        if lb is None:
            return 0
        depth, count = lb
        width = self.simd * self.in_bits

        def ram_width(d: int) -> int:
            for limit, rw in ((512, 36), (1024, 18), (2048, 9), (4096, 4), (8192, 2)):
                if d <= limit:
                    return rw
            return 1

        cascade_depth = math.ceil(depth / 16384)
        cascade_width = math.ceil(width / ram_width(depth))
        savings = 0
        if depth > 16384:
            savings = cascade_width - math.ceil(width / ram_width(depth % 16384))
        return int((cascade_depth * cascade_width - savings) * count)

    def uram(self) -> int:
        if self.ram_style != "ultra":
            return 0
        lb = self._line_buffers()
        if lb is None:
            return 0
        depth, count = lb
        return int(math.ceil(depth / 4096) * math.ceil(self.simd * self.in_bits / 72) * count)


def fmpadding_cycles(img_dim: tuple[int, int], padding: tuple[int, int, int, int], channels: int, simd: int) -> int:
    """FMPadding.get_exp_cycles (FMPadding_rtl has no resource estimate: 0)."""
    oh = img_dim[0] + padding[0] + padding[2]
    ow = img_dim[1] + padding[1] + padding[3]
    return int((channels / simd) * 1 * oh * ow)


def pool_cycles(channels: int, pe: int, k: tuple[int, int], out_dim: tuple[int, int]) -> int:
    """Pool.get_exp_cycles (Pool_hls has no resource estimate: 0)."""
    return int(((channels * k[0] * k[1]) / pe) * out_dim[0] * out_dim[1] * 1)


# Thresholding_rtl ---------------------------------------------------------------------


# finn.util.memutil.mem_primitives_versal (FINN uses this list on every part)
_MEM_PRIMITIVES = (
    ("URAM_72x4096", 72, 4096),
    ("URAM_36x8192", 36, 8192),
    ("URAM_18x16384", 18, 16384),
    ("URAM_9x32768", 9, 32768),
    ("BRAM18_36x512", 36, 512),
    ("BRAM18_18x1024", 18, 1024),
    ("BRAM18_9x2048", 9, 2048),
    ("LUTRAM", 1, 64),
)


def _roundup(x: int, factor: int) -> int:
    if x < factor:
        return factor
    return x if x % factor == 0 else x + (factor - x % factor)


def thresholding_rtl_memory(channels: int, pe: int, thr_bits: int, out_bits: int) -> dict[str, int]:
    """Thresholding_rtl.get_memory_estimate: per output bit x, a memory of thr_bits x
    (C/PE * 2^x) per PE, each given the primitive with the least waste (first on ties)."""
    res: dict[str, int] = {}
    cf = channels // pe
    for x in range(out_bits):
        width, depth = thr_bits, cf * 2**x
        best = None
        for name, pw, pd in _MEM_PRIMITIVES:
            count = (_roundup(width, pw) // pw) * (_roundup(depth, pd) // pd)
            waste = count * pw * pd - width * depth
            if best is None or waste < best[2]:
                best = (name, count, waste)
        name, count, _ = best
        kind = "BRAM" if name.startswith("BRAM") else name.split("_")[0]
        res[kind] = res.get(kind, 0) + pe * count
    return res


def thresholding_cycles(channels: int, pe: int, n_vectors: int) -> int:
    """Thresholding.get_exp_cycles: product of the folded shape without its last dim."""
    return int(n_vectors * (channels // pe))
