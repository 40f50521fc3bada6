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
METRIC_RESOLUTION = 10**9  # integer units for the largest per-layer value of an uncapped metric
RESOURCE_WEIGHT = 10**6  # "resources" objective: R_r weighted by round(RESOURCE_WEIGHT / cap_r)
RESOURCE_ORDER = ("LUT", "BRAM_18K", "URAM", "DSP")
NO_ACT = -1  # a_out column of a layer without an output activation
ENERGY = "energy_pJ"
OBJECTIVES = ("throughput", "resources", "latency", "energy")


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
    in_slot: int  # activation slot the unit reads (-1: the network input)
    out_slot: int | None  # slot it writes (None: no output activation)
    folds: list[tuple[int, int]]
    cand: np.ndarray  # (w, a_in, a_out | NO_ACT, fold, cycles, *resources, *metrics), Pareto in all columns
    _rows: dict = field(default_factory=dict)
    _death: np.ndarray | None = None

    def rows(self, cmax: int | None) -> list[tuple]:
        """The table for cycle cap `cmax` (None: no cap): per (w, a_in, a_out), the rows
        with cycles <= cmax that no other such row beats or matches in every resource (ties
        go to the fastest, then the first folding), as `_prune_on_resources` would give."""
        if cmax not in self._rows:
            death = self.death()
            cyc = self.cand[:, 4]
            keep = death == _NEVER if cmax is None else (cyc <= cmax) & (death > cmax)
            self._rows[cmax] = [tuple(r) for r in self.cand[keep].tolist()]
        return self._rows[cmax]

    def death(self) -> np.ndarray:
        """Per row, the least cycle cap at which another row of its choice dominates it in
        resources (with the tie rule above): the row is in the table for cap C iff
        cycles <= C < death."""
        if self._death is None:
            self._death = _death_caps(self.cand)
        return self._death


_NEVER = np.iinfo(np.int64).max


def _death_caps(cand: np.ndarray) -> np.ndarray:
    """See _Layer.death. Row q dominates row r when q's resources are <= r's everywhere and
    either differ somewhere or (cycles, fold) of q < those of r; r dies at the least cycles
    of a row that dominates it."""
    n = len(cand)
    death = np.full(n, _NEVER, dtype=np.int64)
    if n == 0:
        return death
    _, first, inv = np.unique(cand[:, :3], axis=0, return_index=True, return_inverse=True)
    inv = inv.ravel()
    varying = [k for k in range(5, cand.shape[1]) if not np.array_equal(cand[:, k], cand[first[inv], k])]
    if len(varying) <= 1:
        # one resource varies within a choice: r's dominators are exactly the rows before it
        # in (resource, cycles, fold) order, so death = the running minimum of the cycles
        # before it (per choice: later choices are shifted below earlier ones)
        res = cand[:, varying[0]] if varying else np.zeros(n, dtype=np.int64)
        order = np.lexsort((cand[:, 3], cand[:, 4], res, inv))
        g, cyc = inv[order], cand[order, 4].astype(np.int64)
        span = int(cyc.max()) + 1
        shifted = cyc + (int(g.max()) - g) * span
        run = np.minimum.accumulate(shifted)
        before = np.full(n, _NEVER, dtype=np.int64)
        same = g[1:] == g[:-1]
        before[1:] = np.where(same, run[:-1] - (int(g.max()) - g[1:]) * span, _NEVER)
        death[order] = before
        return death
    order = np.argsort(inv, kind="stable")
    bounds = np.flatnonzero(np.diff(inv[order])) + 1
    for idx in np.split(order, bounds):
        if len(idx) == 1:
            continue
        R = cand[idx, 5:]
        cyc, fold = cand[idx, 4], cand[idx, 3]
        le = np.all(R[:, None, :] <= R[None, :, :], axis=2)  # le[q, r]
        eq = np.all(R[:, None, :] == R[None, :, :], axis=2)
        faster = (cyc[:, None] < cyc[None, :]) | ((cyc[:, None] == cyc[None, :]) & (fold[:, None] < fold[None, :]))
        dom = le & (~eq | faster)
        killer = np.where(dom, cyc[:, None], _NEVER)
        death[idx] = killer.min(axis=0)
    return death


@dataclass
class _Slot:
    """One output activation width: a layer's (shared by its channel groups)."""

    name: str
    a_vals: list[int]


