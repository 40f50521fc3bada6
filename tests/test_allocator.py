"""The CP-SAT allocator: hard constraints hold (checked by pricing the result), the choice
follows the sensitivity, and infeasible requests name the constraint and what would work."""
from __future__ import annotations

import itertools
import json
import re
from fractions import Fraction

import numpy as np
import pytest

from fqhw.allocator.allocation import Allocation
from fqhw.allocator.cpsat import allocate, price
from fqhw.errors import InfeasibleError
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.hwmodels import get_cost_model
from fqhw.hwmodels.finn import FinnCostModel
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.network import network_spec

GROUPS = ["light", "dark"]
BITS = range(2, 9)


def synthetic_sensitivity(net, seed=0, act_scale=0.3):
    """Loss increase falling 4x per extra bit, proportional to each layer's share of the
    parameters, with a random per-group factor."""
    rng = np.random.default_rng(seed)
    weight, act = {}, {}
    for spec in net.layers:
        s = rng.uniform(0.5, 2.0, size=len(GROUPS)) * spec.params / net.total_params
        weight[spec.name] = {b: s * 4.0 ** (-(b - 2)) for b in BITS}
        if spec.has_output_act:
            s2 = rng.uniform(0.2, 1.0, size=len(GROUPS)) * act_scale
            act[spec.name] = {b: s2 * 4.0 ** (-(b - 2)) for b in BITS}
    return Sensitivity(list(GROUPS), weight, act)


@pytest.fixture(scope="module")
def faircnn():
    return network_spec(FairCNN(), (3, 32, 32), name="fqcnn")


@pytest.fixture(scope="module")
def tiny():
    return network_spec(FairCNN(CNNConfig(channels=(8, 16), image_size=16)), (3, 16, 16), name="tiny")


@pytest.fixture(scope="module")
def pynq():
    return get_cost_model("pynq-z2")


def check_hard_constraints(net, alloc, cost, budget, min_fps=None):
    pr = price(net, alloc, cost)
    assert Fraction(sum(net.layer(la.name).params * la.weight_bits for la in alloc.layers), net.total_params) <= Fraction(repr(float(budget)))
    assert pr["total"]["fits"]
    for r, cap in pr["total"]["caps"].items():
        assert pr["total"][r] <= cap == int(cost.limits.totals[r] * cost.limits.utilisation[r] + 1e-9)
    for la in alloc.layers:
        spec = net.layer(la.name)
        assert spec.mh % la.pe == 0 and spec.mw % la.simd == 0
        assert (la.act_bits is None) == (not spec.has_output_act)
    if min_fps is not None:
        assert pr["total"]["fps"] >= min_fps
    # what the solver reports is what pricing gives
    assert alloc.solver["resources"] == {r: pr["total"][r] for r in alloc.solver["resources"]}
    assert alloc.solver["bottleneck_cycles"] == pr["total"]["cycles"]
    return pr


def test_faircnn_respects_budget_and_caps(faircnn, pynq):
    sens = synthetic_sensitivity(faircnn)
    pinned = {"features.0.conv": 8, "head": 8}
    alloc = allocate(faircnn, sens, pynq, 4.0, pinned=pinned, time_limit_s=20)
    check_hard_constraints(faircnn, alloc, pynq, 4.0)
    assert alloc.layer("features.0.conv").weight_bits == 8 and alloc.layer("head").weight_bits == 8
    info = alloc.solver
    assert info["status"] == "OPTIMAL" and info["gap"] == 0.0
    assert [s["name"] for s in info["stages"]] == ["min_worst_group_loss", "min_bottleneck_cycles", "min_luts"]
    assert abs(info["objective"] - info["objective_exact"]) <= info["loss_rounding_error"]
    assert info["model"]["variables"] > 0 and info["model"]["table_rows"] > 0
    pred = sens.predicted({la.name: la.weight_bits for la in alloc.layers}, {la.name: la.act_bits for la in alloc.layers})
    again = Allocation.from_dict(json.loads(json.dumps(alloc.to_dict())))  # plain data
    assert again.layers == alloc.layers and again.solver["status"] == "OPTIMAL"
    assert info["objective_exact"] == pytest.approx(float(np.max(pred)))


