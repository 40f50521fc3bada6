"""Sensitivity: per unit and candidate width, the predicted loss increase for each group."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Sensitivity:
    """weight[layer][bits] and act[layer][bits] are arrays of shape (G,): one predicted
    loss increase per group when that layer's weights (or output activation) are quantized
    to `bits`. Additive across layers (a second-order, diagonal approximation)."""

    groups: list[str]
    weight: dict[str, dict[int, np.ndarray]]
    act: dict[str, dict[int, np.ndarray]]
    method: str = "fisher"

    def to_dict(self) -> dict:
        conv = lambda table: {  # noqa: E731
            layer: {str(b): [float(v) for v in arr] for b, arr in per_bits.items()}
            for layer, per_bits in table.items()
        }
        return {"groups": self.groups, "method": self.method, "weight": conv(self.weight), "act": conv(self.act)}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        conv = lambda table: {  # noqa: E731
            layer: {int(b): np.asarray(v, dtype=np.float64) for b, v in per_bits.items()}
            for layer, per_bits in table.items()
        }
        return cls(groups=list(d["groups"]), weight=conv(d["weight"]), act=conv(d["act"]), method=d.get("method", "fisher"))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Sensitivity":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def predicted(self, weight_bits: dict[str, int], act_bits: dict[str, int | None]) -> np.ndarray:
        """Predicted per-group loss increase of a whole allocation. Channel groups
        ("<layer>:g<k>") each have their weight entry and share their layer's activation
        entry, counted once."""
        total = np.zeros(len(self.groups))
        for layer, b in weight_bits.items():
            total += self.weight[layer][b]
        seen = set()
        for unit, b in act_bits.items():
            layer = unit if unit in self.act else unit.rsplit(":g", 1)[0]
            if b is not None and layer not in seen:
                seen.add(layer)
                total += self.act[layer][b]
        return total