@dataclass
class _Problem:
    net: NetworkSpec
    cost: CostModel
    target: str
    input_bits: int
    layers: list[_Layer]
    slots: list[_Slot]
    resources: list[str]  # capped
    metrics: list[str]  # priced, uncapped (energy), integer units of metric_scale
    metric_scale: dict[str, float]
    caps: dict[str, int]
    extras: list[LayerCost]
    budget: Fraction
    max_cycles: int | None
    groups: list[str]
    scale: float
    tw: list[dict[int, np.ndarray]]  # integer sensitivity terms per unit and width: (G,)
    ta: list[dict[int, np.ndarray]]  # per slot
    schedule: str = "dataflow"
    objective: str = "throughput"
    candidates: int = 0
    timings: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return [*self.resources, *self.metrics]


def _resource_value(c: LayerCost, r: str) -> int:
    return int(math.ceil(c.resources.get(r, 0)))


def _layer_candidates(cost: CostModel, spec: LayerSpec, w_vals, ai_vals, ao_vals, resources, metrics=()) -> tuple[list, np.ndarray, int]:
    """Every buildable choice of the unit, priced; per (w, a_in, a_out) only the foldings no
    other folding beats in every column. Float array: metrics are scaled later."""
    folds = list(cost.folding_options(spec))
    table_fn = getattr(cost, "price_table", None)
    if table_fn is not None:
        rows, n = table_fn(spec, list(w_vals), list(ai_vals), list(ao_vals), folds, list(resources), list(metrics))
        return folds, _pareto_by_choice(np.asarray(rows, dtype=np.float64), 5 + len(resources) + len(metrics)), int(n)
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
                    cands.append(
                        (w, ai, NO_ACT if ao is None else ao, f, int(c.cycles), *(_resource_value(c, r) for r in resources),
                         *(float(c.resources.get(m, 0.0)) for m in metrics))
                    )
                n += len(cands)
                if cands:
                    arr = np.asarray(cands, dtype=np.float64)
                    rows.append(arr[_pareto(arr[:, 4:])])
    width = 5 + len(resources) + len(metrics)
    return folds, (np.concatenate(rows) if rows else np.zeros((0, width), dtype=np.float64)), n


def _pareto_by_choice(arr: np.ndarray, width: int) -> np.ndarray:
    """The rows of `arr` that are Pareto-optimal (as `_pareto`) in the columns from 4 on,
    within each choice (w, a_in, a_out). Where at most one column after the cycles varies
    within a choice (e.g. only the LUTs), a sorted running minimum gives the same rows in
    O(n log n); otherwise `_pareto` per choice."""
    if len(arr) == 0:
        return np.zeros((0, width), dtype=np.float64)
    _, first, inv = np.unique(arr[:, :3], axis=0, return_index=True, return_inverse=True)
    inv = inv.ravel()
    cols = [k for k in range(5, arr.shape[1]) if not np.array_equal(arr[:, k], arr[first[inv], k])]
    if len(cols) <= 1:
        c1 = arr[:, cols[0]] if cols else np.zeros(len(arr))
        order = np.lexsort((np.arange(len(arr)), c1, arr[:, 4], inv))
        g, v = inv[order], c1[order]
        span = float(v.max() - v.min()) + 1.0 if len(v) else 1.0
        shifted = (v - v.min()) + (g.max() - g) * span  # earlier choices lie above later ones
        run = np.minimum.accumulate(shifted)
        keep = np.ones(len(order), dtype=bool)
        keep[1:] = shifted[1:] < run[:-1]
        return arr[np.sort(order[keep])]
    out = []
    for k in range(len(first)):
        sub = arr[inv == k]
        out.append(sub[_pareto(sub[:, 4:])])
    return np.concatenate(out)


def _sample_cost(cost: CostModel, net: NetworkSpec) -> LayerCost:
    spec = net.layers[0]
    pe, simd = cost.folding_options(spec)[0]
    return cost.layer_cost(spec, 8, 8, 8 if spec.has_output_act else None, pe, simd)


def _priced_resources(cost: CostModel, net: NetworkSpec) -> list[str]:
    """Resources the cost model prices and the target caps, in a fixed order."""
    sample = _sample_cost(cost, net)
    names = [r for r in sample.resources if r in cost.limits.totals]
    return sorted(names, key=lambda r: (RESOURCE_ORDER.index(r) if r in RESOURCE_ORDER else len(RESOURCE_ORDER), r))


