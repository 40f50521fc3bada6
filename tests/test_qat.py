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
