"""The table of a `fqhw sidebyside` result (fqhw.sidebyside's SideBySideResult): the
summary over seeds, the intervals and paired comparisons, sidebyside.md and sidebyside.png,
and writing the output folder whole."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from fqhw.outputs import staging_folder, swap_in


METRICS = ("overall_acc", "mean_group_acc", "worst_group_acc", "gap_mean_worst", "balanced_acc", "eopp1", "eodd")


def summarize(runs: list[dict], methods: list[str]) -> dict[str, dict]:
    out = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        entry = {"n": len(rs), "avg_weight_bits": {"mean": float(np.mean([r["avg_weight_bits"] for r in rs]))}}
        for k in METRICS:
            v = np.array([r["test"].get(k) for r in rs if r["test"].get(k) is not None], dtype=float)
            entry[k] = {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        out[m] = entry
    return out


def add_statistics(res, test, reference: str | None) -> None:
    """Wilson intervals per group and method, and the paired comparison of `reference`
    with every other method on the same test images (fqhw.fairness.stats)."""
    from fqhw.fairness.stats import compare_paired, group_intervals, holm

    preds = {m: {r["seed"]: np.asarray(r["test_pred"]) for r in res.runs if r["method"] == m} for m in res.methods}
    for m, by_seed in preds.items():
        if by_seed:
            seeds = sorted(by_seed)
            res.group_ci[m] = group_intervals(np.tile(test.labels, len(seeds)), np.concatenate([by_seed[s] for s in seeds]),
                                              np.tile(test.groups, len(seeds)), test.group_names)
    res.test_counts = {g: int((test.groups == i).sum()) for i, g in enumerate(test.group_names)}
    res.reference = reference
    if reference is None or len(preds[reference]) == 0:
        return
    comps = [compare_paired(test.labels, test.groups, test.group_names, preds[reference], preds[m], reference, m)
             for m in res.methods if m != reference]
    holm(comps)
    res.comparisons = {c.method: c.to_dict() for c in comps}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(res) -> str:
    lines = [
        f"# Side by side at {res.budget:g} bits per weight on {res.target}",
        "",
        f"Seeds {', '.join(map(str, res.seeds))}; test split; mean ± standard deviation over seeds (%); "
        f"weights and activations quantized. Wall time {res.wall_time_s:.0f} s.",
        "",
        "| method | avg bits | overall | mean group | worst group | gap | balanced | EOpp1 | EOdd |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in res.methods:
        s = res.summary[m]

        def ms(k):
            v = s[k]
            return "-" if v["mean"] is None else f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"

        lines.append(f"| {res.labels[m]} | {s['avg_weight_bits']['mean']:.2f} | {ms('overall_acc')} | {ms('mean_group_acc')} | "
                     f"{ms('worst_group_acc')} | {ms('gap_mean_worst')} | {ms('balanced_acc')} | {ms('eopp1')} | {ms('eodd')} |")
    lines += ["", "Per seed (worst group / mean group, %):", "", "| method | " + " | ".join(f"seed {s}" for s in res.seeds) + " |",
              "| --- |" + " --- |" * len(res.seeds)]
    for m in res.methods:
        cells = []
        for s in res.seeds:
            r = next((r for r in res.runs if r["method"] == m and r["seed"] == s), None)
            cells.append("-" if r is None else f"{_pct(r['test']['worst_group_acc'])} / {_pct(r['test']['mean_group_acc'])}")
        lines.append(f"| {res.labels[m]} | " + " | ".join(cells) + " |")
    if res.comparisons:
        ref = res.labels[res.reference]
        lines += [
            "", f"Paired against {ref}, on the same test images and seeds (test images per group: "
            + ", ".join(f"{g} {n}" for g, n in res.test_counts.items()) + "). Worst group: each seed's lowest group "
            "accuracy, averaged over seeds; difference = reference minus method, points, with a 95 % bootstrap interval "
            "over seeds and images; exact McNemar test on the group worst for the two together, (seed, image) pairs "
            "that only the reference / only the method classifies right; p (Holm): adjusted over the methods compared.",
            "", "| method | worst group [95 % CI] | difference [95 % CI] | group | only ref right / only method right | p | p (Holm) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m, c in res.comparisons.items():
            lines.append(
                f"| {res.labels[m]} | {_pct(c['worst_group_method'])} [{_pct(c['worst_group_method_ci'][0])}, {_pct(c['worst_group_method_ci'][1])}] "
                f"| {100 * c['diff']:+.1f} [{100 * c['diff_ci'][0]:+.1f}, {100 * c['diff_ci'][1]:+.1f}] | {c['group']} "
                f"| {c['ref_only_right']} / {c['method_only_right']} | {c['p_mcnemar']:.2g} | {c['p_holm']:.2g} |"
            )
        first = next(iter(res.comparisons.values()))
        lines.append(f"| {ref} (reference) | {_pct(first['worst_group_ref'])} [{_pct(first['worst_group_ref_ci'][0])}, "
                     f"{_pct(first['worst_group_ref_ci'][1])}] | | | | | |")
    return "\n".join(lines) + "\n"


def plot_png(res, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for m in res.methods:
        s = res.summary[m]
        x, y = s["mean_group_acc"], s["worst_group_acc"]
        ax.errorbar(100 * x["mean"], 100 * y["mean"], xerr=100 * x["std"], yerr=100 * y["std"], fmt="o", capsize=3,
                    label=f"{res.labels[m]} ({s['avg_weight_bits']['mean']:.2f} b)")
    ax.set_xlabel("mean group accuracy (%)")
    ax.set_ylabel("worst group accuracy (%)")
    ax.set_title(f"{res.budget:g} bits per weight, {res.target}, seeds {', '.join(map(str, res.seeds))}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(res, out_dir: Path) -> Path:
    out = Path(out_dir).absolute()
    work = staging_folder(out)
    try:
        res.out_dir = str(out)
        (work / "sidebyside.json").write_text(json.dumps(res.to_dict(), indent=2, sort_keys=True) + "\n")
        (work / "sidebyside.md").write_text(markdown(res))
        plot_png(res, work / "sidebyside.png")
        swap_in(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out
