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

Sensitivities are floats; the model uses integers round(S * scale) with
scale = LOSS_RESOLUTION / M, where M bounds every group's total, so z has a resolution of
M / LOSS_RESOLUTION. The largest possible rounding error of a group's total is reported in
Allocation.solver["loss_rounding_error"] (in the sensitivity's own units).
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field, replace
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
NO_ACT = -1  # a_out column of a layer without an output activation


# ------------------------------------------------------------------ the problem data


def _pareto(arr: np.ndarray) -> np.ndarray:
    """Mask of the rows of `arr` (n x k ints) that no other row matches or beats in every
    column (of identical rows, the first is kept)."""
    n = len(arr)
    if n <= 1:
        return np.ones(n, dtype=bool)
    le = np.all(arr[:, None, :] <= arr[None, :, :], axis=2)  # le[j, i]: row j <= row i everywhere
    lt = np.any(arr[:, None, :] < arr[None, :, :], axis=2)
    earlier = np.triu(np.ones((n, n), dtype=bool), 1)  # earlier[j, i]: j < i
    return ~np.any(le & (lt | earlier), axis=0)


def _prune_on_resources(rows: np.ndarray) -> list[tuple]:
    """Per (w, a_in, a_out): the rows no other row beats or matches in every resource
    (ties go to the fastest, then the first folding)."""
    if len(rows) == 0:
        return []
    keys = [rows[:, k] for k in range(rows.shape[1] - 1, 4, -1)]  # resources, last first
    order = np.lexsort((rows[:, 3], rows[:, 4], *keys, rows[:, 2], rows[:, 1], rows[:, 0]))
    out: list[tuple] = []
    group = None
    kept: list[tuple] = []
    for row in rows[order].tolist():
        g = (row[0], row[1], row[2])
        if g != group:
            group, kept = g, []
        res = row[5:]
        if any(all(k <= r for k, r in zip(kr, res)) for kr in kept):
            continue
        kept.append(res)
        out.append(tuple(row))
    return out


@dataclass
class _Layer:
    spec: LayerSpec
    w_vals: list[int]
    a_vals: list[int] | None  # None: no output activation
    ai_vals: list[int]  # widths of the input activation
    folds: list[tuple[int, int]]
    cand: np.ndarray  # (w, a_in, a_out | NO_ACT, fold, cycles, *resources), Pareto in all columns
    _rows: dict = field(default_factory=dict)

    def rows(self, cmax: int | None) -> list[tuple]:
        """The table for cycle cap `cmax` (None: no cap)."""
        if cmax not in self._rows:
            sel = self.cand if cmax is None else self.cand[self.cand[:, 4] <= cmax]
            self._rows[cmax] = _prune_on_resources(sel)
        return self._rows[cmax]


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
    tw: list[dict[int, np.ndarray]]  # integer sensitivity terms per layer and width: (G,)
    ta: list[dict[int, np.ndarray] | None]
    candidates: int = 0
    timings: dict = field(default_factory=dict)


def _resource_value(c: LayerCost, r: str) -> int:
    return int(math.ceil(c.resources.get(r, 0)))


def _layer_candidates(cost: CostModel, spec: LayerSpec, w_vals, ai_vals, ao_vals, resources) -> tuple[list, np.ndarray, int]:
    folds = list(cost.folding_options(spec))
    buildable = getattr(cost, "buildable", None)
    rows = []
    n = 0
    for w in w_vals:
        for ai in ai_vals:
            for ao in ao_vals:
                cands = []
                for f, (pe, simd) in enumerate(folds):
                    if buildable is not None and not buildable(spec, w, ai, ao, pe, simd):
                        continue
                    c = cost.layer_cost(spec, w, ai, ao, pe, simd)
                    cands.append((w, ai, NO_ACT if ao is None else ao, f, int(c.cycles), *(_resource_value(c, r) for r in resources)))
                n += len(cands)
                if cands:
                    arr = np.asarray(cands, dtype=np.int64)
                    rows.append(arr[_pareto(arr[:, 4:])])
    width = 5 + len(resources)
    return folds, (np.concatenate(rows) if rows else np.zeros((0, width), dtype=np.int64)), n


def _priced_resources(cost: CostModel, net: NetworkSpec) -> list[str]:
    """Resources the cost model prices and the target caps, in a fixed order."""
    spec = net.layers[0]
    pe, simd = cost.folding_options(spec)[0]
    sample = cost.layer_cost(spec, 8, 8, 8 if spec.has_output_act else None, pe, simd)
    names = [r for r in sample.resources if r in cost.limits.totals]
    return sorted(names, key=lambda r: (RESOURCE_ORDER.index(r) if r in RESOURCE_ORDER else len(RESOURCE_ORDER), r))


def _check_sensitivity(sens: Sensitivity, layer: str, table: str, widths) -> dict[int, np.ndarray]:
    per_bits = getattr(sens, table).get(layer)
    if per_bits is None:
        raise FqhwError(f"the sensitivity has no {table} entry for layer {layer!r}: recompute it for this network")
    out = {}
    for b in widths:
        if b not in per_bits:
            raise FqhwError(
                f"the sensitivity of layer {layer!r} has no {table} entry for {b} bits: recompute it for bits {min(widths)}..{max(widths)}"
            )
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
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget) or budget <= 0:
        raise FqhwError(f"budget {budget!r} must be a positive number of bits per weight")
    if min_fps is not None and not (math.isfinite(min_fps) and min_fps > 0):
        raise FqhwError(f"min fps {min_fps!r} must be a positive number")

    resources = _priced_resources(cost, net)
    caps = {r: int(math.floor(cost.limits.cap(r) + 1e-9)) for r in resources}
    max_cycles = None if min_fps is None else int(math.floor(cost.limits.clock_hz / min_fps))

    raw_w, raw_a, layers = [], [], []
    n_cand = 0
    prev_a: list[int] | None = [input_bits]
    for spec in net.layers:
        if prev_a is None:
            raise FqhwError(f"layer {spec.name!r} follows a layer without an output activation")
        w_vals = [int(pinned[spec.name])] if spec.name in pinned else bits
        a_vals = act_bits if spec.has_output_act else None
        raw_w.append(_check_sensitivity(sens, spec.name, "weight", w_vals))
        raw_a.append(_check_sensitivity(sens, spec.name, "act", a_vals) if a_vals else None)
        folds, cand, n = _layer_candidates(cost, spec, w_vals, prev_a, a_vals or [None], resources)
        n_cand += n
        if len(cand) == 0:
            raise InfeasibleError(f"layer {spec.name!r} cannot be built on {cost.limits.name} with any folding at the candidate widths")
        layers.append(_Layer(spec, w_vals, a_vals, list(prev_a), folds, cand))
        prev_a = a_vals

    extras_fn = getattr(cost, "extras_options", None)
    extras = list(extras_fn(net, input_bits)) if extras_fn is not None else []

    # integer sensitivity terms: M bounds every group's total
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
        caps=caps, extras=extras,
        budget=Fraction(int(budget)) if isinstance(budget, numbers.Integral) else Fraction(repr(float(budget))),
        max_cycles=max_cycles, groups=list(sens.groups), scale=scale,
        tw=[to_int(t) for t in raw_w], ta=[to_int(t) for t in raw_a], candidates=n_cand,
    )
    prob.timings["tables_s"] = round(time.perf_counter() - t0, 3)
    return prob


