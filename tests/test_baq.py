"""BAQ (learned widths), the solver's projection, recovery, weight-only and iterative QAT."""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from fqhw.allocator.allocation import Allocation
from fqhw.allocator.cpsat import allocate, price
from fqhw.data.registry import load_data
from fqhw.data.synthetic import SyntheticDermConfig
from fqhw.errors import InfeasibleError
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.hwmodels import get_cost_model
from fqhw.hwmodels.finn import FinnCostModel
from fqhw.hwmodels.finn_boards import DEFAULT_UTILISATION
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.network import network_spec, split_channel_groups
from fqhw.quant.baq import iterative_qat, learn_bits, recover
from fqhw.quant.baq_model import ActFakeQuant, BAQFairCNN, weight_only_model
from fqhw.quant.projection import BudgetError, bitrate_penalty, check_budget_met, project
from fqhw.quant.qmodel import build_quant_model

from conftest import sensitivity

torch.set_num_threads(1)
TARGET = "pynq-z2"


@pytest.fixture(scope="module")
def splits():
    cfg = SyntheticDermConfig(n_train=256, n_val=96, n_test=96, image_size=16)
    return load_data("builtin", image_size=16, seed=0, builtin=cfg)


@pytest.fixture(scope="module")
def setup(splits):
    torch.manual_seed(0)
    model = FairCNN(CNNConfig(image_size=16, channels=(4, 8), num_classes=splits.train.num_classes)).eval()
    net = network_spec(model, splits.train.input_shape)
    return model, net


@pytest.fixture(scope="module")
def cost():
    return get_cost_model(TARGET)


@pytest.fixture(scope="module")
def warm(setup, cost):
    _, net = setup
    return allocate(net, sensitivity(net), cost, budget=4, time_limit_s=10)


def levels_per_channel(w: torch.Tensor) -> list[int]:
    return [len(torch.unique(row)) for row in w.detach().reshape(w.shape[0], -1)]


def test_ste_gradient_reaches_the_bit_logits(setup, splits):
    model, net = setup
    twin = BAQFairCNN(model, Allocation.uniform(net, 4, TARGET), net, pinned={"head": 8})
    assert twin.unit_bits(rounded=True) == {"features.0.conv": 4, "features.1.conv": 4, "head": 8}
    assert twin.unit_bits()["features.1.conv"] == pytest.approx(4.0, abs=1e-4)  # initialised at the warm start
    x, y, _ = splits.train.tensors()
    nn.functional.cross_entropy(twin(x[:64]), y[:64]).backward()
    for layer in ("features.0.conv", "features.1.conv"):
        g = twin.quantizer(layer).bit_logit.grad
        assert g is not None and torch.all(g != 0) and torch.isfinite(g).all()
    head = twin.quantizer("head")
    assert head.bit_logit.grad is None or torch.all(head.bit_logit.grad == 0)  # pinned: never learns
    # the forward pass uses the rounded width: a narrow-range 4-bit grid, at most 15 levels
    w = twin.module("features.1.conv").weight
    assert max(levels_per_channel(w)) <= 2**4 - 1
    # moving the continuous width within its rounding interval changes nothing (STE)
    before = w.detach().clone()
    twin.set_unit_bits({"features.1.conv": 4.3})
    assert twin.unit_bits(rounded=True)["features.1.conv"] == 4
    assert torch.equal(twin.module("features.1.conv").weight.detach(), before)
    twin.set_unit_bits({"features.1.conv": 4.6})
    assert twin.unit_bits(rounded=True)["features.1.conv"] == 5
    assert max(levels_per_channel(twin.module("features.1.conv").weight)) > 15


def test_quantizer_is_the_deployed_rule(setup):
    model, net = setup
    alloc = Allocation.uniform(net, 3, TARGET)
    twin = BAQFairCNN(model, alloc, net, learn_bits=False, dead_zone=None)
    q = build_quant_model(model, alloc)
    for name, ql in q.layers.items():
        assert torch.allclose(twin.module(name).weight, ql.compute.quant_weight().value, atol=1e-6)


@pytest.mark.parametrize("start,budget", [(8, 4.0), (2, 5.0)])
def test_bitrate_term_drives_the_average_to_the_budget(setup, start, budget):
    """From above and from below: the term alone brings the average to the budget."""
    model, net = setup
    twin = BAQFairCNN(model, Allocation.uniform(net, start, TARGET), net)
    opt = torch.optim.Adam(twin.bit_parameters(), lr=0.05)
    first = float(twin.avg_bits().detach())
    for _ in range(300):
        loss = bitrate_penalty(twin.avg_bits(), budget)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = float(twin.avg_bits().detach())
    assert first == pytest.approx(start, abs=1e-3)
    assert abs(last - budget) < 0.1 < abs(first - budget)
    assert float(bitrate_penalty(torch.tensor(budget), budget)) == 0.0
    # over the budget costs more than the same distance under it
    assert float(bitrate_penalty(torch.tensor(budget + 1), budget)) > float(bitrate_penalty(torch.tensor(budget - 1), budget)) > 0


