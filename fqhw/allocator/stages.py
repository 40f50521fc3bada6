"""The CP-SAT models of the allocation problem (fqhw.allocator.cpsat) and the stages that
solve them: the model over widths and table rows, the widths-only relaxation, one solve
with its hints and time limit, and the least bottleneck cycles by certificates and
bisection."""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from fqhw.allocator.tables import NO_ACT, RESOURCE_WEIGHT, LayerTable, Problem, resource_value


# CP-SAT parameters set on every solve. Presolve is off: on these models (one-hot widths,
# a table per unit, a few linear sums) CP-SAT's presolve, which expands every table, cost
# about as much CPU as the search and saved nothing (bench/allocator_scale.py: ResNet-50
# per layer 7.9 -> 5.1 CPU s, ResNet-18 2.3 -> 1.4, the same optima and, on the default
# CNN and cnv, the same allocations).
SOLVER_PARAMETERS: dict = {"cp_model_presolve": False}


@dataclass
class SatModel:
    m: cp_model.CpModel
    cmax: int | None
    xw: list[dict]  # per unit
    xa: list[dict]  # per activation slot
    w: list
    a: list  # per activation slot
    fold: list
    cyc: list
    res: list[dict]  # per unit: every column (capped resources and metrics)
    ext: list
    ext_cycles: list[int]
    ext_index: list[int]
    z: object
    bottleneck: object
    latency: object  # sum of the units' cycles (+ the extras')
    lut_total: object | None
    avg_num: object  # sum_l params_l * w_l
    res_total: dict  # per column
    weighted_resources: object | None  # sum_r R_r * round(RESOURCE_WEIGHT / cap_r)
    decision: list
    table_rows: dict
    fold_dom: list = field(default_factory=list)  # per unit, the folding indices its table allows

    def unit_act(self, L: LayerTable):
        return None if L.out_slot is None else self.a[L.out_slot]


def width_choice(m: cp_model.CpModel, values, name: str):
    """A width as one-hot booleans x[b] (what the sensitivity terms and tables index) and
    the integer w = sum_b b * x[b] (what the budget sums)."""
    x = {b: m.NewBoolVar(f"{name}=={b}") for b in values}
    m.AddExactlyOne(x.values())
    w = m.NewIntVarFromDomain(cp_model.Domain.FromValues(values), name)
    m.Add(w == sum(b * v for b, v in x.items()))
    return x, w