def _priced_metrics(cost: CostModel, net: NetworkSpec) -> list[str]:
    """Uncapped quantities the allocator can minimise (energy), where the model prices them."""
    sample = _sample_cost(cost, net)
    return [m for m in (ENERGY,) if m in sample.resources and m not in cost.limits.totals]


def _resolve_objective(cost: CostModel, objective: str | None, metrics: list[str], resources: list[str]) -> str:
    schedule = getattr(cost, "schedule", "dataflow")
    if objective is None:
        objective = getattr(cost, "default_objective", None) or ("throughput" if schedule == "dataflow" else "latency")
    objective = str(objective).lower()
    name = cost.limits.name
    if objective not in OBJECTIVES:
        raise FqhwError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if schedule == "sequential" and objective == "throughput":
        objective = "latency"  # one image at a time: throughput = 1 / latency
    if schedule == "dataflow" and objective == "latency":
        raise FqhwError(f"{name} is a dataflow pipeline: use --objective throughput (or resources with a throughput floor)")
    if objective == "energy" and ENERGY not in metrics:
        raise FqhwError(f"{name} has no energy model: use --objective {'throughput' if schedule == 'dataflow' else 'latency'}")
    if objective == "resources" and not any(cost.limits.cap(r) > 0 for r in resources):
        raise FqhwError(f"{name} caps no resources to minimise: use --objective {'throughput' if schedule == 'dataflow' else 'latency or energy'}")
    return objective


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


def _check_pins(pins: dict, names: list[str], what: str) -> None:
    for name, b in pins.items():
        if name not in names:
            raise FqhwError(f"pinned {what} {name!r} is not in the network ({what}s: {', '.join(names)})")
        if isinstance(b, bool) or int(b) != b or b < 1:
            raise FqhwError(f"pinned width {b!r} of {what} {name!r} is not a positive integer")


