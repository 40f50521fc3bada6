"""The allocation problem's data (fqhw.allocator.cpsat): each unit's table T_l of buildable
choices priced by the target's cost model, pruned to the rows that can matter (Pareto on
cycles and resources, per cycle cap), the integer loss tables, and the checks of the inputs
(sensitivity tables, pins, objective)."""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np

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


def pareto(arr: np.ndarray) -> np.ndarray:
    """Mask of the rows of `arr` (n x k ints) that no other row matches or beats in every
    column (of identical rows, the first is kept)."""
    n = len(arr)
    if n <= 1:
        return np.ones(n, dtype=bool)
    le = np.all(arr[:, None, :] <= arr[None, :, :], axis=2)  # le[j, i]: row j <= row i everywhere
    lt = np.any(arr[:, None, :] < arr[None, :, :], axis=2)
    earlier = np.triu(np.ones((n, n), dtype=bool), 1)  # earlier[j, i]: j < i
    return ~np.any(le & (lt | earlier), axis=0)


def prune_on_resources(rows: np.ndarray) -> list[tuple]:
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
class LayerTable:
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
        go to the fastest, then the first folding), as `prune_on_resources` would give."""
        if cmax not in self._rows:
            self._rows[cmax] = [tuple(r) for r in self.array(cmax).tolist()]
        return self._rows[cmax]

    def array(self, cmax: int | None) -> np.ndarray:
        """rows(cmax) as one int64 array, in the same order."""
        key = ("array", cmax)
        if key not in self._rows:
            death = self.death()
            cyc = self.cand[:, 4]
            keep = death == NEVER if cmax is None else (cyc <= cmax) & (death > cmax)
            self._rows[key] = self.cand[keep]
        return self._rows[key]

    def table(self, cmax: int | None, keep: tuple[int, ...]) -> tuple[list, list]:
        """(domains, tuples) for the model at cap cmax: the sorted distinct values of each
        column from 3 on (folding, cycles, every resource and metric), and the sorted
        distinct rows of the columns `keep`."""
        key = ("table", cmax, keep)
        if key not in self._rows:
            arr = self.array(cmax)
            doms = [np.unique(arr[:, k]).tolist() for k in range(3, arr.shape[1])]
            self._rows[key] = (doms, np.unique(arr[:, list(keep)], axis=0).tolist())
        return self._rows[key]

    def death(self) -> np.ndarray:
        """Per row, the least cycle cap at which another row of its choice dominates it in
        resources (with the tie rule above): the row is in the table for cap C iff
        cycles <= C < death."""
        if self._death is None:
            self._death = death_caps(self.cand)
        return self._death


NEVER = np.iinfo(np.int64).max


def death_caps(cand: np.ndarray) -> np.ndarray:
    """See LayerTable.death. Row q dominates row r when q's resources are <= r's everywhere and
    either differ somewhere or (cycles, fold) of q < those of r; r dies at the least cycles
    of a row that dominates it."""
    n = len(cand)
    death = np.full(n, NEVER, dtype=np.int64)
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
        before = np.full(n, NEVER, dtype=np.int64)
        same = g[1:] == g[:-1]
        before[1:] = np.where(same, run[:-1] - (int(g.max()) - g[1:]) * span, NEVER)
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
        killer = np.where(dom, cyc[:, None], NEVER)
        death[idx] = killer.min(axis=0)
    return death


@dataclass
class Slot:
    """One output activation width: a layer's (shared by its channel groups)."""

    name: str
    a_vals: list[int]


@dataclass
class Problem:
    net: NetworkSpec
    cost: CostModel
    target: str
    input_bits: int
    layers: list[LayerTable]
    slots: list[Slot]
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


def resource_value(c: LayerCost, r: str) -> int:
    return int(math.ceil(c.resources.get(r, 0)))


def layer_candidates(cost: CostModel, spec: LayerSpec, w_vals, ai_vals, ao_vals, resources, metrics=()) -> tuple[list, np.ndarray, int]:
    """Every buildable choice of the unit, priced; per (w, a_in, a_out) only the foldings no
    other folding beats in every column. Float array: metrics are scaled later."""
    folds = list(cost.folding_options(spec))
    table_fn = getattr(cost, "price_table", None)
    if table_fn is not None:
        rows, n = table_fn(spec, list(w_vals), list(ai_vals), list(ao_vals), folds, list(resources), list(metrics))
        return folds, pareto_by_choice(np.asarray(rows, dtype=np.float64), 5 + len(resources) + len(metrics)), int(n)
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
                        (w, ai, NO_ACT if ao is None else ao, f, int(c.cycles), *(resource_value(c, r) for r in resources),
                         *(float(c.resources.get(m, 0.0)) for m in metrics))
                    )
                n += len(cands)
                if cands:
                    arr = np.asarray(cands, dtype=np.float64)
                    rows.append(arr[pareto(arr[:, 4:])])
    width = 5 + len(resources) + len(metrics)
    return folds, (np.concatenate(rows) if rows else np.zeros((0, width), dtype=np.float64)), n


def pareto_by_choice(arr: np.ndarray, width: int) -> np.ndarray:
    """The rows of `arr` that are Pareto-optimal (as `pareto`) in the columns from 4 on,
    within each choice (w, a_in, a_out). Where at most one column after the cycles varies
    within a choice (e.g. only the LUTs), a sorted running minimum gives the same rows in
    O(n log n); otherwise `pareto` per choice."""
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
        out.append(sub[pareto(sub[:, 4:])])
    return np.concatenate(out)


