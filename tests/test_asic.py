"""ASIC-style cost models: the formulas against hand-computed values (Bit Fusion bricks,
bit-serial proportionalities, the memory/compute switch, energy), and the allocator on a
target whose only costs are cycles and energy."""
from __future__ import annotations

import math

import pytest

from fqhw.allocator.allocation import Allocation
from fqhw.allocator.cpsat import allocate, price
from fqhw.errors import FqhwError, InfeasibleError
from fqhw.hwmodels import get_cost_model, known_targets
from fqhw.hwmodels.asic import PRESETS, AsicCostModel, EnergyModel, bitfusion_bricks
from fqhw.models.cnn import FairCNN
from fqhw.network import LayerSpec, network_spec

from conftest import sensitivity

# a conv with many MACs and few weights and activations (compute-bound at 8 bits), and a
# fully connected layer with many weights and no reuse (memory-bound)
CONV = LayerSpec("conv", "conv", mw=3 * 3 * 64, mh=64, out_pixels=32 * 32, kernel=3, padding=1, in_channels=64,
                 in_hw=(32, 32), out_hw=(32, 32))
FC = LayerSpec("fc", "linear", mw=4096, mh=1024, out_pixels=1, in_channels=4096)
MACS = CONV.macs  # 37748736 = 2^25 * 9 / 8


def compute(target: str, layer: LayerSpec, w: int, a: int) -> int:
    return get_cost_model(target).compute_cycles(layer, w, a)


def test_registry_and_interface():
    assert {"bitfusion", "bitserial", "stripes", "fixed8"} <= set(known_targets())
    for t in ("bitfusion", "bitserial", "stripes", "fixed8"):
        cm = get_cost_model(t)
        assert cm.folding_options(CONV) == [(1, 1)]
        assert cm.schedule == "sequential" and cm.limits.totals == {}
        c = cm.layer_cost(CONV, 4, 4, 4, 1, 1)
        assert c.cycles == c.latency and set(c.resources) == {"energy_pJ", "dram_bits"}
        # the same peak at 8 x 8: 512 MACs per cycle at 500 MHz
        assert cm.params.bitops_per_cycle == 512 * 64 and cm.limits.clock_hz == 500e6
    with pytest.raises(FqhwError):
        get_cost_model("bitfusion").layer_cost(CONV, 4, 4, 4, 2, 1)
    with pytest.raises(FqhwError) as e:
        get_cost_model("bitfusion", nonsense=3)
    assert "\n" not in str(e.value)
    with pytest.raises(FqhwError):
        get_cost_model("bitserial", units=0)


def test_bitfusion_bricks():
    assert [bitfusion_bricks(w, a) for w, a in [(2, 2), (3, 3), (4, 4), (2, 8), (8, 8), (5, 3), (16, 16)]] == [1, 4, 4, 4, 16, 6, 64]
    # 512 fusion units of 16 bricks: 16 / bricks products per unit and cycle
    assert compute("bitfusion", CONV, 8, 8) == math.ceil(MACS / 512)
    assert compute("bitfusion", CONV, 2, 2) == math.ceil(MACS / (512 * 16))
    assert compute("bitfusion", CONV, 8, 8) == 16 * compute("bitfusion", CONV, 2, 2)  # 16x the 8x8 rate at 2x2
    assert compute("bitfusion", CONV, 8, 8) == 4 * compute("bitfusion", CONV, 4, 4)  # 4x at 4x4
    assert compute("bitfusion", CONV, 3, 3) == compute("bitfusion", CONV, 4, 4)  # odd widths take the next brick
    assert compute("bitfusion", CONV, 2, 8) == compute("bitfusion", CONV, 4, 4)  # 2x8 fuses like 4x4
    assert compute("bitfusion", CONV, 16, 16) == 4 * compute("bitfusion", CONV, 8, 8)  # 16-bit: several cycles
    # FC layers alike
    assert compute("bitfusion", FC, 8, 8) == 16 * compute("bitfusion", FC, 2, 2)