def _problem(net, sens, cost, budget, bits, act_bits, pinned, min_fps, input_bits, pinned_act=None, objective=None) -> _Problem:
    t0 = time.perf_counter()
    if not net.layers:
        raise FqhwError("the network has no conv or linear layers to allocate")
    bits = sorted(set(int(b) for b in bits))
    act_bits = sorted(set(int(b) for b in act_bits))
    if not bits or not act_bits:
        raise FqhwError("the candidate weight and activation widths must not be empty")
    pinned = dict(pinned or {})
    pinned_act = dict(pinned_act or {})
    names = [s.name for s in net.layers]
    _check_pins(pinned, names, "layer")
    _check_pins(pinned_act, list(dict.fromkeys(s.act_group for s in net.layers if s.has_output_act)), "activation")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget) or budget <= 0:
        raise FqhwError(f"budget {budget!r} must be a positive number of bits per weight")
    if min_fps is not None and not (math.isfinite(min_fps) and min_fps > 0):
        raise FqhwError(f"min fps {min_fps!r} must be a positive number")

    schedule = getattr(cost, "schedule", "dataflow")
    if schedule not in ("dataflow", "sequential"):
        raise FqhwError(f"cost model of {cost.limits.name} has an unknown schedule {schedule!r}")
    resources = _priced_resources(cost, net)
    metrics = _priced_metrics(cost, net)
    objective = _resolve_objective(cost, objective, metrics, resources)
    caps = {r: int(math.floor(cost.limits.cap(r) + 1e-9)) for r in resources}
    max_cycles = None if min_fps is None else int(math.floor(cost.limits.clock_hz / min_fps))

    raw_w, raw_a, layers, slots = [], [], [], []
    slot_of: dict[str, int] = {}
    priced: dict = {}
    n_cand = 0
    # Residual joins: the activations that meet at an add are added code to code, so they
    # share one width (one activation slot): every join group of the network is tied, its
    # slot named after its first layer, its loss the sum of its members'.
    tie: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for group in net.join_groups():
        ordered = [s.act_group for s in net.layers if s.act_group in group and s.has_output_act]
        ordered = list(dict.fromkeys(ordered))
        for g in ordered:
            tie[g] = ordered[0]
        members[ordered[0]] = ordered
    for i, spec in enumerate(net.layers):
        j = net.input_of(i)
        if j >= 0 and not net.layers[j].has_output_act:
            raise FqhwError(f"layer {spec.name!r} follows a layer without an output activation")
        in_slot = -1 if j < 0 else slot_of[tie.get(net.layers[j].act_group, net.layers[j].act_group)]
        ai_vals = [input_bits] if in_slot < 0 else slots[in_slot].a_vals
        out_slot = None
        if spec.has_output_act:
            g = tie.get(spec.act_group, spec.act_group)
            if g not in slot_of:
                group = members.get(g, [g])
                pins = {int(pinned_act[m]) for m in group if m in pinned_act}
                if len(pins) > 1:
                    raise FqhwError(f"activations {', '.join(group)} meet at residual adds and must share one width, but are pinned to {sorted(pins)}")
                a_vals = sorted(pins) if pins else act_bits
                slot_of[g] = len(slots)
                slots.append(_Slot(g, a_vals))
                tables = [_check_sensitivity(sens, m, "act", a_vals) for m in group]
                raw_a.append({b: sum(t[b] for t in tables) for b in a_vals})
            out_slot = slot_of[g]
        elif spec.act_group in slot_of:
            raise FqhwError(f"the channel groups of layer {spec.act_group!r} disagree on having an output activation")
        a_vals = slots[out_slot].a_vals if out_slot is not None else None
        w_vals = [int(pinned[spec.name])] if spec.name in pinned else bits
        raw_w.append(_check_sensitivity(sens, spec.name, "weight", w_vals))
        # units of the same shape and widths (repeated blocks, channel groups) share one table
        shape_key = (replace(spec, name="", group="", group_index=min(spec.group_index, 1)), tuple(w_vals), tuple(ai_vals),
                     tuple(a_vals or [None]))
        if not getattr(cost, "prices_by_shape", False):
            shape_key = (len(layers), spec.name)
        if shape_key not in priced:
            priced[shape_key] = _layer_candidates(cost, spec, w_vals, ai_vals, a_vals or [None], resources, metrics)
        folds, cand, n = priced[shape_key]
        cand = cand.copy()
        n_cand += n
        if len(cand) == 0:
            raise InfeasibleError(f"layer {spec.name!r} cannot be built on {cost.limits.name} with any folding at the candidate widths")
        layers.append(_Layer(spec, w_vals, a_vals, list(ai_vals), in_slot, out_slot, folds, cand))

    # uncapped metrics in integer units: the largest per-layer value is METRIC_RESOLUTION
    metric_scale = {}
    for k, mname in enumerate(metrics):
        col = 5 + len(resources) + k
        top = max(float(np.max(np.abs(L.cand[:, col]))) for L in layers)
        metric_scale[mname] = METRIC_RESOLUTION / top if top > 0 else 1.0
        for L in layers:
            L.cand[:, col] = np.rint(L.cand[:, col] * metric_scale[mname])
    shared: dict = {}
    for L in layers:
        L.cand = L.cand.astype(np.int64)
        # identical tables share their pruning (death caps and the rows per cycle cap)
        key = (L.cand.shape, L.cand.tobytes())
        if key in shared:
            L._death, L._rows = shared[key]
        else:
            L._death = _death_caps(L.cand)
            shared[key] = (L._death, L._rows)

    extras_fn = getattr(cost, "extras_options", None)
    extras = list(extras_fn(net, input_bits)) if extras_fn is not None else []

    # integer sensitivity terms: M bounds every group's total
    bound = np.zeros(len(sens.groups))
    for t in [*raw_w, *raw_a]:
        bound += np.max(np.abs(np.stack(list(t.values()))), axis=0)
    m = float(np.max(bound)) if len(bound) else 0.0
    scale = LOSS_RESOLUTION / m if m > 0 else 1.0

    def to_int(table):
        return {b: np.rint(v * scale).astype(np.int64) for b, v in table.items()}

    prob = _Problem(
        net=net, cost=cost, target=cost.limits.name, input_bits=input_bits, layers=layers, slots=slots, resources=resources,
        metrics=metrics, metric_scale=metric_scale, caps=caps, extras=extras,
        budget=Fraction(int(budget)) if isinstance(budget, numbers.Integral) else Fraction(repr(float(budget))),
        max_cycles=max_cycles, groups=list(sens.groups), scale=scale,
        tw=[to_int(t) for t in raw_w], ta=[to_int(t) for t in raw_a], schedule=schedule, objective=objective, candidates=n_cand,
    )
    prob.timings["tables_s"] = round(time.perf_counter() - t0, 3)
    return prob