# ------------------------------------------------------------------ the model


@dataclass
class _Model:
    m: cp_model.CpModel
    cmax: int | None
    xw: list[dict]
    xa: list[dict | None]
    w: list
    a: list
    fold: list
    cyc: list
    res: list[dict]
    ext: list
    ext_cycles: list[int]
    ext_index: list[int]
    z: object
    bottleneck: object
    lut_total: object | None
    avg_num: object  # sum_l params_l * w_l
    res_total: dict
    decision: list
    table_rows: dict


def _build(
    p: _Problem, cmax: int | None, *, budget: bool = True, caps: bool = True, loss: bool = True, z_max: int | None = None
) -> _Model | None:
    """The model with every layer's cycles capped at cmax; None when some layer (or the
    extras) has no folding that fast."""
    tables = [L.rows(cmax) for L in p.layers]
    if any(not t for t in tables):
        return None
    ext_index = [k for k, e in enumerate(p.extras) if cmax is None or e.cycles <= cmax]
    if p.extras and not ext_index:
        return None
    m = cp_model.CpModel()
    xw, xa, W, A, F, CYC, RES, decision = [], [], [], [], [], [], [], []
    ncol = 5 + len(p.resources)
    for i, (L, rows) in enumerate(zip(p.layers, tables)):
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
        f = m.NewIntVarFromDomain(cp_model.Domain.FromValues(sorted({r[3] for r in rows})), f"fold[{name}]")
        cyc = m.NewIntVarFromDomain(cp_model.Domain.FromValues(sorted({r[4] for r in rows})), f"cycles[{name}]")
        res = {
            r: m.NewIntVarFromDomain(cp_model.Domain.FromValues(sorted({row[5 + k] for row in rows})), f"{r}[{name}]")
            for k, r in enumerate(p.resources)
        }
        F.append(f)
        CYC.append(cyc)
        RES.append(res)
        decision.append(f)
        # table columns: w_l, a_{l-1} (a variable unless l is the first layer), a_l (if any)
        cols, keep = [w], [0]
        if i > 0:
            cols.append(A[i - 1])
            keep.append(1)
        if L.a_vals:
            cols.append(A[i])
            keep.append(2)
        cols += [f, cyc, *res.values()]
        keep += list(range(3, ncol))
        m.AddAllowedAssignments(cols, sorted({tuple(r[k] for k in keep) for r in rows}))

    # units outside the layers (FINN: the input thresholding), one folding option each
    ext = [m.NewBoolVar(f"extras[{k}]") for k in ext_index]
    decision += ext
    if ext:
        m.AddExactlyOne(ext)
    ext_cycles = [p.extras[k].cycles for k in ext_index]

    top = max([max(r[4] for r in t) for t in tables] + ext_cycles)
    bottleneck = m.NewIntVar(0, top, "bottleneck_cycles")
    for cyc in CYC:
        m.Add(bottleneck >= cyc)
    if ext:
        m.Add(bottleneck >= sum(c * x for c, x in zip(ext_cycles, ext)))

    res_total = {}
    for r in p.resources:
        total = sum(res[r] for res in RES) + sum(_resource_value(p.extras[k], r) * x for k, x in zip(ext_index, ext))
        res_total[r] = total
        if caps:
            m.Add(total <= p.caps[r])

    avg_num = sum(L.spec.params * w for L, w in zip(p.layers, W))
    if budget:
        m.Add(avg_num * p.budget.denominator <= p.budget.numerator * p.net.total_params)

    z = None
    if loss:
        lo = hi = 0
        exprs = []
        for g in range(len(p.groups)):
            terms, glo, ghi = [], 0, 0
            for i, L in enumerate(p.layers):
                vals = [int(p.tw[i][b][g]) for b in L.w_vals]
                terms += [v * xw[i][b] for v, b in zip(vals, L.w_vals)]
                glo, ghi = glo + min(vals), ghi + max(vals)
                if L.a_vals:
                    vals = [int(p.ta[i][b][g]) for b in L.a_vals]
                    terms += [v * xa[i][b] for v, b in zip(vals, L.a_vals)]
                    glo, ghi = glo + min(vals), ghi + max(vals)
            exprs.append(sum(terms))
            lo, hi = min(lo, glo), max(hi, ghi)
        z = m.NewIntVar(lo, hi, "z_worst_group_loss")
        for e in exprs:
            m.Add(z >= e)
        if z_max is not None:
            m.Add(z <= z_max)

    return _Model(
        m, cmax, xw, xa, W, A, F, CYC, RES, ext, ext_cycles, ext_index, z, bottleneck, res_total.get("LUT"), avg_num,
        res_total, decision, {L.spec.name: len(t) for L, t in zip(p.layers, tables)},
    )