def test_bitserial_and_stripes_proportionalities():
    lanes = 512 * 64
    for w, a in [(2, 2), (3, 5), (8, 8), (7, 3)]:
        assert compute("bitserial", CONV, w, a) == math.ceil(MACS * w * a / lanes)  # Loom conv: ~ w * a
    assert compute("bitserial", CONV, 8, 8) == 16 * compute("bitserial", CONV, 2, 2)
    assert compute("bitserial", CONV, 3, 8) * 8 == compute("bitserial", CONV, 8, 3) * 8 == 3 * compute("bitserial", CONV, 8, 8)
    # Loom FC: ~ w, the activations bit-parallel
    assert compute("bitserial", FC, 4, 2) == compute("bitserial", FC, 4, 8) == compute("bitserial", FC, 8, 8) // 2
    # Stripes: ~ a, weights bit-parallel
    for w in (2, 5, 8):
        assert compute("stripes", CONV, w, 2) * 4 == compute("stripes", CONV, w, 8) == math.ceil(MACS / 512)
    assert compute("stripes", FC, 8, 3) * 8 == compute("stripes", FC, 8, 8) * 3
    # fixed 8-bit array: widths do not change the compute time (up to 8 bits)
    assert {compute("fixed8", CONV, w, a) for w in (2, 5, 8) for a in (2, 8)} == {math.ceil(MACS / 512)}
    assert compute("fixed8", CONV, 16, 8) == 2 * compute("fixed8", CONV, 8, 8)


def test_memory_and_compute_bound_switch():
    cm = get_cost_model("bitfusion")
    p = cm.params
    # 3x3 conv, 8 -> 16 channels at 32x32: compute-bound at 8 bits (2304 > 804 cycles),
    # memory-bound at 2 bits (144 < 201): compute falls with w * a, traffic only with w and a
    small = LayerSpec("small", "conv", mw=72, mh=16, out_pixels=1024, kernel=3, padding=1, in_channels=8, in_hw=(32, 32), out_hw=(32, 32))
    for (w, a), bound, (comp_hand, mem_hand) in [((8, 8), "compute", (2304, 804)), ((2, 2), "memory", (144, 201))]:
        c = cm.layer_cost(small, w, a, a, 1, 1)
        attrs = c.units[0]["attrs"]
        dram = 8 * 32 * 32 * a + small.params * w + 16 * 32 * 32 * a  # inputs + weights + outputs, one tile
        mem = math.ceil(dram / p.dram_bits_per_cycle)
        comp = math.ceil(small.macs * bitfusion_bricks(w, a) * 4 / p.bitops_per_cycle)
        assert (comp, mem) == (comp_hand, mem_hand)
        assert (attrs["compute_cycles"], attrs["memory_cycles"]) == (comp, mem)
        assert c.cycles == max(comp, mem) and attrs["bound"] == bound
        assert c.resources["dram_bits"] == dram
    # the FC is memory-bound: 4M weights streamed at 256 bits per cycle
    c = cm.layer_cost(FC, 4, 8, 8, 1, 1)
    wbits = FC.params * 4
    tiles = math.ceil(wbits / (p.buffer_bits / 2))
    assert tiles == 2  # 16 Mbit of weights, 8 Mbit per tile: the input is read twice
    dram = wbits + 4096 * 8 * tiles + 1024 * 8
    assert c.cycles == math.ceil(dram / 256) and c.units[0]["attrs"]["bound"] == "memory"
    # the head (no activation) writes 32-bit accumulators
    assert get_cost_model("bitfusion").traffic(FC, 4, 8, None)["outputs"] == 1024 * 32


def test_energy_by_hand():
    e = EnergyModel()
    assert e.mult(8, 8) == pytest.approx(0.2) and e.mult(32, 32) == pytest.approx(3.2)  # Horowitz: 0.2, 3.1
    assert e.add(32) == pytest.approx(0.1) and e.add(16) == pytest.approx(0.05) and e.add(8) == pytest.approx(0.025)
    assert e.sram_pj_per_bit == 5 / 32 and e.dram_pj_per_bit == 20.0
    for target, (we, ae) in [("bitfusion", (4, 4)), ("bitserial", (3, 3)), ("stripes", (8, 3)), ("fixed8", (8, 8))]:
        cm = get_cost_model(target)
        c = cm.layer_cost(CONV, 3, 3, 5, 1, 1)
        dram = 64 * 32 * 32 * 3 + CONV.params * 3 + 64 * 32 * 32 * 5
        mac = 0.2 * we * ae / 64 + 0.1 / 32 * 32
        assert c.resources["energy_pJ"] == pytest.approx(MACS * mac + dram * 20 + 2 * dram * 5 / 32, rel=1e-12)
    # narrower widths never cost more energy; the fixed array saves only memory energy
    fixed = get_cost_model("fixed8")
    e8, e2 = (fixed.layer_cost(CONV, b, b, b, 1, 1).resources["energy_pJ"] for b in (8, 2))
    assert e2 < e8 and e8 - e2 == pytest.approx((64 * 32 * 32 * 6 * 2 + CONV.params * 6) * (20 + 10 / 32))


