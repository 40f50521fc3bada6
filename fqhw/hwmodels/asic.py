"""ASIC-style accelerator models: precision-scalable arrays that run one layer at a time.

Four architectures, one model (`AsicCostModel`), each with its parameters in one
dataclass (`AsicParams`: array size, clock, on-chip buffer, DRAM bandwidth) and the same
energy model (`EnergyModel`, 45 nm figures from Horowitz, ISSCC 2014):

  bitfusion  Bit Fusion (spatial, precision-scalable): a fusion unit holds 16 BitBricks of
             2x2 bits; a w x a product occupies ceil(w/2) * ceil(a/2) bricks, so a unit
             computes 16 / (ceil(w/2) * ceil(a/2)) products per cycle (16x the 8x8 rate at
             2x2). Widths above 8 take several cycles (the same formula).
  bitserial  Loom-like bit-serial: convolutions take time proportional to w * a, fully
             connected layers to w (their activations are processed bit-parallel at
             `parallel_bits`).
  stripes    Stripes-like: activations bit-serial, weights bit-parallel at `parallel_bits`:
             time proportional to a.
  fixed8     a fixed 8-bit array: every product takes one 8x8 slot (ceil(w/8) * ceil(a/8)
             passes), so narrower widths only save memory traffic and memory energy.

Every architecture is described by the widths its datapath actually spends on a product
(`effective_widths`): the array does `bitops_per_cycle` 1 x 1-bit partial products per
cycle, so a layer's compute time is

    compute_cycles = ceil(MACs * w_eff * a_eff / bitops_per_cycle)

(Bit Fusion: w_eff * a_eff = 4 * ceil(w/2) * ceil(a/2), i.e. 4 bit-products per brick).
With the default parameters every architecture has the same peak rate at 8 x 8 bits
(32768 bit-products = 512 8x8 MACs per cycle at 500 MHz), so they differ only in what
narrow widths buy.

Memory: a layer reads its weights and input activations from DRAM and writes its output
activations back, at the widths chosen (the classifier head writes `acc_bits`-wide
accumulators; a max pool after a conv is applied before the write). When the layer's
weights do not fit in half the on-chip buffer they are processed in tiles and the input
is read once per tile. With `weights_on_chip` the whole model's weights stay in the buffer
(loaded once, not per image): the buffer is then a hard cap on the sum of weight bits
(resource "buffer_bits"), and only activations move per image.

    memory_cycles = ceil(DRAM bits / dram_bits_per_cycle)
    cycles        = max(compute_cycles, memory_cycles)   (compute and transfers overlap)

Energy per image (pJ):

    MACs * (E_mult(w_eff, a_eff) + E_add(acc_bits))
    + DRAM bits * E_dram  +  2 * DRAM bits * E_sram     (every bit moved is written into
                                                         and read out of the buffer once)

with E_mult(w, a) = mult_pj_8x8 * w * a / 64 (multiplier energy ~ square of the width:
0.2 pJ at 8x8, 3.2 pJ at 32x32 against Horowitz's 3.1), E_add(b) = add_pj_per_bit * b
(0.1 pJ at 32 bits), E_sram = 5 pJ / 32 bits (8 KB SRAM read), E_dram = 640 pJ / 32 bits.

Layers run one after another on the one array, so a network's latency is the sum of its
layers' cycles and its throughput one image per latency (`schedule = "sequential"`).
The arrays do not fold: `folding_options` is [(1, 1)].
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from fqhw.errors import FqhwError
from fqhw.hwmodels.base import LayerCost, TargetLimits
from fqhw.network import LayerSpec

ENERGY = "energy_pJ"
BUFFER = "buffer_bits"
DRAM = "dram_bits"

ARCHITECTURES = ("bitfusion", "bitserial", "stripes", "fixed8")


@dataclass(frozen=True)
class EnergyModel:
    """Per-operation energy, 45 nm (Horowitz, ISSCC 2014)."""

    mult_pj_8x8: float = 0.2  # int8 multiply
    add_pj_per_bit: float = 0.1 / 32  # int32 add 0.1 pJ; int8 0.03, int16 0.05: ~linear
    sram_pj_per_bit: float = 5.0 / 32  # 32-bit read from an 8 KB SRAM
    dram_pj_per_bit: float = 640.0 / 32  # 32-bit DRAM access

    def mult(self, w: int, a: int) -> float:
        """A w x a multiply: quadratic in the width (w * a / 64 of an 8 x 8 multiply)."""
        return self.mult_pj_8x8 * w * a / 64.0

    def add(self, bits: int) -> float:
        return self.add_pj_per_bit * bits


@dataclass(frozen=True)
class AsicParams:
    """Everything a target's numbers come from, in one place."""

    name: str
    arch: str  # one of ARCHITECTURES
    units: int  # fusion units (bitfusion), 1x1-bit lanes (bitserial), w-bit x 1-bit lanes (stripes), 8x8 MACs (fixed8)
    clock_hz: float = 500e6
    buffer_bits: int = 2 * 1024 * 1024 * 8  # on-chip buffer: 2 MiB
    dram_bits_per_cycle: float = 256.0  # 16 GB/s at 500 MHz
    acc_bits: int = 32  # accumulator width (adds per MAC; the head's output width)
    parallel_bits: int = 8  # width of the bit-parallel operand (bitserial FC activations, stripes weights)
    weights_on_chip: bool = False  # True: the whole model's weights stay in the buffer (a cap)
    energy: EnergyModel = field(default_factory=EnergyModel)
    note: str = ""

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise FqhwError(f"unknown ASIC architecture {self.arch!r}: known ones are {', '.join(ARCHITECTURES)}")
        for f in ("units", "clock_hz", "buffer_bits", "dram_bits_per_cycle", "acc_bits", "parallel_bits"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise FqhwError(f"ASIC parameter {f}={v!r} of {self.name} must be a positive number")

    @property
    def bitops_per_unit(self) -> int:
        """1 x 1-bit partial products one unit does per cycle."""
        return {"bitfusion": 16 * 4, "bitserial": 1, "stripes": self.parallel_bits, "fixed8": 64}[self.arch]

    @property
    def bitops_per_cycle(self) -> int:
        return self.units * self.bitops_per_unit

    def to_dict(self) -> dict:
        return asdict(self)


# The defaults: the same 8x8 peak (512 MACs per cycle) for every architecture.
PRESETS: dict[str, AsicParams] = {
    "bitfusion": AsicParams("bitfusion", "bitfusion", units=512, note="512 fusion units of 16 2x2-bit BitBricks"),
    "bitserial": AsicParams("bitserial", "bitserial", units=512 * 64, note="Loom-like: 32768 bit-serial 1x1-bit lanes"),
    "stripes": AsicParams("stripes", "stripes", units=512 * 8, note="Stripes-like: 4096 lanes of an 8-bit weight x 1 activation bit"),
    "fixed8": AsicParams("fixed8", "fixed8", units=512, note="512 fixed 8x8-bit MACs"),
}


def bitfusion_bricks(w: int, a: int) -> int:
    """BitBricks one w x a product occupies."""
    return math.ceil(w / 2) * math.ceil(a / 2)


class AsicCostModel:
    """An ASIC-style array; implements fqhw.hwmodels.base.CostModel.

    Resources per layer: energy_pJ (per image), dram_bits (per image), and buffer_bits
    (weights kept on chip: only with weights_on_chip, where it is the target's one cap)."""

    schedule = "sequential"  # layers run one after another on the array
    prices_by_shape = True  # a layer's price depends on its shape, not its name
    objectives = ("latency", "energy")

    def __init__(self, params: AsicParams | str = "bitfusion", objective: str = "latency", **overrides):
        if isinstance(params, str):
            key = params.lower()
            if key not in PRESETS:
                raise FqhwError(f"unknown ASIC target {params!r}: known ones are {', '.join(sorted(PRESETS))}")
            params = PRESETS[key]
        if overrides:
            try:
                params = replace(params, **overrides)
            except TypeError as e:
                raise FqhwError(f"bad ASIC parameter for {params.name}: {e}") from None
        if objective not in self.objectives:
            raise FqhwError(f"objective {objective!r} is not one of {', '.join(self.objectives)} for {params.name}")
        self.params = params
        self.default_objective = objective
        totals = {BUFFER: float(params.buffer_bits)} if params.weights_on_chip else {}
        self.limits = TargetLimits(
            name=params.name,
            part=f"{params.arch} array, {params.bitops_per_cycle // 64} 8x8 MACs/cycle at {params.clock_hz / 1e6:g} MHz (45 nm energy)",
            clock_hz=float(params.clock_hz),
            totals=totals,
            utilisation={BUFFER: 1.0} if totals else {},
        )

    def __repr__(self) -> str:
        return f"AsicCostModel({self.params.name!r}, arch={self.params.arch!r})"

    # ---------------------------------------------------------------- formulas

    def effective_widths(self, layer: LayerSpec, w: int, a: int) -> tuple[int, int]:
        """The widths the datapath spends on one w x a product."""
        p = self.params
        if p.arch == "bitfusion":
            return 2 * math.ceil(w / 2), 2 * math.ceil(a / 2)
        if p.arch == "bitserial":
            return (w, a) if layer.kind == "conv" else (w, p.parallel_bits * math.ceil(a / p.parallel_bits))
        if p.arch == "stripes":
            return p.parallel_bits * math.ceil(w / p.parallel_bits), a
        return 8 * math.ceil(w / 8), 8 * math.ceil(a / 8)  # fixed8

    def compute_cycles(self, layer: LayerSpec, w: int, a: int) -> int:
        we, ae = self.effective_widths(layer, w, a)
        return math.ceil(layer.macs * we * ae / self.params.bitops_per_cycle)

    @staticmethod
    def input_elements(layer: LayerSpec) -> int:
        if layer.kind == "conv":
            h, w = layer.in_hw
            return layer.in_channels * h * w
        return layer.mw

    @staticmethod
    def output_elements(layer: LayerSpec) -> int:
        if layer.pool_kernel:
            h, w = layer.pool_out_hw
            return layer.mh * h * w
        return layer.mh * layer.out_pixels

    def traffic(self, layer: LayerSpec, w: int, a_in: int, a_out: int | None) -> dict:
        """DRAM bits moved per image, by kind, and the number of weight tiles."""
        p = self.params
        wbits = layer.params * w
        tiles = 1 if p.weights_on_chip else max(1, math.ceil(wbits / (p.buffer_bits / 2)))
        out_w = p.acc_bits if a_out is None else a_out
        t = {
            "weights": 0 if p.weights_on_chip else wbits,
            "inputs": self.input_elements(layer) * a_in * tiles,
            "outputs": self.output_elements(layer) * out_w,
        }
        t["total"] = t["weights"] + t["inputs"] + t["outputs"]
        t["tiles"] = tiles
        return t

    def mac_energy(self, layer: LayerSpec, w: int, a: int) -> float:
        e = self.params.energy
        we, ae = self.effective_widths(layer, w, a)
        return e.mult(we, ae) + e.add(self.params.acc_bits)

    # ---------------------------------------------------------------- CostModel

    def folding_options(self, layer: LayerSpec) -> list[tuple[int, int]]:
        return [(1, 1)]

    def layer_cost(self, layer: LayerSpec, weight_bits: int, in_bits: int, out_bits: int | None, pe: int = 1, simd: int = 1) -> LayerCost:
        if (pe, simd) != (1, 1):
            raise FqhwError(f"{self.params.name} does not fold: PE and SIMD must be 1 (got {pe}, {simd})")
        p = self.params
        comp = self.compute_cycles(layer, weight_bits, in_bits)
        tr = self.traffic(layer, weight_bits, in_bits, out_bits)
        mem = math.ceil(tr["total"] / p.dram_bits_per_cycle)
        cycles = max(comp, mem)
        e = p.energy
        e_compute = layer.macs * self.mac_energy(layer, weight_bits, in_bits)
        e_dram = tr["total"] * e.dram_pj_per_bit
        e_sram = 2 * tr["total"] * e.sram_pj_per_bit
        resources = {ENERGY: e_compute + e_dram + e_sram, DRAM: float(tr["total"])}
        if p.weights_on_chip:
            resources[BUFFER] = float(layer.params * weight_bits)
        we, ae = self.effective_widths(layer, weight_bits, in_bits)
        unit = {
            "op_type": p.arch,
            "role": "layer",
            "attrs": {
                "macs": layer.macs, "weight_bits": weight_bits, "in_bits": in_bits, "out_bits": out_bits,
                "effective_widths": [we, ae], "compute_cycles": comp, "memory_cycles": mem,
                "bound": "compute" if comp >= mem else "memory", "weight_tiles": tr["tiles"],
                "dram_bits": {k: tr[k] for k in ("weights", "inputs", "outputs")},
                "energy_pJ": {"compute": e_compute, "dram": e_dram, "sram": e_sram},
            },
            "cycles": cycles,
        }
        return LayerCost(cycles=int(cycles), resources=resources, latency_cycles=int(cycles), units=(unit,))


def asic_targets() -> list[str]:
    return sorted(PRESETS)