def build_sat_model(
    p: Problem, cmax: int | None, *, budget: bool = True, caps: bool = True, loss: bool = True, z_max: int | None = None,
    hardware: bool = True,
) -> SatModel | None:
    """The model with every image's cycles capped at cmax (dataflow: every unit's cycles;
    sequential: their sum); None when some unit (or the extras) has no folding that fast.
    hardware=False leaves out the foldings, cycles and resources (the tables): only the
    widths, the budget and the loss, a relaxation of the problem."""
    if not hardware:
        return build_widths_only(p, budget=budget, z_max=z_max)
    tables = [L.array(cmax) for L in p.layers]
    if any(not len(t) for t in tables):
        return None
    ext_index = [k for k, e in enumerate(p.extras) if cmax is None or e.cycles <= cmax]
    if p.extras and not ext_index:
        return None
    m = cp_model.CpModel()
    xw, xa, W, A, F, CYC, RES, decision = [], [None] * len(p.slots), [], [None] * len(p.slots), [], [], [], []
    fold_doms: list[set] = []
    ncol = 5 + len(p.columns)
    for i, (L, rows) in enumerate(zip(p.layers, tables)):
        name = L.spec.name
        bw, w = width_choice(m, L.w_vals, f"w[{name}]")
        xw.append(bw)
        W.append(w)
        decision += list(bw.values())
        if L.out_slot is not None and A[L.out_slot] is None:
            slot = p.slots[L.out_slot]
            ba, a = width_choice(m, slot.a_vals, f"a[{slot.name}]")
            xa[L.out_slot] = ba
            A[L.out_slot] = a
            decision += list(ba.values())
        # table columns: w_l, the input activation (a variable unless it is the network's), a_l (if any)
        keep = (0, *((1,) if L.in_slot >= 0 else ()), *((2,) if L.out_slot is not None else ()), *range(3, ncol))
        doms, tuples = L.table(cmax, keep)
        f = m.NewIntVarFromDomain(cp_model.Domain.FromValues(doms[0]), f"fold[{name}]")
        cyc = m.NewIntVarFromDomain(cp_model.Domain.FromValues(doms[1]), f"cycles[{name}]")
        res = {r: m.NewIntVarFromDomain(cp_model.Domain.FromValues(doms[2 + k]), f"{r}[{name}]") for k, r in enumerate(p.columns)}
        F.append(f)
        CYC.append(cyc)
        RES.append(res)
        fold_doms.append(set(doms[0]))
        decision.append(f)
        cols = [w]
        if L.in_slot >= 0:
            cols.append(A[L.in_slot])
        if L.out_slot is not None:
            cols.append(A[L.out_slot])
        cols += [f, cyc, *res.values()]
        m.AddAllowedAssignments(cols, tuples)

    # units outside the layers (FINN: the input thresholding), one folding option each
    ext = [m.NewBoolVar(f"extras[{k}]") for k in ext_index]
    decision += ext
    if ext:
        m.AddExactlyOne(ext)
    ext_cycles = [p.extras[k].cycles for k in ext_index]
    ext_cyc_expr = sum(c * x for c, x in zip(ext_cycles, ext)) if ext else 0

    top = max([int(t[:, 4].max()) for t in tables] + ext_cycles)
    bottleneck = m.NewIntVar(0, top, "bottleneck_cycles")
    for cyc in CYC:
        m.Add(bottleneck >= cyc)
    if ext:
        m.Add(bottleneck >= ext_cyc_expr)
    latency = sum(CYC) + ext_cyc_expr
    if p.schedule == "sequential" and cmax is not None:
        m.Add(latency <= cmax)

    res_total = {}
    for r in p.columns:
        total = sum(res[r] for res in RES)
        if r in p.resources:
            total += sum(resource_value(p.extras[k], r) * x for k, x in zip(ext_index, ext))
        res_total[r] = total
        if caps and r in p.resources:
            m.Add(total <= p.caps[r])
    weights = {r: max(1, round(RESOURCE_WEIGHT / p.caps[r])) for r in p.resources if p.caps[r] > 0}
    weighted = sum(k * res_total[r] for r, k in weights.items()) if weights else None

    avg_num = sum(L.spec.params * w for L, w in zip(p.layers, W))
    if budget:
        m.Add(avg_num * p.budget.denominator <= p.budget.numerator * p.net.total_params)

    z = add_loss(p, m, xw, xa, z_max) if loss else None

    return SatModel(
        m, cmax, xw, xa, W, A, F, CYC, RES, ext, ext_cycles, ext_index, z, bottleneck, latency, res_total.get("LUT"), avg_num,
        res_total, weighted, decision, {L.spec.name: len(t) for L, t in zip(p.layers, tables)},
        fold_doms,
    )


def add_loss(p: Problem, m: cp_model.CpModel, xw: list[dict], xa: list[dict], z_max: int | None):
    """z >= every group's integer loss total (and z <= z_max when given)."""
    lo = hi = 0
    exprs = []
    for g in range(len(p.groups)):
        glo = sum(min(int(p.tw[i][b][g]) for b in L.w_vals) for i, L in enumerate(p.layers))
        glo += sum(min(int(p.ta[k][b][g]) for b in slot.a_vals) for k, slot in enumerate(p.slots))
        ghi = sum(max(int(p.tw[i][b][g]) for b in L.w_vals) for i, L in enumerate(p.layers))
        ghi += sum(max(int(p.ta[k][b][g]) for b in slot.a_vals) for k, slot in enumerate(p.slots))
        exprs.append(group_terms(p, xw, xa, g))
        lo, hi = min(lo, glo), max(hi, ghi)
    z = m.NewIntVar(lo, hi, "z_worst_group_loss")
    for e in exprs:
        m.Add(z >= e)
    if z_max is not None:
        m.Add(z <= z_max)
    return z


def group_terms(p: Problem, xw: list[dict], xa: list[dict], g: int):
    """Group g's integer loss total as a linear expression of the width booleans."""
    terms = []
    for i, L in enumerate(p.layers):
        terms += [int(p.tw[i][b][g]) * xw[i][b] for b in L.w_vals]
    for k, slot in enumerate(p.slots):
        terms += [int(p.ta[k][b][g]) * xa[k][b] for b in slot.a_vals]
    return sum(terms)


