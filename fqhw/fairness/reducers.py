"""Reducers: one importance score per weight from per-group maps, and unit scores from it.

The per-group maps come from `fqhw.fairness.importance.importance_maps`:
{layer: array (G, *weight.shape)}. A reducer turns the G maps of every layer into one map
per layer, {layer: array (*weight.shape)}, and decides what "important" means when groups
disagree:

    max          max_g I_g                       protect whichever group needs the weight most
    mean         1/G sum_g I_g                   the average group (no fairness)
    cvar(alpha)  mean of the k = ceil((1 - alpha) * G) largest I_g, per weight
                 (the conditional value at risk of the group distribution: alpha = 0 is the
                 mean, alpha near 1 the max)
    balanced     max_g I_g / s_g, s_g = T_g / sum_h T_h, T_g = sum over all layers of |I_g|
                 (each group's map scaled by its share of total importance, so a group whose
                 gradients are small overall, e.g. a rare one, still counts, then max)
    subtractive(beta, unprivileged)
                 I_u - beta * I_p for exactly two groups (after FairQuantize): weights the
                 unprivileged group u needs more than the privileged one p. u defaults to
                 the worst-off group, the one with the larger total importance T_g.

`balanced` and `subtractive` look at every layer at once (the shares and the worst-off
group are network-wide), so reducers take the whole dict of maps. A unit's score
(`unit_scores`) is the mean |importance| over its fan-in weights; a unit is a whole layer or
one output channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from fqhw.errors import FqhwError

Maps = Mapping[str, "np.ndarray"]


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _prepare(maps) -> tuple[dict[str, np.ndarray], bool]:
    """Accept {layer: (G, ...)} or one (G, ...) array (returned bare)."""
    if isinstance(maps, Mapping):
        out = {k: _as_numpy(v) for k, v in maps.items()}
        single = False
    else:
        out = {"": _as_numpy(maps)}
        single = True
    sizes = {v.shape[0] for v in out.values() if v.ndim}
    if any(v.ndim == 0 for v in out.values()) or len(sizes) != 1:
        raise FqhwError("importance maps must all have the same leading group axis (G, *weight.shape)")
    return out, single


def group_totals(maps) -> np.ndarray:
    """T_g: the total |importance| of each group over every layer, shape (G,)."""
    m, _ = _prepare(maps)
    return sum(np.abs(v).reshape(v.shape[0], -1).sum(1) for v in m.values())


@dataclass(frozen=True)
class Reducer:
    """A named reduction across groups; call it on {layer: (G, ...)} (or one (G, ...) array)."""

    name: str
    fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    params: tuple = ()

    def __call__(self, maps):
        m, single = _prepare(maps)
        out = self.fn(m)
        return out[""] if single else out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.name}({args})"


def _max(m):
    return {k: v.max(0) for k, v in m.items()}


def _mean(m):
    return {k: v.mean(0) for k, v in m.items()}


def cvar_count(alpha: float, groups: int) -> int:
    """k = ceil((1 - alpha) * G), at least 1; the product is rounded to 9 decimals first so
    that e.g. alpha 0.8 with 5 groups is 1 group, not 2 by a floating-point hair."""
    return max(1, math.ceil(round((1.0 - alpha) * groups, 9)))


def _cvar(alpha: float):
    if not 0.0 <= alpha < 1.0:
        raise FqhwError(f"cvar alpha must be in [0, 1), got {alpha}")

    def fn(m):
        out = {}
        for k, v in m.items():
            n = cvar_count(alpha, v.shape[0])
            top = np.sort(v, axis=0)[v.shape[0] - n :]
            out[k] = top.mean(0)
        return out

    return fn


def _balanced(m):
    totals = group_totals(m)
    share = totals / totals.sum() if totals.sum() > 0 else np.zeros_like(totals)
    # a group with no importance at all (absent from the calibration data) has nothing to
    # rescale: it takes part with its zeros
    scale = np.where(share > 0, 1.0 / np.where(share > 0, share, 1.0), 0.0)
    return {k: (v * scale.reshape(-1, *([1] * (v.ndim - 1)))).max(0) for k, v in m.items()}


def _subtractive(beta: float, unprivileged: int | None, names: list[str] | None):
    def fn(m):
        G = next(iter(m.values())).shape[0]
        if G != 2:
            what = f" ({', '.join(names)})" if names and len(names) == G else ""
            raise FqhwError(
                f"the subtractive reducer needs exactly two groups, got {G}{what}; regroup into two "
                f"(e.g. light/dark: --data 'fitzpatrick17k:ROOT;groups=light-dark') or use max, mean, cvar or balanced"
            )
        u = unprivileged
        if u is None:
            u = int(np.argmax(group_totals(m)))  # worst-off: the group that needs the weights most
        if u not in (0, 1):
            raise FqhwError(f"unprivileged group index must be 0 or 1, got {u}")
        return {k: v[u] - beta * v[1 - u] for k, v in m.items()}

    return fn


_FACTORIES: dict[str, Callable[..., Reducer]] = {
    "max": lambda: Reducer("max", _max),
    "mean": lambda: Reducer("mean", _mean),
    "cvar": lambda alpha=0.8: Reducer("cvar", _cvar(float(alpha)), (("alpha", float(alpha)),)),
    "balanced": lambda: Reducer("balanced", _balanced),
    "subtractive": lambda beta=1.0, unprivileged=None, group_names=None: Reducer(
        "subtractive",
        _subtractive(float(beta), unprivileged, list(group_names) if group_names else None),
        (("beta", float(beta)), ("unprivileged", unprivileged)),
    ),
}


def known_reducers() -> list[str]:
    return list(_FACTORIES)


def get_reducer(name: str, **params) -> Reducer:
    """The reducer called `name` with its parameters, e.g. get_reducer("cvar", alpha=0.8),
    get_reducer("subtractive", beta=0.5, unprivileged=1)."""
    factory = _FACTORIES.get(str(name).lower())
    if factory is None:
        raise FqhwError(f"unknown reducer {name!r}; known: {', '.join(known_reducers())}")
    try:
        return factory(**params)
    except TypeError:
        import inspect

        allowed = list(inspect.signature(factory).parameters)
        raise FqhwError(
            f"reducer {name!r} takes {', '.join(allowed) if allowed else 'no parameters'}, got {', '.join(params)}"
        ) from None


UNITS = ("layer", "channel")


def unit_scores(reduced, unit: str = "channel", absolute: bool = True) -> dict[str, np.ndarray]:
    """Mean |importance| over each unit's fan-in weights: {layer: array}, shape (1,) for
    unit "layer" (the mean over the whole weight tensor), (C_out,) for unit "channel" (the
    mean over each output channel's row: its C_in * K * K weights).

    absolute=False takes the signed mean instead: for `subtractive`, whose sign says which
    group needs a weight more, |.| ranks a weight the privileged group needs as highly as
    one the unprivileged group needs (the reference takes |.|, hence the default)."""
    if unit not in UNITS:
        raise FqhwError(f"unknown unit {unit!r}; known: {', '.join(UNITS)}")
    out = {}
    for k, v in reduced.items():
        a = _as_numpy(v)
        a = np.abs(a) if absolute else a
        rows = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
        out[k] = np.array([rows.mean()]) if unit == "layer" else rows.mean(1)
    return out
