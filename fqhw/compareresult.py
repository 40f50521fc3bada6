"""The result of `fqhw compare` (fqhw.compare): the CompareResult type and what is read off
it: each metric's objective value, and which allocations are admissible on a target."""
from __future__ import annotations

from dataclasses import dataclass, field

from fqhw.outputs import plain


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




def objective_value(metrics: dict, objective: str) -> float:
    """The objective's value, smaller is better (throughput: images/s, negated)."""
    if objective == "throughput":
        return -metrics["fps"]
    if objective == "latency":
        return metrics["latency_ms"]
    if objective == "energy":
        return metrics["energy_uJ"]
    return metrics["weighted_utilisation"]


def admissible(res: CompareResult, on: str) -> list[str]:
    """Allocations that fit `on` and whose predicted loss is within `on`'s own loss limit
    (the set its allocation was chosen from), up to rounding."""
    limit = res.own[on]["loss_limit"]
    tol = 1e-9 + 1e-6 * abs(limit)
    return [src for src in res.cross if res.cross[src][on]["fits"] and res.cross[src][on]["worst_group_loss"] <= limit + tol]
