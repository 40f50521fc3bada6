"""group_metrics on hand-made examples whose answers are worked out in the comments."""
import numpy as np
import pytest

from fqhw.fairness.metrics import group_metrics, summary_line


def approx(v):
    return pytest.approx(v, abs=1e-12)


def test_two_groups_symmetric():
    # group A all right; group B gets one of each class wrong
    y_true = [0, 0, 1, 1, 0, 0, 1, 1]
    y_pred = [0, 0, 1, 1, 0, 1, 0, 1]
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    m = group_metrics(y_true, y_pred, groups, ["A", "B"], 2)
    assert m["overall_acc"] == approx(6 / 8)
    assert m["group_acc"] == {"A": 1.0, "B": 0.5}
    assert m["mean_group_acc"] == approx(0.75)
    assert m["worst_group"] == "B" and m["worst_group_acc"] == approx(0.5)
    assert m["best_group"] == "A" and m["best_group_acc"] == approx(1.0)
    assert m["gap_mean_worst"] == approx(0.25)
    assert m["gap_best_worst"] == approx(0.5)
    assert m["balanced_acc"] == approx(0.75)  # recall 3/4 for both classes
    # TPR: A (1, 1), B (0.5, 0.5); TNR likewise
    assert m["eopp1"] == approx(0.5)
    assert m["eopp0"] == approx(0.5)
    assert m["eodd"] == approx(1.0)  # per class 0.5 TPR gap + 0.5 FPR gap
    # each group predicts each class half the time
    assert m["dp_gap"] == approx(0.0)
    assert m["dp_gap_per_class"] == [approx(0.0), approx(0.0)]


def test_empty_group_and_missing_class():
    # groups A, B, C (C has no samples); 3 classes, B has no sample of class 2
    #   A: true [0, 1, 2]    pred [0, 1, 1]     acc 2/3
    #   B: true [0, 0, 1, 1] pred [0, 2, 0, 1]  acc 1/2
    y_true = [0, 1, 2, 0, 0, 1, 1]
    y_pred = [0, 1, 1, 0, 2, 0, 1]
    groups = [0, 0, 0, 1, 1, 1, 1]
    m = group_metrics(y_true, y_pred, groups, ["A", "B", "C"], 3, dp_class=1)
    assert m["overall_acc"] == approx(4 / 7)
    assert m["group_n"] == {"A": 3, "B": 4, "C": 0}
    assert m["group_acc"]["C"] is None
    assert m["group_acc"]["A"] == approx(2 / 3) and m["group_acc"]["B"] == approx(0.5)
    assert m["mean_group_acc"] == approx(7 / 12)  # C left out
    assert m["worst_group"] == "B" and m["best_group"] == "A"
    assert m["gap_mean_worst"] == approx(1 / 12)
    assert m["gap_best_worst"] == approx(1 / 6)
    # recall: class 0 2/3, class 1 2/3, class 2 0/1
    assert m["balanced_acc"] == approx(4 / 9)
    # TPR A (1, 1, 0), B (1/2, 1/2, undefined): class 2 has one group only -> left out
    assert m["tpr"][1][2] is None
    assert m["eopp1"] == approx(0.5)
    # TNR A (1, 1/2, 1), B (1/2, 1, 3/4): gaps 1/2, 1/2, 1/4
    assert m["tnr"][0] == [approx(1.0), approx(0.5), approx(1.0)]
    assert m["tnr"][1] == [approx(0.5), approx(1.0), approx(0.75)]
    assert m["tnr"][2] == [None, None, None]
    assert m["eopp0"] == approx(5 / 12)
    # EOdd over classes 0 and 1 (class 2 lacks a TPR gap): (1/2 + 1/2 + 1/2 + 1/2) / 2
    assert m["eodd"] == approx(1.0)
    # prediction rates A (1/3, 2/3, 0), B (1/2, 1/4, 1/4)
    assert m["dp_gap_per_class"] == [approx(1 / 6), approx(5 / 12), approx(1 / 4)]
    assert m["dp_class"] == 1 and m["dp_gap"] == approx(5 / 12)


def test_single_group_has_no_gaps():
    m = group_metrics([0, 1, 1], [0, 1, 0], [0, 0, 0], ["only"], 2)
    assert m["overall_acc"] == approx(2 / 3)
    assert m["gap_mean_worst"] == 0.0 and m["gap_best_worst"] == 0.0
    assert m["eopp1"] is None and m["eopp0"] is None and m["eodd"] is None and m["dp_gap"] is None
    assert "worst" in summary_line(m)


def test_perfect_predictions_are_fair():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    g = rng.integers(0, 3, 200)
    m = group_metrics(y, y, g, ["a", "b", "c"], 4)
    assert m["overall_acc"] == 1.0 and m["worst_group_acc"] == 1.0
    assert m["eopp1"] == approx(0.0) and m["eopp0"] == approx(0.0) and m["eodd"] == approx(0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(y_true=[0, 1], y_pred=[0], groups=[0, 0]),
        dict(y_true=[0, 2], y_pred=[0, 1], groups=[0, 0]),
        dict(y_true=[0, 1], y_pred=[0, 1], groups=[0, 5]),
        dict(y_true=[], y_pred=[], groups=[]),
    ],
)
def test_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        group_metrics(group_names=["a", "b"], num_classes=2, **kwargs)
