"""Statistics for claims of the form "method A protects the worst group better than B".

Accuracies of a group are binomial proportions, so every one is shown with a 95 % Wilson
score interval (Wilson 1927; statsmodels' proportion_confint), which keeps its coverage for
the small groups and the accuracies near 1 where the normal approximation fails.

Two methods are compared on the same test images (the test split does not depend on the
training seed), so the comparison is paired:

- the exact McNemar test (statsmodels) on the compared group: of the (seed, image) pairs of
  that group, those that A classifies right and B wrong against those B right and A wrong.
  The group compared is the one worst for the two methods together (lowest accuracy over
  both methods and all seeds), so that the test is about the group the claim is about;
- the difference in worst-group accuracy (each seed's minimum over groups, averaged over
  seeds) with a percentile interval from a two-level bootstrap: seeds drawn with
  replacement, then images drawn with replacement within each group (so each group keeps
  its size), the same draw for both methods. Seeds vary the training, images the test
  sample: the interval carries both sources of noise.

Across the several methods compared with one reference, the McNemar p-values are also
given Holm-adjusted (statsmodels' multipletests), so that "significant against every other
method" is a family-wise claim.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(correct: int, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """The Wilson score interval of correct / n; None for an empty group."""
    from statsmodels.stats.proportion import proportion_confint

    if n <= 0:
        return None
    lo, hi = proportion_confint(int(correct), int(n), alpha=1 - level, method="wilson")
    return float(lo), float(hi)


def group_intervals(labels, preds, groups, group_names: list[str], level: float = LEVEL) -> dict[str, list[float] | None]:
    """Per group, the Wilson interval of its accuracy (pooled over rows: pass several seeds'
    predictions concatenated to pool them)."""
    labels, preds, groups = (np.asarray(a).ravel() for a in (labels, preds, groups))
    out = {}
    for g, name in enumerate(group_names):
        sel = groups == g
        ci = wilson_interval(int((labels[sel] == preds[sel]).sum()), int(sel.sum()), level)
        out[name] = None if ci is None else list(ci)
    return out


@dataclass
class PairedComparison:
    """Reference method A against method B on the same images and seeds (accuracies in [0, 1])."""

    reference: str
    method: str
    seeds: list[int]
    worst_group_ref: float  # mean over seeds of each seed's minimum group accuracy
    worst_group_method: float
    diff: float  # worst_group_ref - worst_group_method
    diff_ci: list[float]  # bootstrap percentile interval of diff
    worst_group_ref_ci: list[float]
    worst_group_method_ci: list[float]
    group: str  # the group the McNemar test compares
    ref_only_right: int  # (seed, image) pairs of that group: A right, B wrong
    method_only_right: int  # B right, A wrong
    p_mcnemar: float  # exact (binomial) McNemar, two-sided
    p_holm: float | None = None  # adjusted over all methods compared with the same reference

    def to_dict(self) -> dict:
        return asdict(self)


def _group_accuracy(correct: np.ndarray, weights: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """(seeds, groups) accuracy of correctness rows under per-image weights (a bootstrap draw)."""
    hits = (correct * weights) @ onehot
    return hits / (weights @ onehot)


def compare_paired(
    labels,
    groups,
    group_names: list[str],
    ref_preds: dict[int, np.ndarray],
    method_preds: dict[int, np.ndarray],
    reference: str = "A",
    method: str = "B",
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> PairedComparison:
    """Compare two methods' predictions, keyed by training seed, on one test split."""
    from statsmodels.stats.contingency_tables import mcnemar

    seeds = sorted(set(ref_preds) & set(method_preds))
    if not seeds:
        raise ValueError(f"{reference} and {method} share no seed")
    labels = np.asarray(labels).ravel()
    groups = np.asarray(groups).ravel()
    G = len(group_names)
    onehot = np.eye(G)[groups]  # (N, G)
    ca = np.stack([np.asarray(ref_preds[s]).ravel() == labels for s in seeds]).astype(float)  # (S, N)
    cb = np.stack([np.asarray(method_preds[s]).ravel() == labels for s in seeds]).astype(float)
    ones = np.ones(len(labels))
    acc_a, acc_b = _group_accuracy(ca, ones, onehot), _group_accuracy(cb, ones, onehot)  # (S, G)
    wa, wb = acc_a.min(axis=1).mean(), acc_b.min(axis=1).mean()

    # two-level bootstrap: seeds, then images within each group (same draw for both methods)
    rng = np.random.default_rng(seed)
    members = [np.nonzero(groups == g)[0] for g in range(G)]
    stats = np.empty((resamples, 3))
    for r in range(resamples):
        pick = rng.integers(0, len(seeds), len(seeds))
        w = np.bincount(np.concatenate([rng.choice(idx, len(idx)) for idx in members if len(idx)]), minlength=len(labels))
        ra = _group_accuracy(ca[pick], w, onehot).min(axis=1).mean()
        rb = _group_accuracy(cb[pick], w, onehot).min(axis=1).mean()
        stats[r] = (ra, rb, ra - rb)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    ci = np.percentile(stats, q, axis=0)  # (2, 3)

    # McNemar on the group worst for the two methods together
    g = int(np.argmin(acc_a.mean(axis=0) + acc_b.mean(axis=0)))
    sel = groups == g
    a_only = int(((ca[:, sel] == 1) & (cb[:, sel] == 0)).sum())
    b_only = int(((ca[:, sel] == 0) & (cb[:, sel] == 1)).sum())
    both = int(((ca[:, sel] == 1) & (cb[:, sel] == 1)).sum())
    neither = int(((ca[:, sel] == 0) & (cb[:, sel] == 0)).sum())
    p = float(mcnemar([[both, a_only], [b_only, neither]], exact=True).pvalue)
    return PairedComparison(
        reference=reference, method=method, seeds=[int(s) for s in seeds],
        worst_group_ref=float(wa), worst_group_method=float(wb), diff=float(wa - wb),
        diff_ci=[float(ci[0, 2]), float(ci[1, 2])],
        worst_group_ref_ci=[float(ci[0, 0]), float(ci[1, 0])], worst_group_method_ci=[float(ci[0, 1]), float(ci[1, 1])],
        group=group_names[g], ref_only_right=a_only, method_only_right=b_only, p_mcnemar=p,
    )


def holm(comparisons: list[PairedComparison]) -> None:
    """Fill in each comparison's Holm-adjusted p-value (in place)."""
    from statsmodels.stats.multitest import multipletests

    if not comparisons:
        return
    adjusted = multipletests([c.p_mcnemar for c in comparisons], method="holm")[1]
    for c, p in zip(comparisons, adjusted):
        c.p_holm = float(p)
