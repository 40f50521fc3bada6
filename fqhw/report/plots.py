"""The report's figures (matplotlib, headless), returned as PNG bytes."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fqhw.report.cells import MODEL_ROWS  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def group_accuracy(report: dict) -> bytes:
    groups = report["data"]["groups"]
    rows = [(k, label) for k, label in MODEL_ROWS if k in report["accuracy"]]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.8 / len(rows)
    x = np.arange(len(groups))
    for i, (key, label) in enumerate(rows):
        acc = report["accuracy"][key]["group_acc"]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [100 * (acc.get(g) or 0) for g in groups], width, label=label)
    ax.set_xticks(x, groups)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy per group")
    ax.legend(fontsize=8, ncol=len(rows), loc="lower center", bbox_to_anchor=(0.5, -0.35))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def layer_widths(report: dict) -> bytes:
    layers = report["allocation"]["layers"]
    names = [la["name"] for la in layers]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(x - 0.2, [la["weight_bits"] for la in layers], 0.4, label="weight bits")
    ax.bar(x + 0.2, [la["act_bits"] or 0 for la in layers], 0.4, label="output activation bits")
    for i, la in enumerate(layers):
        ax.annotate(f"PE {la['pe']}\nSIMD {la['simd']}", (i, 8.3), ha="center", fontsize=7)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylim(0, 10)
    ax.set_ylabel("bits")
    ax.set_title(f"Allocation (average weight width {report['allocation']['avg_weight_bits']:.2f} bits)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def resources(report: dict) -> bytes:
    used = report["hardware"]["finn"]["total"]
    caps = report["hardware"]["predicted"]["caps"]
    totals = {r: caps[r] for r in caps if caps[r] > 0}
    names = list(totals)
    fig, ax = plt.subplots(figsize=(6, 2.6))
    pct = [100 * used.get(r, 0) / totals[r] for r in names]
    bars = ax.barh(names, pct, color=["tab:red" if p > 100 else "tab:green" for p in pct])
    ax.axvline(100, color="k", lw=1)
    for b, r in zip(bars, names):
        ax.annotate(f"{used.get(r, 0):g} / {totals[r]:g}", (b.get_width() + 1, b.get_y() + b.get_height() / 2), va="center", fontsize=8)
    ax.set_xlim(0, max(110, max(pct, default=0) + 30))
    ax.set_xlabel("% of what the board allows (FINN's utilisation limits)")
    ax.set_title(f"FINN resource estimates on {report['hardware']['part']}")
    return _png(fig)
