"""What `fqhw compare` writes besides its JSON: compare.md / pareto.md and the plots
(widths.png, pareto.png) of a CompareResult (fqhw.compareresult)."""
from __future__ import annotations

from fqhw.compareresult import CompareResult, admissible, objective_value


_OBJ_LABEL = {"throughput": "throughput", "resources": "fewest resources", "latency": "latency", "energy": "energy"}


def _fmt_resources(m: dict) -> str:
    if m.get("utilisation"):
        return ", ".join(f"{r} {100 * u:.0f}%" for r, u in m["utilisation"].items() if m["resources"].get(r, 0)) or "0"
    if m.get("dram_kbit") is not None:
        return f"DRAM {m['dram_kbit']:.0f} kbit"
    return "-"


def _widths(a: dict) -> str:
    return " ".join(f"{la['weight_bits']}/{la['act_bits'] if la['act_bits'] is not None else '-'}" for la in a["layers"])


def markdown(res: CompareResult) -> str:
    T = res.targets
    lines = [
        f"# fqhw compare: {res.network}, budget {res.budget:g} bits per weight",
        "",
        f"Targets and objectives: {', '.join(f'{t} ({_OBJ_LABEL[res.objectives[t]]})' for t in T)}. "
        f"Stage 1 minimises the worst group's predicted loss increase; the hardware objective may cost up to "
        f"{100 * res.loss_slack:g} % more of it (--loss-slack {res.loss_slack:g})."
        + (f" Every target must reach {res.min_fps:g} images/s." if res.min_fps else "")
        + (f" Pinned weights: {', '.join(f'{k} {v}' for k, v in res.pinned.items())}." if res.pinned else ""),
        "",
        "## The allocation for each target, on that target",
        "",
        "| target | objective | worst-group loss | avg weight bits | images/s | latency (ms) | energy (µJ/image) | resources | solver |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in T:
        m, s = res.own[t], res.allocations[t]["solver"]
        e = f"{m['energy_uJ']:.3f}" if m.get("energy_uJ") is not None else "-"
        lines.append(
            f"| {t} | {_OBJ_LABEL[res.objectives[t]]} | {m['worst_group_loss']:.5g} | {m['avg_weight_bits']:.3f} | {m['fps']:.1f} | "
            f"{m['latency_ms']:.4g} | {e} | {_fmt_resources(m)} | {s['status']} in {s['wall_time_s']:.2f} s |"
        )
    lines += ["", "## Widths per layer (weight bits / output activation bits)", "",
              "| layer | " + " | ".join(T) + " |", "| --- |" + " --- |" * len(T)]
    for i, name in enumerate(res.layers):
        cells = []
        for t in T:
            la = res.allocations[t]["layers"][i]
            fold = f" (PE {la['pe']}, SIMD {la['simd']})" if (la["pe"], la["simd"]) != (1, 1) else ""
            cells.append(f"{la['weight_bits']} / {la['act_bits'] if la['act_bits'] is not None else '-'}{fold}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    lines += ["", "## Cross table: the allocation for the row's target, built on the column's target", "",
              "Each column's target refolds the row's widths for its own objective. ★ marks the best value in a column by "
              "that target's objective among the allocations that fit it and stay within its loss limit; "
              "the diagonal is each target's own allocation.", ""]

    def table(title: str, cell, objective_of=None):
        out = [f"### {title}", "", "| allocation for ↓ / built on → | " + " | ".join(T) + " |", "| --- |" + " --- |" * len(T)]
        for src in T:
            row = []
            for on in T:
                m = res.cross[src][on]
                if not m["fits"]:
                    row.append("does not fit")
                    continue
                txt = cell(m)
                if objective_of is not None and objective_of(on):
                    adm = admissible(res, on)
                    obj = res.objectives[on]
                    best = min(objective_value(res.cross[s][on], obj) for s in adm) if adm else None
                    v = objective_value(m, obj)
                    if src in adm and best is not None and v <= best + 1e-6 * abs(best) + 1e-12:
                        txt += " ★"
                if src == on:
                    txt = f"**{txt}**"
                row.append(txt)
            out.append(f"| {src} | " + " | ".join(row) + " |")
        return out + [""]

    lines += table("Throughput (images/s)", lambda m: f"{m['fps']:.1f}", lambda on: res.objectives[on] in ("throughput", "latency"))
    lines += table("Latency (ms per image)", lambda m: f"{m['latency_ms']:.4g}")
    if any(res.own[t].get("energy_uJ") is not None for t in T):
        lines += table("Energy (µJ per image; FPGA targets have no energy model)",
                       lambda m: f"{m['energy_uJ']:.3f}" if m.get("energy_uJ") is not None else "-",
                       lambda on: res.objectives[on] == "energy")
    lines += table("Resources (FPGA: share of the cap, FINN's utilisation limits; ASIC: DRAM traffic per image)", _fmt_resources,
                   lambda on: res.objectives[on] == "resources")
    lines += table("Worst-group predicted loss increase", lambda m: f"{m['worst_group_loss']:.5g}")
    why = [(src, on, res.cross[src][on]["why"]) for src in T for on in T if not res.cross[src][on]["fits"]]
    if why:
        lines += ["### Why some do not fit", ""] + [f"- {src} on {on}: {w}" for src, on, w in why] + [""]
    lines += ["Own allocation best on its own target: "
              + ", ".join(f"{t} {'yes' if res.own_best[t] else 'no'}" for t in T) + ".", ""]
    lines += [f"Wall time {res.wall_time_s:.1f} s.", ""]
    return "\n".join(lines)


def pareto_markdown(res: CompareResult) -> str:
    t = res.targets[0]
    lines = [
        f"# fqhw compare: {res.network} on {t}, worst-group loss against throughput",
        "",
        f"Objective after the loss: {_OBJ_LABEL[res.objectives[t]]}; loss slack {res.loss_slack:g}."
        + (f" At least {res.min_fps:g} images/s." if res.min_fps else ""),
        "",
        "| budget | worst-group loss | avg weight bits | images/s | latency (ms) | energy (µJ/image) | resources | on the front | widths (w/a per layer) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in res.front:
        if not p["feasible"]:
            lines.append(f"| {p['budget']:g} | infeasible: {p['why']} | | | | | | | |")
            continue
        e = f"{p['energy_uJ']:.3f}" if p.get("energy_uJ") is not None else "-"
        lines.append(
            f"| {p['budget']:g} | {p['worst_group_loss']:.5g} | {p['avg_weight_bits']:.3f} | {p['fps']:.1f} | {p['latency_ms']:.4g} | "
            f"{e} | {_fmt_resources(p)} | {'yes' if p['pareto'] else 'no'} | {_widths(p['allocation'])} |"
        )
    lines += ["", f"Wall time {res.wall_time_s:.1f} s.", ""]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    import io

    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def widths_png(res: CompareResult) -> bytes:
    """Heatmap of per-layer weight and activation widths (rows: targets)."""
    import numpy as np

    plt = _plt()
    T, L = res.targets, res.layers
    w = np.array([[la["weight_bits"] for la in res.allocations[t]["layers"]] for t in T], dtype=float)
    a = np.array([[la["act_bits"] if la["act_bits"] is not None else np.nan for la in res.allocations[t]["layers"]] for t in T], dtype=float)
    width = max(6.0, 0.45 * len(L) + 2.5)
    fig, axes = plt.subplots(2, 1, figsize=(width, 1.6 + 0.5 * len(T) * 2), squeeze=False)
    vmin = np.nanmin([np.nanmin(w), np.nanmin(a)])
    vmax = np.nanmax([np.nanmax(w), np.nanmax(a)])
    for ax, data, title in ((axes[0][0], w, "weight bits"), (axes[1][0], a, "output activation bits")):
        im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_yticks(range(len(T)), T)
        ax.set_xticks(range(len(L)), L if len(L) <= 24 else [str(i) for i in range(len(L))], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{title} per layer", fontsize=9)
        if len(L) <= 40:
            for i in range(len(T)):
                for j in range(len(L)):
                    if not np.isnan(data[i, j]):
                        ax.text(j, i, f"{int(data[i, j])}", ha="center", va="center", fontsize=7,
                                color="white" if data[i, j] < (vmin + vmax) / 2 else "black")
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    fig.suptitle(f"{res.network}: widths chosen for each target (budget {res.budget:g})", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def pareto_png(res: CompareResult) -> bytes:
    plt = _plt()
    pts = [p for p in res.front if p["feasible"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p["fps"] for p in pts], [p["worst_group_loss"] for p in pts], c=["tab:blue" if p["pareto"] else "tab:gray" for p in pts])
    front = sorted((p for p in pts if p["pareto"]), key=lambda p: p["fps"])
    ax.plot([p["fps"] for p in front], [p["worst_group_loss"] for p in front], "-", color="tab:blue", lw=1, label="Pareto front")
    for p in pts:
        ax.annotate(f"{p['budget']:g} b", (p["fps"], p["worst_group_loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("worst-group predicted loss increase")
    ax.set_title(f"{res.network} on {res.targets[0]}: loss against throughput by budget", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