def sample_cost(cost: CostModel, net: NetworkSpec) -> LayerCost:
    spec = net.layers[0]
    pe, simd = cost.folding_options(spec)[0]
    return cost.layer_cost(spec, 8, 8, 8 if spec.has_output_act else None, pe, simd)


def priced_resources(cost: CostModel, net: NetworkSpec) -> list[str]:
    """Resources the cost model prices and the target caps, in a fixed order."""
    sample = sample_cost(cost, net)
    names = [r for r in sample.resources if r in cost.limits.totals]
    return sorted(names, key=lambda r: (RESOURCE_ORDER.index(r) if r in RESOURCE_ORDER else len(RESOURCE_ORDER), r))


def priced_metrics(cost: CostModel, net: NetworkSpec) -> list[str]:
    """Uncapped quantities the allocator can minimise (energy), where the model prices them."""
    sample = sample_cost(cost, net)
    return [m for m in (ENERGY,) if m in sample.resources and m not in cost.limits.totals]


def resolve_objective(cost: CostModel, objective: str | None, metrics: list[str], resources: list[str]) -> str:
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


def check_sensitivity(sens: Sensitivity, layer: str, table: str, widths) -> dict[int, np.ndarray]:
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


def check_pins(pins: dict, names: list[str], what: str) -> None:
    for name, b in pins.items():
        if name not in names:
            raise FqhwError(f"pinned {what} {name!r} is not in the network ({what}s: {', '.join(names)})")
        if isinstance(b, bool) or int(b) != b or b < 1:
            raise FqhwError(f"pinned width {b!r} of {what} {name!r} is not a positive integer")


def build_problem(net, sens, cost, budget, bits, act_bits, pinned, min_fps, input_bits, pinned_act=None, objective=None) -> Problem:
    t0, c0 = time.perf_counter(), time.process_time()
    if not net.layers:
        raise FqhwError("the network has no conv or linear layers to allocate")
    bits = sorted(set(int(b) for b in bits))
    act_bits = sorted(set(int(b) for b in act_bits))
    if not bits or not act_bits:
        raise FqhwError("the candidate weight and activation widths must not be empty")
    pinned = dict(pinned or {})
    pinned_act = dict(pinned_act or {})
    names = [s.name for s in net.layers]
    check_pins(pinned, names, "layer")
    check_pins(pinned_act, list(dict.fromkeys(s.act_group for s in net.layers if s.has_output_act)), "activation")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget) or budget <= 0:
        raise FqhwError(f"budget {budget!r} must be a positive number of bits per weight")
    if min_fps is not None and not (math.isfinite(min_fps) and min_fps > 0):
        raise FqhwError(f"min fps {min_fps!r} must be a positive number")

    schedule = getattr(cost, "schedule", "dataflow")
    if schedule not in ("dataflow", "sequential"):
        raise FqhwError(f"cost model of {cost.limits.name} has an unknown schedule {schedule!r}")
    resources = priced_resources(cost, net)
    metrics = priced_metrics(cost, net)
    objective = resolve_objective(cost, objective, metrics, resources)
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
                slots.append(Slot(g, a_vals))
                tables = [check_sensitivity(sens, m, "act", a_vals) for m in group]
                raw_a.append({b: sum(t[b] for t in tables) for b in a_vals})
            out_slot = slot_of[g]
        elif spec.act_group in slot_of:
            raise FqhwError(f"the channel groups of layer {spec.act_group!r} disagree on having an output activation")
        a_vals = slots[out_slot].a_vals if out_slot is not None else None
        w_vals = [int(pinned[spec.name])] if spec.name in pinned else bits
        raw_w.append(check_sensitivity(sens, spec.name, "weight", w_vals))
        # units of the same shape and widths (repeated blocks, channel groups) share one table
        shape_key = (replace(spec, name="", group="", group_index=min(spec.group_index, 1)), tuple(w_vals), tuple(ai_vals),
                     tuple(a_vals or [None]))
        if not getattr(cost, "prices_by_shape", False):
            shape_key = (len(layers), spec.name)
        if shape_key not in priced:
            priced[shape_key] = layer_candidates(cost, spec, w_vals, ai_vals, a_vals or [None], resources, metrics)
        folds, cand, n = priced[shape_key]
        cand = cand.copy()
        n_cand += n
        if len(cand) == 0:
            raise InfeasibleError(f"layer {spec.name!r} cannot be built on {cost.limits.name} with any folding at the candidate widths")
        layers.append(LayerTable(spec, w_vals, a_vals, list(ai_vals), in_slot, out_slot, folds, cand))

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
            L._death = death_caps(L.cand)
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

    prob = Problem(
        net=net, cost=cost, target=cost.limits.name, input_bits=input_bits, layers=layers, slots=slots, resources=resources,
        metrics=metrics, metric_scale=metric_scale, caps=caps, extras=extras,
        budget=Fraction(int(budget)) if isinstance(budget, numbers.Integral) else Fraction(repr(float(budget))),
        max_cycles=max_cycles, groups=list(sens.groups), scale=scale,
        tw=[to_int(t) for t in raw_w], ta=[to_int(t) for t in raw_a], schedule=schedule, objective=objective, candidates=n_cand,
    )
    prob.timings["tables_s"] = round(time.perf_counter() - t0, 3)
    prob.timings["tables_cpu_s"] = round(time.process_time() - c0, 3)
    return prob
