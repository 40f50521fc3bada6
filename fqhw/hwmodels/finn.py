"""FINN dataflow cost model: what finn-plus 1.6.1 builds for each layer, priced with the
analytical estimates finn-plus itself reports (estimate_layer_cycles.json,
estimate_layer_resources.json): the same formulas, checked node by node against the
installed finn-plus in tests/test_hwmodels.py.

What FINN builds with its default settings (standalone_thresholds=False, mem_mode
internal_decoupled, ram_style auto, ram_style_thresholds auto, sliding-window ram_style
distributed), after SpecializeLayers:

  conv layer (K x K, padding p, stride s), followed by a max pool (k, stride t):
    FMPadding_rtl                   (only when p > 0)
    ConvolutionInputGenerator_rtl   the sliding window (depthwise=0)
    MVAU_hls                        MatMul with BN + ReLU + requantisation as embedded
                                    thresholds: an MVAU with thresholds never gets the RTL
                                    backend
    ConvolutionInputGenerator_rtl   depthwise=1, feeding
    Pool_hls                        MaxPool (finn-plus has no StreamingMaxPool any more)
  linear layer with an output activation: MVAU_hls with thresholds
  classifier head (no activation): MVAU_rtl (DSPs, no LUT estimate) when weights and input
    are >= 4 bits, the weights are signed and narrow-range (DSP48E1 parts need narrow
    weights; Brevitas' default weight quantizers are narrow) and the widths fit the DSP
    datapath; otherwise MVAU_hls
  network input: fqhw's FINN backend feeds the uint8 pixel codes, the 8-bit input quantizer
    becomes a Mul that streamlining absorbs, so nothing is built (input_mode="absorbed");
    a float input would instead get a standalone Thresholding_rtl (input_mode="thresholding")

Folding: the allocator picks each MVAU's (PE, SIMD); the other units of the layer are
folded here, and fqhw's FINN backend applies exactly this folding (it reads `layer_units`):
just enough that none is slower than the layer's MVAU, with widths that are multiples of
the MVAU's (window and padding share a SIMD | C_in that is a multiple of the MVAU's SIMD,
else C_in, switching the window to parallel_window mode if it is still too slow; the pool
and its window share a PE | C_out that is a multiple of the MVAU's PE). `layer_units`
returns every unit with those attributes. Width converters and FIFOs, which FINN inserts
only when it generates hardware, are in neither FINN's estimate reports nor this model.

Channel groups (fqhw.network.split_channel_groups): each group is its own MVAU (and pool);
the groups read one input stream, so the padding and sliding window are priced once, with
group 0 (folded to keep up with group 0's MVAU; a stream duplicator is not priced).

Widths FINN derives from the trained weights: its flow minimises each MVAU's weight and
accumulator types from the actual values. Before training we only have the data types, so
this model uses the worst case of the types (MinimizeAccumulatorWidth(datatype_only=True));
FINN's LUT estimate takes the minimum of that and its own alpha bound, so the model is never
below FINN's number for the trained weights and usually equal or a few LUTs above.
"""
from __future__ import annotations

import math

import numpy as np

from fqhw.errors import FqhwError
from fqhw.hwmodels.base import LayerCost, TargetLimits
from fqhw.hwmodels.finn_boards import BOARDS, DEFAULT_UTILISATION, PRICED
from fqhw.hwmodels.finn_formulas import (
    MAX_ALLOWED_AP_INT_W,
    SWG,
    acc_bits_worst_case,
    divisors,
    dsp_block,
    fmpadding_cycles,
    mvau_bram,
    mvau_cycles,
    mvau_hls_dsp,
    mvau_hls_lut,
    mvau_rtl_dsp,
    mvau_rtl_possible,
    mvau_uram,
    pool_cycles,
    thresholding_cycles,
    thresholding_rtl_memory,
)
from fqhw.network import LayerSpec, NetworkSpec


