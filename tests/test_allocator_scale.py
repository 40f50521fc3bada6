"""What the allocator needs at scale: channel-group units, the vectorised FINN price table
(the same numbers as layer_cost), the per-cap table pruning, and the FPGA objectives
(fastest within the resources, or the fewest resources at a rate)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from fqhw.allocator.allocation import Allocation
from fqhw.allocator.cpsat import allocate, price
from fqhw.allocator.tables import LayerTable, pareto, pareto_by_choice, prune_on_resources
from fqhw.errors import FqhwError
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.hwmodels import get_cost_model
from fqhw.hwmodels.finn import FinnCostModel
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.network import LayerSpec, NetworkSpec, network_spec, split_channel_groups

GROUPS = ["light", "dark"]


@pytest.fixture(scope="module")
def tiny():
    return network_spec(FairCNN(CNNConfig(channels=(8, 16), image_size=16)), (3, 16, 16), name="tiny")


def unit_sensitivity(net, seed=0):
    rng = np.random.default_rng(seed)
    w, a = {}, {}
    for s in net.layers:
        f = rng.uniform(0.5, 2.0, len(GROUPS)) * s.params / net.total_params
        w[s.name] = {b: f * 3.0 ** (-(b - 2)) for b in range(2, 9)}
        if s.has_output_act and s.act_group not in a:
            a[s.act_group] = {b: rng.uniform(0.05, 0.3, len(GROUPS)) * 3.0 ** (-(b - 2)) for b in range(2, 9)}
    return Sensitivity(GROUPS, w, a)


def test_split_channel_groups(tiny):
    g = split_channel_groups(tiny, 2)
    assert [s.name for s in g.layers] == [
        "features.0.conv:g0", "features.0.conv:g1", "features.1.conv:g0", "features.1.conv:g1", "head:g0", "head:g1"
    ]
    assert g.total_params == tiny.total_params and g.total_macs == tiny.total_macs
    assert [s.act_group for s in g.layers][:2] == ["features.0.conv"] * 2 and g.layers[1].group_index == 1
    assert [g.input_of(i) for i in range(6)] == [-1, -1, 1, 1, 3, 3]  # a group reads the layer before its own groups
    assert ("features.0.conv:g1", "features.1.conv:g0") in g.edges
    assert [s.name for s in split_channel_groups(tiny, 8).layers][-1] == "head"  # 4 outputs: kept whole
    again = NetworkSpec.from_dict(g.to_dict())
    assert again.layers == g.layers and again.edges == g.edges
    # FINN: the groups share one input window, priced with group 0
    cm = get_cost_model("pynq-z2")
    roles = lambda s: [u["role"] for u in cm.layer_units(s, 4, 4, 4, 1, 1)]  # noqa: E731
    assert roles(g.layers[2]) == ["padding", "window", "mvau", "pool_window", "pool"]
    assert roles(g.layers[3]) == ["mvau", "pool_window", "pool"]


def test_channel_groups_against_brute_force(tiny):
    """Weight widths per group, one activation width per layer (counted once in the loss):
    the allocator's worst-group loss equals the best over every combination."""
    net = split_channel_groups(tiny, 2)
    sens = unit_sensitivity(net, seed=3)
    bits = [2, 4, 8]
    budget = 4.0
    cost = get_cost_model("bitserial")
    alloc = allocate(net, sens, cost, budget, bits=bits, act_bits=bits, time_limit_s=10)
    acts = {la.name: la.act_bits for la in alloc.layers}
    assert acts["features.0.conv:g0"] == acts["features.0.conv:g1"] and acts["features.1.conv:g0"] == acts["features.1.conv:g1"]
    assert alloc.input_bits_of(net, "features.1.conv:g1") == acts["features.0.conv:g0"]
    best = None
    units = net.layers
    for ws in itertools.product(bits, repeat=len(units)):
        if sum(s.params * w for s, w in zip(units, ws)) > budget * net.total_params:
            continue
        for a0, a1 in itertools.product(bits, repeat=2):
            loss = sens.predicted(dict(zip([s.name for s in units], ws)), {"features.0.conv": a0, "features.1.conv": a1})
            best = max(loss) if best is None else min(best, max(loss))
    assert alloc.solver["status"] == "OPTIMAL"
    assert abs(alloc.solver["objective_exact"] - best) <= 2 * alloc.solver["loss_rounding_error"]
    assert alloc.solver["objective_exact"] == pytest.approx(max(alloc.predicted_loss(net, sens)))
    # FINN with folding per group unit: fits, and the groups of a layer still share widths
    pynq = get_cost_model("pynq-z2")
    a2 = allocate(net, sens, pynq, budget, time_limit_s=10)
    pr = price(net, a2, pynq)
    assert pr["total"]["fits"] and a2.solver["model"]["activation_slots"] == 2
    assert a2.layer("features.1.conv:g0").act_bits == a2.layer("features.1.conv:g1").act_bits