def test_min_fps_and_lexicographic_order(tiny, pynq):
    sens = synthetic_sensitivity(tiny, seed=1)
    # at 6 bits the loss-optimal allocation is not the fastest one that fits, so a floor
    # between the two is feasible, and it must cost loss (loss comes first)
    free = allocate(tiny, sens, pynq, 6.0, time_limit_s=10)
    fps_free = free.solver["fps"]
    with pytest.raises(InfeasibleError) as e:
        allocate(tiny, sens, pynq, 6.0, min_fps=fps_free * 100, time_limit_s=10)
    fastest = float(re.search(r"reaches ([0-9.]+) fps", str(e.value)).group(1))
    floor = fps_free * 1.5
    assert fastest >= floor
    fast = allocate(tiny, sens, pynq, 6.0, min_fps=floor, time_limit_s=10)
    check_hard_constraints(tiny, fast, pynq, 6.0, min_fps=floor)
    assert fast.solver["fps"] >= floor > fps_free
    assert fast.solver["objective"] > free.solver["objective"]  # the solver's (rounded) loss: strictly worse
    assert fast.solver["objective_exact"] >= free.solver["objective_exact"] - free.solver["loss_rounding_error"]
    slow_floor = fps_free / 10
    slow = allocate(tiny, sens, pynq, 4.0, min_fps=slow_floor, time_limit_s=10)
    check_hard_constraints(tiny, slow, pynq, 4.0, min_fps=slow_floor)


def test_choice_follows_sensitivity(tiny, pynq):
    sens = synthetic_sensitivity(tiny, seed=2)
    base = allocate(tiny, sens, pynq, 3.0, time_limit_s=10)
    layer = "features.0.conv"  # small enough that the budget lets it widen
    b0 = base.layer(layer).weight_bits
    assert b0 < 8
    # group "dark" loses a lot when this layer's weights are narrow: it must get more bits
    w = {n: dict(t) for n, t in sens.weight.items()}
    w[layer] = {b: v + np.array([0.0, 50.0 * 4.0 ** (-(b - 2))]) for b, v in sens.weight[layer].items()}
    shifted = Sensitivity(sens.groups, w, sens.act)
    after = allocate(tiny, shifted, pynq, 3.0, time_limit_s=10)
    check_hard_constraints(tiny, after, pynq, 3.0)
    assert after.layer(layer).weight_bits > b0
    assert after.solver["worst_group"] == "dark"


def test_stage_one_is_optimal_against_brute_force(tiny):
    """Worst-group loss over every width combination (weights {2,4,8}, activations {2,4,8})
    under the budget and a binding LUT cap, with the cheapest folding of each layer."""
    cost = FinnCostModel("pynq-z2", utilisation={"LUT": 0.044, "FF": 1, "BRAM_18K": 1, "URAM": 1, "DSP": 1}, input_mode="absorbed")
    sens = synthetic_sensitivity(tiny, seed=3, act_scale=0.05)
    bits = [2, 4, 8]
    budget = 4.0
    cap = int(cost.limits.cap("LUT"))
    layers = tiny.layers
    best, n_fit, n_over = None, 0, 0
    for ws in itertools.product(bits, repeat=len(layers)):
        if sum(s.params * w for s, w in zip(layers, ws)) > budget * tiny.total_params:
            continue
        for acts in itertools.product(bits, repeat=len(layers) - 1):
            ins = [8, *acts]
            outs = [*acts, None]
            lut = 0
            for s, w, ai, ao in zip(layers, ws, ins, outs):
                lut += min(
                    cost.layer_cost(s, w, ai, ao, pe, simd).resources["LUT"]
                    for pe, simd in cost.folding_options(s)
                    if cost.buildable(s, w, ai, ao, pe, simd)
                )
            if lut > cap:
                n_over += 1
                continue
            n_fit += 1
            loss = max(sens.predicted(dict(zip([s.name for s in layers], ws)), dict(zip([s.name for s in layers], outs))))
            best = loss if best is None else min(best, loss)
    alloc = allocate(tiny, sens, cost, budget, bits=bits, act_bits=bits, time_limit_s=10)
    check_hard_constraints(tiny, alloc, cost, budget)
    assert n_fit > 0 and n_over > 0  # the cap binds
    assert abs(alloc.solver["objective_exact"] - best) <= 2 * alloc.solver["loss_rounding_error"]


def test_infeasible_budget_names_smallest_budget(faircnn, pynq):
    sens = synthetic_sensitivity(faircnn)
    pinned = {"features.0.conv": 8, "head": 8}
    with pytest.raises(InfeasibleError) as e:
        allocate(faircnn, sens, pynq, 2.0, pinned=pinned, time_limit_s=10)
    msg = str(e.value)
    assert "\n" not in msg and "budget 2.0" in msg and "pinned" in msg and "pynq-z2" in msg
    need = float(re.search(r"--budget (\d+\.\d+)", msg).group(1))
    exact = (sum(faircnn.layer(n).params * b for n, b in pinned.items())
             + 2 * sum(s.params for s in faircnn.layers if s.name not in pinned)) / faircnn.total_params
    assert need >= exact and need - exact < 0.01
    alloc = allocate(faircnn, sens, pynq, need, pinned=pinned, time_limit_s=10)
    check_hard_constraints(faircnn, alloc, pynq, need)