def _distance(net, bits, learned):
    return sum(s.params * abs(b - learned[s.name]) for s, b in zip(net.layers, bits))


def _fits(net, bits, warm, cost) -> bool:
    """Whether these weight widths (the warm start's activations) fit the target's caps at
    some folding: the allocator with every width pinned either finds a folding or cannot."""
    zero = {s.name: {b: np.zeros(1) for b in range(2, 9)} for s in net.layers}
    acts = {s.name: warm.layer(s.name).act_bits for s in net.layers if s.has_output_act}
    table = Sensitivity(["none"], zero, {g: {a: np.zeros(1)} for g, a in acts.items()})
    try:
        allocate(net, table, cost, budget=8, pinned=dict(zip([s.name for s in net.layers], bits)), pinned_act=acts,
                 act_bits=sorted(set(acts.values())), time_limit_s=10)
    except InfeasibleError:
        return False
    return True


@pytest.mark.parametrize("pinned,budget,lut", [(None, 4.0, None), ({"features.0.conv": 8, "head": 8}, 6.0, None), (None, 4.0, 2300)])
def test_projection_meets_budget_and_caps_and_is_nearest(setup, warm, cost, pinned, budget, lut):
    _, net = setup
    loose = cost
    if lut is not None:  # a LUT cap the nearest widths under the board's own caps do not always meet
        cost = FinnCostModel(TARGET, utilisation={**DEFAULT_UTILISATION, "LUT": lut / cost.limits.totals["LUT"]})
    moved = 0
    rng = np.random.default_rng(1)
    names = [s.name for s in net.layers]
    vectors = [dict(zip(names, rng.uniform(1.5, 8.5, len(names)))) for _ in range(3)]
    vectors += [dict.fromkeys(names, 8.49), dict.fromkeys(names, 1.51), {n: float(warm.layer(n).weight_bits) for n in names}]
    total = Fraction(net.total_params)
    for learned in vectors:
        alloc = project(net, learned, warm, budget=budget, cost_model=cost, pinned=pinned, time_limit_s=10)
        if lut is not None:
            free = project(net, learned, warm, budget=budget, cost_model=loose, pinned=pinned, time_limit_s=10)
            moved += [la.weight_bits for la in free.layers] != [la.weight_bits for la in alloc.layers]
        assert Fraction(sum(net.layer(la.name).params * la.weight_bits for la in alloc.layers)) / total <= Fraction(budget)
        assert alloc.avg_weight_bits(net) <= budget
        priced = price(net, alloc, cost)
        assert priced["total"]["fits"]
        assert all(priced["total"][r] <= cap for r, cap in priced["total"]["caps"].items())
        for la in alloc.layers:  # activations stay the warm start's; pins hold
            assert la.act_bits == warm.layer(la.name).act_bits
            if pinned and la.name in pinned:
                assert la.weight_bits == pinned[la.name]
        # nearest: no budget-feasible width vector that fits the caps is closer to the learned widths
        got = _distance(net, [la.weight_bits for la in alloc.layers], learned)
        tol = 1e-6 * max(1.0, got) + 0.5 * len(names) * alloc.solver["loss_scale"] ** -1
        closer = [
            bits for bits in itertools.product(range(2, 9), repeat=len(names))
            if sum(s.params * b for s, b in zip(net.layers, bits)) <= budget * net.total_params
            and all(not pinned or n not in pinned or b == pinned[n] for n, b in zip(names, bits))
            and _distance(net, bits, learned) < got - tol
        ]
        assert not any(_fits(net, bits, warm, cost) for bits in closer)
        check_budget_met(net, alloc, budget)  # does not raise
        # filling the budget only raises widths, stays within it and fits
        filled = project(net, learned, warm, budget=budget, cost_model=cost, pinned=pinned, fill_budget=True, time_limit_s=10)
        assert all(f.weight_bits >= a.weight_bits for f, a in zip(filled.layers, alloc.layers))
        assert alloc.avg_weight_bits(net) <= filled.avg_weight_bits(net) <= budget
        assert price(net, filled, cost)["total"]["fits"]
        # ... and no single unit could go one bit wider within the budget and the caps
        for k, la in enumerate(filled.layers):
            if la.weight_bits < 8 and not (pinned and la.name in pinned):
                wider = [f.weight_bits + (j == k) for j, f in enumerate(filled.layers)]
                assert filled.avg_weight_bits(net) + net.layers[k].params / net.total_params > budget or not _fits(net, wider, warm, cost)
    assert lut is None or moved  # the tight cap did change some projection
    # the warm start's own widths project onto themselves when they meet the budget
    if pinned is None and lut is None:
        same = project(net, {n: float(warm.layer(n).weight_bits) for n in names}, warm, budget=budget, cost_model=cost)
        assert [la.weight_bits for la in same.layers] == [la.weight_bits for la in warm.layers]


