"""The fairness term of QAT and the fine-tuning loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fqhw.quant.qat import fairness_loss


def test_fairness_loss_adds_max_minus_min_group_loss():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    groups = [ce[g == k].mean() for k in range(3)]
    expected = ce.mean() + 0.7 * (max(groups) - min(groups))
    assert float(fairness_loss(logits, y, g, 0.7)) == pytest.approx(float(expected), rel=1e-6)
    assert float(fairness_loss(logits, y, g, 0.0)) == pytest.approx(float(ce.mean()), rel=1e-6)
    one_group = torch.zeros(6, dtype=torch.long)
    assert float(fairness_loss(logits, y, one_group, 5.0)) == pytest.approx(float(ce.mean()), rel=1e-6)


# ----------------------------------------------------------------------------- tune


SIZE = 16


def _tiny_setup():
    from fqhw.allocator.allocation import Allocation
    from fqhw.data.registry import load_data
    from fqhw.data.synthetic import SyntheticDermConfig
    from fqhw.models.cnn import CNNConfig, FairCNN
    from fqhw.network import network_spec
    from fqhw.quant.qmodel import build_quant_model, calibrate

    torch.set_num_threads(1)
    data = load_data("builtin", builtin=SyntheticDermConfig(n_train=160, n_val=120, n_test=60, image_size=SIZE))
    torch.manual_seed(0)
    fm = FairCNN(CNNConfig(image_size=SIZE, channels=(4, 8), num_classes=data.train.num_classes)).eval()
    net = network_spec(fm, data.train.input_shape)
    qm = build_quant_model(fm, Allocation.uniform(net, 4))
    calibrate(qm, data.train.loader(64, shuffle=True, seed=0), batches=2)
    return data, qm


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tune_keeps_the_candidate_best_on_validation_and_its_weights():
    import copy

    from fqhw.quant.qat import evaluate_groups, finetune, tune

    data, qm = _tiny_setup()
    start = copy.deepcopy(qm)
    grid = ((0.0, 1e-4), (1.0, 3e-3), (0.5, 1e-3))
    res = tune(qm, data, epochs=2, grid=grid, progress=False)
    assert [(c["fairness_lambda"], c["lr"]) for c in res.candidates] == list(grid)
    keys = [(c["val_worst_group_acc"], c["val_mean_group_acc"]) for c in res.candidates]
    chosen = keys.index(max(keys))  # first of the best: ties go to the earlier grid entry
    assert (res.fairness_lambda, res.lr) == grid[chosen]
    # the model holds the chosen run's weights: the same as that run alone from the same start
    alone = copy.deepcopy(start)
    finetune(alone, data, epochs=2, lr=grid[chosen][1], fairness_lambda=grid[chosen][0], progress=False)
    got, ref = _weights(qm), _weights(alone)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    val = evaluate_groups(qm, data.val)
    assert (val["worst_group_acc"], val["mean_group_acc"]) == keys[chosen]
    # the candidates did not all train to the same weights (the grid changes something)
    other = copy.deepcopy(start)
    j = (chosen + 1) % len(grid)
    finetune(other, data, epochs=2, lr=grid[j][1], fairness_lambda=grid[j][0], progress=False)
    assert any(not torch.equal(got[k], v) for k, v in _weights(other).items())


def test_tune_refuses_an_empty_grid_and_the_flow_refuses_bad_entries(tmp_path):
    from fqhw.errors import FqhwError
    from fqhw.flow import CompileConfig, validate
    from fqhw.quant.qat import tune

    data, qm = _tiny_setup()
    with pytest.raises(ValueError, match="at least one"):
        tune(qm, data, epochs=1, grid=(), progress=False)
    with pytest.raises(FqhwError, match="lambda must be >= 0 and lr > 0"):
        validate(CompileConfig(out_dir=tmp_path / "o", qat_grid=((0.5, 0.0),)))
