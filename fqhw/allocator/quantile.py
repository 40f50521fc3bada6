"""FairQuant's quantile allocation, as a baseline next to the CP-SAT allocator.

Units (whole layers, or output channels) are ranked by their reduced importance score
(fqhw.fairness.reducers.unit_scores); the least important get the fewest bits. No solver,
no hardware cost: the point of this module is to show what ranking alone achieves at the
same budget.

Two ways to state the budget:

- fractions (FairQuant's own, `per_weight=False`): {bits: fraction of units}, e.g.
  {2: 0.2, 4: 0.4, 8: 0.4}. The average is over units, not weights, as in the reference.
  The cumulative counts are rounded up at each width (ceil(N * (f_1 + ... + f_k)) units at
  widths <= b_k), so the unit average never exceeds sum_k f_k * b_k.
- bits per weight (`per_weight=True`): a float budget on the parameter-weighted average
  width, the quantity fqhw's solver bounds, for a side-by-side comparison. Every free unit
  starts at the narrowest width of the ladder (`widths`, default 2, 4, 8); then one fixed
  sequence of upgrades (`chain`) is walked until the first upgrade the budget cannot pay
  for:
    "unit" (default): the most important unit all the way up the ladder, then the next,
      ...: the spread of FairQuant's fractions (the most important units at the widest,
      the least at the narrowest, one unit in between).
    "level": every unit, most important first, one step up the ladder; then again for the
      next step. Widths differ by at most one ladder step (at a budget on a ladder width
      every free unit gets that width: the ranking only decides who is one step above), so
      this is close to uniform quantization.
  Stopping at the first unaffordable upgrade (rather than skipping to cheaper ones further
  on) keeps the ranking (a more important unit never has fewer bits than a less important
  one) and makes the result monotone: a larger budget only walks further along the same
  sequence, so no unit's width ever drops. (Any rule monotone in the budget is such a
  chain; the price is up to one upgrade's worth of unused budget, which the per-layer
  widths below spend.)

Pinned layers (layer -> bits; the flow pins the first and last layer to 8) keep their width
and count in the budget: in fraction mode a pinned unit takes a slot of its own width (or,
when none is left, the nearest wider slot; failing that the widest, and the remaining free
slots are narrowed until the total fits); in per-weight mode its bits are paid first.

Per-layer widths. The deployed model needs one width per layer (or channel group), while
per-channel units give one per output channel (`QuantileResult.unit_bits`). The
Allocation takes, per layer, its channels' mean width (within a layer every channel has
the same fan-in, so this is the parameter-weighted mean) rounded down, so the per-weight
budget still holds; then it spends what that rounding and the chain's last, unaffordable
step left unused: in passes over the unpinned layers, most important first (mean unit
score), each layer goes up by one bit (to at most the widest width of the budget or
ladder) where that still fits within the budget (per-weight mode) or within the units'
own total bits (fraction mode), until a pass raises nothing. Without this, a layer whose
channels straddle two widths loses up to a bit per weight, and with layer units one
unaffordable whole-layer step can leave most of a bit per weight unused. A layer may so get
a width between the ladder's (the deployed model takes any width). `unit_bits` is thus the
ranking rule's answer (ranked, monotone in the budget) and `allocation.layers` the
deployable one derived from it (within the budget, but not monotone: the fill may raise a
layer at one budget and not at the next). A network split into channel groups
(fqhw.network.split_channel_groups) gets the same rule per group, over the group's
contiguous block of channels.

The Allocation's activations are at `act_bits` (default 8) and every layer's folding is
PE = SIMD = 1; fqhw.compare.fit_on refolds an allocation's widths for a target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Mapping

import numpy as np

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.errors import FqhwError, InfeasibleError
from fqhw.network import NetworkSpec

DEFAULT_WIDTHS = (2, 4, 8)  # FairQuant's usual set; range(2, 9) gives the solver's choices


@dataclass
class Unit:
    """One allocation unit: a layer (channel None) or one output channel of it."""

    spec: str  # the NetworkSpec unit (layer or channel group) it belongs to
    channel: int | None
    score: float
    params: int
    pinned: int | None = None
    bits: int = 0


@dataclass
class QuantileResult:
    allocation: Allocation
    unit_bits: dict[str, np.ndarray]  # per NetworkSpec unit: its units' widths, (1,) or (channels,)
    # (the ranking rule's widths; allocation.layers adds the per-layer rounding and fill)
    units: list[Unit] = field(default_factory=list)

    @property
    def avg_unit_bits(self) -> float:
        """Average width over units (FairQuant's measure)."""
        return float(np.mean([u.bits for u in self.units]))

    @property
    def unit_avg_weight_bits(self) -> float:
        """Parameter-weighted average width of the units, before any per-layer rounding."""
        return sum(u.params * u.bits for u in self.units) / sum(u.params for u in self.units)


def _frac(x) -> Fraction:
    """The decimal the user wrote: Fraction(repr(0.2)) is exactly 1/5."""
    if isinstance(x, (int, Fraction)):
        return Fraction(x)
    return Fraction(repr(float(x)))


def _check_width(b) -> int:
    if int(b) != b or int(b) < 2:
        raise FqhwError(f"bit width {b!r} is not an integer of at least 2")
    return int(b)


def build_units(net: NetworkSpec, scores: Mapping[str, object], pinned: Mapping[str, int] | None = None) -> list[Unit]:
    """Units from per-layer scores {layer: array (1,) for the layer, or (C_out,) per channel}.
    A channel group "<layer>:g<k>" of `net` takes its rows of the layer's per-channel scores
    (or the layer's single score)."""
    pinned = dict(pinned or {})
    names = [s.name for s in net.layers]
    bad = [p for p in pinned if p not in names and not any(s.group == p for s in net.layers)]
    if bad:
        raise FqhwError(f"pinned layer {bad[0]!r} is not in the network (layers: {', '.join(names)})")
    units: list[Unit] = []
    for spec in net.layers:
        if spec.name in scores:
            s = np.atleast_1d(np.asarray(scores[spec.name], dtype=np.float64)).ravel()
        elif spec.group and spec.group in scores:
            s = np.atleast_1d(np.asarray(scores[spec.group], dtype=np.float64)).ravel()
            if len(s) > 1:
                s = s[spec.group_index * spec.mh : (spec.group_index + 1) * spec.mh]
        else:
            raise FqhwError(f"no importance score for layer {spec.name!r}")
        pin = pinned.get(spec.name, pinned.get(spec.group) if spec.group else None)
        if pin is not None:
            pin = _check_width(pin)
        if not np.isfinite(s).all():
            raise FqhwError(f"the importance scores of layer {spec.name!r} are not all finite")
        if len(s) == 1:
            units.append(Unit(spec.name, None, float(s[0]), spec.params, pin))
        elif len(s) == spec.mh:
            units.extend(Unit(spec.name, c, float(v), spec.mw, pin) for c, v in enumerate(s))
        else:
            raise FqhwError(
                f"layer {spec.name!r} has {spec.mh} output channels but {len(s)} scores; give one score or one per channel"
            )
    return units


def _ranked(units: list[Unit]) -> list[int]:
    """Free units, least important first (ties: network order)."""
    return sorted((i for i, u in enumerate(units) if u.pinned is None), key=lambda i: (units[i].score, i))


def _by_fractions(units: list[Unit], budget: Mapping[int, float]) -> None:
    if not budget:
        raise FqhwError("the fraction budget is empty; give widths with fractions, e.g. {2: 0.2, 4: 0.4, 8: 0.4}")
    widths = sorted(_check_width(b) for b in budget)
    fr = [_frac(budget[b]) for b in sorted(budget)]
    if any(f < 0 for f in fr) or abs(float(sum(fr)) - 1.0) > 1e-9:
        raise FqhwError(f"the budget's fractions must be non-negative and sum to 1, got {dict(budget)}")
    n = len(units)
    cum, quota, prev = Fraction(0), [], 0
    for k, (b, f) in enumerate(zip(widths, fr)):
        cum += f
        upto = n if k == len(widths) - 1 else min(n, math.ceil(n * cum))
        quota += [b] * (upto - prev)
        prev = upto
    # pinned units take their slots (quota stays sorted ascending)
    deficit = 0
    for u in units:
        if u.pinned is None:
            continue
        p = u.bits = u.pinned
        j = next((j for j, q in enumerate(quota) if q >= p), None)
        if j is None:  # wider than every slot left: take the widest, narrow others below
            j = len(quota) - 1
            deficit += p - quota[j]
        quota.pop(j)
    while deficit > 0:
        j = max((j for j, q in enumerate(quota) if q > widths[0]), default=None)
        if j is None:
            raise InfeasibleError(
                f"the pinned layers need more bits than the budget {dict(budget)} allows over {n} units; "
                f"pin fewer layers or move fractions to wider widths"
            )
        lower = max(w for w in widths if w < quota[j])
        deficit -= quota[j] - lower
        quota[j] = lower
        quota.sort()
    for i, b in zip(_ranked(units), sorted(quota)):
        units[i].bits = b


CHAINS = ("level", "unit")


def _per_weight(units: list[Unit], budget: float, widths, chain: str) -> None:
    ladder = sorted({_check_width(b) for b in widths})
    if not ladder:
        raise FqhwError("no candidate widths")
    total_params = sum(u.params for u in units)
    cap = math.floor(_frac(budget) * total_params)  # bits the whole model may use
    used = 0
    for u in units:
        u.bits = u.pinned if u.pinned is not None else ladder[0]
        used += u.params * u.bits
    if used > cap:
        need = Fraction(used, total_params)
        raise InfeasibleError(
            f"budget {budget} bits per weight is infeasible: "
            f"{'the pinned layers and ' if any(u.pinned for u in units) else ''}the narrowest width {ladder[0]} "
            f"need {float(need):.4f}; give a budget of at least {math.ceil(need * 100) / 100:g}"
        )
    order = _ranked(units)[::-1]  # most important first
    if chain == "level":
        steps = [(i, k) for k in range(1, len(ladder)) for i in order]
    else:
        steps = [(i, k) for i in order for k in range(1, len(ladder))]
    for i, k in steps:
        u = units[i]
        extra = u.params * (ladder[k] - ladder[k - 1])
        if used + extra > cap:
            return
        used += extra
        u.bits = ladder[k]


def _layer_widths(net: NetworkSpec, units: list[Unit], unit_bits: dict[str, np.ndarray], cap: int, top: int) -> dict[str, int]:
    """One width per NetworkSpec unit: the floor of its units' mean width, then the bits
    left under `cap` spent greedily, in passes over the unpinned layers, most important
    first (mean unit score), each raised by one bit (up to `top`) where that still fits,
    until a pass raises nothing."""
    width = {k: int(v.sum() // len(v)) for k, v in unit_bits.items()}
    used = sum(s.params * width[s.name] for s in net.layers)
    score: dict[str, list[float]] = {}
    pinned = set()
    for u in units:
        score.setdefault(u.spec, []).append(u.score)
        if u.pinned is not None:
            pinned.add(u.spec)
    order = sorted((s for s in net.layers if s.name not in pinned), key=lambda s: -float(np.mean(score[s.name])))
    raised = True
    while raised:
        raised = False
        for s in order:
            if width[s.name] < top and used + s.params <= cap:
                used += s.params
                width[s.name] += 1
                raised = True
    return width


def quantile_allocate(
    net: NetworkSpec,
    scores: Mapping[str, object],
    budget,
    *,
    per_weight: bool = False,
    widths=None,
    chain: str = "unit",
    pinned: Mapping[str, int] | None = None,
    act_bits: int = 8,
    target: str = "quantile",
) -> QuantileResult:
    """Rank units by score and give the least important the fewest bits.

    scores: {layer: array}, one score per layer ((1,)) or per output channel ((C_out,)),
        e.g. fqhw.fairness.reducers.unit_scores(reducer(maps), unit).
    budget: {bits: fraction of units} (per_weight=False), or bits per weight (per_weight=True).
    widths: the width ladder of per-weight mode (default 2, 4, 8).
    chain: the order of upgrades in per-weight mode, "level" or "unit" (module docstring).
    pinned: {layer: bits}, kept and counted in the budget.
    """
    units = build_units(net, scores, pinned)
    if per_weight:
        if isinstance(budget, Mapping):
            raise FqhwError("per_weight=True takes the budget as bits per weight (a number), not fractions")
        if chain not in CHAINS:
            raise FqhwError(f"unknown chain {chain!r}; known: {', '.join(CHAINS)}")
        _per_weight(units, budget, DEFAULT_WIDTHS if widths is None else widths, chain)
    else:
        if not isinstance(budget, Mapping):
            raise FqhwError("the quantile budget is {bits: fraction of units}, e.g. {2: 0.2, 4: 0.4, 8: 0.4}; "
                            "for bits per weight use per_weight=True")
        _by_fractions(units, budget)
    unit_bits: dict[str, np.ndarray] = {}
    for u in units:
        unit_bits.setdefault(u.spec, [])
        unit_bits[u.spec].append(u.bits)
    unit_bits = {k: np.asarray(v, dtype=np.int64) for k, v in unit_bits.items()}
    if per_weight:
        cap = math.floor(_frac(budget) * net.total_params)
        top = max(int(b) for b in (DEFAULT_WIDTHS if widths is None else widths))
    else:
        cap = sum(u.params * u.bits for u in units)
        top = max(int(b) for b in budget)
    widths_of = _layer_widths(net, units, unit_bits, cap, top)
    layers = [LayerAllocation(s.name, widths_of[s.name], act_bits if s.has_output_act else None) for s in net.layers]
    alloc = Allocation(target=target, layers=layers)
    res = QuantileResult(alloc, unit_bits, units)
    alloc.solver = {
        "status": "QUANTILE",
        "method": "quantile",
        "mode": f"per_weight/{chain}" if per_weight else "fractions",
        "budget": float(budget) if per_weight else {str(k): float(v) for k, v in budget.items()},
        "unit": "channel" if any(u.channel is not None for u in units) else "layer",
        "avg_unit_bits": res.avg_unit_bits,
        "unit_avg_weight_bits": res.unit_avg_weight_bits,
        "avg_weight_bits": alloc.avg_weight_bits(net),
    }
    return res


def quantile_baseline(
    model,
    net: NetworkSpec,
    data,
    budget,
    *,
    method: str = "grape",
    reducer: str = "max",
    reducer_params: Mapping | None = None,
    unit: str = "channel",
    group_by: str = "attribute",
    per_weight: bool = False,
    widths=None,
    chain: str = "unit",
    pinned: Mapping[str, int] | None = None,
    act_bits: int = 8,
    max_per_group: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    draws: int = 8,
) -> QuantileResult:
    """The whole FairQuant static pipeline in one call: per-group importance maps of
    `method`, reduced across groups by `reducer`, scored per `unit`, allocated by quantile.
    E.g. FairGRAPE-style: method="grape", reducer="max"; FairQuantize-style: method="grape",
    reducer="subtractive"; HAWQ-style: method="hawq", reducer="mean"."""
    from fqhw.fairness.importance import group_ids, importance_maps
    from fqhw.fairness.reducers import get_reducer, unit_scores

    params = dict(reducer_params or {})
    if reducer == "subtractive":
        params.setdefault("group_names", group_ids(data, group_by)[1])
    red = get_reducer(reducer, **params)
    maps = importance_maps(model, net, data, method=method, group_by=group_by, max_per_group=max_per_group,
                           batch_size=batch_size, seed=seed, draws=draws)
    return quantile_allocate(net, unit_scores(red(maps), unit), budget, per_weight=per_weight, widths=widths,
                             chain=chain, pinned=pinned, act_bits=act_bits)