def test_check_budget_met_raises(setup):
    _, net = setup
    with pytest.raises(BudgetError, match="over the budget"):
        check_budget_met(net, Allocation.uniform(net, 5, TARGET), 4.0)
    assert check_budget_met(net, Allocation.uniform(net, 4, TARGET), 4.0) == 4


@pytest.mark.parametrize("mode", ["grid", "reference"])
def test_dead_zone_zeroes_small_weights(setup, mode):
    model, net = setup
    twin = BAQFairCNN(model, Allocation.uniform(net, 8, TARGET), net, dead_zone=mode)
    layer = "features.1.conv"
    q = twin.quantizer(layer)
    assert float(q.dead_zone().detach().max()) < 1e-3  # starts near 0
    w = twin.latent_weight(layer).detach().reshape(8, -1)
    amax = w.abs().amax(1, keepdim=True)
    assert int((twin.module(layer).weight.reshape(8, -1) == 0).sum()) < int((w.abs() < 0.25 * amax).sum())
    with torch.no_grad():
        q.dz_logit.fill_(0.0)  # d = 0.5 max|w|: zero below 0.25 max|w|
    wq = twin.module(layer).weight.reshape(8, -1)
    small = w.abs() < 0.25 * amax
    assert small.any() and (~small).any()
    assert torch.all(wq[small] == 0)
    assert torch.all(wq[~small] != 0)
    assert torch.all(torch.sign(wq[~small]) == torch.sign(w[~small]))
    wq.sum().backward()
    assert q.dz_logit.grad is not None and torch.all(q.dz_logit.grad != 0)
    state = twin.float_state(prune_dead_zone=True)
    assert torch.all(state[f"{layer}.weight"].reshape(8, -1)[small] == 0)


def test_weight_only_model_leaves_activations_float(setup, splits):
    model, net = setup
    alloc = Allocation.uniform(net, 3, TARGET)
    wo = weight_only_model(model, alloc, net).eval()
    assert not any(isinstance(m, ActFakeQuant) for m in wo.modules())
    assert isinstance(wo.features[0].relu, nn.ReLU)
    assert not any(p.requires_grad for p in wo.bit_parameters())
    assert all(n <= 2**3 - 1 for n in levels_per_channel(wo.module("features.1.conv").weight))
    full = BAQFairCNN(model, alloc, net, learn_bits=False).eval()
    full.calibrate(splits.train.loader(64, shuffle=False), batches=2)
    x, _, _ = splits.train.tensors()
    outs = {}
    for key, m in (("wo", wo), ("full", full)):
        h = m.features[0].relu.register_forward_hook(lambda _m, _i, o, key=key: outs.__setitem__(key, o))
        with torch.no_grad():
            m(x[:16])
        h.remove()
    assert len(torch.unique(outs["wo"])) > 2**8  # float activations
    assert len(torch.unique(outs["full"])) <= 2**3  # 3-bit unsigned codes


def test_channel_group_units(setup, cost, warm):
    model, net = setup
    gnet = split_channel_groups(net, {"features.1.conv": 2})
    alloc = Allocation(TARGET, [
        *[type(warm.layers[0])(s.name, 4, 4 if s.has_output_act else None) for s in gnet.layers]
    ])
    twin = BAQFairCNN(model, alloc, gnet)
    twin.set_unit_bits({"features.1.conv:g0": 2, "features.1.conv:g1": 8})
    counts = levels_per_channel(twin.module("features.1.conv").weight)
    assert max(counts[:4]) <= 3 and min(counts[4:]) > 15
    projected = project(gnet, twin.unit_bits(), alloc, budget=4.0, cost_model=cost, time_limit_s=10)
    assert projected.avg_weight_bits(gnet) <= 4.0


