"""The budget of learned widths and their projection onto a deployable allocation: the
bitrate penalty BAQ trains with, the exact budget check (`check_budget_met`, rational
arithmetic as the allocator's; `BudgetError`), and `project`, the CP-SAT allocation nearest
to the learned widths that meets the budget and fits the target (see fqhw.quant.baq)."""
from __future__ import annotations

from fractions import Fraction
from typing import Iterable

import numpy as np
import torch

from fqhw.allocator.allocation import Allocation
from fqhw.errors import FqhwError
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.network import NetworkSpec
from fqhw.quant.baq_model import BIT_RANGE

class BudgetError(FqhwError):
    """An allocation meant for deployment is over the bit budget (a bug of the caller or of
    the projection: the projection's solver makes the budget a hard constraint)."""


def bitrate_penalty(avg: torch.Tensor, budget: float, under_weight: float = 0.25) -> torch.Tensor:
    """R_b = relu(avg - B)^2 + under_weight * relu(B - avg)^2: zero exactly at the budget,
    a firm pull down from above and a gentler pull up from below (see the module docstring)."""
    over = torch.relu(avg - budget)
    under = torch.relu(budget - avg)
    return over**2 + under_weight * under**2


def _budget_fraction(budget: float) -> Fraction:
    return Fraction(int(budget)) if float(budget).is_integer() else Fraction(repr(float(budget)))


def check_budget_met(net: NetworkSpec, alloc: Allocation, budget: float) -> Fraction:
    """Exact check that the allocation's parameter-weighted average weight width is within
    the budget (rational arithmetic, as the allocator's constraint); raises BudgetError.
    Returns the average as a fraction."""
    if sorted(la.name for la in alloc.layers) != sorted(s.name for s in net.layers):
        raise BudgetError("the allocation's units differ from the network's: cannot check the budget")
    num = sum(net.layer(la.name).params * int(la.weight_bits) for la in alloc.layers)
    avg = Fraction(num, net.total_params)
    if avg > _budget_fraction(budget):
        raise BudgetError(f"allocation averages {float(avg):.4f} bits per weight, over the budget of {budget:g}")
    return avg


def projection_sensitivity(
    net: NetworkSpec,
    learned: dict[str, float],
    act_widths: dict[str, int],
    bits: Iterable[int] = range(BIT_RANGE[0], BIT_RANGE[1] + 1),
    squared: bool = False,
) -> Sensitivity:
    """One pseudo-group "projection": weight[u][b] = params(u) * |b - learned(u)| (or its
    square), so the allocator's worst-group loss is the parameter-weighted distance of an
    allocation's widths to the learned ones. Activation tables are zero at the (pinned)
    widths `act_widths` (per activation group): they add nothing to the distance."""
    bits = sorted(set(int(b) for b in bits))
    weight = {}
    for s in net.layers:
        if s.name not in learned:
            raise FqhwError(f"no learned width for unit {s.name!r}")
        bl = float(learned[s.name])
        weight[s.name] = {b: np.array([s.params * (abs(b - bl) ** 2 if squared else abs(b - bl))]) for b in bits}
    act = {g: {int(a): np.zeros(1)} for g, a in act_widths.items()}
    return Sensitivity(["projection"], weight, act, method="baq-projection")


def warm_act_widths(net: NetworkSpec, alloc: Allocation) -> dict[str, int]:
    """Per activation group (layer), its width in `alloc`."""
    out: dict[str, int] = {}
    for s in net.layers:
        if s.has_output_act:
            a = alloc.layer(s.name).act_bits
            if a is None:
                raise FqhwError(f"the allocation gives layer {s.name!r} no activation width")
            out.setdefault(s.act_group, int(a))
    return out


def project(
    net: NetworkSpec,
    learned: dict[str, float],
    alloc_warm: Allocation,
    *,
    budget: float,
    cost_model=None,
    pinned: dict[str, int] | None = None,
    min_fps: float | None = None,
    objective: str | None = None,
    bits: Iterable[int] = range(BIT_RANGE[0], BIT_RANGE[1] + 1),
    squared: bool = False,
    fill_budget: bool = False,
    time_limit_s: float = 30.0,
    seed: int = 0,
    workers: int = 2,
) -> Allocation:
    """The allocation nearest to the learned widths (parameter-weighted |b - b_learned|, or
    squared) that meets the budget exactly and fits the target, by CP-SAT: activation widths
    pinned to the warm start's, weight pins as given, folding re-chosen (ties toward the
    hardware objective). cost_model defaults to the warm start's target's.

    fill_budget: the nearest allocation may leave budget unused (a large layer rounded
    down frees bits that no other unit was asked for); a second solve then raises widths
    from the projection, never lowering one, to use as much of the budget as the caps
    allow (weight[u][b] = params(u) * (b_max - b) for b >= the projected width, a
    prohibitive cost below it), ties again toward the hardware objective.

    Raises InfeasibleError when no allocation exists (never when the warm start meets the
    same budget, pins and throughput floor), BudgetError if the result were over budget."""
    from fqhw.allocator.cpsat import allocate, price
    from fqhw.hwmodels import get_cost_model

    cost = cost_model if cost_model is not None else get_cost_model(alloc_warm.target)
    pinned = dict(pinned or {})
    bits = sorted(set(int(b) for b in bits) | {int(b) for b in pinned.values()})
    acts = warm_act_widths(net, alloc_warm)
    sens = projection_sensitivity(net, learned, acts, bits, squared)

    def solve(table: Sensitivity) -> Allocation:
        return allocate(
            net, table, cost, budget=budget, bits=bits, act_bits=sorted(set(acts.values())) or [8], pinned=pinned or None,
            min_fps=min_fps, time_limit_s=time_limit_s, workers=workers, seed=seed, input_bits=alloc_warm.input_bits,
            objective=objective, loss_slack=0.0, pinned_act=acts,
        )

    alloc = solve(sens)
    nearest = {la.name: la.weight_bits for la in alloc.layers}
    distance = float(alloc.predicted_loss(net, sens)[0])
    if fill_budget:
        check_budget_met(net, alloc, budget)
        b_max = max(bits)
        big = float(net.total_params * (b_max - min(bits) + 1) * 2)  # more than any fill cost
        fill = Sensitivity(
            ["fill"],
            {s.name: {b: np.array([s.params * (b_max - b) if b >= nearest[s.name] else big]) for b in bits} for s in net.layers},
            {g: {int(a): np.zeros(1)} for g, a in acts.items()},
            method="baq-fill",
        )
        alloc = solve(fill)
        if any(la.weight_bits < nearest[la.name] for la in alloc.layers):
            raise AssertionError("filling the budget lowered a width")
    avg = check_budget_met(net, alloc, budget)
    priced = price(net, alloc, cost)
    if not priced["total"]["fits"]:  # allocate asserts this too; a second, independent check
        raise AssertionError(f"projected allocation does not fit {cost.limits.name}")
    alloc.solver["projection"] = {
        "learned_bits": {k: float(v) for k, v in learned.items()},
        "distance": float(alloc.predicted_loss(net, sens)[0]),
        "distance_kind": "params * (b - b_learned)^2" if squared else "params * |b - b_learned|",
        "nearest": nearest,
        "nearest_distance": distance,
        "fill_budget": bool(fill_budget),
        "avg_weight_bits": float(avg),
        "warm_start": {la.name: la.weight_bits for la in alloc_warm.layers},
    }
    return alloc

