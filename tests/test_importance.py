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
