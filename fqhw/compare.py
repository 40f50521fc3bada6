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
from pathlib import Path

from fqhw.comparereport import markdown, pareto_markdown, pareto_png, widths_png
from fqhw.compareresult import CompareResult, admissible, objective_value
from fqhw.errors import FqhwError, InfeasibleError
from fqhw.outputs import plain, staging_folder, swap_in

DEFAULT_LOSS_SLACK = 0.1


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
        from fqhw.config import check_writable

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


def _own_is_best(res: CompareResult, on: str) -> bool:
    obj = res.objectives[on]
    mine = objective_value(res.cross[on][on], obj)
    tol = 1e-6 * abs(mine) + 1e-12
    return all(objective_value(res.cross[src][on], obj) >= mine - tol for src in admissible(res, on))


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