@dataclass
class _Stage:
    name: str
    status: str
    objective: float | None
    bound: float | None
    wall_time_s: float
    values: dict | None = None  # variable index -> value (CP-SAT variables are not hashable)
    model: _Model | None = None
    steps: int = 1


def _solve(mod: _Model | None, objective, name: str, time_limit: float, workers: int, seed: int, hint: list | None = None) -> _Stage:
    if mod is None:
        return _Stage(name, "INFEASIBLE", None, None, 0.0)
    m = mod.m
    m.ClearHints()
    for var, val in hint or ():
        m.AddHint(var, val)
    if objective is not None:
        m.Minimize(objective)
    elif m.HasObjective():
        m.ClearObjective()
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
        return _Stage(name, sname, None, None, wall, model=mod)
    values = {v.Index(): solver.Value(v) for v in mod.decision}
    for v in [*mod.w, *(a for a in mod.a if a is not None), *mod.cyc, *(x for r in mod.res for x in r.values()), mod.bottleneck]:
        values[v.Index()] = solver.Value(v)
    if mod.z is not None:
        values[mod.z.Index()] = solver.Value(mod.z)
    values["avg_num"] = solver.Value(mod.avg_num)
    for r, e in mod.res_total.items():
        values[f"total:{r}"] = solver.Value(e)
    # the slowest unit of the solution (the bottleneck variable is only bounded below)
    values["max_cycles"] = max(
        [solver.Value(c) for c in mod.cyc] + [c for c, x in zip(mod.ext_cycles, mod.ext) if solver.Value(x)]
    )
    obj = solver.ObjectiveValue() if objective is not None else None
    bnd = solver.BestObjectiveBound() if objective is not None else None
    return _Stage(name, sname, obj, bnd, wall, values, mod)


