"""The widths-only allocation (fqhw.allocator.cpsat's stage-1 model with no hardware):
the least worst-group loss under the bit budget, every layer at PE = SIMD = 1."""
from __future__ import annotations

import time

import numpy as np

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.allocator.cpsat import ortools_version, precheck_budget
from fqhw.allocator.stages import bits_hint, build_sat_model, group_terms, run_solver
from fqhw.allocator.tables import build_problem
from fqhw.errors import FqhwError
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.hwmodels.base import LayerCost
from fqhw.network import LayerSpec, NetworkSpec


class _NoHardware:
    """A target with nothing to price: one folding (1, 1), no cycles, no resources, no caps.
    What allocate_widths gives the problem builder, so that no tables are priced."""

    schedule = "dataflow"
    prices_by_shape = True

    def __init__(self) -> None:
        from fqhw.hwmodels.base import TargetLimits

        self.limits = TargetLimits(name="widths-only", part="", clock_hz=1.0, totals={}, utilisation={})

    def folding_options(self, layer: LayerSpec) -> list[tuple[int, int]]:
        return [(1, 1)]

    def layer_cost(self, layer, weight_bits, in_bits, out_bits, pe, simd) -> LayerCost:
        return LayerCost(cycles=1)


def allocate_widths(
    net: NetworkSpec,
    sens: Sensitivity,
    budget: float,
    bits=range(2, 9),
    act_bits=range(2, 9),
    pinned: dict[str, int] | None = None,
    time_limit_s: float = 30,
    workers: int = 2,
    seed: int = 0,
    input_bits: int = 8,
    *,
    pinned_act: dict[str, int] | None = None,
    tie_break: str | None = "mean",
    target: str = "widths-only",
    rel_gap: float = 0.0,
) -> Allocation:
    """Widths only, no hardware terms (the bit-rate-only practice, as HAWQ-V3's ILP): the
    weight and activation widths that minimise the worst group's predicted loss under the
    budget, the same stage 1 as `allocate` without the target. Among the widths that reach
    that loss, tie_break "mean" takes those with the least loss summed over the groups (an
    accuracy-only tie-break: it knows nothing of any hardware); None returns stage 1's
    solution as CP-SAT found it. Every unit gets folding PE = SIMD = 1 (a folding is for a
    separate tool, e.g. FINN's SetFolding, to choose). rel_gap > 0 lets stage 1 stop within
    that relative gap of its bound."""
    t_start, c_start = time.perf_counter(), time.process_time()
    if tie_break not in (None, "mean"):
        raise FqhwError(f"tie_break {tie_break!r} must be 'mean' or None")
    p = build_problem(net, sens, _NoHardware(), budget, bits, act_bits, pinned, None, input_bits, pinned_act, None)
    precheck_budget(p, budget)
    deadline = t_start + float(time_limit_s)
    mod = build_sat_model(p, None, hardware=False)
    s1 = run_solver(mod, mod.z, "min_worst_group_loss", max(0.1, (deadline - time.perf_counter()) * 0.6), workers, seed, rel_gap=rel_gap)
    if s1.choice is None:
        if s1.status == "INFEASIBLE":
            precheck_budget(p, budget)  # pragma: no cover - the precheck is exact for widths only
        raise FqhwError(f"no width allocation found within {time_limit_s:g} s (CP-SAT {s1.status}): allow more solver time")
    stages, final = [s1], s1
    if tie_break == "mean":
        z_star = int(round(s1.objective))
        mod2 = build_sat_model(p, None, hardware=False, z_max=z_star)
        total = sum(group_terms(p, mod2.xw, mod2.xa, g) for g in range(len(p.groups)))
        s2 = run_solver(mod2, total, "min_total_group_loss", max(0.1, deadline - time.perf_counter()), workers, seed, bits_hint(s1, mod2))
        stages.append(s2)
        if s2.choice is not None:
            final = s2
    c = final.choice
    layers = []
    for i, L in enumerate(p.layers):
        a = None if L.out_slot is None else int(c.a[L.out_slot])
        layers.append(LayerAllocation(L.spec.name, int(c.w[i]), a, 1, 1))
    alloc = Allocation(target=target, layers=layers, input_bits=input_bits)
    pred = alloc.predicted_loss(net, sens)
    alloc.solver = {
        "solver": "cp-sat",
        "ortools": ortools_version(),
        "status": "OPTIMAL" if all(s.status == "OPTIMAL" for s in stages) else "FEASIBLE",
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "objective": float(s1.objective / p.scale),
        "bound": float(s1.bound / p.scale),
        "objective_exact": float(np.max(pred)),
        "predicted_group_loss": dict(zip(p.groups, [float(v) for v in pred])),
        "worst_group": p.groups[int(np.argmax(pred))],
        "loss_rounding_error": float(0.5 * (len(p.layers) + len(p.slots)) / p.scale),
        "hardware_objective": None,
        "tie_break": tie_break,
        "budget": float(budget),
        "avg_weight_bits": float(alloc.avg_weight_bits(net)),
        "pinned": dict(pinned or {}),
        "stages": [
            {"name": s.name, "status": s.status, "objective": None if s.objective is None else s.objective / p.scale,
             "bound": None if s.bound is None else s.bound / p.scale, "wall_time_s": round(s.wall_time_s, 3)}
            for s in stages
        ],
        "tables_s": p.timings.get("tables_s"),
        "workers": workers,
        "seed": seed,
        "time_limit_s": time_limit_s,
    }
    return alloc