def test_infeasible_fps_names_fastest(tiny, pynq):
    sens = synthetic_sensitivity(tiny)
    with pytest.raises(InfeasibleError) as e:
        allocate(tiny, sens, pynq, 4.0, min_fps=1e7, time_limit_s=10)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("min fps 1e+07 is infeasible on pynq-z2")
    best = float(re.search(r"--min-fps (\d+\.\d+)", msg).group(1))
    alloc = allocate(tiny, sens, pynq, 4.0, min_fps=best, time_limit_s=10)
    check_hard_constraints(tiny, alloc, pynq, 4.0, min_fps=best)


def test_infeasible_resources_names_resource(tiny):
    cost = FinnCostModel("pynq-z2", utilisation={"LUT": 0.01, "FF": 1, "BRAM_18K": 1, "URAM": 1, "DSP": 1})
    with pytest.raises(InfeasibleError) as e:
        allocate(tiny, synthetic_sensitivity(tiny), cost, 4.0, time_limit_s=10)
    msg = str(e.value)
    assert "\n" not in msg and "LUT" in msg and "does not fit pynq-z2" in msg


def test_price_uniform_baseline(faircnn, pynq):
    alloc = Allocation.uniform(faircnn, 4)
    pr = price(faircnn, alloc, pynq)
    assert pr["extras"] is None  # fqhw's FINN backend feeds uint8 codes: the input quantizer is absorbed
    layer_sum = {r: sum(v[r] for v in pr["layers"].values()) for r in ("LUT", "BRAM_18K", "URAM", "DSP")}
    assert layer_sum == {r: pr["total"][r] for r in layer_sum}
    assert pr["total"]["cycles"] == max(v["cycles"] for v in pr["layers"].values())
    assert pr["total"]["fps"] == pytest.approx(1e8 / pr["total"]["cycles"])
    assert pr["total"]["avg_weight_bits"] == 4.0
    assert pr["layers"]["head"]["out_bits"] is None and pr["layers"]["features.0.conv"]["in_bits"] == 8
    assert pr["total"]["fits"]


def test_input_thresholding_extras(tiny):
    """With a float input FINN builds a standalone input Thresholding_rtl: priced, folded to
    keep up with the layers, and counted against the caps."""
    cost = get_cost_model("pynq-z2", input_mode="thresholding")
    alloc = allocate(tiny, synthetic_sensitivity(tiny), cost, 4.0, time_limit_s=10)
    pr = check_hard_constraints(tiny, alloc, cost, 4.0)
    ex = pr["extras"]
    assert ex["units"][0]["op_type"] == "Thresholding_rtl"
    assert ex["cycles"] <= max(v["cycles"] for v in pr["layers"].values())
    assert pr["total"]["LUT"] == sum(v["LUT"] for v in pr["layers"].values()) + ex["LUT"]


