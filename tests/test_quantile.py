"""FairQuant's quantile allocation: ranking, exact budgets, pins, monotonicity."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from fqhw.allocator.quantile import quantile_allocate
from fqhw.errors import FqhwError, InfeasibleError
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.network import network_spec, split_channel_groups

FR = {2: 0.2, 4: 0.4, 8: 0.4}


@pytest.fixture(scope="module")
def net():
    # conv0: 27 x 4 = 108 params, conv1: 36 x 8 = 288, head: 8 x 3 = 24; 420 in all
    return network_spec(FairCNN(CNNConfig(image_size=16, channels=(4, 8), num_classes=3)), (3, 16, 16))


def channel_scores(net, seed):
    rng = np.random.default_rng(seed)
    return {s.name: rng.random(s.mh) for s in net.layers}


def flat(res):
    """(score, bits, params, pinned) of every unit."""
    return [(u.score, u.bits, u.params, u.pinned) for u in res.units]


def assert_ranked(res):
    free = sorted((u.score, u.bits) for u in res.units if u.pinned is None)
    assert [b for _, b in free] == sorted(b for _, b in free), "a more important unit got fewer bits"


def test_layer_units_follow_the_ranking(net):
    scores = {"features.0.conv": [1.0], "features.1.conv": [3.0], "head": [2.0]}
    res = quantile_allocate(net, scores, {2: 1 / 3, 4: 1 / 3, 8: 1 / 3})
    assert [la.weight_bits for la in res.allocation.layers] == [2, 8, 4]
    assert [la.act_bits for la in res.allocation.layers] == [8, 8, None]
    assert all(la.pe == la.simd == 1 for la in res.allocation.layers)
    assert res.allocation.solver["unit"] == "layer" and res.allocation.solver["mode"] == "fractions"
    res6 = quantile_allocate(net, scores, {2: 1 / 3, 4: 1 / 3, 8: 1 / 3}, act_bits=6)
    assert [la.act_bits for la in res6.allocation.layers] == [6, 6, None]


def test_channel_units_fractions(net):
    res = quantile_allocate(net, channel_scores(net, 0), FR)
    bits = sorted(u.bits for u in res.units)
    # 15 channels: ceil(15 * 0.2) = 3 at 2 bits, ceil(15 * 0.6) = 9 at <= 4 bits
    assert bits == [2] * 3 + [4] * 6 + [8] * 6
    assert_ranked(res)
    assert {k: len(v) for k, v in res.unit_bits.items()} == {"features.0.conv": 4, "features.1.conv": 8, "head": 3}
    # the per-layer allocation: at least each layer's channel mean rounded down, at most the
    # widest width, within the channels' own total
    for la in res.allocation.layers:
        assert np.floor(res.unit_bits[la.name].mean()) <= la.weight_bits <= 8
    assert res.allocation.avg_weight_bits(net) <= res.unit_avg_weight_bits


def test_per_layer_widths_spend_what_rounding_leaves(net):
    scores = {"features.0.conv": [8, 0, 0, 0], "features.1.conv": [9] + [0] * 7, "head": [7, 0, 0]}
    # widths 2 or 8, budget 3.5 x 420 = 1470 bits; all at 2 is 840, an upgrade costs 6 bits
    # a weight: conv1 ch0 (216), conv0 ch0 (162), head ch0, ch2, ch1 (48 each; ties go in
    # reverse network order) -> 1362; the next (conv1 ch7, 216) does not fit
    res = quantile_allocate(net, scores, 3.5, per_weight=True, widths=(2, 8))
    assert [list(v) for v in res.unit_bits.values()] == [[8, 2, 2, 2], [8] + [2] * 7, [8, 8, 8]]
    # floors 3, 2, 8 use 1092 bits; the fill goes by mean unit score: head (7/3, already at
    # 8), conv0 (2: +108 a bit), conv1 (1.125: +288 a bit, never fits): conv0 to 6 (1416)
    assert [la.weight_bits for la in res.allocation.layers] == [6, 2, 8]
    assert res.allocation.avg_weight_bits(net) == pytest.approx(1416 / 420)
    # fraction mode caps the fill at the units' own total instead
    fr = quantile_allocate(net, scores, {2: 0.8, 8: 0.2})  # 15 channels: 12 at 2, 3 at 8
    assert [list(v) for v in fr.unit_bits.values()] == [[8, 2, 2, 2], [8] + [2] * 7, [8, 2, 2]]
    # total 27 * 14 + 36 * 22 + 8 * 12 = 1266 bits; floors 3, 2, 4 use 996; passes raise
    # head (+24) and conv0 (+108) twice: 1260; a third step fits neither
    assert [la.weight_bits for la in fr.allocation.layers] == [5, 2, 6]
    assert fr.allocation.avg_weight_bits(net) == pytest.approx(1260 / 420)


@pytest.mark.parametrize("seed", range(25))
def test_fraction_budget_is_exact(net, seed):
    rng = np.random.default_rng(seed)
    widths = sorted(rng.choice(np.arange(2, 9), size=rng.integers(1, 5), replace=False))
    cuts = np.sort(rng.integers(0, 101, len(widths) - 1))
    fr = {int(b): float(f) / 100 for b, f in zip(widths, np.diff([0, *cuts, 100]))}
    grouped = split_channel_groups(net, 2) if seed % 3 == 0 else net
    pins = {"head": int(rng.integers(2, 9))} if seed % 2 else None
    try:
        res = quantile_allocate(grouped, channel_scores(net, seed), fr, pinned=pins)
    except InfeasibleError:  # only when the pin cannot be paid for by narrowing every free unit
        assert pins and (15 * sum(Fraction(repr(f)) * b for b, f in fr.items()) < 3 * pins["head"] + 12 * min(fr))
        return
    n = len(res.units)
    assert Fraction(sum(u.bits for u in res.units)) <= n * sum(Fraction(repr(f)) * b for b, f in fr.items())
    assert_ranked(res)
    if pins:
        assert all(u.bits == pins["head"] for u in res.units if u.spec == "head")


@pytest.mark.parametrize("chain", ["level", "unit"])
@pytest.mark.parametrize("seed", range(8))
def test_per_weight_budget_is_exact_and_monotone(net, seed, chain):
    scores = channel_scores(net, seed) if seed % 2 else {s.name: [float(v)] for s, v in zip(net.layers, np.random.default_rng(seed).random(3))}
    ladder = range(2, 9) if seed % 3 else (2, 4, 8)
    pins = {"head": 8} if seed % 4 == 1 else None
    prev = None
    for budget in np.round(np.arange(2.5, 8.01, 0.25), 2):
        res = quantile_allocate(net, scores, float(budget), per_weight=True, widths=ladder, chain=chain, pinned=pins)
        used = sum(u.params * u.bits for u in res.units)
        assert Fraction(used, net.total_params) <= Fraction(repr(float(budget)))
        assert Fraction(sum(net.layer(la.name).params * la.weight_bits for la in res.allocation.layers), net.total_params) <= Fraction(repr(float(budget)))
        assert_ranked(res)
        now = [u.bits for u in res.units]
        if prev is not None:
            assert all(a >= b for a, b in zip(now, prev)), f"budget {budget} lowered a unit"
        prev = now
    assert set(prev) == {8}


def test_the_two_chains(net):
    scores = {"features.0.conv": [1.0], "features.1.conv": [3.0], "head": [2.0]}
    # 420 params, budget 4 = 1680 bits; all at 2 is 840. level: every layer to 4 (840) first
    level = quantile_allocate(net, scores, 4.0, per_weight=True, chain="level")
    assert [la.weight_bits for la in level.allocation.layers] == [4, 4, 4]
    # unit: conv1 (the most important, 288 params) 2 -> 4 (+576, 1416 bits), and the chain
    # stops at its 4 -> 8 (+1152): units 2, 4, 2
    unit = quantile_allocate(net, scores, 4.0, per_weight=True, chain="unit")
    assert [u.bits for u in unit.units] == [2, 4, 2]
    # the per-layer fill spends the 264 bits left one bit at a time, conv1 (+288 never
    # fits), head (+24), conv0 (+108), twice: 4, 4, 4 and exactly 1680 bits
    assert [la.weight_bits for la in unit.allocation.layers] == [4, 4, 4]
    # at 6.5 bits per weight (2730): conv1 to 8 (2568), head to 4, 8 (2712), conv0's 2 -> 4
    # (+216) does not fit; 18 bits are left, too few for any layer's next bit
    unit = quantile_allocate(net, scores, 6.5, per_weight=True, chain="unit")
    assert [u.bits for u in unit.units] == [2, 8, 8]
    assert [la.weight_bits for la in unit.allocation.layers] == [2, 8, 8]
    with pytest.raises(FqhwError, match="unknown chain"):
        quantile_allocate(net, scores, 4.0, per_weight=True, chain="random")


def test_per_weight_budget_can_be_met_with_equality(net):
    res = quantile_allocate(net, channel_scores(net, 1), 4.0, per_weight=True, chain="level")
    assert res.unit_avg_weight_bits == 4.0 and all(u.bits == 4 for u in res.units)
    # 5 bits per weight: the 420 bits above 4 buy 4 -> 8 for the most important channels,
    # in rank order, until the next one does not fit (a conv1 channel costs 36 * 4 = 144)
    res = quantile_allocate(net, channel_scores(net, 1), 5.0, per_weight=True, chain="level")
    ranked = sorted(res.units, key=lambda u: -u.score)
    k = sum(u.bits == 8 for u in ranked)
    assert k > 0 and all(u.bits == 8 for u in ranked[:k]) and all(u.bits == 4 for u in ranked[k:])
    used = sum(u.params * u.bits for u in res.units)
    assert used <= 2100 < used + 4 * ranked[k].params


def test_pins_are_kept_and_paid_for(net):
    pins = {"features.0.conv": 8, "head": 8}
    res = quantile_allocate(net, channel_scores(net, 2), 4.0, per_weight=True, pinned=pins)
    for la in res.allocation.layers:
        if la.name in pins:
            assert la.weight_bits == 8 and set(res.unit_bits[la.name]) == {8}
    assert res.unit_avg_weight_bits <= 4.0
    # (108 + 24) * 8 + 288 * 2 = 1632 bits > 420 * 3.5 = 1470
    with pytest.raises(InfeasibleError, match=r"at least 3.89"):
        quantile_allocate(net, channel_scores(net, 2), 3.5, per_weight=True, pinned=pins)
    # fractions: a pin wider than every slot narrows free slots to pay for it
    # 15 channels: slots 3 x 2 + 12 x 4 = 54 bits; the 3 head channels at 8 take three
    # 4-bit slots and 12 bits more, paid by narrowing six free 4-bit slots to 2
    res = quantile_allocate(net, channel_scores(net, 2), {2: 0.2, 4: 0.8}, pinned={"head": 8})
    assert set(res.unit_bits["head"]) == {8}
    assert sorted(u.bits for u in res.units if u.pinned is None) == [2] * 9 + [4] * 3
    assert sum(u.bits for u in res.units) == 54
    with pytest.raises(InfeasibleError, match="pinned layers need more bits"):
        quantile_allocate(net, channel_scores(net, 2), {2: 0.2, 4: 0.8}, pinned={"features.1.conv": 8})


def test_more_fraction_budget_never_lowers_a_unit(net):
    scores = channel_scores(net, 3)
    budgets = [{2: 1.0}, {2: 0.6, 4: 0.4}, {2: 0.2, 4: 0.4, 8: 0.4}, {2: 0.1, 4: 0.4, 8: 0.5}, {4: 0.5, 8: 0.5}, {8: 1.0}]
    prev = None
    for b in budgets:
        now = [u.bits for u in quantile_allocate(net, scores, b).units]
        if prev is not None:
            assert all(x >= y for x, y in zip(now, prev))
        prev = now


def test_channel_groups_take_their_rows(net):
    grouped = split_channel_groups(net, 2)
    scores = {"features.0.conv": [0.0, 0.0, 9.0, 9.0], "features.1.conv": np.arange(8.0), "head": [5.0]}
    res = quantile_allocate(grouped, scores, {2: 0.5, 8: 0.5})
    names = [la.name for la in res.allocation.layers]
    assert names == [s.name for s in grouped.layers]
    assert list(res.unit_bits["features.0.conv:g0"]) == [2, 2] and list(res.unit_bits["features.0.conv:g1"]) == [8, 8]
    # 13 units, 7 at 2 bits: conv0 g0, conv1 channels 0-4; conv1:g1 = [2, 8, 8, 8] -> floor(6.5)
    assert list(res.unit_bits["features.1.conv:g1"]) == [2, 8, 8, 8]
    # the floor frees 0.5 x 144 = 72 bits: conv1:g1 +1 (144) does not fit, conv0:g0 +1 (54)
    # does (the fill skips what does not fit)
    assert [la.weight_bits for la in res.allocation.layers] == [3, 8, 2, 6, 8]


def test_bad_inputs(net):
    s = channel_scores(net, 0)
    with pytest.raises(FqhwError, match="sum to 1"):
        quantile_allocate(net, s, {2: 0.5, 4: 0.4})
    with pytest.raises(FqhwError, match="per_weight=True"):
        quantile_allocate(net, s, 4.0)
    with pytest.raises(FqhwError, match="not in the network"):
        quantile_allocate(net, s, FR, pinned={"nope": 8})
    with pytest.raises(FqhwError, match="one score or one per channel"):
        quantile_allocate(net, {**s, "head": [1.0, 2.0]}, FR)


def test_quantile_baseline_end_to_end():
    import torch

    from fqhw.allocator.quantile import quantile_baseline
    from fqhw.data.dataset import GroupedImages

    torch.manual_seed(0)
    model = FairCNN(CNNConfig(image_size=8, channels=(4, 8), num_classes=3)).eval()
    net8 = network_spec(model, (3, 8, 8))
    rng = np.random.default_rng(0)
    n = 36
    images, labels = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8), rng.integers(0, 3, n)
    two = GroupedImages(images, labels, np.repeat([0, 1], n // 2), ["light", "dark"], ["a", "b", "c"])
    pins = {"features.0.conv": 8, "head": 8}
    res = quantile_baseline(model, net8, two, 4.0, method="grape", reducer="subtractive", per_weight=True, pinned=pins)
    assert res.allocation.avg_weight_bits(net8) <= 4.0
    assert [la.weight_bits for la in res.allocation.layers][::2] == [8, 8]
    three = GroupedImages(images, labels, np.repeat([0, 1, 2], n // 3), ["I", "II", "III"], ["a", "b", "c"])
    res = quantile_baseline(model, net8, three, FR, method="gradient", reducer="cvar", reducer_params={"alpha": 0.5})
    assert_ranked(res)
    with pytest.raises(FqhwError, match=r"exactly two groups, got 3 \(I, II, III\)"):
        quantile_baseline(model, net8, three, FR, method="grape", reducer="subtractive")
