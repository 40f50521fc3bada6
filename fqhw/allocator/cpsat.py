"""The allocation problem as a CP-SAT model (OR-Tools).

For each compute layer l (in stream order):

    w_l in bits                       weight width (one-hot booleans xw[l,b], w_l = sum b xw[l,b])
    a_l in act_bits                   output activation width, for layers with an output
                                      activation (one-hot xa[l,b]); layer l reads a_{l-1}
                                      (input_bits for the first layer)
    f_l                               index of the layer's folding (PE, SIMD) among the
                                      target's folding options
    (w_l, a_{l-1}, a_l, f_l, cyc_l, R_l,r)  in  T_l            (AddAllowedAssignments)

T_l is the cost model's price of every buildable choice: cycles of the layer's slowest unit
and each resource (LUT, BRAM_18K, URAM, DSP). Rows whose (cycles, resources) are dominated
by another folding of the same widths are left out: they can never be needed.

Constraints
    sum_l params_l * w_l * q <= p * total_params          (budget = p / q, exact)
    sum_l R_l,r + E_r <= floor(cap_r)                      for every priced resource r
    cyc_l <= floor(clock_hz / min_fps)                     (when min_fps is given)
where E_r is the cost of the units the target builds outside the layers (FINN: the input
thresholding), one of its folding options chosen by one-hot booleans.

Objectives, lexicographic:
    1. minimise z >= sum_l S_w[l, w_l, g] + S_a[l, a_l, g]    for every group g
       (the worst group's predicted loss increase; floats scaled to integers, see below)
    2. with z <= z*, minimise the bottleneck C >= cyc_l (maximise throughput)
    3. with C <= C*, minimise total LUTs

Sensitivities are scaled by LOSS_RESOLUTION / M and rounded, where M bounds every group's
total; the largest possible rounding error of a group's total is reported in
Allocation.solver["loss_rounding_error"] (in the sensitivity's own units).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from ortools.sat.python import cp_model

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.errors import FqhwError, InfeasibleError
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.hwmodels.base import CostModel, LayerCost
from fqhw.network import LayerSpec, NetworkSpec

LOSS_RESOLUTION = 10**7  # integer units for the largest possible group total
RESOURCE_ORDER = ("LUT", "BRAM_18K", "URAM", "DSP")


# ------------------------------------------------------------------ the problem data


@dataclass
class _Layer:
    spec: LayerSpec
    w_vals: list[int]
    a_vals: list[int] | None  # None: no output activation
    ai_vals: list[int]  # widths of the input activation
    folds: list[tuple[int, int]]
    rows: list[tuple]  # (w, a_in, a_out | None, fold, cycles, *resources)


@dataclass
class _Problem:
    net: NetworkSpec
    cost: CostModel
    target: str
    input_bits: int
    layers: list[_Layer]
    resources: list[str]
    caps: dict[str, int]
    extras: list[LayerCost]
    budget: Fraction
    max_cycles: int | None
    groups: list[str]
    scale: float
    tw: list[dict[int, np.ndarray]]  # integer sensitivity terms per layer, per width: (G,)
    ta: list[dict[int, np.ndarray] | None]
    timings: dict = field(default_factory=dict)


def _resource_value(c: LayerCost, r: str) -> int:
    return int(math.ceil(c.resources.get(r, 0)))


def _pareto(cands: list[tuple]) -> list[tuple]:
    """Keep the candidates (cycles, *resources, fold) that no other candidate matches or
    beats in every column but the last; of identical ones the first."""
    if len(cands) <= 1:
        return cands
    arr = np.asarray([c[:-1] for c in cands], dtype=np.int64)
    le = np.all(arr[:, None, :] <= arr[None, :, :], axis=2)  # le[j, i]: j <= i everywhere
    lt = np.any(arr[:, None, :] < arr[None, :, :], axis=2)
    n = len(cands)
    earlier = np.tri(n, n, -1, dtype=bool).T  # earlier[j, i]: j < i
    dominated = np.any(le & (lt | earlier), axis=0)
    return [c for c, d in zip(cands, dominated) if not d]


def _layer_rows(cost: CostModel, spec: LayerSpec, w_vals, ai_vals, ao_vals, resources) -> tuple[list, list]:
    folds = list(cost.folding_options(spec))
    buildable = getattr(cost, "buildable", None)
    rows = []
    for w in w_vals:
        for ai in ai_vals:
            for ao in ao_vals:
                cands = []
                for f, (pe, simd) in enumerate(folds):
                    if buildable is not None and not buildable(spec, w, ai, ao, pe, simd):
                        continue
                    c = cost.layer_cost(spec, w, ai, ao, pe, simd)
                    cands.append((int(c.cycles), *(_resource_value(c, r) for r in resources), f))
                for c in _pareto(cands):
                    rows.append((w, ai, ao, c[-1], *c[:-1]))
    return folds, rows


def _priced_resources(cost: CostModel, net: NetworkSpec) -> list[str]:
    """Resources the cost model prices and the target caps, in a fixed order."""
    spec = net.layers[0]
    pe, simd = cost.folding_options(spec)[0]
    sample = cost.layer_cost(spec, 8, 8, 8 if spec.has_output_act else None, pe, simd)
    names = [r for r in sample.resources if r in cost.limits.totals]
    return sorted(names, key=lambda r: (RESOURCE_ORDER.index(r) if r in RESOURCE_ORDER else len(RESOURCE_ORDER), r))


def _check_sensitivity(net: NetworkSpec, sens: Sensitivity, layer: str, table: str, widths) -> dict[int, np.ndarray]:
    per_bits = getattr(sens, table).get(layer)
    if per_bits is None:
        raise FqhwError(f"the sensitivity has no {table} entry for layer {layer!r}: recompute it for this network")
    out = {}
    for b in widths:
        if b not in per_bits:
            raise FqhwError(f"the sensitivity of layer {layer!r} has no {table} entry for {b} bits: recompute it for bits {min(widths)}..{max(widths)}")
        v = np.asarray(per_bits[b], dtype=np.float64)
        if v.shape != (len(sens.groups),) or not np.all(np.isfinite(v)):
            raise FqhwError(f"the sensitivity of layer {layer!r} at {b} bits ({table}) is not {len(sens.groups)} finite numbers")
        out[b] = v
    return out


def _problem(net, sens, cost, budget, bits, act_bits, pinned, min_fps, input_bits) -> _Problem:
    t0 = time.perf_counter()
    if not net.layers:
        raise FqhwError("the network has no conv or linear layers to allocate")
    bits = sorted(set(int(b) for b in bits))
    act_bits = sorted(set(int(b) for b in act_bits))
    if not bits or not act_bits:
        raise FqhwError("the candidate weight and activation widths must not be empty")
    pinned = dict(pinned or {})
    names = [s.name for s in net.layers]
    for name, b in pinned.items():
        if name not in names:
            raise FqhwError(f"pinned layer {name!r} is not in the network (layers: {', '.join(names)})")
        if int(b) != b or b < 1:
            raise FqhwError(f"pinned width {b!r} of layer {name!r} is not a positive integer")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise FqhwError(f"budget {budget!r} must be a positive number of bits per weight")
    if min_fps is not None and not (math.isfinite(min_fps) and min_fps > 0):
        raise FqhwError(f"min fps {min_fps!r} must be a positive number")

    resources = _priced_resources(cost, net)
    caps = {r: int(math.floor(cost.limits.cap(r) + 1e-9)) for r in resources}
    max_cycles = None if min_fps is None else int(math.floor(cost.limits.clock_hz / min_fps))

    raw_w, raw_a, layers = [], [], []
    prev_a: list[int] | None = [input_bits]
    for i, spec in enumerate(net.layers):
        if prev_a is None:
            raise FqhwError(f"layer {spec.name!r} follows a layer without an output activation")
        w_vals = [int(pinned[spec.name])] if spec.name in pinned else bits
        a_vals = act_bits if spec.has_output_act else None
        raw_w.append(_check_sensitivity(net, sens, spec.name, "weight", w_vals))
        raw_a.append(_check_sensitivity(net, sens, spec.name, "act", a_vals) if a_vals else None)
        folds, rows = _layer_rows(cost, spec, w_vals, prev_a, a_vals or [None], resources)
        if not rows:
            raise InfeasibleError(f"layer {spec.name!r} cannot be built on {cost.limits.name} with any folding at the candidate widths")
        layers.append(_Layer(spec, w_vals, a_vals, list(prev_a), folds, rows))
        prev_a = a_vals

    extras_fn = getattr(cost, "extras_options", None)
    extras = list(extras_fn(net, input_bits)) if extras_fn is not None else []

    # integer sensitivity terms
    bound = np.zeros(len(sens.groups))
    for tw, ta in zip(raw_w, raw_a):
        bound += np.max(np.abs(np.stack(list(tw.values()))), axis=0)
        if ta:
            bound += np.max(np.abs(np.stack(list(ta.values()))), axis=0)
    m = float(np.max(bound)) if len(bound) else 0.0
    scale = LOSS_RESOLUTION / m if m > 0 else 1.0

    def to_int(table):
        return None if table is None else {b: np.rint(v * scale).astype(np.int64) for b, v in table.items()}

    prob = _Problem(
        net=net, cost=cost, target=cost.limits.name, input_bits=input_bits, layers=layers, resources=resources,
        caps=caps, extras=extras, budget=Fraction(repr(float(budget))) if isinstance(budget, float) else Fraction(budget),
        max_cycles=max_cycles, groups=list(sens.groups), scale=scale,
        tw=[to_int(t) for t in raw_w], ta=[to_int(t) for t in raw_a],
    )
    prob.timings["tables_s"] = round(time.perf_counter() - t0, 3)
    return prob


# ------------------------------------------------------------------ the model


@dataclass
class _Model:
    m: cp_model.CpModel
    xw: list[dict]
    xa: list[dict | None]
    w: list
    a: list
    fold: list
    cyc: list
    res: list[dict]
    ext: list
    z: object
    bottleneck: object
    lut_total: object | None
    avg_num: object  # sum_l params_l * w_l
    res_total: dict
    decision: list


def _build(p: _Problem, *, budget: bool = True, fps: bool = True, caps: bool = True, loss: bool = True) -> _Model:
    m = cp_model.CpModel()
    xw, xa, W, A, F, CYC, RES, decision = [], [], [], [], [], [], [], []
    max_cyc = p.max_cycles if fps else None
    all_cycles = [r[4] for L in p.layers for r in L.rows] + [e.cycles for e in p.extras]
    for i, L in enumerate(p.layers):
        name = L.spec.name
        bw = {b: m.NewBoolVar(f"xw[{name},{b}]") for b in L.w_vals}
        m.AddExactlyOne(bw.values())
        w = m.NewIntVarFromDomain(cp_model.Domain.FromValues(L.w_vals), f"w[{name}]")
        m.Add(w == sum(b * x for b, x in bw.items()))
        xw.append(bw)
        W.append(w)
        decision += list(bw.values())
        if L.a_vals:
            ba = {b: m.NewBoolVar(f"xa[{name},{b}]") for b in L.a_vals}
            m.AddExactlyOne(ba.values())
            a = m.NewIntVarFromDomain(cp_model.Domain.FromValues(L.a_vals), f"a[{name}]")
            m.Add(a == sum(b * x for b, x in ba.items()))
            xa.append(ba)
            A.append(a)
            decision += list(ba.values())
        else:
            xa.append(None)
            A.append(None)
        rows = [r for r in L.rows if max_cyc is None or r[4] <= max_cyc]
        if not rows:  # no folding is fast enough: an empty table makes the model infeasible
            m.AddBoolOr([])
            rows = L.rows
        f = m.NewIntVar(0, len(L.folds) - 1, f"fold[{name}]")
        cyc = m.NewIntVarFromDomain(cp_model.Domain.FromValues(sorted({r[4] for r in rows})), f"cycles[{name}]")
        res = {
            r: m.NewIntVarFromDomain(cp_model.Domain.FromValues(sorted({row[5 + k] for row in rows})), f"{r}[{name}]")
            for k, r in enumerate(p.resources)
        }
        F.append(f)
        CYC.append(cyc)
        RES.append(res)
        decision.append(f)
        cols, tuples = [w], None
        keep = [0]
        if i > 0:
            cols.append(A[i - 1])
            keep.append(1)
        if L.a_vals:
            cols.append(A[i])
            keep.append(2)
        cols += [f, cyc, *res.values()]
        keep += list(range(3, 5 + len(p.resources)))
        tuples = [tuple(r[k] for k in keep) for r in rows]
        m.AddAllowedAssignments(cols, tuples)

    # units outside the layers (e.g. FINN's input thresholding)
    ext = [m.NewBoolVar(f"extras[{k}]") for k in range(len(p.extras))]
    decision += ext
    if ext:
        m.AddExactlyOne(ext)
    ext_cyc = sum(e.cycles * x for e, x in zip(p.extras, ext)) if ext else 0

    bottleneck = m.NewIntVar(0, max(all_cycles), "bottleneck_cycles")
    for cyc in CYC:
        m.Add(bottleneck >= cyc)
    if ext:
        m.Add(bottleneck >= ext_cyc)
    if max_cyc is not None:
        m.Add(bottleneck <= max_cyc)

    res_total = {}
    for r in p.resources:
        total = sum(res[r] for res in RES) + sum(_resource_value(e, r) * x for e, x in zip(p.extras, ext))
        res_total[r] = total
        if caps:
            m.Add(total <= p.caps[r])

    params = [L.spec.params for L in p.layers]
    avg_num = sum(n * w for n, w in zip(params, W))
    if budget:
        m.Add(avg_num * p.budget.denominator <= p.budget.numerator * p.net.total_params)

    z = None
    if loss:
        lo = hi = 0
        groups_expr = []
        for g in range(len(p.groups)):
            terms = []
            glo = ghi = 0
            for i, L in enumerate(p.layers):
                vals = [int(p.tw[i][b][g]) for b in L.w_vals]
                terms += [int(p.tw[i][b][g]) * xw[i][b] for b in L.w_vals]
                glo, ghi = glo + min(vals), ghi + max(vals)
                if L.a_vals:
                    vals = [int(p.ta[i][b][g]) for b in L.a_vals]
                    terms += [int(p.ta[i][b][g]) * xa[i][b] for b in L.a_vals]
                    glo, ghi = glo + min(vals), ghi + max(vals)
            groups_expr.append(sum(terms))
            lo, hi = min(lo, glo), max(hi, ghi)
        z = m.NewIntVar(lo, hi, "z_worst_group_loss")
        for e in groups_expr:
            m.Add(z >= e)

    lut_total = res_total.get("LUT")
    return _Model(m, xw, xa, W, A, F, CYC, RES, ext, z, bottleneck, lut_total, avg_num, res_total, decision)


@dataclass
class _Stage:
    name: str
    status: str
    objective: float | None
    bound: float | None
    wall_time_s: float
    values: dict | None = None


def _solve(mod: _Model, objective, name: str, time_limit: float, workers: int, seed: int, hint: list | None = None) -> _Stage:
    m = mod.m
    m.ClearHints()
    for var, val in hint or ():
        m.AddHint(var, val)
    if objective is not None:
        m.Minimize(objective)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, float(time_limit))
    solver.parameters.num_workers = max(1, int(workers))
    solver.parameters.random_seed = int(seed)
    t0 = time.perf_counter()
    status = solver.Solve(m)
    wall = time.perf_counter() - t0
    sname = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if status == cp_model.MODEL_INVALID:
            raise RuntimeError(f"CP-SAT model invalid: {m.Validate()}")
        return _Stage(name, sname, None, None, wall)
    # keyed by variable index (CP-SAT variables are not hashable)
    values = {v.Index(): solver.Value(v) for v in mod.decision}
    for v in [*mod.w, *(a for a in mod.a if a is not None), *mod.cyc, *(x for r in mod.res for x in r.values()), mod.bottleneck]:
        values[v.Index()] = solver.Value(v)
    if mod.z is not None:
        values[mod.z.Index()] = solver.Value(mod.z)
    values["avg_num"] = solver.Value(mod.avg_num)
    for r, e in mod.res_total.items():
        values[f"total:{r}"] = solver.Value(e)
    obj = solver.ObjectiveValue() if objective is not None else None
    bnd = solver.BestObjectiveBound() if objective is not None else None
    return _Stage(name, sname, obj, bnd, wall, values)


def _hint(mod: _Model, st: _Stage) -> list:
    return [(v, st.values[v.Index()]) for v in mod.decision]


def _val(st: _Stage, var) -> int:
    return st.values[var.Index()]


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
) -> Allocation:
    """Weight and activation widths and folding per layer that minimise the worst group's
    predicted loss increase under the budget (parameter-weighted average weight width),
    the target's resource caps and an optional throughput floor; then the fastest such
    design, then the one with the fewest LUTs. Raises InfeasibleError (one line, naming the
    constraint and what would work) when no allocation exists."""
    t_start = time.perf_counter()
    p = _problem(net, sens, cost, budget, bits, act_bits, pinned, min_fps, input_bits)
    _precheck_budget(p, budget)
    mod = _build(p)
    proto = mod.m.Proto()
    model_size = {
        "variables": len(proto.variables),
        "constraints": len(proto.constraints),
        "table_rows": sum(len(L.rows) for L in p.layers),
        "table_rows_per_layer": {L.spec.name: len(L.rows) for L in p.layers},
    }
    deadline = t_start + float(time_limit_s)

    def left(frac: float) -> float:
        return max(0.1, (deadline - time.perf_counter()) * frac)

    s1 = _solve(mod, mod.z, "min_worst_group_loss", left(0.6), workers, seed)
    if s1.values is None:
        if s1.status == "INFEASIBLE":
            _diagnose(p, budget, min_fps, workers, seed, time_limit_s)
        raise FqhwError(
            f"no allocation found on {p.target} within {time_limit_s:g} s (CP-SAT {s1.status}): allow more solver time"
        )
    z_star = int(round(s1.objective))
    mod.m.Add(mod.z <= z_star)
    s2 = _solve(mod, mod.bottleneck, "min_bottleneck_cycles", left(0.5), workers, seed, _hint(mod, s1))
    if s2.values is None:
        s2 = _Stage(s2.name, s2.status, None, None, s2.wall_time_s, s1.values)
    c_star = int(_val(s2, mod.bottleneck))
    mod.m.Add(mod.bottleneck <= c_star)
    stages = [s1, s2]
    final = s2
    if mod.lut_total is not None:
        s3 = _solve(mod, mod.lut_total, "min_luts", left(1.0), workers, seed, _hint(mod, s2))
        stages.append(s3)
        if s3.values is not None:
            final = s3

    layers = []
    for i, L in enumerate(p.layers):
        pe, simd = L.folds[_val(final, mod.fold[i])]
        a = _val(final, mod.a[i]) if mod.a[i] is not None else None
        layers.append(LayerAllocation(L.spec.name, int(_val(final, mod.w[i])), None if a is None else int(a), int(pe), int(simd)))
    alloc = Allocation(target=p.target, layers=layers, input_bits=input_bits)

    # the exact (unscaled) objective of the chosen allocation
    pred = sens.predicted({la.name: la.weight_bits for la in layers}, {la.name: la.act_bits for la in layers})
    n_terms = sum(1 + (L.a_vals is not None) for L in p.layers)
    priced = price(net, alloc, cost)
    for r in p.resources:
        if priced["total"][r] > p.caps[r]:
            raise AssertionError(f"allocation exceeds the {r} cap after pricing: {priced['total'][r]} > {p.caps[r]}")
    status = "OPTIMAL" if all(s.status == "OPTIMAL" for s in stages) else "FEASIBLE"
    z = s1.objective / p.scale
    zb = s1.bound / p.scale
    alloc.solver = {
        "solver": "cp-sat",
        "ortools": _ortools_version(),
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
        "bottleneck_cycles": int(priced["total"]["cycles"]),
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
                "objective": s.objective if s.name != "min_worst_group_loss" or s.objective is None else s.objective / p.scale,
                "bound": s.bound if s.name != "min_worst_group_loss" or s.bound is None else s.bound / p.scale,
                "wall_time_s": round(s.wall_time_s, 3),
            }
            for s in stages
        ],
        "model": model_size,
        "tables_s": p.timings.get("tables_s"),
        "workers": workers,
        "seed": seed,
        "time_limit_s": time_limit_s,
    }
    return alloc


def _ortools_version() -> str:
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


def _precheck_budget(p: _Problem, budget: float) -> None:
    """The narrowest widths allowed (pinned layers at their pin) against the budget."""
    total = p.net.total_params
    num = sum(L.spec.params * min(L.w_vals) for L in p.layers)
    need = Fraction(num, total)
    if need > p.budget:
        pinned = [L.spec.name for L in p.layers if len(L.w_vals) == 1]
        why = "the pinned layers need" if pinned else "the narrowest candidate width gives"
        raise InfeasibleError(
            f"budget {budget} is infeasible on {p.target}: {why} an average of at least {_fmt(_ceil2(need))} bits; "
            f"use --budget {_fmt(_ceil2(need))} or more"
        )


def _diagnose(p: _Problem, budget: float, min_fps: float | None, workers: int, seed: int, time_limit_s: float) -> None:
    """Find which constraint cannot be met and raise InfeasibleError saying what would work."""
    tl = max(1.0, min(10.0, time_limit_s / 3))
    total = p.net.total_params

    # 1. the resource caps alone
    mod = _build(p, budget=False, fps=False, caps=True, loss=False)
    st = _solve(mod, mod.avg_num, "diag_caps", tl, workers, seed)
    if st.values is None:
        _diagnose_resources(p, workers, seed, tl)
    need_caps = Fraction(st.values["avg_num"], total)

    # 2. the throughput floor with the caps
    if min_fps is not None:
        mod = _build(p, budget=False, fps=True, caps=True, loss=False)
        st = _solve(mod, mod.avg_num, "diag_fps", tl, workers, seed)
        if st.values is None:
            with_budget = need_caps <= p.budget
            mod = _build(p, budget=with_budget, fps=False, caps=True, loss=False)
            st = _solve(mod, mod.bottleneck, "diag_fastest", tl, workers, seed)
            cyc = _val(st, mod.bottleneck)
            best = p.cost.limits.clock_hz / cyc
            within = f" within budget {budget}" if with_budget else ""
            raise InfeasibleError(
                f"min fps {min_fps:g} is infeasible on {p.target}: the fastest allocation that fits{within} reaches "
                f"{best:.2f} fps ({cyc} cycles per image); use --min-fps {_floor2(best):.2f} or less"
            )
        need = Fraction(st.values["avg_num"], total)
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
    raise InfeasibleError(
        f"budget {budget} is infeasible on {p.target}: the budget, resource caps and min fps cannot be met together"
    )


def _diagnose_resources(p: _Problem, workers: int, seed: int, tl: float) -> None:
    mod = _build(p, budget=False, fps=False, caps=False, loss=False)
    for r in p.resources:
        st = _solve(mod, mod.res_total[r], f"diag_min_{r}", tl, workers, seed)
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
    target (e.g. a uniform baseline), with the target's caps and whether it fits."""
    lim = cost.limits
    layers: dict[str, dict] = {}
    for spec in net.layers:
        la = alloc.layer(spec.name)
        a_in = alloc.input_bits_of(net, spec.name)
        a_out = la.act_bits if spec.has_output_act else None
        if spec.has_output_act and a_out is None:
            raise FqhwError(f"allocation gives layer {spec.name!r} no activation width")
        c = cost.layer_cost(spec, la.weight_bits, a_in, a_out, la.pe, la.simd)
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
        extras = {
            "option": k,
            "cycles": int(e.cycles),
            "latency_cycles": int(e.latency),
            **{r: e.resources.get(r, 0) for r in e.resources},
            "units": [{kk: u[kk] for kk in ("op_type", "role", "attrs", "cycles", *RESOURCE_ORDER) if kk in u} for u in e.units],
        }

    names = sorted({r for v in layers.values() for r in v if r in lim.totals} | ({r for r in extras if r in lim.totals} if extras else set()))
    names.sort(key=lambda r: (RESOURCE_ORDER.index(r) if r in RESOURCE_ORDER else 9, r))
    total: dict = {}
    for r in names:
        total[r] = sum(v.get(r, 0) for v in layers.values()) + (extras.get(r, 0) if extras else 0)
    cycles = layer_cycles
    bottleneck = bottleneck_layer
    if extras and extras["cycles"] > cycles:
        cycles, bottleneck = extras["cycles"], "extras"
    latency = sum(v["latency_cycles"] for v in layers.values()) + (extras["latency_cycles"] if extras else 0)
    caps = {r: int(math.floor(lim.cap(r) + 1e-9)) for r in names}
    total.update(
        {
            "cycles": int(cycles),
            "bottleneck": bottleneck,
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