def _val(st: _Stage, var) -> int:
    return st.values[var.Index()]


def _bits_hint(st: _Stage, mod: _Model) -> list:
    """Hint the widths of a solution of another model of the same problem (layer by layer)."""
    old = st.model
    hint = []
    for xo, xn in zip(old.xw + old.xa, mod.xw + mod.xa):
        if xo is None:
            continue
        for b, var in xn.items():
            hint.append((var, st.values[xo[b].Index()]))
    return hint


def _min_bottleneck(
    p: _Problem, start: _Stage, name: str, deadline: float, workers: int, seed: int, **build
) -> tuple[_Stage, bool]:
    """Smallest cycle cap C at which the model (with `build` options) is feasible, by
    bisection over the cycle counts in the tables between the largest per-layer minimum
    and the slowest unit of the feasible solution `start`. Returns the feasible stage at C
    and whether every step was decided (False: a step timed out and was taken as
    infeasible, so C may not be the least)."""
    t0 = time.perf_counter()
    ub = int(start.values["max_cycles"])
    cap = p.max_cycles
    lb = max(int(np.min(L.cand[:, 4] if cap is None else L.cand[L.cand[:, 4] <= cap, 4])) for L in p.layers)
    if p.extras:
        lb = max(lb, min(e.cycles for e in p.extras))
    values = {int(v) for L in p.layers for v in L.cand[:, 4]} | {e.cycles for e in p.extras}
    cands = sorted(v for v in values if lb <= v <= ub)
    if not cands or cands[-1] != ub:
        cands.append(ub)
    best = start
    lo, hi = 0, len(cands) - 1
    exact, steps = True, 0
    while lo < hi:
        mid = (lo + hi) // 2
        steps += 1
        remaining = deadline - time.perf_counter()
        est_steps = max(1, math.ceil(math.log2(hi - lo + 1)))
        mod = _build(p, cands[mid], **build)
        hint = _bits_hint(best, mod) if mod is not None else None
        st = _solve(mod, None, name, max(0.2, remaining / (2 * est_steps)), workers, seed, hint)
        if st.values is not None:
            hi, best = mid, st
        else:
            if st.status != "INFEASIBLE":
                exact = False
            lo = mid + 1
    c_star = cands[hi]
    if best.values is None or best.values["max_cycles"] > c_star:  # pragma: no cover - defensive
        raise AssertionError("bisection lost its feasible solution")
    out = _Stage(name, "OPTIMAL" if exact else "FEASIBLE", float(c_star), float(cands[lo]) if exact else float(lb),
                 time.perf_counter() - t0, best.values, best.model, steps)
    return out, exact


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
    deadline = t_start + float(time_limit_s)

    def left(frac: float) -> float:
        return max(0.1, (deadline - time.perf_counter()) * frac)

    # stage 1: the worst group's predicted loss
    mod1 = _build(p, p.max_cycles)
    if mod1 is None:
        _diagnose(p, budget, min_fps, workers, seed, time_limit_s)
    proto = mod1.m.Proto()
    model_size = {
        "variables": len(proto.variables),
        "constraints": len(proto.constraints),
        "table_rows": sum(mod1.table_rows.values()),
        "table_rows_per_layer": dict(mod1.table_rows),
        "priced_choices": p.candidates,
        "pareto_choices": int(sum(len(L.cand) for L in p.layers)),
    }
    s1 = _solve(mod1, mod1.z, "min_worst_group_loss", left(0.5), workers, seed)
    if s1.values is None:
        if s1.status == "INFEASIBLE":
            _diagnose(p, budget, min_fps, workers, seed, time_limit_s)
        raise FqhwError(f"no allocation found on {p.target} within {time_limit_s:g} s (CP-SAT {s1.status}): allow more solver time")
    z_star = int(round(s1.objective))

    # stage 2: the bottleneck, with the loss held at z*
    s2, _ = _min_bottleneck(p, s1, "min_bottleneck_cycles", time.perf_counter() + left(0.7), workers, seed, z_max=z_star)
    c_star = int(s2.objective)

    # stage 3: the fewest LUTs at that throughput
    stages = [s1, s2]
    final = s2
    mod3 = _build(p, c_star, z_max=z_star)
    if mod3 is not None and mod3.lut_total is not None:
        s3 = _solve(mod3, mod3.lut_total, "min_luts", left(1.0), workers, seed, _bits_hint(s2, mod3))
        stages.append(s3)
        if s3.values is not None:
            final = s3
    fm = final.model

    layers = []
    for i, L in enumerate(p.layers):
        pe, simd = L.folds[_val(final, fm.fold[i])]
        a = _val(final, fm.a[i]) if fm.a[i] is not None else None
        layers.append(LayerAllocation(L.spec.name, int(_val(final, fm.w[i])), None if a is None else int(a), int(pe), int(simd)))
    alloc = Allocation(target=p.target, layers=layers, input_bits=input_bits)

    # the exact (unscaled) objective of the chosen allocation, and its price
    pred = sens.predicted({la.name: la.weight_bits for la in layers}, {la.name: la.act_bits for la in layers})
    n_terms = sum(1 + (L.a_vals is not None) for L in p.layers)
    priced = price(net, alloc, cost)
    for r in p.resources:
        if priced["total"][r] > p.caps[r]:
            raise AssertionError(f"allocation exceeds the {r} cap after pricing: {priced['total'][r]} > {p.caps[r]}")
    if p.max_cycles is not None and priced["total"]["cycles"] > p.max_cycles:
        raise AssertionError("allocation misses the throughput floor after pricing")
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
                "objective": (s.objective / p.scale if s is s1 else s.objective) if s.objective is not None else None,
                "bound": (s.bound / p.scale if s is s1 else s.bound) if s.bound is not None else None,
                "wall_time_s": round(s.wall_time_s, 3),
                "solves": s.steps,
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