@pytest.mark.parametrize("kw", [{}, {"mem_mode": "external"}, {"ram_style": "distributed"}, {"mem_mode": "internal_embedded"},
                                {"ram_style_thresholds": "distributed"}, {"board": "zcu104", "ram_style": "ultra"}])
def test_finn_price_table_equals_layer_cost(tiny, kw):
    kw = dict(kw)
    board = kw.pop("board", "pynq-z2")
    bits = [2, 3, 8]
    net = network_spec(FairCNN(), (3, 32, 32))
    specs = [*net.layers, split_channel_groups(tiny, 2).layers[3],
             LayerSpec("ds", "conv", mw=64, mh=128, out_pixels=49, kernel=1, stride=2, in_channels=64, in_hw=(14, 14), out_hw=(7, 7))]
    for spec in specs:
        cm = FinnCostModel(board, **kw)
        res = ["LUT", "BRAM_18K", "URAM", "DSP"]
        folds = cm.folding_options(spec)[::3]
        ao = bits if spec.has_output_act else [None]
        rows, n = cm.price_table(spec, bits, bits, ao, folds, res)
        ref = FinnCostModel(board, **kw)
        want = [
            (w, ai, -1 if a is None else a, f, ref.layer_cost(spec, w, ai, a, pe, simd).cycles,
             *(ref.layer_cost(spec, w, ai, a, pe, simd).resources[r] for r in res))
            for w in bits for ai in bits for a in ao for f, (pe, simd) in enumerate(folds)
            if ref.buildable(spec, w, ai, a, pe, simd)
        ]
        want = np.array(want, dtype=float)
        assert n == len(want)
        assert np.array_equal(rows[np.lexsort(rows.T[::-1])], want[np.lexsort(want.T[::-1])]), spec.name


def test_table_pruning_shortcuts_agree():
    rng = np.random.default_rng(0)
    for trial in range(150):
        n = int(rng.integers(1, 50))
        k = int(rng.integers(1, 4))
        arr = np.zeros((n, 5 + k), dtype=np.int64)
        arr[:, 0], arr[:, 1], arr[:, 2] = rng.integers(2, 4, n), rng.integers(2, 4, n), -1
        arr[:, 3], arr[:, 4] = rng.permutation(n), rng.integers(1, 12, n)
        arr[:, 5] = rng.integers(0, 6, n)
        if trial % 2:
            arr[:, 6:] = rng.integers(0, 6, (n, k - 1))
        layer = LayerTable(None, [], None, [], -1, None, [], arr)
        for cmax in (None, 1, 4, 7, 11):
            sel = arr if cmax is None else arr[arr[:, 4] <= cmax]
            assert sorted(prune_on_resources(sel)) == sorted(layer.rows(cmax))
        got = pareto_by_choice(arr.astype(float), 5 + k)
        want = np.concatenate([arr[np.all(arr[:, :3] == key, axis=1)][pareto(arr[np.all(arr[:, :3] == key, axis=1)][:, 4:])]
                               for key in np.unique(arr[:, :3], axis=0)])
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.astype(float).tolist()))


def test_fpga_fewest_resources_at_a_rate(tiny):
    sens = unit_sensitivity(tiny, seed=1)
    pynq = get_cost_model("pynq-z2")
    fastest = allocate(tiny, sens, pynq, 4.0, time_limit_s=10)
    rate = fastest.solver["fps"] / 4
    fast = allocate(tiny, sens, pynq, 4.0, min_fps=rate, time_limit_s=10)
    lean = allocate(tiny, sens, pynq, 4.0, min_fps=rate, objective="resources", time_limit_s=10)
    assert [s["name"] for s in lean.solver["stages"]] == ["min_worst_group_loss", "min_weighted_resources", "min_bottleneck_cycles"]
    assert lean.solver["status"] == "OPTIMAL" and lean.solver["hardware_objective"] == "resources"

    def weighted(a):
        t = price(tiny, a, pynq)["total"]
        assert t["fits"] and t["fps"] >= rate
        return sum(t[r] / t["caps"][r] for r in t["caps"] if t["caps"][r] > 0)

    assert weighted(lean) <= weighted(fast) and lean.solver["fps"] <= fast.solver["fps"]
    assert weighted(lean) < weighted(fast) or lean.solver["fps"] == fast.solver["fps"]
    # the widths are the loss-optimal ones either way (no slack)
    assert lean.solver["objective_exact"] == pytest.approx(fast.solver["objective_exact"], abs=2 * fast.solver["loss_rounding_error"])
    uniform = Allocation.uniform(tiny, 4)
    assert price(tiny, uniform, pynq)["total"]["fits"]


