"""Bit-exact comparison of the integer traces of several backends.

A trace is {key: int array} as the backends' `*integer_trace` functions return it ("input",
"<layer>.act", "head.acc"; first axis = images). Integers are compared with
np.array_equal: no tolerance, ever.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from fqhw.errors import BitExactError


@dataclass
class BitExact:
    ok: bool
    n_images: int
    backends: list[str]
    keys: list[str]
    # key -> "backend_a vs backend_b" -> number of mismatching elements (all elements when the
    # shapes differ or the key is missing on one side)
    mismatches: dict[str, dict[str, int]] = field(default_factory=dict)
    first_mismatch: str | None = None  # a sentence naming the tensor, backends and first index

    @property
    def first_mismatching_key(self) -> str | None:
        for key, pairs in self.mismatches.items():
            if any(pairs.values()):
                return key
        return None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "n_images": self.n_images,
            "backends": list(self.backends),
            "keys": list(self.keys),
            "mismatches": {k: dict(v) for k, v in self.mismatches.items()},
            "first_mismatch": self.first_mismatch,
        }

    def summary(self) -> str:
        if self.ok:
            return (
                f"bit-exact: {', '.join(self.backends)} agree on {len(self.keys)} integer tensors "
                f"over {self.n_images} images"
            )
        return f"NOT bit-exact: {self.first_mismatch}"


def _check_int(backend: str, key: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{backend}[{key!r}] has dtype {a.dtype}: traces must hold integers")
    return a


def _key_order(traces: dict[str, dict[str, np.ndarray]]) -> list[str]:
    keys: list[str] = []
    for tr in traces.values():
        for k in tr:
            if k not in keys:
                keys.append(k)
    # input first, head accumulator last, activations in between in their given order
    return sorted(keys, key=lambda k: (k != "input", k == "head.acc"))


def check_bit_exact(traces: dict[str, dict[str, np.ndarray]], partial: tuple[str, ...] = ()) -> BitExact:
    """Compare every pair of backends on every key; ok only if all integers agree exactly.

    `partial`: backends that compute only some of the tensors (FINN's streamlined ResNet
    adds the two operands of a residual join without materialising them): a key missing
    from one of them is not compared with it, rather than counted as a mismatch. Every key
    must still be in at least two backends, and each partial backend must hold some key."""
    backends = list(traces)
    for b in partial:
        if b in traces and not traces[b]:
            raise ValueError(f"backend {b} has no tensors to compare")
    if len(backends) < 2:
        raise ValueError("check_bit_exact needs the traces of at least two backends")
    keys = _key_order(traces)
    n_images = None
    for b in backends:
        for k, a in traces[b].items():
            a = _check_int(b, k, a)
            n = int(a.shape[0]) if a.ndim else 1
            n_images = n if n_images is None else n_images
            if n != n_images:
                raise ValueError(f"{b}[{k!r}] has {n} images, others {n_images}")
    mismatches: dict[str, dict[str, int]] = {k: {} for k in keys}
    first = None
    for k in keys:
        holders = [b for b in backends if k in traces[b]]
        if partial and len(holders) < 2 and first is None:  # nothing to compare it with
            first = f"{k}: only {holders[0]} computes it"
        for a_name, b_name in combinations(backends, 2):
            pair = f"{a_name} vs {b_name}"
            a, b = traces[a_name].get(k), traces[b_name].get(k)
            if (a is None and a_name in partial) or (b is None and b_name in partial):
                continue
            if a is None or b is None:
                present = a if a is not None else b
                mismatches[k][pair] = int(np.asarray(present).size)
                if first is None:
                    missing = a_name if a is None else b_name
                    first = f"{k}: missing from {missing} (present in {b_name if a is None else a_name})"
                continue
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                mismatches[k][pair] = int(max(a.size, b.size))
                if first is None:
                    first = f"{k}: {a_name} has shape {a.shape}, {b_name} has shape {b.shape}"
                continue
            if np.array_equal(a, b):
                mismatches[k][pair] = 0
                continue
            diff = a != b
            n = int(diff.sum())
            mismatches[k][pair] = n
            if first is None:
                idx = tuple(int(i) for i in np.argwhere(diff)[0])
                first = (
                    f"{k}: {a_name} vs {b_name}: {n} of {a.size} integers differ, first at index "
                    f"{idx} (image {idx[0]}): {a_name}={int(a[idx])}, {b_name}={int(b[idx])}"
                )
    ok = first is None
    return BitExact(
        ok=ok,
        n_images=int(n_images or 0),
        backends=backends,
        keys=keys,
        mismatches=mismatches,
        first_mismatch=first,
    )


def require_bit_exact(result: BitExact) -> BitExact:
    """Raise BitExactError naming the first mismatching tensor unless `result.ok`."""
    if not result.ok:
        raise BitExactError(
            f"backends disagree on integer tensor {result.first_mismatching_key!r}: "
            f"{result.first_mismatch}. The build must not be trusted."
        )
    return result
