"""The allocation problem as a CP-SAT model (OR-Tools).

For each compute layer l (in stream order):

    w_l in bits          weight width: one-hot booleans xw[l,b], w_l = sum_b b * xw[l,b]
    a_l in act_bits      output activation width (layers with an output activation):
                         one-hot xa[l,b]; layer l reads a_{l-1}, the first layer input_bits
    f_l                  index of the layer's folding (PE, SIMD) among the target's options
    (w_l, a_{l-1}, a_l, f_l, cyc_l, R_l,LUT, R_l,BRAM_18K, R_l,URAM, R_l,DSP) in T_l
                         (AddAllowedAssignments)

T_l holds the cost model's price of every buildable choice: the cycles of the layer's
slowest unit and each resource it prices. A row is left out when another folding of the
same widths is no slower and no dearer in every resource; for a cycle cap C (a throughput
floor, or stage 2 below) the rows slower than C are removed and the rest pruned the same
way on resources alone, so each model holds only the rows that can matter.

Constraints
    sum_l params_l * w_l * q <= p * total_params            (budget = p / q, exact)
    sum_l R_l,r + E_r <= floor(cap_r)                        for every priced resource r
    cyc_l <= C_max = floor(clock_hz / min_fps)               (when min_fps is given)
where E_r is the cost of the units the target builds outside the layers (FINN: the input
thresholding), one of its folding options chosen by one-hot booleans.

Objectives, lexicographic:
    1. minimise z  subject to  z >= sum_l S_w[l, w_l, g] + S_a[l, a_l, g]  for every group g
       (the worst group's predicted loss increase)
    2. with z <= z*: minimise the bottleneck C >= cyc_l (throughput = clock / C), found by
       bisection over the cycle counts that occur in the tables, each step a feasibility
       solve of the same model with every cyc_l <= C
    3. with z <= z* and cyc_l <= C*: minimise the total LUTs

Other hardware objectives (allocate(objective=...); stage 1 is always the loss, and
stages 2 and 3 may trade up to `loss_slack` of it: z <= z* + floor(loss_slack * |z*|)):
    "throughput"   (dataflow targets, the default) stages 2 and 3 above
    "resources"    the fewest resources that meet the throughput floor: minimise
                   sum_r R_r * round(10^6 / cap_r) over the capped resources, then the
                   bottleneck (or the latency) at that cost
    "latency"      (sequential targets, which run one layer at a time: cost.schedule ==
                   "sequential") minimise sum_l cyc_l, then the energy at that latency;
                   a throughput floor caps sum_l cyc_l <= C_max
    "energy"       minimise sum_l E_l (an uncapped priced metric, "energy_pJ", in integer
                   units of (largest per-layer value) / 10^9), then the latency

How it is solved quickly: stage 1 is first solved without the tables (widths, budget and
loss only, a relaxation); if its widths, each unit at its least-resource folding, fit the
target, they are optimal for the whole problem and the tables are not needed. Each table
is pruned for a cycle cap C by a vectorised rule (a row is kept while cycles <= C < its
"death cap", the least cycles of a row that dominates it in resources). Bisection steps are
decided without the solver where possible: the current widths refolded fit (feasible), or
the least resources the loss limit allows exceed a cap (infeasible). Cost models may
price a whole table at once (price_table) and declare that repeated shapes price alike
(prices_by_shape).

Channel groups (fqhw.network.split_channel_groups): a unit reads the activation of the
layer before its own groups, and the groups of a layer share one activation variable
(one "slot"), whose sensitivity is the layer's.

Sensitivities are floats; the model uses integers round(S * scale) with
scale = LOSS_RESOLUTION / M, where M bounds every group's total, so z has a resolution of
M / LOSS_RESOLUTION. The largest possible rounding error of a group's total is reported in
Allocation.solver["loss_rounding_error"] (in the sensitivity's own units).
"""
from __future__ import annotations

import math
import numbers
import threading
import time
from dataclasses import replace
from fractions import Fraction

import numpy as np

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.allocator.stages import SatModel, Stage, bits_hint, build_sat_model, certificate, min_bottleneck, run_solver
from fqhw.allocator.tables import ENERGY, LOSS_RESOLUTION, RESOURCE_ORDER, Problem, build_problem
from fqhw.errors import FqhwError, InfeasibleError
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.hwmodels.base import CostModel, LayerCost
from fqhw.network import NetworkSpec


# ------------------------------------------------------------------ public API