def test_stages_two_and_three_against_brute_force(tiny):
    """The bottleneck (stage 2) and the LUTs at that bottleneck (stage 3) equal the best
    over every width combination within the loss limit (stage 1's loss and a slack, so that
    stage 2 may change the widths), each layer at its fewest-LUT folding that meets a cycle
    cap, under a binding LUT cap."""
    cost = FinnCostModel("pynq-z2", utilisation={"LUT": 0.06, "FF": 1, "BRAM_18K": 1, "URAM": 1, "DSP": 1})
    sens = synthetic_sensitivity(tiny, seed=4, act_scale=0.05)
    bits = [2, 4, 8]
    budget = 4.0
    alloc = allocate(tiny, sens, cost, budget, bits=bits, act_bits=bits, time_limit_s=20, loss_slack=0.5)
    pr = check_hard_constraints(tiny, alloc, cost, budget)
    s = alloc.solver
    assert s["status"] == "OPTIMAL" and [st["name"] for st in s["stages"]] == ["min_worst_group_loss", "min_bottleneck_cycles", "min_luts"]
    caps = pr["total"]["caps"]
    layers = tiny.layers
    # per layer and (w, a_in, a_out): every folding's (cycles, LUT, BRAM)
    table = {}
    for s_ in layers:
        for w in bits:
            for ai in ([8] if s_ is layers[0] else bits):
                for ao in (bits if s_.has_output_act else [None]):
                    rows = []
                    for pe, simd in cost.folding_options(s_):
                        if cost.buildable(s_, w, ai, ao, pe, simd):
                            c = cost.layer_cost(s_, w, ai, ao, pe, simd)
                            rows.append((c.cycles, c.resources["LUT"], c.resources["BRAM_18K"]))
                    table[s_.name, w, ai, ao] = rows
    z_tol = 2 * s["loss_rounding_error"]
    best = None  # (bottleneck, LUTs)
    for ws in itertools.product(bits, repeat=len(layers)):
        if sum(l_.params * w for l_, w in zip(layers, ws)) > budget * tiny.total_params:
            continue
        for acts in itertools.product(bits, repeat=len(layers) - 1):
            outs = [*acts, None]
            loss = max(sens.predicted(dict(zip([l_.name for l_ in layers], ws)), dict(zip([l_.name for l_ in layers], outs))))
            assert abs(loss - s["loss_limit"]) > z_tol  # no combination at the limit's rounding edge
            if loss > s["loss_limit"]:
                continue
            keys = [(l_.name, w, ai, ao) for l_, w, ai, ao in zip(layers, ws, [8, *acts], outs)]
            for cyc in sorted({r[0] for k in keys for r in table[k]}):
                fast = [[r for r in table[k] if r[0] <= cyc] for k in keys]
                if not all(fast):
                    continue
                least = [min(rows, key=lambda r: (r[1], r[2])) for rows in fast]
                lut, bram = sum(r[1] for r in least), sum(r[2] for r in least)
                if lut <= caps["LUT"] and bram <= caps["BRAM_18K"]:
                    cand = (max(r[0] for r in least), lut)
                    best = cand if best is None else min(best, cand)
                    break
    assert best is not None
    assert s["bottleneck_cycles"] == best[0]
    # the slack matters: the solver, not the stage-1 widths refolded, found the bottleneck
    assert s["stages"][1]["solver_steps"] >= 1
    assert pr["total"]["LUT"] == best[1]
    # the LUT cap binds: the fastest folding of the loss-optimal widths does not fit
    assert s["resources"]["LUT"] > 0.9 * caps["LUT"]


def test_widths_only_against_brute_force(tiny):
    """allocate_widths: the least worst-group loss under the budget (no hardware), ties to
    the least loss summed over groups, every unit folded PE = SIMD = 1."""
    from fqhw.allocator.widths import allocate_widths

    sens = synthetic_sensitivity(tiny, seed=6)
    bits = [2, 3, 4, 8]
    budget = 3.5
    alloc = allocate_widths(tiny, sens, budget, bits=bits, act_bits=bits, pinned={"head": 8})
    s = alloc.solver
    assert s["status"] == "OPTIMAL" and s["hardware_objective"] is None
    assert all(la.pe == 1 and la.simd == 1 for la in alloc.layers) and alloc.layer("head").weight_bits == 8
    assert alloc.avg_weight_bits(tiny) <= budget
    names = [l_.name for l_ in tiny.layers]
    results = []
    for ws in itertools.product(bits, repeat=len(names) - 1):
        ws = (*ws, 8)
        if sum(l_.params * w for l_, w in zip(tiny.layers, ws)) > budget * tiny.total_params:
            continue
        for acts in itertools.product(bits, repeat=len(names) - 1):
            pred = sens.predicted(dict(zip(names, ws)), dict(zip(names, [*acts, None])))
            results.append((max(pred), sum(pred)))
    worst = min(r[0] for r in results)
    tol = 2 * s["loss_rounding_error"]
    assert abs(s["objective_exact"] - worst) <= tol
    total = min(r[1] for r in results if r[0] <= worst + tol)
    got = alloc.predicted_loss(tiny, sens)
    assert sum(got) == pytest.approx(total, abs=len(sens.groups) * tol)
    # activations cost no budget: with no hardware they take the least-loss width
    assert all(la.act_bits == 8 for la in alloc.layers if la.act_bits is not None)


def test_stage_three_beside_the_probe_gives_the_same_design(faircnn, pynq):
    """With two workers, stage 3 runs in a thread beside stage 2's last probe (one worker
    each); the design it gives has the loss, bottleneck and LUTs of the one-worker run,
    which solves the stages one after another."""
    sens = synthetic_sensitivity(faircnn, seed=7)
    two = allocate(faircnn, sens, pynq, 4.0, workers=2, time_limit_s=30)
    one = allocate(faircnn, sens, pynq, 4.0, workers=1, time_limit_s=30)
    for a in (two, one):
        check_hard_constraints(faircnn, a, pynq, 4.0)
        assert a.solver["status"] == "OPTIMAL"
    assert two.solver["stages"][1]["solver_steps"] >= 1  # the probe ran
    assert two.solver["stages"][2].get("overlapped_with_previous_stage") is True
    assert "overlapped_with_previous_stage" not in one.solver["stages"][2]
    for k in ("objective", "bottleneck_cycles", "resources"):
        assert two.solver[k] == one.solver[k], k