def test_iterative_qat_freezes_the_stages_it_claims(setup, splits):
    model, net = setup
    alloc = Allocation.uniform(net, 4, TARGET)
    fresh = BAQFairCNN(model, alloc, net, learn_bits=False, dead_zone=None)
    start = {layer: fresh.module(layer).weight.detach().clone() for layer in ("features.0.conv", "features.1.conv", "head")}
    res = iterative_qat(model, alloc, splits, net, stages=2, order="size", epochs_per_stage=1, lr=5e-3, seed=0)
    assert [s["units"] for s in res.stages] == [["features.1.conv", "features.0.conv"], ["head"]]
    # stage 1 froze its units at the quantized float weights, before any training ...
    for name in res.stages[0]["units"]:
        assert torch.equal(res.frozen[name], start[name])
    # ... while the head trained in float during stage 1, then was frozen
    assert not torch.allclose(res.frozen["head"], start["head"])
    for name, rows in res.frozen.items():  # nothing moved after its freeze
        assert torch.equal(res.model.latent_weight(name), rows)
        assert torch.allclose(res.model.module(name).weight, rows, atol=1e-6)  # on the grid
        assert max(levels_per_channel(rows)) <= 2**4 - 1
    assert len(res.stages[1]["history"]) == 1
    # deployable: Brevitas maps the on-grid weights onto the same values
    q = build_quant_model(res.float_model(model), alloc)
    for name, ql in q.layers.items():
        assert torch.allclose(ql.compute.quant_weight().value, res.frozen[name], atol=1e-6)


def test_learn_bits_projects_and_recovers(setup, splits, warm, cost):
    model, net = setup
    res = learn_bits(
        model, Allocation.uniform(net, 8, TARGET), splits, net, budget=4.0, epochs=2, bit_lr=0.5, bitrate_lambda=5.0,
        cost_model=cost, pinned={}, time_limit_s=10, seed=0,
    )
    hist = res.history
    assert len(hist) == 2 and hist[0]["avg_bits"] < 8 and abs(hist[-1]["avg_bits"] - 4) < abs(hist[0]["avg_bits"] - 4)
    assert {"val_worst_group_acc", "val_mean_group_acc", "train_ce", "train_bitrate", "avg_bits_rounded"} <= set(hist[-1])
    assert res.allocation.avg_weight_bits(net) <= 4.0 and price(net, res.allocation, cost)["total"]["fits"]
    assert res.allocation.solver["projection"]["learned_bits"] == pytest.approx(res.learned_bits)
    fm = res.float_model(model)
    assert not torch.equal(fm.features[1].conv.weight, model.features[1].conv.weight)  # BAQ trained the weights
    qmodel, qat = recover(fm, res.allocation, splits, net, budget=4.0, epochs=1, seed=0)
    assert qat.epochs_run == 1
    assert {n: ql.weight_bits for n, ql in qmodel.layers.items()} == {la.name: la.weight_bits for la in res.allocation.layers}
    with pytest.raises(BudgetError):
        recover(fm, Allocation.uniform(net, 8, TARGET), splits, net, budget=4.0, epochs=1)


def test_learn_bits_refuses_an_unreachable_budget_before_training(setup, splits, cost):
    from fqhw.errors import InfeasibleError

    model, net = setup
    with pytest.raises(InfeasibleError, match="budget 3"):
        learn_bits(model, Allocation.uniform(net, 8, TARGET), splits, net, budget=3.0, epochs=1, cost_model=cost,
                   pinned={"features.0.conv": 8, "head": 8})


@pytest.mark.slow
def test_compile_with_learned_bits(compiled, tmp_path):
    """`fqhw compile --baq-epochs N`: BAQ between allocate and quantize; what is deployed is
    the projection, within the budget, and the build of it is bit-exact."""
    import json

    from conftest import TINY

    from fqhw.cli import main

    _, cache = compiled
    out = tmp_path / "baq"
    assert main(["compile", "--out", str(out), "--cache-dir", str(cache), *TINY, "--baq-epochs", "1"]) == 0
    rep = json.loads((out / "report.json").read_text())
    deployed = {la["name"]: la["weight_bits"] for la in rep["allocation"]["layers"]}
    assert rep["baq"]["projected"] == deployed
    assert json.loads((out / "allocation.json").read_text())["layers"][1]["weight_bits"] == deployed[rep["allocation"]["layers"][1]["name"]]
    assert rep["allocation"]["avg_weight_bits"] <= rep["budget"] + 1e-12
    assert "baq" in rep["steps"] and rep["bit_exact"]["ok"] is True
    assert "Learned bits (BAQ)" in (out / "report.md").read_text()