def test_stopped_search_uses_best_found_and_reports_the_gap(monkeypatch):
    """A search stopped before its proof (here at CP-SAT's first solution, as the time limit
    stops it; bench/allocator_scale.py measures the time limit itself) returns the best
    allocation found, within the budget and the caps, and the report says which stages are
    unproven and how far from the bound the loss may be. No timing: the stop is CP-SAT's
    stop_after_first_solution, on one worker."""
    from fqhw.allocator import stages
    from fqhw.report.report import solver_line

    net = split_channel_groups(network_spec(FairCNN(CNNConfig(channels=(16, 32, 64))), (3, 32, 32), name="cnn"), 4, name="cnn-g4")
    sens = unit_sensitivity(net, seed=5)
    cost = get_cost_model("pynq-z2")
    monkeypatch.setitem(stages.SOLVER_PARAMETERS, "stop_after_first_solution", True)
    monkeypatch.setitem(stages.SOLVER_PARAMETERS, "num_workers", 1)
    alloc = allocate(net, sens, cost, 3.0, time_limit_s=60, workers=1, seed=0)
    s = alloc.solver
    assert s["status"] == "FEASIBLE" and alloc.avg_weight_bits(net) <= 3.0 + 1e-9 and price(net, alloc, cost)["total"]["fits"]
    unproven = [st for st in s["stages"] if st["status"] != "OPTIMAL"]
    assert unproven
    for st in unproven:  # each open stage's own gap is reported
        assert st["objective"] is not None and st["bound"] is not None and st["bound"] < st["objective"]
    line = solver_line(s)
    assert "the time limit (60 s) stopped the search: the best allocation found is used" in line
    assert f"gap to its bound {100 * s['gap']:.2f} %" in line
    for st in unproven:
        assert st["name"] in line
    monkeypatch.delitem(stages.SOLVER_PARAMETERS, "stop_after_first_solution")
    full = allocate(net, sens, cost, 3.0, time_limit_s=60, workers=1, seed=0)
    assert full.solver["status"] == "OPTIMAL"
    assert full.solver["objective_exact"] <= s["objective_exact"] + 2 * s["loss_rounding_error"]


@pytest.mark.slow
def test_residual_joins_share_one_activation_width():
    """Activations added at a residual join are added code to code (FINN's AddStreams after
    one shared quantizer): the allocator gives each join group one width. Without the joins
    the same problem picks different widths inside the groups, so the constraint is what
    makes them equal."""
    import dataclasses

    import timm

    net = network_spec(timm.create_model("resnet18", pretrained=False, num_classes=4), (3, 64, 64), name="r18")
    groups = net.join_groups()
    assert len(groups) == 4 and {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"} in groups
    rng = np.random.default_rng(3)
    sens = unit_sensitivity(net)
    for s in net.layers:  # activation sensitivities that differ a lot between layers
        f = rng.uniform(0.01, 3.0, len(GROUPS))
        sens.act[s.act_group] = {b: f * 3.0 ** (-(b - 2)) for b in range(2, 9)}
    cost = get_cost_model("u250", mem_mode="external")
    pin = {"layer2.0.downsample.0": 4}  # one member of a join group pinned narrower
    tied = allocate(net, sens, cost, 4.0, pinned_act=pin, time_limit_s=30, workers=2, seed=0)
    act = {la.name: la.act_bits for la in tied.layers}
    for g in groups:
        assert len({act[m] for m in g}) == 1, (g, {m: act[m] for m in g})
    assert act["layer2.1.conv2"] == 4  # the pin reached the whole group
    free = allocate(dataclasses.replace(net, joins=[]), sens, cost, 4.0, pinned_act=pin, time_limit_s=30, workers=2, seed=0)
    act_free = {la.name: la.act_bits for la in free.layers}
    assert act_free["layer2.0.downsample.0"] == 4 and act_free["layer2.1.conv2"] != 4
    # the solver's predicted loss counts every member's activation
    assert tied.solver["objective_exact"] == pytest.approx(float(np.max(tied.predicted_loss(net, sens))))
    with pytest.raises(FqhwError, match="meet at residual adds and must share one width"):
        allocate(net, sens, cost, 4.0, pinned_act={"layer2.0.downsample.0": 4, "layer2.0.conv2": 6}, time_limit_s=30)
