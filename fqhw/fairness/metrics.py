"""Accuracy per group and the group-fairness metrics FairQuant reports (numpy; statsmodels for the intervals).

Definitions (G groups, C classes; a "group" is a demographic group such as a skin type):

- overall_acc: accuracy over all samples.
- group_acc[g]: accuracy over group g's samples (None for a group with no samples; such a
  group is left out of every statistic below).
- mean_group_acc (FairQuant's avg_acc): mean of the per-group accuracies.
- worst_group_acc / worst_group, best_group_acc / best_group: min / max per-group accuracy
  (ties go to the lower group index).
- gap_mean_worst = mean - worst (FairQuant's acc_gap); gap_best_worst = best - worst.
- balanced_acc: mean per-class recall over the classes present in y_true.
- TPR_g(c) = P(pred = c | y = c, g), defined where group g has samples of class c;
  TNR_g(c) = P(pred != c | y != c, g), defined where group g has samples of another class;
  FPR = 1 - TNR.
- EOpp1: mean over classes of max_g TPR_g(c) - min_g TPR_g(c), over the groups where it is
  defined; a class with fewer than two such groups is left out of the mean.
- EOpp0: the same for TNR.
- EOdd: mean over classes (those where both gaps are defined) of the TPR gap + the FPR gap.
  The FPR gap equals the TNR gap, so EOdd = EOpp1 + EOpp0 when both use the same classes.
- dp_gap: demographic parity gap for class dp_class, max_g - min_g of P(pred = dp_class | g)
  (dp_gap_per_class has it for every class).

- group_acc_ci95[g]: the 95 % Wilson score interval of group_acc[g] (fqhw.fairness.stats).

Every metric is a fraction in [0, 1] (not percent); an undefined one is None.
"""
from __future__ import annotations

import numpy as np


def _gap(values: np.ndarray) -> float | None:
    """max - min over the defined (non-NaN) entries; None with fewer than two."""
    v = values[~np.isnan(values)]
    return float(v.max() - v.min()) if len(v) >= 2 else None


def _mean(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _ci(correct, n) -> list[float] | None:
    from fqhw.fairness.stats import wilson_interval

    ci = wilson_interval(int(round(correct)), int(n))
    return None if ci is None else list(ci)


def _nan_to_none(a: np.ndarray) -> list:
    return [[None if np.isnan(x) else float(x) for x in row] for row in a]


def group_metrics(
    y_true,
    y_pred,
    groups,
    group_names: list[str],
    num_classes: int,
    dp_class: int = 0,
) -> dict:
    """All metrics of the module docstring, as a JSON-ready dict."""
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    groups = np.asarray(groups).astype(np.int64).ravel()
    G, C = len(group_names), int(num_classes)
    if not (len(y_true) == len(y_pred) == len(groups)):
        raise ValueError(f"y_true, y_pred and groups differ in length: {len(y_true)}, {len(y_pred)}, {len(groups)}")
    if len(y_true) == 0:
        raise ValueError("no samples")
    for name, arr, hi in (("y_true", y_true, C), ("y_pred", y_pred, C), ("groups", groups, G)):
        if arr.min() < 0 or arr.max() >= hi:
            raise ValueError(f"{name} values must lie in [0, {hi}), got [{arr.min()}, {arr.max()}]")
    if not 0 <= dp_class < C:
        raise ValueError(f"dp_class={dp_class} must lie in [0, {C})")

    correct = y_true == y_pred
    n_g = np.bincount(groups, minlength=G)
    corr_g = np.bincount(groups, weights=correct, minlength=G)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_g = np.where(n_g > 0, corr_g / np.maximum(n_g, 1), np.nan)

    # confusion counts per group: (G, C true, C pred)
    conf = np.zeros((G, C, C), dtype=np.int64)
    np.add.at(conf, (groups, y_true, y_pred), 1)
    pos = conf.sum(axis=2)  # (G, C): samples of class c in group g
    tp = conf[:, np.arange(C), np.arange(C)]  # (G, C)
    pred_c = conf.sum(axis=1)  # (G, C): predictions of class c in group g
    neg = n_g[:, None] - pos  # samples of other classes
    fp = pred_c - tp
    tn = neg - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(pos > 0, tp / np.maximum(pos, 1), np.nan)
        tnr = np.where(neg > 0, tn / np.maximum(neg, 1), np.nan)
        pred_rate = np.where(n_g[:, None] > 0, pred_c / np.maximum(n_g[:, None], 1), np.nan)

    tpr_gaps = [_gap(tpr[:, c]) for c in range(C)]
    tnr_gaps = [_gap(tnr[:, c]) for c in range(C)]
    eodd_terms = [t + f for t, f in zip(tpr_gaps, tnr_gaps) if t is not None and f is not None]
    dp_per_class = [_gap(pred_rate[:, c]) for c in range(C)]

    present = ~np.isnan(acc_g)
    accs = acc_g[present]
    idx = np.nonzero(present)[0]
    worst_i = int(idx[np.argmin(accs)])
    best_i = int(idx[np.argmax(accs)])
    mean_acc = float(accs.mean())

    pos_all = pos.sum(axis=0)
    recall = [float(tp[:, c].sum() / pos_all[c]) for c in range(C) if pos_all[c] > 0]

    return {
        "n": int(len(y_true)),
        "overall_acc": float(correct.mean()),
        "group_n": {g: int(n_g[i]) for i, g in enumerate(group_names)},
        "group_acc": {g: (None if np.isnan(acc_g[i]) else float(acc_g[i])) for i, g in enumerate(group_names)},
        # 95 % Wilson score interval of each group's accuracy (fqhw.fairness.stats)
        "group_acc_ci95": {g: _ci(corr_g[i], n_g[i]) for i, g in enumerate(group_names)},
        "mean_group_acc": mean_acc,
        "worst_group_acc": float(acc_g[worst_i]),
        "worst_group": group_names[worst_i],
        "best_group_acc": float(acc_g[best_i]),
        "best_group": group_names[best_i],
        "gap_mean_worst": float(mean_acc - acc_g[worst_i]),
        "gap_best_worst": float(acc_g[best_i] - acc_g[worst_i]),
        "balanced_acc": float(np.mean(recall)),
        "eopp1": _mean(tpr_gaps),
        "eopp0": _mean(tnr_gaps),
        "eodd": float(np.mean(eodd_terms)) if eodd_terms else None,
        "dp_class": int(dp_class),
        "dp_gap": dp_per_class[dp_class],
        "dp_gap_per_class": dp_per_class,
        "tpr": _nan_to_none(tpr),  # [group][class]
        "tnr": _nan_to_none(tnr),
    }


def summary_line(m: dict) -> str:
    """One line for logs: overall / mean-group / worst-group (which) / gap, in percent."""
    return (
        f"acc {100 * m['overall_acc']:.1f}  mean-group {100 * m['mean_group_acc']:.1f}  "
        f"worst {100 * m['worst_group_acc']:.1f} ({m['worst_group']})  gap {100 * m['gap_mean_worst']:.1f}"
    )
