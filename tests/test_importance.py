"""Group-aware importance: the Fisher machinery and the shape of its answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fqhw.data.dataset import GroupedImages
from fqhw.fairness.importance import group_sensitivity, quantize_weight_per_channel
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.network import network_spec


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = FairCNN(CNNConfig(image_size=8, channels=(4, 8), num_classes=3)).eval()
    rng = np.random.default_rng(0)
    n = 48
    data = GroupedImages(
        rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8),
        rng.integers(0, 3, n),
        np.repeat([0, 1], n // 2),
        ["light", "dark"],
        ["a", "b", "c"],
    )
    return model, network_spec(model, (3, 8, 8)), data


def test_quantizer_is_symmetric_per_channel():
    w = torch.tensor([[0.6, -1.0, 0.25], [2.0, 1.2, -0.1]])
    q = quantize_weight_per_channel(w, 2)  # levels {-1, 0, 1} * max|w| per row
    assert torch.equal(q, torch.tensor([[1.0, -1.0, 0.0], [2.0, 2.0, -0.0]]))
    assert torch.equal(quantize_weight_per_channel(w, 8).abs().amax(1), w.abs().amax(1))


def test_weight_fisher_matches_a_per_sample_loop(setup):
    model, net, data = setup
    sens = group_sensitivity(model, net, data, bits=range(2, 5), max_per_group=64, batch_size=7)
    x, y, g = data.tensors()
    layer = net.layers[1].name
    w = dict(model.named_modules())[layer].weight
    for grp in (0, 1):
        fisher = torch.zeros_like(w)
        idx = torch.nonzero(g == grp).flatten()
        for i in idx:
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            fisher += w.grad**2
        err2 = (w.detach() - quantize_weight_per_channel(w.detach(), 3)) ** 2
        expected = 0.5 * float((fisher * err2).sum()) / len(idx)
        assert sens.weight[layer][3][grp] == pytest.approx(expected, rel=1e-4)


def test_sensitivity_shapes_and_ordering(setup):
    model, net, data = setup
    sens = group_sensitivity(model, net, data, max_per_group=32)
    assert sens.groups == ["light", "dark"]
    assert set(sens.weight) == {s.name for s in net.layers}
    assert set(sens.act) == {s.name for s in net.layers if s.has_output_act}
    for table in (sens.weight, sens.act):
        for per_bits in table.values():
            assert set(per_bits) == set(range(2, 9))
            assert all(v.shape == (2,) and (v >= 0).all() for v in per_bits.values())
            assert (per_bits[2] > per_bits[8]).all()
    # activation noise falls 4x per extra bit (step halves); exactly, by construction
    act = sens.act[net.layers[0].name]
    ratio = act[4] / act[5]
    assert ratio == pytest.approx(np.full(2, ((2**5 - 1) / (2**4 - 1)) ** 2))


def test_absent_group_predicts_nothing(setup):
    model, net, data = setup
    only_light = data.subset(np.flatnonzero(data.groups == 0))
    sens = group_sensitivity(model, net, only_light, max_per_group=16)
    assert all(v[1] == 0 for v in sens.weight[net.layers[0].name].values())
    assert all(v[0] > 0 for v in sens.weight[net.layers[0].name].values())


# ------------------------------------------------------------------ per-weight methods

from fqhw.data.synthetic import SyntheticDermConfig, generate  # noqa: E402
from fqhw.errors import FqhwError  # noqa: E402
from fqhw.fairness.importance import importance_maps, weight_table  # noqa: E402
from fqhw.network import split_channel_groups  # noqa: E402

NEW_METHODS = ("gradient", "grape", "hawq")


@pytest.fixture(scope="module")
def synth():
    """A tiny FairCNN on the built-in synthetic data at image size 16 (six skin types)."""
    torch.manual_seed(1)
    model = FairCNN(CNNConfig(image_size=16, channels=(4, 8), num_classes=4)).eval()
    data = generate(SyntheticDermConfig(n_train=24, n_val=96, n_test=12, image_size=16)).val
    net = network_spec(model, (3, 16, 16))
    fisher = group_sensitivity(model, net, data, max_per_group=12, batch_size=6)
    return model, net, data, fisher


@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_method_gives_finite_non_negative_tables(synth, method):
    model, net, data, fisher = synth
    sens = group_sensitivity(model, net, data, max_per_group=12, batch_size=6, method=method, draws=4)
    assert sens.method == method and len(sens.groups) == data.num_groups == 6
    assert set(sens.weight) == {s.name for s in net.layers}
    for layer, per_bits in sens.weight.items():
        arr = np.stack([per_bits[b] for b in range(2, 9)])
        assert arr.shape == (7, 6) and np.isfinite(arr).all() and (arr >= 0).all()
        # fewer bits, more predicted loss: 2 bits above 8 bits for every group, and the
        # layer's total over the groups falls with every extra bit
        assert (arr[0] > arr[-1]).all(), layer
        assert (np.diff(arr.sum(1)) < 0).all(), layer
    # the activation table is the Fisher one whatever the method
    assert sens.to_dict()["act"] == fisher.to_dict()["act"]


def test_maps_have_a_group_axis_and_match_hand_computed_scores(setup):
    model, net, data = setup
    x, y, g = data.tensors()
    layers = [s.name for s in net.layers]
    w = {n: dict(model.named_modules())[n].weight for n in layers}
    for method in ("gradient", "grape"):
        maps = importance_maps(model, net, data, method=method, max_per_group=64, batch_size=64)
        assert list(maps) == layers
        for grp in (0, 1):
            # one batch per group: the score of the group's mean loss
            model.zero_grad()
            nn.functional.cross_entropy(model(x[g == grp]), y[g == grp]).backward()
            for n in layers:
                assert maps[n].shape == (2, *w[n].shape)
                expect = w[n].grad.abs() if method == "gradient" else (w[n].grad * w[n].detach()) ** 2
                # the same numbers summed in another order (the samples are shuffled)
                assert torch.allclose(maps[n][grp], expect, rtol=1e-4, atol=1e-6 * float(expect.max()))
    model.zero_grad(set_to_none=True)


def test_tables_follow_the_documented_formulas(setup):
    model, net, data = setup
    name = net.layers[1].name
    w = dict(model.named_modules())[name].weight.detach().double()
    delta = w - quantize_weight_per_channel(w, 3)
    for method in NEW_METHODS:
        sens = group_sensitivity(model, net, data, bits=range(3, 4), max_per_group=64, method=method, draws=4)
        m = importance_maps(model, net, data, method=method, max_per_group=64, draws=4)[name].double()
        if method == "gradient":
            expect = (m.abs() * delta.abs()).flatten(1).sum(1)
        elif method == "grape":
            expect = (m * (delta / w) ** 2).flatten(1).sum(1)
        else:
            expect = (0.5 * (m * delta**2).flatten(1).sum(1)).clamp_min(0)
        assert sens.weight[name][3] == pytest.approx(expect.numpy(), rel=1e-6, abs=1e-15)


def test_grape_guards_zero_weights():
    w = torch.tensor([[0.0, 1.0, -0.5]])
    maps = {"l": torch.tensor([[[5.0, 1.0, 2.0]]])}
    t = weight_table(maps, {"l": w}, "grape", bits=[2])["l"][2]
    # 2 bits: levels {-1, 0, 1}: -0.5 rounds to -0 (round half to even), error 0.5 -> ratio 1
    assert t == pytest.approx([2.0 * 1.0]) and np.isfinite(t).all()


def test_hutchinson_matches_the_exact_hessian_diagonal():
    """Tiny two-layer tanh model: the Hutchinson map against the exact Hessian's diagonal
    (torch.autograd.functional.hessian), within 5 standard errors (per entry,
    sqrt(sum_{j != i} H_ij^2 / draws))."""
    from torch.autograd.functional import hessian
    from torch.func import functional_call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, bias=False), nn.Tanh(), nn.Linear(3, 2, bias=False)).eval()
    rng = np.random.default_rng(0)
    n, draws = 16, 1024
    data = GroupedImages(rng.integers(0, 256, (n, 3, 2, 2), dtype=np.uint8), rng.integers(0, 2, n), np.repeat([0, 1], n // 2), ["a", "b"], ["x", "y"])
    net = network_spec(model, (3, 2, 2))
    maps = importance_maps(model, net, data, method="hawq", draws=draws, batch_size=64)
    x, y, g = data.tensors()
    names = [s.name for s in net.layers]
    ws = {k: dict(model.named_modules())[k].weight.detach() for k in names}
    for grp in (0, 1):
        for name in names:
            def loss(wk):
                p = {k + ".weight": (wk if k == name else ws[k]) for k in names}
                return nn.functional.cross_entropy(functional_call(model, p, (x[g == grp],)), y[g == grp])

            H = hessian(loss, ws[name]).reshape(ws[name].numel(), -1)
            diag = torch.diagonal(H)
            sigma = (((H**2).sum(1) - diag**2) / draws).sqrt()
            err = (maps[name][grp].flatten() - diag).abs()
            assert (err <= 5 * sigma + 1e-7).all(), (grp, name, err.max())
            assert err.max() < 0.2 * diag.abs().max()


def test_group_by_class(synth):
    model, net, data, _ = synth
    sens = group_sensitivity(model, net, data, max_per_group=8, method="grape", group_by="class")
    assert sens.groups == data.class_names and len(sens.groups) == data.num_classes == 4
    assert all(v.shape == (4,) for per_bits in sens.weight.values() for v in per_bits.values())
    assert all(v.shape == (4,) for per_bits in sens.act.values() for v in per_bits.values())
    assert sens.method == "grape/class"
    maps = importance_maps(model, net, data, max_per_group=8, method="gradient", group_by="class")
    assert all(m.shape[0] == 4 for m in maps.values())


def test_channel_groups_split_the_layer_tables(setup):
    model, net, data = setup
    whole = group_sensitivity(model, net, data, max_per_group=16, method="gradient")
    split = group_sensitivity(model, split_channel_groups(net, 2), data, max_per_group=16, method="gradient")
    name = net.layers[1].name
    assert {f"{name}:g0", f"{name}:g1"} <= set(split.weight) and name in split.act
    for b in (2, 5):
        assert split.weight[f"{name}:g0"][b] + split.weight[f"{name}:g1"][b] == pytest.approx(whole.weight[name][b])


def test_unknown_options_are_one_line_errors(setup):
    model, net, data = setup
    with pytest.raises(FqhwError, match="unknown importance method 'hessian'; known: fisher, gradient, grape, hawq"):
        group_sensitivity(model, net, data, method="hessian")
    with pytest.raises(FqhwError, match="unknown group_by 'sex'; known: attribute, class"):
        importance_maps(model, net, data, group_by="sex")