# ------------------------------------------------------------------ the model


@dataclass
class _Model:
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

    def unit_act(self, L: _Layer):
        return None if L.out_slot is None else self.a[L.out_slot]


def _width_choice(m: cp_model.CpModel, values, name: str):
    """A width as one-hot booleans x[b] (what the sensitivity terms and tables index) and
    the integer w = sum_b b * x[b] (what the budget sums)."""
    x = {b: m.NewBoolVar(f"{name}=={b}") for b in values}
    m.AddExactlyOne(x.values())
    w = m.NewIntVarFromDomain(cp_model.Domain.FromValues(values), name)
    m.Add(w == sum(b * v for b, v in x.items()))
    return x, w


def _build(
    p: _Problem, cmax: int | None, *, budget: bool = True, caps: bool = True, loss: bool = True, z_max: int | None = None,
    hardware: bool = True,
) -> _Model | None:
    """The model with every image's cycles capped at cmax (dataflow: every unit's cycles;
    sequential: their sum); None when some unit (or the extras) has no folding that fast.
    hardware=False leaves out the foldings, cycles and resources (the tables): only the
    widths, the budget and the loss, a relaxation of the problem."""
    if not hardware:
        return _build_widths_only(p, budget=budget, z_max=z_max)
    tables = [L.rows(cmax) for L in p.layers]
    if any(not t for t in tables):
        return None
    ext_index = [k for k, e in enumerate(p.extras) if cmax is None or e.cycles <= cmax]
    if p.extras and not ext_index:
        return None
    m = cp_model.CpModel()
    xw, xa, W, A, F, CYC, RES, decision = [], [None] * len(p.slots), [], [None] * len(p.slots), [], [], [], []
    ncol = 5 + len(p.columns)
    for i, (L, rows) in enumerate(zip(p.layers, tables)):
        name = L.spec.name
        bw, w = _width_choice(m, L.w_vals, f"w[{name}]")
        xw.append(bw)
        W.append(w)
        decision += list(bw.values())
        if L.out_slot is not None and A[L.out_slot] is None:
            slot = p.slots[L.out_slot]
            ba, a = _width_choice(m, slot.a_vals, f"a[{slot.name}]")
            xa[L.out_slot] = ba
            A[L.out_slot] = a
            decision += list(ba.values())
        f = m.NewIntVarFromDomain(cp_model.Domain.FromValues(sorted({r[3] for r in rows})), f"fold[{name}]")
        cyc = m.NewIntVarFromDomain(cp_model.Domain.FromValues(sorted({r[4] for r in rows})), f"cycles[{name}]")
        res = {
            r: m.NewIntVarFromDomain(cp_model.Domain.FromValues(sorted({row[5 + k] for row in rows})), f"{r}[{name}]")
            for k, r in enumerate(p.columns)
        }
        F.append(f)
        CYC.append(cyc)
        RES.append(res)
        decision.append(f)
        # table columns: w_l, the input activation (a variable unless it is the network's), a_l (if any)
        cols, keep = [w], [0]
        if L.in_slot >= 0:
            cols.append(A[L.in_slot])
            keep.append(1)
        if L.out_slot is not None:
            cols.append(A[L.out_slot])
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
    ext_cyc_expr = sum(c * x for c, x in zip(ext_cycles, ext)) if ext else 0

    top = max([max(r[4] for r in t) for t in tables] + ext_cycles)
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
            total += sum(_resource_value(p.extras[k], r) * x for k, x in zip(ext_index, ext))
        res_total[r] = total
        if caps and r in p.resources:
            m.Add(total <= p.caps[r])
    weights = {r: max(1, round(RESOURCE_WEIGHT / p.caps[r])) for r in p.resources if p.caps[r] > 0}
    weighted = sum(k * res_total[r] for r, k in weights.items()) if weights else None

    avg_num = sum(L.spec.params * w for L, w in zip(p.layers, W))
    if budget:
        m.Add(avg_num * p.budget.denominator <= p.budget.numerator * p.net.total_params)

    z = _add_loss(p, m, xw, xa, z_max) if loss else None

    return _Model(
        m, cmax, xw, xa, W, A, F, CYC, RES, ext, ext_cycles, ext_index, z, bottleneck, latency, res_total.get("LUT"), avg_num,
        res_total, weighted, decision, {L.spec.name: len(t) for L, t in zip(p.layers, tables)},
        [{r[3] for r in t} for t in tables],
    )