def build_widths_only(p: Problem, *, budget: bool = True, z_max: int | None = None) -> SatModel:
    m = cp_model.CpModel()
    xw, W, decision = [], [], []
    for L in p.layers:
        bw, w = width_choice(m, L.w_vals, f"w[{L.spec.name}]")
        xw.append(bw)
        W.append(w)
        decision += list(bw.values())
    xa, A = [], []
    for slot in p.slots:
        ba, a = width_choice(m, slot.a_vals, f"a[{slot.name}]")
        xa.append(ba)
        A.append(a)
        decision += list(ba.values())
    avg_num = sum(L.spec.params * w for L, w in zip(p.layers, W))
    if budget:
        m.Add(avg_num * p.budget.denominator <= p.budget.numerator * p.net.total_params)
    z = add_loss(p, m, xw, xa, z_max)
    return SatModel(m, None, xw, xa, W, A, [], [], [], [], [], [], z, None, 0, None, avg_num, {}, None, decision, {})


@dataclass
class Choice:
    """A solution as plain data: widths per unit and per activation slot, and (where the
    model had the hardware) the folding index and cycles per unit."""

    w: list[int]
    a: list[int]
    fold: list[int] | None = None
    cycles: list[int] | None = None
    ext: int | None = None  # index into p.extras

    @property
    def max_cycles(self) -> int:
        return max(self.cycles or [0])


@dataclass
class Stage:
    name: str
    status: str
    objective: float | None
    bound: float | None
    wall_time_s: float
    values: dict | None = None  # variable index -> value (CP-SAT variables are not hashable)
    model: SatModel | None = None
    steps: int = 1
    choice: Choice | None = None
    solver_steps: int | None = None  # bisection: the steps that needed the solver
    cpu_time_s: float | None = None  # process CPU time (every CP-SAT worker thread)
    overlapped: bool = False  # solved in a thread beside the stage before it (its times are the wait after it)


def run_solver(
    mod: SatModel | None, objective, name: str, time_limit: float, workers: int, seed: int, hint: list | None = None, rel_gap: float = 0.0,
    holder: list | None = None,
) -> Stage:
    """One CP-SAT solve of `mod`; `holder`, when given, receives the CpSolver before it
    starts (so that another thread may stop it)."""
    if mod is None:
        return Stage(name, "INFEASIBLE", None, None, 0.0)
    m = mod.m
    m.ClearHints()
    for var, val in hint or ():
        m.AddHint(var, val)
    if objective is not None:
        m.Minimize(objective)
    elif m.HasObjective():
        m.ClearObjective()
    solver = cp_model.CpSolver()
    # CP-SAT's own Ctrl-C handler is left as SIG_DFL after Solve: a later Ctrl-C would kill
    # the process with no message and no clean-up. Python's handler stays (Ctrl-C during a
    # solve then takes effect when it returns, within the time limit).
    solver.parameters.catch_sigint_signal = False
    solver.parameters.max_time_in_seconds = max(0.05, float(time_limit))
    solver.parameters.num_workers = max(1, int(workers))
    solver.parameters.random_seed = int(seed)
    if rel_gap > 0 and objective is not None:
        solver.parameters.relative_gap_limit = float(rel_gap)
    for k, v in SOLVER_PARAMETERS.items():
        setattr(solver.parameters, k, v)
    if holder is not None:
        holder.append(solver)
    t0, c0 = time.perf_counter(), time.process_time()
    status = solver.Solve(m)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    sname = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if status == cp_model.MODEL_INVALID:
            raise RuntimeError(f"CP-SAT model invalid: {m.Validate()}")
        return Stage(name, sname, None, None, wall, model=mod, cpu_time_s=cpu)
    values = {v.Index(): solver.Value(v) for v in mod.decision}
    for v in [*mod.w, *(a for a in mod.a if a is not None), *mod.cyc, *(x for r in mod.res for x in r.values())]:
        values[v.Index()] = solver.Value(v)
    if mod.bottleneck is not None:
        values[mod.bottleneck.Index()] = solver.Value(mod.bottleneck)
    if mod.z is not None:
        values[mod.z.Index()] = solver.Value(mod.z)
    values["avg_num"] = solver.Value(mod.avg_num)
    for r, e in mod.res_total.items():
        values[f"total:{r}"] = solver.Value(e)
    # the slowest unit of the solution (the bottleneck variable is only bounded below)
    unit_cycles = [solver.Value(c) for c in mod.cyc] + [c for c, x in zip(mod.ext_cycles, mod.ext) if solver.Value(x)]
    values["max_cycles"] = max(unit_cycles, default=0)
    values["latency"] = sum(unit_cycles)
    obj = solver.ObjectiveValue() if objective is not None else None
    bnd = solver.BestObjectiveBound() if objective is not None else None
    choice = Choice(
        w=[int(values[v.Index()]) for v in mod.w],
        a=[int(values[v.Index()]) for v in mod.a],
        fold=[int(values[v.Index()]) for v in mod.fold] if mod.fold else None,
        cycles=[int(values[v.Index()]) for v in mod.cyc] if mod.cyc else None,
        ext=next((mod.ext_index[k] for k, x in enumerate(mod.ext) if values[x.Index()]), None),
    )
    return Stage(name, sname, obj, bnd, wall, values, mod, choice=choice, cpu_time_s=cpu)