def allocate(
    net: NetworkSpec,
    sens: Sensitivity,
    cost: CostModel,
    budget: float,
    bits=range(2, 9),
    act_bits=range(2, 9),
    pinned: dict[str, int] | None = None,
    min_fps: float | None = None,
    time_limit_s: float = 30,
    workers: int = 2,
    seed: int = 0,
    input_bits: int = 8,
    *,
    objective: str | None = None,
    loss_slack: float = 0.0,
    pinned_act: dict[str, int] | None = None,
    rel_gap: float = 0.0,
) -> Allocation:
    """Weight and activation widths and folding per unit that minimise the worst group's
    predicted loss increase under the budget (parameter-weighted average weight width),
    the target's resource caps and an optional throughput floor; then the best design for
    the hardware objective among those within `loss_slack` (a fraction) of that loss:

      objective None        the cost model's default_objective, else "throughput" for a
                            dataflow target (the fastest, then the fewest LUTs) and
                            "latency" for a sequential one (then the least energy)
      "resources"           the fewest resources (sum of R_r / cap_r) that meet min_fps,
                            then the fastest at that cost
      "energy"              the least energy, then the lowest latency

    pinned / pinned_act fix weight widths per unit / activation widths per layer;
    rel_gap > 0 lets CP-SAT stop each stage within that relative gap of its bound.
    Raises InfeasibleError (one line, naming the constraint and what would work) when no
    allocation exists."""
    t_start, c_start = time.perf_counter(), time.process_time()
    if not (isinstance(loss_slack, numbers.Real) and math.isfinite(loss_slack) and loss_slack >= 0):
        raise FqhwError(f"loss slack {loss_slack!r} must be a non-negative fraction")
    p = build_problem(net, sens, cost, budget, bits, act_bits, pinned, min_fps, input_bits, pinned_act, objective)
    precheck_budget(p, budget)
    deadline = t_start + float(time_limit_s)

    def left(frac: float) -> float:
        return max(0.1, (deadline - time.perf_counter()) * frac)

    # stage 1: the worst group's predicted loss. First without the hardware (the widths,
    # the budget and the loss only: a relaxation); when its solution, each unit at its
    # least-resource folding, fits the target, it is optimal for the whole problem too.
    # Otherwise the model with the tables, hinted with it.
    clock = [time.perf_counter(), time.process_time()]  # each stage's wall and CPU time, model building included

    def timed(st: Stage) -> Stage:
        now = [time.perf_counter(), time.process_time()]
        st.wall_time_s, st.cpu_time_s = now[0] - clock[0], now[1] - clock[1]
        clock[:] = now
        return st

    mod_hw = build_sat_model(p, p.max_cycles)
    if mod_hw is None:
        _diagnose(p, budget, min_fps, workers, seed, time_limit_s)
    proto = mod_hw.m.Proto()
    model_size = {
        "units": len(p.layers),
        "activation_slots": len(p.slots),
        "variables": len(proto.variables),
        "constraints": len(proto.constraints),
        "table_rows": sum(mod_hw.table_rows.values()),
        "table_rows_per_layer": dict(mod_hw.table_rows),
        "priced_choices": p.candidates,
        "pareto_choices": int(sum(len(L.cand) for L in p.layers)),
    }
    s1 = None
    if not p.extras:
        mod_w = build_sat_model(p, p.max_cycles, hardware=False)
        s_w = run_solver(mod_w, mod_w.z, "min_worst_group_loss", left(0.4), workers, seed, rel_gap=rel_gap)
        cert = certificate(p, p.max_cycles, s_w.choice) if s_w.choice is not None else None
        if cert is not None:
            s_w.choice = cert
            s1 = s_w
        elif s_w.status == "INFEASIBLE":
            _diagnose(p, budget, min_fps, workers, seed, time_limit_s)
    model_size["stage1_without_tables"] = s1 is not None
    if s1 is None:
        hint = bits_hint(s_w, mod_hw) if not p.extras and s_w.choice is not None else None
        s1 = run_solver(mod_hw, mod_hw.z, "min_worst_group_loss", left(0.5), workers, seed, hint, rel_gap=rel_gap)
    if s1.choice is None:
        if s1.status == "INFEASIBLE":
            _diagnose(p, budget, min_fps, workers, seed, time_limit_s)
        raise FqhwError(f"no allocation found on {p.target} within {time_limit_s:g} s (CP-SAT {s1.status}): allow more solver time")
    z_star = int(round(s1.objective))
    z_max = z_star + int(math.floor(loss_slack * abs(z_star)))

    stages = [timed(s1)]
    final = s1

    def better(st: Stage) -> None:
        nonlocal final
        stages.append(timed(st))
        if st.choice is not None:
            final = st

    if p.objective == "throughput":
        # stage 2: the bottleneck, with the loss held at z_max
        # With two or more workers, stage 3 at the cap stage 2 expects (the refolded widths')
        # runs in a thread beside stage 2's probe just below it, one worker each: when the
        # probe proves that cap optimal, as it mostly does, stage 3 is already done (its
        # model and hint are those the sequential order would give it); else it is stopped.
        spec: dict = {}

        def speculate(best: Stage, cap: int) -> bool:
            if workers < 2 or best.choice is None:
                return False
            mod = build_sat_model(p, cap, z_max=z_max)
            if mod is None or mod.lut_total is None:
                return False
            holder: list = []

            def run():
                spec["stage"] = run_solver(mod, mod.lut_total, "min_luts", left(1.0), max(1, workers // 2), seed,
                                       bits_hint(best, mod, folds=True), rel_gap, holder)

            spec.update(cap=cap, holder=holder, thread=threading.Thread(target=run, daemon=True))
            spec["thread"].start()
            return True

        s2, _ = min_bottleneck(p, s1, "min_bottleneck_cycles", time.perf_counter() + left(0.7), workers, seed,
                                on_probe=speculate, z_max=z_max)
        c_star = int(s2.objective)
        better(s2)
        # stage 3: the fewest LUTs at that throughput
        if spec and spec["cap"] == c_star:
            spec["thread"].join()
            s3 = spec["stage"]
            s3.overlapped = True
            better(s3)
        else:
            if spec:
                while spec["thread"].is_alive():
                    for solver in spec["holder"]:
                        solver.StopSearch()
                    spec["thread"].join(0.01)
            mod3 = build_sat_model(p, c_star, z_max=z_max)
            if mod3 is not None and mod3.lut_total is not None:
                better(run_solver(mod3, mod3.lut_total, "min_luts", left(1.0), workers, seed, bits_hint(final, mod3, folds=True), rel_gap))
    else:
        # stage 2: the objective; stage 3: the tie-break at (no worse than) its value
        first, second = {
            "resources": ("weighted_resources", "latency" if p.schedule == "sequential" else "bottleneck"),
            "latency": ("latency", ENERGY if ENERGY in p.metrics else None),
            "energy": (ENERGY, "latency"),
        }[p.objective]
        names = {"weighted_resources": "min_weighted_resources", "latency": "min_latency_cycles",
                 "bottleneck": "min_bottleneck_cycles", ENERGY: "min_energy"}

        def expr(mod: SatModel, key: str):
            if key == "weighted_resources":
                return mod.weighted_resources
            if key == "latency":
                return mod.latency
            if key == "bottleneck":
                return mod.bottleneck
            return mod.res_total[key]

        mod2 = build_sat_model(p, p.max_cycles, z_max=z_max)
        s2 = run_solver(mod2, expr(mod2, first), names[first], left(0.6), workers, seed, bits_hint(s1, mod2), rel_gap)
        better(s2)
        if s2.choice is not None and second is not None:
            mod3 = build_sat_model(p, p.max_cycles, z_max=z_max)
            mod3.m.Add(expr(mod3, first) <= int(round(s2.objective)))
            better(run_solver(mod3, expr(mod3, second), names[second], left(1.0), workers, seed, bits_hint(s2, mod3), rel_gap))
    layers = []
    fc = final.choice
    for i, L in enumerate(p.layers):
        pe, simd = L.folds[fc.fold[i]]
        a = None if L.out_slot is None else fc.a[L.out_slot]
        layers.append(LayerAllocation(L.spec.name, int(fc.w[i]), None if a is None else int(a), int(pe), int(simd)))
    alloc = Allocation(target=p.target, layers=layers, input_bits=input_bits)

    # the exact (unscaled) objective of the chosen allocation, and its price
    pred = alloc.predicted_loss(net, sens)
    n_terms = len(p.layers) + len(p.slots)
    priced = price(net, alloc, cost)
    for r in p.resources:
        if priced["total"][r] > p.caps[r]:
            raise AssertionError(f"allocation exceeds the {r} cap after pricing: {priced['total'][r]} > {p.caps[r]}")
    if p.max_cycles is not None and priced["total"]["cycles"] > p.max_cycles:
        raise AssertionError("allocation misses the throughput floor after pricing")
    status = "OPTIMAL" if all(s.status == "OPTIMAL" for s in stages) else "FEASIBLE"
    z = s1.objective / p.scale
    zb = s1.bound / p.scale

    def stage_value(st: Stage, v):
        if v is None:
            return None
        if st is s1:
            return v / p.scale
        if st.name == "min_energy":
            return v / p.metric_scale[ENERGY]
        return v

    alloc.solver = {
        "solver": "cp-sat",
        "ortools": ortools_version(),
        "status": status,
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "objective": float(z),
        "bound": float(zb),
        "gap": float(abs(z - zb) / max(abs(z), 1e-12)) if z != zb else 0.0,
        "objective_exact": float(np.max(pred)),
        "predicted_group_loss": dict(zip(p.groups, [float(v) for v in pred])),
        "worst_group": p.groups[int(np.argmax(pred))],
        "loss_scale": float(p.scale),
        "loss_units": f"integer = round(loss * {p.scale:.6g}); {LOSS_RESOLUTION} units bound every group's total",
        "loss_rounding_error": float(0.5 * n_terms / p.scale),
        "loss_slack": float(loss_slack),
        "loss_limit": float(z_max / p.scale),
        "hardware_objective": p.objective,
        "schedule": p.schedule,
        "bottleneck_cycles": int(priced["total"]["cycles"]),
        "latency_cycles": int(priced["total"]["latency_cycles"]),
        "fps": float(priced["total"]["fps"]),
        "resources": {r: priced["total"][r] for r in p.resources},
        "caps": dict(p.caps),
        "budget": float(budget),
        "avg_weight_bits": float(alloc.avg_weight_bits(net)),
        "min_fps": min_fps,
        "pinned": dict(pinned or {}),
        "stages": [
            {
                "name": s.name,
                "status": s.status,
                "objective": stage_value(s, s.objective),
                "bound": stage_value(s, s.bound),
                "wall_time_s": round(s.wall_time_s, 3),
                "cpu_time_s": None if s.cpu_time_s is None else round(s.cpu_time_s, 3),
                **({"overlapped_with_previous_stage": True} if s.overlapped else {}),
                "solves": s.steps,
                **({"solver_steps": s.solver_steps} if s.solver_steps is not None else {}),
            }
            for s in stages
        ],
        "model": model_size,
        "tables_s": p.timings.get("tables_s"),
        "tables_cpu_s": p.timings.get("tables_cpu_s"),
        "cpu_time_s": round(time.process_time() - c_start, 3),
        "workers": workers,
        "seed": seed,
        "time_limit_s": time_limit_s,
        "rel_gap": rel_gap,
    }
    if ENERGY in priced["total"]:
        alloc.solver[ENERGY] = float(priced["total"][ENERGY])
    if pinned_act:
        alloc.solver["pinned_act"] = dict(pinned_act)
    return alloc


def ortools_version() -> str:
    try:
        import ortools

        return ortools.__version__
    except Exception:  # pragma: no cover
        return "?"


# ------------------------------------------------------------------ infeasibility


def _ceil2(x: Fraction) -> Fraction:
    return Fraction(math.ceil(x * 100), 100)


def _floor2(x: float) -> float:
    return math.floor(x * 100 + 1e-9) / 100


def _fmt(x) -> str:
    return f"{float(x):.2f}"


def check_budget(net: NetworkSpec, budget: float, target: str, bits=range(2, 9), pinned: dict[str, int] | None = None) -> None:
    """The narrowest widths allowed (pinned layers at their pin) against the budget.

    Needs no sensitivity and no solver, so the flow calls it before any training."""
    pinned = pinned or {}
    need = Fraction(sum(s.params * pinned.get(s.name, min(bits)) for s in net.layers), net.total_params)
    if need > Fraction(repr(float(budget))):
        why = "the pinned layers need" if pinned else "the narrowest candidate width gives"
        raise InfeasibleError(
            f"budget {budget} is infeasible on {target}: {why} an average of at least {_fmt(_ceil2(need))} bits; "
            f"use --budget {_fmt(_ceil2(need))} or more"
        )


def precheck_budget(p: Problem, budget: float) -> None:
    pins = {L.spec.name: min(L.w_vals) for L in p.layers}
    check_budget(p.net, budget, p.target, bits=[min(pins.values())], pinned=pins)


def _diagnose(p: Problem, budget: float, min_fps: float | None, workers: int, seed: int, time_limit_s: float) -> None:
    """Find which constraint cannot be met and raise InfeasibleError saying what would work."""
    tl = max(1.0, min(10.0, time_limit_s / 3))
    total = p.net.total_params

    # 1. the resource caps alone: the narrowest allocation that fits
    mod = build_sat_model(p, None, budget=False, caps=True, loss=False)
    st = run_solver(mod, mod.avg_num, "diag_caps", tl, workers, seed)
    if st.values is None:
        _diagnose_resources(p, workers, seed, tl)
    need_caps = Fraction(st.values["avg_num"], total)

    # 2. the throughput floor with the caps
    if min_fps is not None:
        mod = build_sat_model(p, p.max_cycles, budget=False, caps=True, loss=False)
        st_fps = run_solver(mod, mod.avg_num if mod is not None else None, "diag_fps", tl, workers, seed)
        if st_fps.values is None:
            with_budget = need_caps <= p.budget
            start = run_solver(build_sat_model(p, None, budget=with_budget, caps=True, loss=False), None, "diag_start", tl, workers, seed)
            if start.values is None:  # pragma: no cover - the caps-only model was feasible
                start = st
                with_budget = False
            if p.schedule == "sequential":
                mod = build_sat_model(p, None, budget=with_budget, caps=True, loss=False)
                fast = run_solver(mod, mod.latency, "diag_fastest", 3 * tl, workers, seed)
                cyc = int(fast.values["latency"] if fast.status != "OPTIMAL" else round(fast.objective))
            else:
                fast, _ = min_bottleneck(replace(p, max_cycles=None), start, "diag_fastest", time.perf_counter() + 3 * tl,
                                          workers, seed, budget=with_budget, loss=False)
                cyc = int(fast.objective)
            best = p.cost.limits.clock_hz / cyc
            within = f" within budget {budget}" if with_budget else ""
            raise InfeasibleError(
                f"min fps {min_fps:g} is infeasible on {p.target}: the fastest allocation that fits{within} reaches "
                f"{best:.2f} fps ({cyc} cycles per image); use --min-fps {_floor2(best):.2f} or less"
            )
        need = Fraction(st_fps.values["avg_num"], total)
        if need > p.budget:
            raise InfeasibleError(
                f"budget {budget} is infeasible on {p.target} at min fps {min_fps:g}: the narrowest allocation that fits "
                f"needs an average of {_fmt(_ceil2(need))} bits; use --budget {_fmt(_ceil2(need))} or more"
            )
    if need_caps > p.budget:
        raise InfeasibleError(
            f"budget {budget} is infeasible on {p.target}: the narrowest allocation that fits the resource caps "
            f"needs an average of {_fmt(_ceil2(need_caps))} bits; use --budget {_fmt(_ceil2(need_caps))} or more"
        )
    raise InfeasibleError(f"budget {budget} is infeasible on {p.target}: the budget, resource caps and min fps cannot be met together")


def _diagnose_resources(p: Problem, workers: int, seed: int, tl: float) -> None:
    mod = build_sat_model(p, None, budget=False, caps=False, loss=False)
    for r in p.resources:
        st = run_solver(mod, mod.res_total[r], f"diag_min_{r}", tl, workers, seed)
        if st.values is None:
            continue
        need = int(math.ceil(st.bound - 1e-9))  # a lower bound on the smallest total
        if need > p.caps[r]:
            lim = p.cost.limits
            raise InfeasibleError(
                f"{p.net.name} does not fit {p.target}: the smallest design needs {need} {r}, more than the {p.caps[r]} "
                f"allowed ({lim.utilisation.get(r, 1.0):.0%} of {lim.totals[r]:g}); use a larger target or a smaller network"
            )
    caps = ", ".join(f"{r} <= {p.caps[r]}" for r in p.resources)
    raise InfeasibleError(f"{p.net.name} does not fit {p.target}: the resource caps ({caps}) cannot be met together by any allocation")


# ------------------------------------------------------------------ pricing


def _choose_extras(opts: list[LayerCost], bottleneck: int) -> tuple[int, LayerCost] | None:
    """The extras' folding: of the options that keep up with the layers' bottleneck, the
    one with the fewest LUTs (then BRAM, URAM, DSP, option order); the fastest when none
    keeps up."""
    if not opts:
        return None
    idx = list(range(len(opts)))
    keeping = [k for k in idx if opts[k].cycles <= bottleneck]
    if not keeping:
        k = min(idx, key=lambda k: (opts[k].cycles, k))
        return k, opts[k]
    k = min(keeping, key=lambda k: (*(opts[k].resources.get(r, 0) for r in RESOURCE_ORDER), k))
    return k, opts[k]


def price(net: NetworkSpec, alloc: Allocation, cost: CostModel) -> dict:
    """Per-layer and total cycles, resources, fps and latency of any allocation on `cost`'s
    target (e.g. a uniform baseline), with the target's caps and whether it fits.

    total["cycles"] is the cycles per image: the slowest unit's for a dataflow pipeline,
    the sum of the layers' for a sequential target (which runs one layer at a time).
    Priced quantities the target does not cap (energy_pJ) are summed into total too."""
    lim = cost.limits
    sequential = getattr(cost, "schedule", "dataflow") == "sequential"
    layers: dict[str, dict] = {}
    priced_keys: set[str] = set()
    for spec in net.layers:
        la = alloc.layer(spec.name)
        a_in = alloc.input_bits_of(net, spec.name)
        a_out = la.act_bits if spec.has_output_act else None
        if spec.has_output_act and a_out is None:
            raise FqhwError(f"allocation gives layer {spec.name!r} no activation width")
        c = cost.layer_cost(spec, la.weight_bits, a_in, a_out, la.pe, la.simd)
        priced_keys |= set(c.resources)
        entry = {
            "weight_bits": la.weight_bits,
            "in_bits": a_in,
            "out_bits": a_out,
            "pe": la.pe,
            "simd": la.simd,
            "params": spec.params,
            "cycles": int(c.cycles),
            "latency_cycles": int(c.latency),
            **{r: c.resources.get(r, 0) for r in c.resources},
        }
        if c.units:
            entry["units"] = [
                {k: u[k] for k in ("op_type", "role", "attrs", "cycles", *RESOURCE_ORDER) if k in u} for u in c.units
            ]
        layers[spec.name] = entry
    bottleneck_layer = max(layers, key=lambda n: layers[n]["cycles"])
    layer_cycles = layers[bottleneck_layer]["cycles"]

    extras = None
    extras_fn = getattr(cost, "extras_options", None)
    chosen = _choose_extras(list(extras_fn(net, alloc.input_bits)) if extras_fn else [], layer_cycles)
    if chosen is not None:
        k, e = chosen
        priced_keys |= set(e.resources)
        extras = {
            "option": k,
            "cycles": int(e.cycles),
            "latency_cycles": int(e.latency),
            **{r: e.resources.get(r, 0) for r in e.resources},
            "units": [{kk: u[kk] for kk in ("op_type", "role", "attrs", "cycles", *RESOURCE_ORDER) if kk in u} for u in e.units],
        }

    names = sorted(r for r in priced_keys if r in lim.totals)
    names.sort(key=lambda r: (RESOURCE_ORDER.index(r) if r in RESOURCE_ORDER else 9, r))
    uncapped = sorted(r for r in priced_keys if r not in lim.totals)
    total: dict = {}
    for r in [*names, *uncapped]:
        total[r] = sum(v.get(r, 0) for v in layers.values()) + (extras.get(r, 0) if extras else 0)
    latency = sum(v["latency_cycles"] for v in layers.values()) + (extras["latency_cycles"] if extras else 0)
    if sequential:
        cycles = sum(v["cycles"] for v in layers.values()) + (extras["cycles"] if extras else 0)
        bottleneck = bottleneck_layer
    else:
        cycles = layer_cycles
        bottleneck = bottleneck_layer
        if extras and extras["cycles"] > cycles:
            cycles, bottleneck = extras["cycles"], "extras"
    caps = {r: int(math.floor(lim.cap(r) + 1e-9)) for r in names}
    total.update(
        {
            "cycles": int(cycles),
            "bottleneck": bottleneck,
            "schedule": "sequential" if sequential else "dataflow",
            "fps": lim.clock_hz / cycles,
            "latency_cycles": int(latency),
            "latency_ms": latency / lim.clock_hz * 1e3,
            "clock_ns": 1e9 / lim.clock_hz,
            "avg_weight_bits": alloc.avg_weight_bits(net),
            "caps": caps,
            "utilisation": {r: (total[r] / lim.totals[r] if lim.totals[r] else (0.0 if total[r] == 0 else math.inf)) for r in names},
            "fits": all(total[r] <= caps[r] for r in names),
        }
    )
    return {"target": lim.name, "part": lim.part, "clock_ns": 1e9 / lim.clock_hz, "layers": layers, "extras": extras, "total": total}