def _add_loss(p: _Problem, m: cp_model.CpModel, xw: list[dict], xa: list[dict], z_max: int | None):
    """z >= every group's integer loss total (and z <= z_max when given)."""
    lo = hi = 0
    exprs = []
    for g in range(len(p.groups)):
        terms, glo, ghi = [], 0, 0
        for i, L in enumerate(p.layers):
            vals = [int(p.tw[i][b][g]) for b in L.w_vals]
            terms += [v * xw[i][b] for v, b in zip(vals, L.w_vals)]
            glo, ghi = glo + min(vals), ghi + max(vals)
        for k, slot in enumerate(p.slots):
            vals = [int(p.ta[k][b][g]) for b in slot.a_vals]
            terms += [v * xa[k][b] for v, b in zip(vals, slot.a_vals)]
            glo, ghi = glo + min(vals), ghi + max(vals)
        exprs.append(sum(terms))
        lo, hi = min(lo, glo), max(hi, ghi)
    z = m.NewIntVar(lo, hi, "z_worst_group_loss")
    for e in exprs:
        m.Add(z >= e)
    if z_max is not None:
        m.Add(z <= z_max)
    return z


def _build_widths_only(p: _Problem, *, budget: bool = True, z_max: int | None = None) -> _Model:
    m = cp_model.CpModel()
    xw, W, decision = [], [], []
    for L in p.layers:
        bw, w = _width_choice(m, L.w_vals, f"w[{L.spec.name}]")
        xw.append(bw)
        W.append(w)
        decision += list(bw.values())
    xa, A = [], []
    for slot in p.slots:
        ba, a = _width_choice(m, slot.a_vals, f"a[{slot.name}]")
        xa.append(ba)
        A.append(a)
        decision += list(ba.values())
    avg_num = sum(L.spec.params * w for L, w in zip(p.layers, W))
    if budget:
        m.Add(avg_num * p.budget.denominator <= p.budget.numerator * p.net.total_params)
    z = _add_loss(p, m, xw, xa, z_max)
    return _Model(m, None, xw, xa, W, A, [], [], [], [], [], [], z, None, 0, None, avg_num, {}, None, decision, {})


@dataclass
class _Choice:
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
class _Stage:
    name: str
    status: str
    objective: float | None
    bound: float | None
    wall_time_s: float
    values: dict | None = None  # variable index -> value (CP-SAT variables are not hashable)
    model: _Model | None = None
    steps: int = 1
    choice: _Choice | None = None
    solver_steps: int | None = None  # bisection: the steps that needed the solver


def _solve(
    mod: _Model | None, objective, name: str, time_limit: float, workers: int, seed: int, hint: list | None = None, rel_gap: float = 0.0
) -> _Stage:
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
    # CP-SAT's own Ctrl-C handler is left as SIG_DFL after Solve: a later Ctrl-C would kill
    # the process with no message and no clean-up. Python's handler stays (Ctrl-C during a
    # solve then takes effect when it returns, within the time limit).
    solver.parameters.catch_sigint_signal = False
    solver.parameters.max_time_in_seconds = max(0.05, float(time_limit))
    solver.parameters.num_workers = max(1, int(workers))
    solver.parameters.random_seed = int(seed)
    if rel_gap > 0 and objective is not None:
        solver.parameters.relative_gap_limit = float(rel_gap)
    t0 = time.perf_counter()
    status = solver.Solve(m)
    wall = time.perf_counter() - t0
    sname = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if status == cp_model.MODEL_INVALID:
            raise RuntimeError(f"CP-SAT model invalid: {m.Validate()}")
        return _Stage(name, sname, None, None, wall, model=mod)
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
    choice = _Choice(
        w=[int(values[v.Index()]) for v in mod.w],
        a=[int(values[v.Index()]) for v in mod.a],
        fold=[int(values[v.Index()]) for v in mod.fold] if mod.fold else None,
        cycles=[int(values[v.Index()]) for v in mod.cyc] if mod.cyc else None,
        ext=next((mod.ext_index[k] for k, x in enumerate(mod.ext) if values[x.Index()]), None),
    )
    return _Stage(name, sname, obj, bnd, wall, values, mod, choice=choice)