# ------------------------------------------------------------------ FINN helpers


# ------------------------------------------------------------------ the cost model


class FinnCostModel:
    """FINN dataflow on one board; implements fqhw.hwmodels.base.CostModel."""

    prices_by_shape = True  # a layer's price depends on its shape, not its name

    def __init__(
        self,
        board: str = "pynq-z2",
        clock_ns: float = 10.0,
        *,
        utilisation: dict[str, float] | None = None,
        input_mode: str = "absorbed",
        input_threshold_bits: int = 32,
        narrow_weights: bool = True,
        mem_mode: str = "internal_decoupled",
        ram_style: str = "auto",
        ram_style_thresholds: str = "auto",
        swg_ram_style: str = "distributed",
        head_is_last_node: bool = True,
    ):
        key = board.lower()
        if key not in BOARDS:
            raise FqhwError(f"unknown FINN board {board!r}: known boards are {', '.join(sorted(BOARDS))}")
        if clock_ns <= 0:
            raise FqhwError(f"clock period {clock_ns} ns must be positive")
        if input_mode not in ("thresholding", "absorbed"):
            raise FqhwError(f"input_mode {input_mode!r} must be 'thresholding' or 'absorbed'")
        self.board = BOARDS[key]
        self.clock_ns = float(clock_ns)
        self.part = self.board.part
        self.dsp_block = dsp_block(self.part)
        self.input_mode = input_mode
        self.input_threshold_bits = input_threshold_bits
        self.narrow_weights = narrow_weights
        self.mem_mode = mem_mode
        self.ram_style = ram_style
        self.ram_style_thresholds = ram_style_thresholds
        self.swg_ram_style = swg_ram_style
        self.head_is_last_node = head_is_last_node
        self._cache: dict = {}  # folded padding / window / pool units, by (layer, bits, target)
        self._layers: dict[int, LayerSpec] = {}  # keeps the cached layers alive (keys use id())
        self._last_mvau: tuple | None = None  # (key, unit): buildable() then layer_cost()
        self.limits = TargetLimits(
            name=self.board.name,
            part=self.part,
            clock_hz=1e9 / self.clock_ns,
            totals=dict(self.board.totals),
            utilisation=dict(DEFAULT_UTILISATION if utilisation is None else utilisation),
        )

    def __repr__(self) -> str:
        return f"FinnCostModel({self.board.name!r}, clock_ns={self.clock_ns})"

    # ---------------------------------------------------------------- folding

    def folding_options(self, layer: LayerSpec) -> list[tuple[int, int]]:
        """Every MVAU folding FINN accepts: PE | MH, SIMD | MW. The MVAU's SIMD need not
        divide C_in: the sliding window has its own SIMD | C_in (see `layer_units`) and FINN
        puts a width converter between the two when their widths differ."""
        return [(pe, simd) for pe in divisors(layer.mh) for simd in divisors(layer.mw)]

    def buildable(self, layer: LayerSpec, weight_bits: int, in_bits: int, out_bits: int | None, pe: int, simd: int) -> bool:
        """False where an HLS node would need an ap_int wider than FINN allows (8191 bits)."""
        mv = self._mvau_unit(layer, weight_bits, in_bits, out_bits, pe, simd, False)
        units = [mv]
        if out_bits is not None:
            units += self._pool_units(layer, out_bits, mv["cycles"], pe)
        return all(u["ap_int_max_w"] <= MAX_ALLOWED_AP_INT_W for u in units if u["op_type"].endswith("_hls"))

    # ---------------------------------------------------------------- units

    def _layer_key(self, layer: LayerSpec) -> int:
        k = id(layer)
        if self._layers.get(k) is not layer:
            self._layers[k] = layer
        return k

    def _mvau_unit(self, layer: LayerSpec, w: int, a_in: int, a_out: int | None, pe: int, simd: int, in_signed: bool) -> dict:
        key = (self._layer_key(layer), w, a_in, a_out, pe, simd, in_signed)
        if self._last_mvau is not None and self._last_mvau[0] == key:
            return self._last_mvau[1]
        unit = self._mvau_unit_uncached(layer, w, a_in, a_out, pe, simd, in_signed)
        self._last_mvau = (key, unit)
        return unit

    def _mvau_unit_uncached(self, layer: LayerSpec, w: int, a_in: int, a_out: int | None, pe: int, simd: int, in_signed: bool) -> dict:
        if layer.mh % pe or layer.mw % simd:
            raise FqhwError(f"{layer.name}: PE {pe} must divide MH {layer.mh} and SIMD {simd} must divide MW {layer.mw}")
        has_act = a_out is not None
        acc_dt = acc_bits_worst_case(layer.mw, w, a_in, in_signed, last_node=(not has_act) and self.head_is_last_node)
        n_vec = layer.out_pixels
        rtl = mvau_rtl_possible(has_act, w, a_in, in_signed, acc_dt, self.narrow_weights, self.dsp_block)
        out_bits = a_out if has_act else acc_dt
        if rtl:
            op, lut, dsp = "MVAU_rtl", 0, mvau_rtl_dsp(pe, simd, self.dsp_block)
        else:
            op = "MVAU_hls"
            lut = mvau_hls_lut(
                layer.mw, layer.mh, pe, simd, w, a_in, in_signed, acc_dt, a_out,
                mem_mode=self.mem_mode, ram_style=self.ram_style, ram_style_thresholds=self.ram_style_thresholds,
            )
            dsp = mvau_hls_dsp(pe, simd, w, a_in)
        wstream = pe * simd * w if self.mem_mode in ("internal_decoupled", "external", "external_mem") else 0
        return {
            "op_type": op,
            "role": "mvau",
            "attrs": {
                "MW": layer.mw, "MH": layer.mh, "PE": pe, "SIMD": simd, "numInputVectors": n_vec,
                "weight_bits": w, "in_bits": a_in, "out_bits": out_bits, "acc_bits": acc_dt,
                "noActivation": int(not has_act), "mem_mode": self.mem_mode, "ram_style": self.ram_style,
                "ram_style_thresholds": self.ram_style_thresholds,
            },
            "cycles": mvau_cycles(layer.mw, layer.mh, pe, simd, n_vec),
            "LUT": lut,
            "BRAM_18K": mvau_bram(layer.mw, layer.mh, pe, simd, w, self.mem_mode, self.ram_style),
            "URAM": mvau_uram(layer.mw, layer.mh, pe, simd, w, self.mem_mode, self.ram_style),
            "DSP": dsp,
            "ap_int_max_w": max(simd * a_in, pe * out_bits, wstream, simd * w),
        }

    def layer_units(
        self, layer: LayerSpec, weight_bits: int, in_bits: int, out_bits: int | None, pe: int, simd: int, in_signed: bool = False
    ) -> list[dict]:
        """The HW nodes FINN builds for the layer, in stream order, each with its folding
        attributes, cycles and resources (FINN's estimate functions)."""
        mv = self._mvau_unit(layer, weight_bits, in_bits, out_bits, pe, simd, in_signed)
        target = mv["cycles"]
        before = self._window_units(layer, in_bits, target, simd) if not layer.group_index else ()
        after = self._pool_units(layer, out_bits, target, pe) if out_bits is not None else ()
        return [*before, mv, *after]

    def _window_units(self, layer: LayerSpec, in_bits: int, target: int, mvau_simd: int) -> tuple[dict, ...]:
        """Padding and sliding window in front of a conv's MVAU, sharing one SIMD: the
        smallest divisor of C_in that is a multiple of the MVAU's SIMD (so the streams'
        widths match) and keeps up with the MVAU, else C_in; a window at SIMD = C_in that
        is still slower runs in parallel_window mode (a whole K x K window per cycle)."""
        key = ("window", self._layer_key(layer), in_bits, target, mvau_simd)
        if key in self._cache:
            return self._cache[key]
        units: list[dict] = []
        needs_window = layer.kind == "conv" and (layer.kernel != 1 or layer.stride != 1 or layer.padding != 0)
        if needs_window:
            c = layer.in_channels
            h, w = layer.in_hw
            p = layer.padding
            pads = (p, p, p, p)
            ifm = (h + 2 * p, w + 2 * p)

            def swg(s: int, pw: bool = False) -> SWG:
                return SWG(
                    ifm_ch=c, ifm_dim=ifm, ofm_dim=tuple(layer.out_hw), k=(layer.kernel, layer.kernel),
                    stride=(layer.stride, layer.stride), simd=s, in_bits=in_bits, parallel_window=pw,
                    ram_style=self.swg_ram_style,
                )

            def slowest(s: int) -> int:
                return max(swg(s).cycles(), fmpadding_cycles((h, w), pads, c, s) if p > 0 else 0)

            skey = ("window_simd", self._layer_key(layer), target, mvau_simd)  # the search does not depend on the bits
            s_win = self._cache.get(skey)
            if s_win is None:
                cands = [d for d in divisors(c) if d % mvau_simd == 0] or [c]
                if c not in cands:
                    cands.append(c)
                s_win = cands[-1]
                for s_win in cands:
                    if slowest(s_win) <= target:
                        break
                self._cache[skey] = s_win
            pw = s_win == c and layer.kernel > 1 and swg(s_win).cycles() > target
            ukey = ("window_units", self._layer_key(layer), in_bits, s_win, pw)  # what the units depend on
            if ukey in self._cache:
                self._cache[key] = self._cache[ukey]
                return self._cache[key]
            if p > 0:
                units.append(
                    {
                        "op_type": "FMPadding_rtl",
                        "role": "padding",
                        "attrs": {"ImgDim": [h, w], "Padding": list(pads), "NumChannels": c, "SIMD": s_win, "in_bits": in_bits},
                        "cycles": fmpadding_cycles((h, w), pads, c, s_win),
                        "LUT": 0, "BRAM_18K": 0, "URAM": 0, "DSP": 0,
                        "ap_int_max_w": 0,
                    }
                )
            units.append(self._swg_unit(swg(s_win, pw=pw), "window"))
            self._cache[ukey] = tuple(units)
        self._cache[key] = tuple(units)
        return self._cache[key]

    def _pool_units(self, layer: LayerSpec, out_bits: int, target: int, mvau_pe: int) -> tuple[dict, ...]:
        """Max pool after the MVAU: a depthwise sliding window and Pool_hls sharing one
        folding, the smallest divisor of C_out that is a multiple of the MVAU's PE and keeps
        up with the MVAU (else C_out)."""
        key = ("pool", self._layer_key(layer), out_bits, target, mvau_pe)
        if key in self._cache:
            return self._cache[key]
        units: list[dict] = []
        if layer.pool_kernel:
            cp = layer.mh
            k = (layer.pool_kernel, layer.pool_kernel)
            odim = tuple(layer.pool_out_hw)

            def dw(s: int) -> SWG:
                return SWG(
                    ifm_ch=cp, ifm_dim=tuple(layer.out_hw), ofm_dim=odim, k=k,
                    stride=(layer.pool_stride, layer.pool_stride), simd=s, in_bits=out_bits, depthwise=True,
                    ram_style=self.swg_ram_style,
                )

            skey = ("pool_pe", self._layer_key(layer), target, mvau_pe)  # the search does not depend on the bits
            pe_pool = self._cache.get(skey)
            if pe_pool is None:
                cands = [d for d in divisors(cp) if d % mvau_pe == 0] or [cp]
                pe_pool = cands[-1]
                for pe_pool in cands:
                    if max(dw(pe_pool).cycles(), pool_cycles(cp, pe_pool, k, odim)) <= target:
                        break
                self._cache[skey] = pe_pool
            units.append(self._swg_unit(dw(pe_pool), "pool_window"))
            units.append(
                {
                    "op_type": "Pool_hls",
                    "role": "pool",
                    "attrs": {"Channels": cp, "PE": pe_pool, "KernelSize": list(k), "OutImgDims": list(odim), "Function": "MaxPool", "in_bits": out_bits},
                    "cycles": pool_cycles(cp, pe_pool, k, odim),
                    "LUT": 0, "BRAM_18K": 0, "URAM": 0, "DSP": 0,
                    "ap_int_max_w": pe_pool * out_bits,
                }
            )
        self._cache[key] = tuple(units)
        return self._cache[key]

    def _swg_unit(self, s: SWG, role: str) -> dict:
        return {
            "op_type": "ConvolutionInputGenerator_rtl",
            "role": role,
            "attrs": {
                "IFMChannels": s.ifm_ch, "IFMDim": list(s.ifm_dim), "OFMDim": list(s.ofm_dim), "ConvKernelDim": list(s.k),
                "Stride": list(s.stride), "SIMD": s.simd, "depthwise": int(s.depthwise), "parallel_window": int(s.parallel_window),
                "ram_style": s.ram_style, "in_bits": s.in_bits,
            },
            "cycles": s.cycles(),
            "LUT": s.lut(),
            "BRAM_18K": s.bram(),
            "URAM": s.uram(),
            "DSP": 0,
            "ap_int_max_w": 0,
        }

    def layer_cost(
        self, layer: LayerSpec, weight_bits: int, in_bits: int, out_bits: int | None, pe: int, simd: int, in_signed: bool = False
    ) -> LayerCost:
        units = self.layer_units(layer, weight_bits, in_bits, out_bits, pe, simd, in_signed)
        return _sum_units(units)

    # ---------------------------------------------------------------- every choice at once

    def price_table(self, layer: LayerSpec, w_vals, ai_vals, ao_vals, folds, resources, metrics=()):
        """Every buildable (weight bits, input bits, output bits, folding) of the layer,
        priced as layer_cost prices it (the same numbers, exactly: tests check every row),
        for the allocator: (rows, n) with rows float64 (w, a_in, a_out or -1, fold index,
        cycles, *resources) and n the number of rows. The MVAU's estimates are evaluated
        for all foldings at once with numpy, in the same floating-point order as the
        scalar functions; the padding, sliding window and pool units come from the same
        (cached) methods as layer_cost's."""
        if metrics:
            raise ValueError(f"FINN prices no {', '.join(metrics)}")
        folds = list(folds)
        P = np.array([f[0] for f in folds], dtype=np.int64)
        Q = np.array([f[1] for f in folds], dtype=np.int64)
        if np.any(layer.mh % P) or np.any(layer.mw % Q):
            raise FqhwError(f"{layer.name}: PE must divide MH {layer.mh} and SIMD must divide MW {layer.mw}")
        mw, mh, n_vec = layer.mw, layer.mh, layer.out_pixels
        idx = np.arange(len(folds))
        mv_cycles = ((mh / P) * (mw / Q) * n_vec).astype(np.int64)
        omega = (mw * mh) / (Q * P)
        wmem = (mw * mh) // (P * Q)
        cols = {r: k for k, r in enumerate(resources)}

        def units_arrays(unit_lists):
            cyc = np.array([max([u["cycles"] for u in us], default=0) for us in unit_lists], dtype=np.int64)
            res = {r: np.array([sum(u[r] for u in us) for us in unit_lists], dtype=np.int64) for r in PRICED}
            ap = np.array([max([u["ap_int_max_w"] for u in us if u["op_type"].endswith("_hls")], default=0) for us in unit_lists],
                          dtype=np.int64)
            return cyc, res, ap

        window = {
            ai: units_arrays([self._window_units(layer, ai, int(c), int(q)) if not layer.group_index else () for c, q in zip(mv_cycles, Q)])
            for ai in ai_vals
        }
        pool = {
            ao: units_arrays([self._pool_units(layer, ao, int(c), int(pe)) for c, pe in zip(mv_cycles, P)])
            for ao in ao_vals if ao is not None
        }
        rows = []
        for w in w_vals:
            width = Q * w * P
            bram = self._bram_vec(omega, width, wmem)
            uram = self._uram_vec(omega, width, wmem)
            wstream = P * Q * w if self.mem_mode in ("internal_decoupled", "external", "external_mem") else np.zeros_like(P)
            for ai in ai_vals:
                wcyc, wres, _ = window[ai]
                for ao in ao_vals:
                    has_act = ao is not None
                    acc_dt = acc_bits_worst_case(mw, w, ai, False, last_node=(not has_act) and self.head_is_last_node)
                    rtl = mvau_rtl_possible(has_act, w, ai, False, acc_dt, self.narrow_weights, self.dsp_block)
                    out_bits = ao if has_act else acc_dt
                    if rtl:
                        lut = np.zeros_like(P)
                        dsp = P * np.ceil(Q / 3).astype(np.int64) if self.dsp_block == "DSP58" else np.ceil(P / 4).astype(np.int64) * Q
                        ok = np.ones(len(folds), dtype=bool)
                    else:
                        lut = self._hls_lut_vec(layer, P, Q, w, ai, acc_dt, ao, wmem)
                        dsp = np.zeros_like(P)
                        ap = np.maximum(np.maximum(Q * ai, P * out_bits), np.maximum(wstream, Q * w))
                        ok = ap <= MAX_ALLOWED_AP_INT_W
                    cyc = np.maximum(mv_cycles, wcyc)
                    total = {"LUT": lut + wres["LUT"], "BRAM_18K": bram + wres["BRAM_18K"], "URAM": uram + wres["URAM"], "DSP": dsp + wres["DSP"]}
                    if has_act:
                        pcyc, pres, pap = pool[ao]
                        cyc = np.maximum(cyc, pcyc)
                        ok &= pap <= MAX_ALLOWED_AP_INT_W
                        total = {r: total[r] + pres[r] for r in PRICED}
                    k = int(np.count_nonzero(ok))
                    if not k:
                        continue
                    block = np.empty((k, 5 + len(resources)), dtype=np.float64)
                    block[:, 0] = w
                    block[:, 1] = ai
                    block[:, 2] = ao if has_act else -1
                    block[:, 3] = idx[ok]
                    block[:, 4] = cyc[ok]
                    for r, c in cols.items():
                        block[:, 5 + c] = total[r][ok]
                    rows.append(block)
        if not rows:
            return np.zeros((0, 5 + len(resources))), 0
        out = np.concatenate(rows)
        return out, len(out)

    def _bram_vec(self, omega: np.ndarray, width: np.ndarray, wmem: np.ndarray) -> np.ndarray:
        """mvau_bram for every folding."""
        out = np.select(
            [width == 1, width == 2, width <= 4, width <= 9, (width <= 18) | (omega > 512)],
            [
                np.ceil(omega / 16384),
                np.ceil(omega / 8192),
                np.ceil(omega / 4096) * np.ceil(width / 4),
                np.ceil(omega / 2048) * np.ceil(width / 9),
                np.ceil(omega / 1024) * np.ceil(width / 18),
            ],
            np.ceil(omega / 512) * np.ceil(width / 36),
        ).astype(np.int64)
        mm, rs = self.mem_mode, self.ram_style
        if (mm == "internal_decoupled" and rs in ("distributed", "ultra")) or mm in ("external", "external_mem"):
            return np.zeros_like(out)
        if mm == "internal_embedded":
            out = np.where(wmem <= 128, 0, out)
        return out

    def _uram_vec(self, omega: np.ndarray, width: np.ndarray, wmem: np.ndarray) -> np.ndarray:
        """mvau_uram for every folding."""
        out = (np.ceil(width / 72) * np.ceil(omega / 4096)).astype(np.int64)
        mm, rs = self.mem_mode, self.ram_style
        if (mm == "internal_decoupled" and rs != "ultra") or mm in ("external", "external_mem"):
            return np.zeros_like(out)
        if mm == "internal_embedded":
            out = np.where(wmem <= 128, 0, out)
        return out

    def _hls_lut_vec(self, layer: LayerSpec, P, Q, W: int, A: int, acc_dt_bits: int, out_bits: int | None, wmem) -> np.ndarray:
        """mvau_hls_lut for every folding (res_type lut, in_signed False), term by term in
        the scalar function's order."""
        c0, c1 = 300, 1.1
        mm = self.mem_mode
        if mm == "internal_decoupled" and self.ram_style == "distributed":
            c2 = (P * Q * W) * np.ceil(wmem / 64).astype(np.int64)
        elif mm == "internal_embedded":
            c2 = np.where(wmem <= 128, (P * Q * W) * np.ceil(wmem / 64).astype(np.int64), 0)
        else:
            c2 = 0
        mult_luts = Q * (2 * math.ceil((W + A) / 6) - 1) * (W + A)
        addertree_luts = (W + A) * (2 * Q - 1)
        alpha = math.log(layer.mw, 2) + W + A - 1 - 0
        acc_bits = min(acc_dt_bits, np.ceil(alpha + math.log(1 + pow(2, -alpha), 2) + 1))
        thr_luts = comp_luts = 0
        if out_bits is not None and self.ram_style_thresholds == "distributed":
            tmem = layer.mh // P
            thr_luts = (2**out_bits - 1) * acc_bits * np.ceil(tmem / 64)
            comp_luts = (2**out_bits - 1) * acc_bits
        return (c0 + c1 * (P * (mult_luts + addertree_luts + acc_bits + thr_luts + comp_luts)) + c2).astype(np.int64)

    # ---------------------------------------------------------------- network extras

    def extras_options(self, net: NetworkSpec, input_bits: int = 8) -> list[LayerCost]:
        """The units FINN builds outside the compute layers, one LayerCost per folding it
        could be given: the standalone Thresholding_rtl of the input quantizer (float image
        in, input_bits out), PE | C_in. Empty when the input quantizer is absorbed."""
        if self.input_mode == "absorbed":
            return []
        c, h, w = net.input_shape
        return [_sum_units([self._input_threshold_unit(c, h * w, pe, input_bits)]) for pe in divisors(c)]

    def _input_threshold_unit(self, channels: int, pixels: int, pe: int, out_bits: int) -> dict:
        mem = thresholding_rtl_memory(channels, pe, self.input_threshold_bits, out_bits)
        return {
            "op_type": "Thresholding_rtl",
            "role": "input_threshold",
            "attrs": {"NumChannels": channels, "PE": pe, "numInputVectors": pixels, "threshold_bits": self.input_threshold_bits, "out_bits": out_bits},
            "cycles": thresholding_cycles(channels, pe, pixels),
            "LUT": mem.get("LUTRAM", 0),
            "BRAM_18K": mem.get("BRAM", 0),
            "URAM": mem.get("URAM", 0),
            "DSP": 0,
            "ap_int_max_w": 0,
        }


def _sum_units(units: list[dict]) -> LayerCost:
    resources = {r: int(sum(u[r] for u in units)) for r in PRICED}
    return LayerCost(
        cycles=int(max(u["cycles"] for u in units)),
        resources=resources,
        latency_cycles=int(sum(u["cycles"] for u in units)),
        units=tuple(units),
    )