def bits_hint(st: Stage, mod: SatModel, folds: bool = False) -> list:
    """Hint the widths (and with folds=True the foldings) of a solution to a model of the
    same problem."""
    c = st.choice
    hint = []
    for i, xn in enumerate(mod.xw):
        hint += [(var, int(b == c.w[i])) for b, var in xn.items()]
    for k, xn in enumerate(mod.xa):
        hint += [(var, int(b == c.a[k])) for b, var in xn.items()]
    if folds and c.fold is not None and mod.fold:
        hint += [(v, f) for f, v, dom in zip(c.fold, mod.fold, mod.fold_dom) if f in dom]
    return hint


def least_rows(p: Problem, cmax: int | None, c: Choice) -> list[tuple] | None:
    """Per unit, the row of its table at cap cmax for the widths of `c` with the least
    resources (lexicographically, then the fewest cycles); None when a unit has none."""
    out = []
    nres = len(p.resources)
    for L, w in zip(p.layers, c.w):
        ai = p.input_bits if L.in_slot < 0 else c.a[L.in_slot]
        ao = NO_ACT if L.out_slot is None else c.a[L.out_slot]
        arr = L.array(cmax)
        sub = arr[(arr[:, 0] == w) & (arr[:, 1] == ai) & (arr[:, 2] == ao)]
        if not len(sub):
            return None
        # the lexicographic least (resources in order, then cycles, then folding)
        order = np.lexsort((sub[:, 3], sub[:, 4], *(sub[:, 5 + k] for k in reversed(range(nres)))))
        out.append(tuple(sub[order[0]].tolist()))
    return out


def certificate(p: Problem, cmax: int, c: Choice, caps: bool = True) -> Choice | None:
    """The widths of `c` with each unit's least-resource folding at cap cmax, when that
    fits every cap: a feasible solution found without the solver (None otherwise)."""
    if p.extras:
        return None
    rows = least_rows(p, cmax, c)
    if rows is None:
        return None
    if p.schedule == "sequential" and cmax is not None and sum(row[4] for row in rows) > cmax:
        return None
    if caps:
        for k, r in enumerate(p.resources):
            if sum(row[5 + k] for row in rows) > p.caps[r]:
                return None
    return Choice(list(c.w), list(c.a), [int(r[3]) for r in rows], [int(r[4]) for r in rows])


def caps_exceeded(p: Problem, cmax: int, z_max: int | None = None) -> bool:
    """True when even each unit's least use of some resource at cap cmax, over the widths
    the loss limit z_max leaves it (see loss_widths), adds up to more than the cap: no
    solution at cmax (without the solver)."""
    if p.extras:
        return False
    allowed_w, allowed_a = loss_widths(p, z_max)
    need = np.zeros(len(p.resources), dtype=np.int64)
    for i, L in enumerate(p.layers):
        rows = L.array(cmax)
        if len(rows):
            ok = np.isin(rows[:, 0], allowed_w[i])
            if L.in_slot >= 0:
                ok &= np.isin(rows[:, 1], allowed_a[L.in_slot])
            if L.out_slot is not None:
                ok &= np.isin(rows[:, 2], allowed_a[L.out_slot])
            rows = rows[ok]
        if not len(rows):
            return True
        need += rows[:, 5:5 + len(p.resources)].min(axis=0)
    return any(need[k] > p.caps[r] for k, r in enumerate(p.resources))


