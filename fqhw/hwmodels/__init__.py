"""Cost models, one per target: `get_cost_model("pynq-z2")`.

Targets are FINN dataflow builds on boards (fqhw.hwmodels.finn) and ASIC-style
precision-scalable arrays (fqhw.hwmodels.asic: bitfusion, bitserial, stripes, fixed8); the
allocator sees only the CostModel interface (fqhw.hwmodels.base).
"""
from __future__ import annotations

from typing import Callable

from fqhw.errors import FqhwError
from fqhw.hwmodels.base import CostModel, LayerCost, TargetLimits

_REGISTRY: dict[str, Callable[..., CostModel]] = {}


def register(name: str, factory: Callable[..., CostModel]) -> None:
    """Add a target (lower-case name) to the registry."""
    _REGISTRY[name.lower()] = factory


def known_targets() -> list[str]:
    return sorted(_REGISTRY)


def get_cost_model(target: str, **options) -> CostModel:
    """The cost model of `target` (case-insensitive); options go to its constructor
    (for FINN boards: clock_ns, input_mode, ram_style, ...; for ASIC targets: objective and
    any AsicParams field, e.g. weights_on_chip=True)."""
    key = str(target).strip().lower()
    if key not in _REGISTRY:
        raise FqhwError(f"unknown target {target!r}: known targets are {', '.join(known_targets())}")
    return _REGISTRY[key](**options)


def _register_finn() -> None:
    from fqhw.hwmodels.finn import BOARDS, FinnCostModel

    for board in BOARDS:
        register(board, lambda _b=board, **kw: FinnCostModel(_b, **kw))


def _register_asic() -> None:
    from fqhw.hwmodels.asic import PRESETS, AsicCostModel

    for name in PRESETS:
        register(name, lambda _n=name, **kw: AsicCostModel(_n, **kw))


_register_finn()
_register_asic()

__all__ = ["CostModel", "LayerCost", "TargetLimits", "get_cost_model", "known_targets", "register"]