def _bits_hint(st: _Stage, mod: _Model, folds: bool = False) -> list:
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


def _least_rows(p: _Problem, cmax: int | None, c: _Choice) -> list[tuple] | None:
    """Per unit, the row of its table at cap cmax for the widths of `c` with the least
    resources (lexicographically, then the fewest cycles); None when a unit has none."""
    out = []
    for L, w in zip(p.layers, c.w):
        ai = p.input_bits if L.in_slot < 0 else c.a[L.in_slot]
        ao = NO_ACT if L.out_slot is None else c.a[L.out_slot]
        best = None
        for r in L.rows(cmax):
            if r[0] == w and r[1] == ai and r[2] == ao:
                key = (*r[5:5 + len(p.resources)], r[4], r[3])
                if best is None or key < best[0]:
                    best = (key, r)
        if best is None:
            return None
        out.append(best[1])
    return out


def _certificate(p: _Problem, cmax: int, c: _Choice, caps: bool = True) -> _Choice | None:
    """The widths of `c` with each unit's least-resource folding at cap cmax, when that
    fits every cap: a feasible solution found without the solver (None otherwise)."""
    if p.extras:
        return None
    rows = _least_rows(p, cmax, c)
    if rows is None:
        return None
    if p.schedule == "sequential" and cmax is not None and sum(row[4] for row in rows) > cmax:
        return None
    if caps:
        for k, r in enumerate(p.resources):
            if sum(row[5 + k] for row in rows) > p.caps[r]:
                return None
    return _Choice(list(c.w), list(c.a), [int(r[3]) for r in rows], [int(r[4]) for r in rows])


def _caps_exceeded(p: _Problem, cmax: int, z_max: int | None = None) -> bool:
    """True when even each unit's least use of some resource at cap cmax, over the widths
    the loss limit z_max leaves it (see _loss_widths), adds up to more than the cap: no
    solution at cmax (without the solver)."""
    if p.extras:
        return False
    allowed_w, allowed_a = _loss_widths(p, z_max)
    need = np.zeros(len(p.resources), dtype=np.int64)
    for i, L in enumerate(p.layers):
        rows = np.asarray(L.rows(cmax), dtype=np.int64)
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


def _loss_widths(p: _Problem, z_max: int | None) -> tuple[list[list[int]], list[list[int]]]:
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


