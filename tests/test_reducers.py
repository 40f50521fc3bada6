"""Reducers across groups, on hand-made maps with hand-computed answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fqhw.errors import FqhwError
from fqhw.fairness.reducers import cvar_count, get_reducer, group_totals, known_reducers, unit_scores

# three groups, one layer of 2 output channels x 2 fan-in weights
A = np.array(
    [
        [[1.0, 0.0], [2.0, 4.0]],  # group 0
        [[3.0, 1.0], [0.0, 2.0]],  # group 1
        [[2.0, 5.0], [1.0, 0.0]],  # group 2
    ]
)


def test_max_and_mean():
    assert np.array_equal(get_reducer("max")(A), [[3, 5], [2, 4]])
    assert np.allclose(get_reducer("mean")(A), [[2, 2], [1, 2]])


def test_cvar_takes_the_mean_of_the_top_groups():
    # alpha 0.5, G 3: ceil(1.5) = 2 largest per weight
    assert np.allclose(get_reducer("cvar", alpha=0.5)(A), [[2.5, 3.0], [1.5, 3.0]])
    # alpha 0: every group (the mean); alpha 0.9: ceil(0.3) = 1 group (the max)
    assert np.allclose(get_reducer("cvar", alpha=0.0)(A), get_reducer("mean")(A))
    assert np.array_equal(get_reducer("cvar", alpha=0.9)(A), get_reducer("max")(A))
    assert cvar_count(0.7, 10) == 3  # (1 - 0.7) * 10 is 3.0000000000000004 in floats
    assert cvar_count(0.8, 5) == 1 and cvar_count(0.8, 6) == 2
    with pytest.raises(FqhwError, match=r"alpha"):
        get_reducer("cvar", alpha=1.0)


def test_balanced_divides_by_each_groups_share():
    # totals 7, 6, 8 of 21: shares 1/3, 2/7, 8/21; scaled maps 3*A0, 3.5*A1, 21/8*A2
    expected = np.maximum.reduce([3 * A[0], 3.5 * A[1], 21 / 8 * A[2]])
    assert np.allclose(group_totals(A), [7, 6, 8])
    assert np.allclose(get_reducer("balanced")(A), expected)
    assert np.allclose(expected, [[10.5, 13.125], [6, 12]])


def test_balanced_uses_network_wide_shares_and_skips_absent_groups():
    maps = {"a": np.array([[1.0, 1.0], [3.0, 0.0], [0.0, 0.0]]), "b": np.array([[2.0], [1.0], [0.0]])}
    # totals 4, 4, 0: shares 1/2, 1/2, 0 (the absent group keeps its zeros)
    out = get_reducer("balanced")(maps)
    assert np.allclose(out["a"], [6.0, 2.0]) and np.allclose(out["b"], [4.0])


def test_subtractive_two_groups():
    two = {"a": np.array([[1.0, 4.0], [2.0, 1.0]]), "b": np.array([[0.0], [3.0]])}
    # totals: group 0 = 5, group 1 = 6 -> group 1 is the worst-off (unprivileged) by default
    out = get_reducer("subtractive", beta=0.5)(two)
    assert np.allclose(out["a"], [2 - 0.5, 1 - 2.0]) and np.allclose(out["b"], [3.0])
    out0 = get_reducer("subtractive", beta=1.0, unprivileged=0)(two)
    assert np.allclose(out0["a"], [-1.0, 3.0]) and np.allclose(out0["b"], [-3.0])


def test_subtractive_refuses_more_than_two_groups():
    with pytest.raises(FqhwError, match=r"exactly two groups, got 3 \(I, II, III\).*light-dark") as e:
        get_reducer("subtractive", group_names=["I", "II", "III"])(A)
    assert "\n" not in str(e.value)


def test_registry():
    assert set(known_reducers()) == {"max", "mean", "cvar", "balanced", "subtractive"}
    with pytest.raises(FqhwError, match=r"unknown reducer 'median'; known: max, mean, cvar, balanced, subtractive"):
        get_reducer("median")
    with pytest.raises(FqhwError, match=r"takes alpha"):
        get_reducer("cvar", beta=2)
    assert repr(get_reducer("cvar", alpha=0.75)) == "cvar(alpha=0.75)"


def test_torch_maps_and_unit_scores():
    maps = {"conv": torch.tensor(A, dtype=torch.float32)}
    red = get_reducer("max")(maps)
    assert np.allclose(unit_scores(red, "channel")["conv"], [4.0, 3.0])
    assert np.allclose(unit_scores(red, "layer")["conv"], [3.5])
    signed = {"x": np.array([[-1.0, 3.0], [2.0, -4.0]])}
    assert np.allclose(unit_scores(signed, "channel")["x"], [2.0, 3.0])
    assert np.allclose(unit_scores(signed, "channel", absolute=False)["x"], [1.0, -1.0])
    with pytest.raises(FqhwError, match="unknown unit"):
        unit_scores(red, "weight")
