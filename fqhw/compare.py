"""`fqhw compare`: the best allocation for each of several targets, and what each costs on
the others; or, for one target, the Pareto front of worst-group loss against throughput
over several budgets.

    fqhw compare --targets pynq-z2,zcu104,bitfusion,bitserial --budget 4
    fqhw compare --targets bitfusion --budgets 3,4,5,6
    fqhw compare ... --network OUT/network.json --sensitivity OUT/sensitivity.json

Each target's allocation is optimised for that target's own objective: FPGA (dataflow)
targets for throughput, or, with --fps, for the fewest resources that meet that rate; ASIC
targets for latency or energy (--objective). Stage 1 of the allocator is always the
worst-group predicted loss; --loss-slack lets the hardware objective trade up to that
fraction of it (with 0 every target gets the loss-optimal widths and only the folding, and
ties, differ).

Cross table: the widths chosen for target A are priced on target B. B's folding is chosen
for those widths by B's own objective (an FPGA refolds: the allocator with every width
pinned); an ASIC does not fold. An allocation that cannot be built on B within its limits
(or misses --fps) is marked as not fitting, with the reason.

The output folder (compare.json, compare.md, widths.png, allocation-<target>.json; or
pareto.json, pareto.md, pareto.png) is written to a staging folder beside it and renamed
into place only when everything is written, so an error leaves nothing half-written.

The Python API: compare(net, sens, targets=..., budget=...) -> CompareResult;
compare(net, sens, targets=[one], budgets=[...]) for the front; load_inputs(...) gives the
network and sensitivity (from files, or the default flow's float model and importance).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from fqhw.errors import FqhwError, InfeasibleError
from fqhw.outputs import plain, staging_folder, swap_in

DEFAULT_LOSS_SLACK = 0.1


# ------------------------------------------------------------------ results


@dataclass
class CompareResult:
    network: str
    mode: str  # "targets" (cross table) or "pareto" (one target, several budgets)
    targets: list[str]
    budget: float | None
    budgets: list[float]
    objectives: dict[str, str]  # target -> its hardware objective
    loss_slack: float
    min_fps: float | None
    pinned: dict[str, int]
    groups: list[str]
    layers: list[str]
    allocations: dict[str, dict] = field(default_factory=dict)  # target -> Allocation.to_dict()
    own: dict[str, dict] = field(default_factory=dict)  # target -> metrics of its allocation on itself
    cross: dict[str, dict[str, dict]] = field(default_factory=dict)  # from target -> on target -> metrics
    own_best: dict[str, bool] = field(default_factory=dict)  # on target -> its own allocation is best among the admissible
    front: list[dict] = field(default_factory=list)  # pareto mode: one point per budget
    source: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    out_dir: str | None = None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return plain(asdict(self))


# ------------------------------------------------------------------ inputs


def load_inputs(network: Path | None = None, sensitivity: Path | None = None, cfg=None):
    """(NetworkSpec, Sensitivity, source): from network.json and sensitivity.json (a
    compile output folder's), or, with neither, from the default flow: the built-in data,
    the (cached) float model and its group importance for CompileConfig `cfg`."""
    from fqhw.fairness.sensitivity import Sensitivity
    from fqhw.network import NetworkSpec

    if (network is None) != (sensitivity is None):
        raise FqhwError("--network and --sensitivity go together: pass both (from a compile output folder) or neither")
    if network is not None:
        net = _load_json(Path(network), "network", NetworkSpec.from_dict)
        sens = _load_json(Path(sensitivity), "sensitivity", Sensitivity.from_dict)
        return net, sens, {"network": str(Path(network).absolute()), "sensitivity": str(Path(sensitivity).absolute())}
    from fqhw.flow import CompileConfig, step_data, step_float_model, step_importance

    cfg = cfg or CompileConfig()
    splits = step_data(cfg)
    fm = step_float_model(cfg, splits)
    sens = step_importance(cfg, fm, splits)
    return fm.net, sens, {"flow": "default", "float_model_cache_hit": fm.cache_hit, "seed": cfg.seed}


def _load_json(path: Path, what: str, parse):
    if not path.is_file():
        raise FqhwError(f"{what} file {path} does not exist: pass the {what}.json of a compile output folder")
    try:
        return parse(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise FqhwError(f"{what} file {path} is not a valid {what}.json ({type(e).__name__}: {e})") from None


def edge_pins(net, edge_bits: int | None) -> dict[str, int]:
    """The flow's default: the first and the last layer's weights at edge_bits (all their
    channel groups)."""
    if edge_bits is None:
        return {}
    first, last = net.layers[0].act_group, net.layers[-1].act_group
    return {s.name: int(edge_bits) for s in net.layers if s.act_group in (first, last)}


# ------------------------------------------------------------------ objectives


def target_objective(cost, objective: str | None, min_fps: float | None) -> str:
    """The hardware objective a target is optimised for: dataflow (FPGA) targets the
    throughput, or with a rate to meet the fewest resources; sequential (ASIC) targets
    `objective` (latency or energy; default the model's own)."""
    if getattr(cost, "schedule", "dataflow") == "dataflow":
        return "resources" if min_fps is not None else "throughput"
    if objective is None:
        return getattr(cost, "default_objective", None) or "latency"
    objective = objective.lower()
    if objective not in ("latency", "energy"):
        raise FqhwError(f"--objective {objective!r} must be latency or energy")
    return objective


def objective_value(metrics: dict, objective: str) -> float:
    """The objective's value, smaller is better (throughput: images/s, negated)."""
    if objective == "throughput":
        return -metrics["fps"]
    if objective == "latency":
        return metrics["latency_ms"]
    if objective == "energy":
        return metrics["energy_uJ"]
    return metrics["weighted_utilisation"]


def _metrics(net, sens, alloc, priced: dict) -> dict:
    import numpy as np

    t = priced["total"]
    caps = t.get("caps", {})
    util = {r: t[r] / caps[r] for r in caps if caps[r] > 0}
    loss = alloc.predicted_loss(net, sens)
    return {
        "fits": bool(t["fits"]),
        "why": None,
        "fps": float(t["fps"]),
        "latency_ms": float(t["latency_ms"]),
        "cycles": int(t["cycles"]),
        "energy_uJ": float(t["energy_pJ"]) / 1e6 if "energy_pJ" in t else None,
        "dram_kbit": float(t["dram_bits"]) / 1e3 if "dram_bits" in t else None,
        "resources": {r: t[r] for r in caps},
        "utilisation": util,
        "weighted_utilisation": float(sum(util.values())),
        "max_utilisation": max(util.values(), default=0.0),
        "worst_group_loss": float(np.max(loss)),
        "group_loss": dict(zip(sens.groups, [float(v) for v in loss])),
        "avg_weight_bits": float(alloc.avg_weight_bits(net)),
        "folding": [[la.pe, la.simd] for la in alloc.layers],
    }


def _not_fitting(net, sens, alloc, why: str) -> dict:
    import numpy as np

    loss = alloc.predicted_loss(net, sens)
    return {"fits": False, "why": why, "worst_group_loss": float(np.max(loss)), "avg_weight_bits": float(alloc.avg_weight_bits(net))}


def fit_on(net, sens, alloc, cost, *, budget: float, objective: str, min_fps: float | None = None, time_limit_s: float = 30,
           workers: int = 2, seed: int = 0):
    """The widths of `alloc` built on `cost`'s target: (Allocation with the target's
    folding, metrics). A folding target gets the folding its objective prefers for those
    widths; a target that does not fold takes them as they are."""
    from fqhw.allocator.allocation import Allocation, LayerAllocation
    from fqhw.allocator.cpsat import allocate, price

    single = all(len(cost.folding_options(s)) == 1 for s in net.layers)
    if single:
        layers = [
            LayerAllocation(la.name, la.weight_bits, la.act_bits, *cost.folding_options(s)[0]) for la, s in zip(alloc.layers, net.layers)
        ]
        built = Allocation(target=cost.limits.name, layers=layers, input_bits=alloc.input_bits)
        priced = price(net, built, cost)
        m = _metrics(net, sens, built, priced)
        if not m["fits"]:
            over = ", ".join(f"{r} {m['resources'][r]:g} > {priced['total']['caps'][r]}" for r in m["resources"]
                             if m["resources"][r] > priced["total"]["caps"][r])
            m["why"] = f"does not fit {cost.limits.name}: {over}"
        elif min_fps is not None and m["fps"] < min_fps:
            m["fits"] = False
            m["why"] = f"reaches {m['fps']:.2f} fps on {cost.limits.name}, below --fps {min_fps:g}"
        return built, m
    pinned = {la.name: la.weight_bits for la in alloc.layers}
    pinned_act = {}
    for s, la in zip(net.layers, alloc.layers):
        if la.act_bits is not None:
            pinned_act.setdefault(s.act_group, la.act_bits)
    try:
        built = allocate(
            net, sens, cost, max(budget, alloc.avg_weight_bits(net)), pinned=pinned, pinned_act=pinned_act, min_fps=min_fps,
            objective=objective, time_limit_s=time_limit_s, workers=workers, seed=seed, input_bits=alloc.input_bits,
        )
    except InfeasibleError as e:
        return None, _not_fitting(net, sens, alloc, str(e))
    return built, _metrics(net, sens, built, price(net, built, cost))


# ------------------------------------------------------------------ compare


def _resolve_targets(targets) -> list:
    from fqhw.hwmodels import get_cost_model

    if isinstance(targets, str):
        targets = targets.split(",")
    out: list = []
    for t in targets:
        if hasattr(t, "limits") and hasattr(t, "layer_cost"):  # a CostModel object
            name, cost = t.limits.name, t
        else:
            name = str(t).strip().lower()
            if not name:
                continue
            cost = None
        if name in [n for n, _ in out]:
            if cost is not None:
                raise FqhwError(f"two targets are named {name!r}: give each cost model its own name")
            continue
        out.append((name, cost if cost is not None else get_cost_model(name)))
    if not out:
        raise FqhwError("no targets given: pass --targets, e.g. --targets pynq-z2,zcu104,bitfusion,bitserial")
    return out


def _check_budgets(budgets, resolved: list) -> list[float] | None:
    """The Pareto front's budgets, a repeated one dropped; FqhwError for an empty list or
    several targets."""
    if budgets is None:
        return None
    budgets = list(dict.fromkeys(float(b) for b in budgets))
    if len(resolved) != 1:
        raise FqhwError(f"--budgets draws a Pareto front for one target, got {len(resolved)}: pass one target with --targets")
    if not budgets:
        raise FqhwError("--budgets is empty: pass e.g. --budgets 3,4,5,6")
    return budgets


def front_point(job: tuple) -> dict:
    """An executor job: one budget's point of the Pareto front (allocate, then price)."""
    from fqhw.allocator.cpsat import allocate, price

    net, sens, cost, b, pins, min_fps, objective, loss_slack, kw = job
    try:
        a = allocate(net, sens, cost, b, pinned=pins, min_fps=min_fps, objective=objective, loss_slack=loss_slack, **kw)
    except InfeasibleError as e:
        return {"budget": b, "feasible": False, "why": str(e)}
    return {"budget": b, "feasible": True, **_metrics(net, sens, a, price(net, a, cost)), "allocation": a.to_dict()}


def compare(
    net,
    sens,
    targets,
    budget: float = 4.0,
    *,
    budgets=None,
    objective: str | None = None,
    min_fps: float | None = None,
    loss_slack: float = DEFAULT_LOSS_SLACK,
    pinned: dict[str, int] | None = None,
    edge_bits: int | None = 8,
    time_limit_s: float = 30,
    workers: int = 2,
    seed: int = 0,
    out_dir: Path | None = None,
    source: dict | None = None,
    executor=None,
) -> CompareResult:
    """Allocate for each target (names, or CostModel objects) and price every allocation
    on every target (budgets None),
    or allocate for one target at each of `budgets` and mark the Pareto front of worst-group
    loss against throughput. `pinned` (default: the first and last layers at edge_bits, as
    compile does) fixes weight widths. With out_dir, writes the result there atomically."""
    from fqhw.allocator.cpsat import allocate, price

    t0 = time.perf_counter()
    resolved = _resolve_targets(targets)
    if not (isinstance(loss_slack, (int, float)) and math.isfinite(loss_slack) and loss_slack >= 0):
        raise FqhwError(f"--loss-slack {loss_slack!r} must be a non-negative fraction")
    if min_fps is not None and not (math.isfinite(min_fps) and min_fps > 0):
        raise FqhwError(f"--fps {min_fps!r} must be a positive number")
    objectives = {t: target_objective(c, objective, min_fps) for t, c in resolved}
    if objective is not None and not any(getattr(c, "schedule", "dataflow") == "sequential" for _, c in resolved):
        raise FqhwError(f"--objective {objective} applies to ASIC targets only; FPGA targets maximise throughput (or, with --fps, minimise resources)")
    pins = dict(edge_pins(net, edge_bits) if pinned is None else pinned)
    if out_dir is not None:
        from fqhw.flow import check_writable

        check_writable(Path(out_dir), markers=("compare.json", "pareto.json"))
    budgets = _check_budgets(budgets, resolved)
    res = CompareResult(
        network=net.name, mode="pareto" if budgets is not None else "targets", targets=[t for t, _ in resolved],
        budget=None if budgets is not None else float(budget), budgets=budgets or [], objectives=objectives,
        loss_slack=float(loss_slack), min_fps=min_fps, pinned=pins, groups=list(sens.groups),
        layers=[s.name for s in net.layers], source=dict(source or {}),
    )
    kw = dict(time_limit_s=time_limit_s, workers=workers, seed=seed)

    if budgets is not None:
        from fqhw.executor import Executor

        (t, cost), = resolved
        # one executor job per budget (fqhw.executor: --jobs, --executor ray)
        res.front = (executor or Executor()).map(front_point, [(net, sens, cost, b, pins, min_fps, objectives[t], loss_slack, kw) for b in budgets])
        pts = [p for p in res.front if p["feasible"]]
        if not pts:
            raise InfeasibleError(f"no budget of {', '.join(f'{b:g}' for b in budgets)} is feasible on {t}: {res.front[0]['why']}")
        for p in pts:
            p["pareto"] = not any(
                q is not p and q["worst_group_loss"] <= p["worst_group_loss"] and q["fps"] >= p["fps"]
                and (q["worst_group_loss"] < p["worst_group_loss"] or q["fps"] > p["fps"])
                for q in pts
            )
    else:
        allocs = {}
        for t, cost in resolved:
            a = allocate(net, sens, cost, budget, pinned=pins, min_fps=min_fps, objective=objectives[t], loss_slack=loss_slack, **kw)
            allocs[t] = a
            res.allocations[t] = a.to_dict()
            res.own[t] = _metrics(net, sens, a, price(net, a, cost))
            res.own[t]["loss_limit"] = a.solver["loss_limit"]
        for src in allocs:
            res.cross[src] = {}
            for t, cost in resolved:
                if t == src:
                    res.cross[src][t] = res.own[t]
                    continue
                _, m = fit_on(net, sens, allocs[src], cost, budget=budget, objective=objectives[t], min_fps=min_fps, **kw)
                res.cross[src][t] = m
        for t, _ in resolved:
            res.own_best[t] = _own_is_best(res, t)
    res.wall_time_s = round(time.perf_counter() - t0, 3)
    if out_dir is not None:
        write_outputs(res, Path(out_dir))
    return res


def _admissible(res: CompareResult, on: str) -> list[str]:
    """Allocations that fit `on` and whose predicted loss is within `on`'s own loss limit
    (the set its allocation was chosen from), up to rounding."""
    limit = res.own[on]["loss_limit"]
    tol = 1e-9 + 1e-6 * abs(limit)
    return [src for src in res.cross if res.cross[src][on]["fits"] and res.cross[src][on]["worst_group_loss"] <= limit + tol]


def _own_is_best(res: CompareResult, on: str) -> bool:
    obj = res.objectives[on]
    mine = objective_value(res.cross[on][on], obj)
    tol = 1e-6 * abs(mine) + 1e-12
    return all(objective_value(res.cross[src][on], obj) >= mine - tol for src in _admissible(res, on))


# ------------------------------------------------------------------ outputs


def write_outputs(res: CompareResult, out_dir: Path) -> Path:
    """Write the result into out_dir atomically (staging folder, then rename)."""
    out = Path(out_dir).absolute()
    work = staging_folder(out)
    try:
        res.out_dir = str(out)
        data = res.to_dict()
        if res.mode == "pareto":
            (work / "pareto.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            (work / "pareto.md").write_text(pareto_markdown(res))
            (work / "pareto.png").write_bytes(pareto_png(res))
        else:
            (work / "compare.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            (work / "compare.md").write_text(markdown(res))
            (work / "widths.png").write_bytes(widths_png(res))
            for t, a in res.allocations.items():
                (work / f"allocation-{t}.json").write_text(json.dumps(plain(a), indent=2, sort_keys=True) + "\n")
        swap_in(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        res.out_dir = None
        raise
    return out


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
                    adm = _admissible(res, on)
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


# ------------------------------------------------------------------ command line


def _floats(text: str) -> list[float]:
    import argparse

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_compare_parser(subparsers) -> None:
    """Register `fqhw compare` on the CLI's subparsers."""
    from fqhw.cliargs import add_common, add_executor_args

    p = subparsers.add_parser(
        "compare",
        help="best allocation per target and a cross table of each on the others; or a loss/throughput Pareto front over budgets",
    )
    p.add_argument("--targets", required=True, help="comma-separated targets, e.g. pynq-z2,zcu104,bitfusion,bitserial")
    p.add_argument("--budget", type=float, default=None, help="average weight bits for every target (default 4)")
    p.add_argument("--budgets", type=_floats, default=None, help="comma-separated budgets: a Pareto front for one target, e.g. 3,4,5,6")
    p.add_argument("--objective", choices=("latency", "energy"), default=None, help="what ASIC targets minimise after the loss (default latency)")
    p.add_argument("--fps", type=float, default=None, help="images/s every target must reach; FPGA targets then use the fewest resources")
    p.add_argument("--loss-slack", type=float, default=DEFAULT_LOSS_SLACK,
                   help=f"fraction of the worst-group loss the hardware objective may trade (default {DEFAULT_LOSS_SLACK:g})")
    p.add_argument("--edge-bits", default="8", help="pin first/last layer weight bits; 'none' to let the solver choose (default 8)")
    p.add_argument("--network", type=Path, default=None, help="network.json of a compile output folder (with --sensitivity)")
    p.add_argument("--sensitivity", type=Path, default=None, help="sensitivity.json of a compile output folder (with --network)")
    p.add_argument("--out", type=Path, default=Path("fqhw-compare"), help="output folder (default fqhw-compare)")
    p.add_argument("--time-limit", type=float, default=30.0, help="solver time limit per allocation in s (default 30)")
    add_common(p)
    add_executor_args(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from fqhw.cliargs import compile_config
    from fqhw.executor import Executor

    ex = Executor.from_args(args)
    if args.budget is not None and args.budgets is not None:
        raise FqhwError("pass --budget (a cross table) or --budgets (a Pareto front), not both")
    edge = None if str(args.edge_bits).lower() == "none" else _int_flag(args.edge_bits, "--edge-bits")
    _check_budgets(args.budgets, _resolve_targets(args.targets))  # before load_inputs, which may train
    cfg = compile_config(args) if args.network is None else None
    net, sens, source = load_inputs(args.network, args.sensitivity, cfg)
    res = compare(
        net, sens, args.targets, 4.0 if args.budget is None else args.budget, budgets=args.budgets, objective=args.objective,
        min_fps=args.fps, loss_slack=args.loss_slack, edge_bits=edge, time_limit_s=args.time_limit, seed=args.seed,
        out_dir=args.out, source=source, executor=ex,
    )
    if res.mode == "pareto":
        t = res.targets[0]
        pts = ", ".join(
            f"{p['budget']:g} b: loss {p['worst_group_loss']:.4g} at {p['fps']:.0f}/s" if p["feasible"] else f"{p['budget']:g} b: infeasible"
            for p in res.front
        )
        print(f"wrote {res.out_dir}: {t}: {pts}")
    else:
        own = ", ".join(f"{t} {res.own[t]['fps']:.0f}/s" + (f" {res.own[t]['energy_uJ']:.2f} uJ" if res.own[t].get("energy_uJ") is not None else "")
                        for t in res.targets)
        print(f"wrote {res.out_dir}: {own}; own allocation best on its own target: "
              + ", ".join(f"{t} {'yes' if v else 'no'}" for t, v in res.own_best.items()))
    return 0


def _int_flag(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise FqhwError(f"{flag} {text!r} must be an integer or 'none'") from None