@pytest.fixture(scope="module")
def faircnn():
    return network_spec(FairCNN(), (3, 32, 32), name="fqcnn")




def test_allocator_on_asic_targets(faircnn):
    sens = sensitivity(faircnn)
    cm = get_cost_model("bitserial")
    lat = allocate(faircnn, sens, cm, 4.0, loss_slack=0.1, time_limit_s=10)
    en = allocate(faircnn, sens, cm, 4.0, loss_slack=0.1, objective="energy", time_limit_s=10)
    for a, first in ((lat, "min_latency_cycles"), (en, "min_energy")):
        info = a.solver
        assert info["status"] == "OPTIMAL" and info["schedule"] == "sequential"
        assert [s["name"] for s in info["stages"]][:2] == ["min_worst_group_loss", first]
        assert all((la.pe, la.simd) == (1, 1) for la in a.layers)
        assert a.avg_weight_bits(faircnn) <= 4.0
        assert info["objective_exact"] <= info["loss_limit"] + info["loss_rounding_error"]
        pr = price(faircnn, a, cm)
        assert pr["total"]["cycles"] == sum(v["cycles"] for v in pr["layers"].values()) == info["bottleneck_cycles"]
        assert pr["total"]["energy_pJ"] == pytest.approx(info["energy_pJ"])
        assert pr["total"]["fps"] == pytest.approx(500e6 / pr["total"]["cycles"])
    p_lat, p_en = price(faircnn, lat, cm)["total"], price(faircnn, en, cm)["total"]
    assert p_lat["cycles"] <= p_en["cycles"] and p_en["energy_pJ"] <= p_lat["energy_pJ"] * (1 + 1e-6)
    # the latency-optimal design is no slower than any uniform design within the loss limit
    for b in range(2, 9):
        u = Allocation.uniform(faircnn, b)
        if u.avg_weight_bits(faircnn) <= 4 and max(u.predicted_loss(faircnn, sens)) <= lat.solver["loss_limit"]:
            assert price(faircnn, u, cm)["total"]["cycles"] >= p_lat["cycles"]
    # a throughput floor caps the sum of the layers' cycles
    floor = p_lat["fps"] * 0.999
    fast = allocate(faircnn, sens, cm, 4.0, min_fps=floor, objective="energy", time_limit_s=10)
    assert price(faircnn, fast, cm)["total"]["fps"] >= floor
    with pytest.raises(InfeasibleError) as e:
        allocate(faircnn, sens, cm, 4.0, min_fps=p_lat["fps"] * 100, time_limit_s=10)
    assert "\n" not in str(e.value) and "min fps" in str(e.value) and "bitserial" in str(e.value)
    with pytest.raises(FqhwError):
        allocate(faircnn, sens, get_cost_model("pynq-z2"), 4.0, objective="energy")


def test_weights_on_chip_buffer_cap(faircnn):
    sens = sensitivity(faircnn, seed=1)
    need8 = faircnn.total_params * 8
    cm = AsicCostModel("bitfusion", weights_on_chip=True, buffer_bits=faircnn.total_params * 3)
    assert cm.limits.totals == {"buffer_bits": faircnn.total_params * 3}
    a = allocate(faircnn, sens, cm, 8.0, time_limit_s=10)  # the budget allows 8 bits: the buffer does not
    pr = price(faircnn, a, cm)
    assert pr["total"]["fits"] and pr["total"]["buffer_bits"] <= faircnn.total_params * 3 < need8
    assert all(v["dram_bits"] == v["units"][0]["attrs"]["dram_bits"]["inputs"] + v["units"][0]["attrs"]["dram_bits"]["outputs"]
               for v in pr["layers"].values())  # no weight traffic per image
    tiny = AsicCostModel("bitfusion", weights_on_chip=True, buffer_bits=faircnn.total_params)
    with pytest.raises(InfeasibleError) as e:
        allocate(faircnn, sens, tiny, 4.0, time_limit_s=10)
    assert "buffer_bits" in str(e.value) and "\n" not in str(e.value)


def test_presets_stated_in_one_place():
    for name, p in PRESETS.items():
        d = p.to_dict()
        assert {"units", "clock_hz", "buffer_bits", "dram_bits_per_cycle", "energy"} <= set(d)
        assert d["name"] == name
