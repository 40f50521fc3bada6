"""fqhw.fairness.stats: Wilson intervals, the paired comparison of two methods."""
import numpy as np
import pytest
from scipy.stats import binomtest

from fqhw.fairness.metrics import group_metrics
from fqhw.fairness.stats import compare_paired, group_intervals, holm, wilson_interval


def test_wilson_interval_known_values():
    # Wilson score interval, z = 1.959964: 0 of 10 -> [0, 0.2775]; 5 of 10 -> [0.2366, 0.7634]
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))
    assert wilson_interval(0, 0) is None


def test_group_metrics_carry_wilson_intervals():
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    p = np.array([0, 1, 0, 0, 0, 1, 1, 1])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    m = group_metrics(y, p, g, ["a", "b", "c"], 2)
    assert m["group_acc_ci95"]["a"] == list(wilson_interval(3, 4))
    assert m["group_acc_ci95"]["c"] is None  # no samples
    assert group_intervals(y, p, g, ["a", "b"])["b"] == list(wilson_interval(3, 4))


def _split(n_per_group=400, groups=3, seed=0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), n_per_group)
    y = rng.integers(0, 4, len(g))
    return y, g


def _predict(y, g, acc_per_group, rng):
    """Predictions right with the given probability per group (wrong: the next class)."""
    right = rng.random(len(y)) < np.asarray(acc_per_group)[g]
    return np.where(right, y, (y + 1) % 4)


def test_paired_comparison_finds_a_real_difference():
    y, g = _split()
    rng = np.random.default_rng(1)
    # the reference is 10 points better on group 2 (the worst), equal elsewhere
    ref = {s: _predict(y, g, [0.9, 0.85, 0.75], rng) for s in (0, 1, 2)}
    other = {s: _predict(y, g, [0.9, 0.85, 0.65], rng) for s in (0, 1, 2)}
    c = compare_paired(y, g, ["a", "b", "c"], ref, other, "ref", "other", resamples=500)
    assert c.group == "c" and c.seeds == [0, 1, 2]
    assert c.diff == pytest.approx(c.worst_group_ref - c.worst_group_method)
    assert 0.05 < c.diff < 0.15
    assert c.diff_ci[0] > 0 and c.diff_ci[0] < c.diff < c.diff_ci[1]
    assert c.worst_group_ref_ci[0] < c.worst_group_ref < c.worst_group_ref_ci[1]
    # the exact McNemar test is a two-sided binomial test on the discordant pairs
    n = c.ref_only_right + c.method_only_right
    assert c.p_mcnemar == pytest.approx(binomtest(min(c.ref_only_right, c.method_only_right), n, 0.5).pvalue)
    assert c.p_mcnemar < 1e-3


def test_paired_comparison_of_equal_methods_finds_nothing():
    y, g = _split()
    rng = np.random.default_rng(2)
    ref = {s: _predict(y, g, [0.9, 0.8, 0.7], rng) for s in (0, 1)}
    same = {s: ref[s].copy() for s in ref}
    c = compare_paired(y, g, ["a", "b", "c"], ref, same, resamples=200)
    assert c.diff == 0 and c.diff_ci == [0.0, 0.0]
    assert c.ref_only_right == c.method_only_right == 0 and c.p_mcnemar == 1.0
    # independent draws at the same accuracy: the interval covers 0
    other = {s: _predict(y, g, [0.9, 0.8, 0.7], rng) for s in (0, 1)}
    c2 = compare_paired(y, g, ["a", "b", "c"], ref, other, resamples=500)
    assert c2.diff_ci[0] < 0 < c2.diff_ci[1]
    holm([c, c2])
    assert c.p_holm >= c.p_mcnemar and c2.p_holm >= c2.p_mcnemar and c.p_holm <= 1


def test_paired_comparison_needs_a_common_seed():
    y, g = _split(10)
    with pytest.raises(ValueError, match="share no seed"):
        compare_paired(y, g, ["a", "b", "c"], {0: y}, {1: y})