def _precheck_budget(p: _Problem, budget: float) -> None:
    pins = {L.spec.name: min(L.w_vals) for L in p.layers}
    check_budget(p.net, budget, p.target, bits=[min(pins.values())], pinned=pins)


def _diagnose(p: _Problem, budget: float, min_fps: float | None, workers: int, seed: int, time_limit_s: float) -> None:
    """Find which constraint cannot be met and raise InfeasibleError saying what would work."""
    tl = max(1.0, min(10.0, time_limit_s / 3))
    total = p.net.total_params

    # 1. the resource caps alone: the narrowest allocation that fits
    mod = _build(p, None, budget=False, caps=True, loss=False)
    st = _solve(mod, mod.avg_num, "diag_caps", tl, workers, seed)
    if st.values is None:
        _diagnose_resources(p, workers, seed, tl)
    need_caps = Fraction(st.values["avg_num"], total)

    # 2. the throughput floor with the caps
    if min_fps is not None:
        mod = _build(p, p.max_cycles, budget=False, caps=True, loss=False)
        st_fps = _solve(mod, mod.avg_num if mod is not None else None, "diag_fps", tl, workers, seed)
        if st_fps.values is None:
            with_budget = need_caps <= p.budget
            start = _solve(_build(p, None, budget=with_budget, caps=True, loss=False), None, "diag_start", tl, workers, seed)
            if start.values is None:  # pragma: no cover - the caps-only model was feasible
                start = st
                with_budget = False
            fast, _ = _min_bottleneck(replace(p, max_cycles=None), start, "diag_fastest", time.perf_counter() + 3 * tl,
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


def _diagnose_resources(p: _Problem, workers: int, seed: int, tl: float) -> None:
    mod = _build(p, None, budget=False, caps=False, loss=False)
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