def _min_bottleneck(
    p: _Problem, start: _Stage, name: str, deadline: float, workers: int, seed: int, **build
) -> tuple[_Stage, bool]:
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
    while lo < hi:
        mid = (lo + hi) // 2
        steps += 1
        # without the solver where possible: the current widths refolded fit (feasible), or
        # the least resources at this cap exceed a cap whatever the widths (infeasible)
        cert = _certificate(p, cands[mid], best.choice, caps)
        if cert is not None:
            hi, best = mid, _Stage(name, "FEASIBLE", None, None, 0.0, None, None, choice=cert)
            continue
        if caps and _caps_exceeded(p, cands[mid], build.get("z_max") if build.get("loss", True) else None):
            lo = mid + 1
            continue
        solver_steps += 1
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
    if best.choice is None or best.choice.max_cycles > c_star:  # pragma: no cover - defensive
        raise AssertionError("bisection lost its feasible solution")
    out = _Stage(name, "OPTIMAL" if exact else "FEASIBLE", float(c_star), float(cands[lo]) if exact else float(lb),
                 time.perf_counter() - t0, best.values, best.model, steps, choice=best.choice)
    out.solver_steps = solver_steps
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
    t_start = time.perf_counter()
    if not (isinstance(loss_slack, numbers.Real) and math.isfinite(loss_slack) and loss_slack >= 0):
        raise FqhwError(f"loss slack {loss_slack!r} must be a non-negative fraction")
    p = _problem(net, sens, cost, budget, bits, act_bits, pinned, min_fps, input_bits, pinned_act, objective)
    _precheck_budget(p, budget)
    deadline = t_start + float(time_limit_s)

    def left(frac: float) -> float:
        return max(0.1, (deadline - time.perf_counter()) * frac)

    # stage 1: the worst group's predicted loss. First without the hardware (the widths,
    # the budget and the loss only: a relaxation); when its solution, each unit at its
    # least-resource folding, fits the target, it is optimal for the whole problem too.
    # Otherwise the model with the tables, hinted with it.
    mod_hw = _build(p, p.max_cycles)
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
        mod_w = _build(p, p.max_cycles, hardware=False)
        s_w = _solve(mod_w, mod_w.z, "min_worst_group_loss", left(0.4), workers, seed, rel_gap=rel_gap)
        cert = _certificate(p, p.max_cycles, s_w.choice) if s_w.choice is not None else None
        if cert is not None:
            s_w.choice = cert
            s1 = s_w
        elif s_w.status == "INFEASIBLE":
            _diagnose(p, budget, min_fps, workers, seed, time_limit_s)
    model_size["stage1_without_tables"] = s1 is not None
    if s1 is None:
        hint = _bits_hint(s_w, mod_hw) if not p.extras and s_w.choice is not None else None
        s1 = _solve(mod_hw, mod_hw.z, "min_worst_group_loss", left(0.5), workers, seed, hint, rel_gap=rel_gap)
    if s1.choice is None:
        if s1.status == "INFEASIBLE":
            _diagnose(p, budget, min_fps, workers, seed, time_limit_s)
        raise FqhwError(f"no allocation found on {p.target} within {time_limit_s:g} s (CP-SAT {s1.status}): allow more solver time")
    z_star = int(round(s1.objective))
    z_max = z_star + int(math.floor(loss_slack * abs(z_star)))

    stages = [s1]
    final = s1

    def better(st: _Stage) -> None:
        nonlocal final
        stages.append(st)
        if st.choice is not None:
            final = st

    if p.objective == "throughput":
        # stage 2: the bottleneck, with the loss held at z_max
        s2, _ = _min_bottleneck(p, s1, "min_bottleneck_cycles", time.perf_counter() + left(0.7), workers, seed, z_max=z_max)
        c_star = int(s2.objective)
        better(s2)
        # stage 3: the fewest LUTs at that throughput
        mod3 = _build(p, c_star, z_max=z_max)
        if mod3 is not None and mod3.lut_total is not None:
            better(_solve(mod3, mod3.lut_total, "min_luts", left(1.0), workers, seed, _bits_hint(final, mod3, folds=True), rel_gap))
    else:
        # stage 2: the objective; stage 3: the tie-break at (no worse than) its value
        first, second = {
            "resources": ("weighted_resources", "latency" if p.schedule == "sequential" else "bottleneck"),
            "latency": ("latency", ENERGY if ENERGY in p.metrics else None),
            "energy": (ENERGY, "latency"),
        }[p.objective]
        names = {"weighted_resources": "min_weighted_resources", "latency": "min_latency_cycles",
                 "bottleneck": "min_bottleneck_cycles", ENERGY: "min_energy"}

        def expr(mod: _Model, key: str):
            if key == "weighted_resources":
                return mod.weighted_resources
            if key == "latency":
                return mod.latency
            if key == "bottleneck":
                return mod.bottleneck
            return mod.res_total[key]

        mod2 = _build(p, p.max_cycles, z_max=z_max)
        s2 = _solve(mod2, expr(mod2, first), names[first], left(0.6), workers, seed, _bits_hint(s1, mod2), rel_gap)
        better(s2)
        if s2.choice is not None and second is not None:
            mod3 = _build(p, p.max_cycles, z_max=z_max)
            mod3.m.Add(expr(mod3, first) <= int(round(s2.objective)))
            better(_solve(mod3, expr(mod3, second), names[second], left(1.0), workers, seed, _bits_hint(s2, mod3), rel_gap))
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

    def stage_value(st: _Stage, v):
        if v is None:
            return None
        if st is s1:
            return v / p.scale
        if st.name == "min_energy":
            return v / p.metric_scale[ENERGY]
        return v

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
                "solves": s.steps,
                **({"solver_steps": s.solver_steps} if s.solver_steps is not None else {}),
            }
            for s in stages
        ],
        "model": model_size,
        "tables_s": p.timings.get("tables_s"),
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
            if p.schedule == "sequential":
                mod = _build(p, None, budget=with_budget, caps=True, loss=False)
                fast = _solve(mod, mod.latency, "diag_fastest", 3 * tl, workers, seed)
                cyc = int(fast.values["latency"] if fast.status != "OPTIMAL" else round(fast.objective))
            else:
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