def loss_widths(p: Problem, z_max: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """Per unit and per activation slot, the widths that can be part of a solution with
    loss <= z_max: b is left out when, with every other unit and slot at its own least
    term, some group's total with b already exceeds z_max."""
    key = ("loss_widths", z_max)
    if key in p.cache:
        return p.cache[key]
    w_ok = [list(L.w_vals) for L in p.layers]
    a_ok = [list(sl.a_vals) for sl in p.slots]
    if z_max is not None:
        tables = [(t, w_ok, i) for i, t in enumerate(p.tw)] + [(t, a_ok, k) for k, t in enumerate(p.ta)]
        mins = [np.min(np.stack(list(t.values())), axis=0) for t, _, _ in tables]
        base = np.sum(mins, axis=0)
        for (t, out, j), mn in zip(tables, mins):
            out[j] = [b for b in out[j] if np.all(base - mn + t[b] <= z_max)]
    p.cache[key] = (w_ok, a_ok)
    return w_ok, a_ok


def min_bottleneck(
    p: Problem, start: Stage, name: str, deadline: float, workers: int, seed: int, on_probe=None, **build
) -> tuple[Stage, bool]:
    """Smallest cycle cap C at which the model (with `build` options) is feasible, by
    bisection over the cycle counts in the tables between the largest per-layer minimum
    and the slowest unit of the feasible solution `start`. Returns the feasible stage at C
    and whether every step was decided (False: a step timed out and was taken as
    infeasible, so C may not be the least)."""
    t0 = time.perf_counter()
    ub = int(start.choice.max_cycles)
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
    caps = build.get("caps", True)
    solver_steps = 0
    z_lim = build.get("z_max") if build.get("loss", True) else None
    # Without the solver first: the least cap at which the widths of `start`, refolded,
    # fit (feasible from there up), and the least cap the resources do not rule out
    # (infeasible below it); both tests are monotone in the cap.
    a, b = lo, hi
    while a < b:
        mid = (a + b) // 2
        steps += 1
        cert = certificate(p, cands[mid], best.choice, caps)
        if cert is not None:
            b, best = mid, Stage(name, "FEASIBLE", None, None, 0.0, None, None, choice=cert)
        else:
            a = mid + 1
    hi = b
    if caps:
        a, b = lo, hi
        while a < b:
            mid = (a + b) // 2
            steps += 1
            if caps_exceeded(p, cands[mid], z_lim):
                a = mid + 1
            else:
                b = mid
        lo = a
    # Then the solver, first at the cap just below the feasible one (where the certificate
    # is usually the optimum: one infeasible solve proves it), then by bisection.
    first = True
    probe_workers = workers
    while lo < hi:
        mid = hi - 1 if first else (lo + hi) // 2
        if first and on_probe is not None and on_probe(best, cands[hi]):
            # the caller now solves the next stage at cands[hi] beside this probe: share the cores
            probe_workers = max(1, workers - 1)
        first = False
        steps += 1
        # without the solver where possible: the current widths refolded fit (feasible), or
        # the least resources at this cap exceed a cap whatever the widths (infeasible)
        cert = certificate(p, cands[mid], best.choice, caps)
        if cert is not None:
            hi, best = mid, Stage(name, "FEASIBLE", None, None, 0.0, None, None, choice=cert)
            continue
        if caps and caps_exceeded(p, cands[mid], z_lim):
            lo = mid + 1
            continue
        solver_steps += 1
        remaining = deadline - time.perf_counter()
        est_steps = max(1, math.ceil(math.log2(hi - lo + 1)))
        mod = build_sat_model(p, cands[mid], **build)
        hint = bits_hint(best, mod) if mod is not None else None
        share = 0.5 if mid == hi - 1 else 1 / (2 * est_steps)  # the probe below the best cap decides most runs
        st = run_solver(mod, None, name, max(0.2, remaining * share), probe_workers, seed, hint)
        probe_workers = workers
        if st.values is not None:
            # the solution's own bottleneck may lie below the cap it was asked for
            hi, best = min(mid, bisect.bisect_left(cands, st.choice.max_cycles)), st
        else:
            if st.status != "INFEASIBLE":
                exact = False
            lo = mid + 1
    c_star = cands[hi]
    if best.choice is None or best.choice.max_cycles > c_star:  # pragma: no cover - defensive
        raise AssertionError("bisection lost its feasible solution")
    out = Stage(name, "OPTIMAL" if exact else "FEASIBLE", float(c_star), float(cands[lo]) if exact else float(lb),
                 time.perf_counter() - t0, best.values, best.model, steps, choice=best.choice)
    out.solver_steps = solver_steps
    return out, exact
