"""Allocation: the one currency between allocator, quant, hwmodels and backends."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fqhw.network import NetworkSpec


@dataclass
class LayerAllocation:
    """Choices for one compute layer.

    act_bits is the width of this layer's *output* activation (the quantized ReLU after
    it); None for the classifier head, whose output is the integer accumulator.
    pe / simd are FINN's folding factors (PE | MH, SIMD | MW).
    """

    name: str
    weight_bits: int
    act_bits: int | None
    pe: int = 1
    simd: int = 1


@dataclass
class Allocation:
    target: str
    layers: list[LayerAllocation]
    input_bits: int = 8
    solver: dict = field(default_factory=dict)  # status, wall time, objective: how it was found

    def layer(self, name: str) -> LayerAllocation:
        for la in self.layers:
            if la.name == name:
                return la
        raise KeyError(name)

    def input_bits_of(self, net: NetworkSpec, name: str) -> int:
        """Width of the activation that feeds layer `name` (the previous layer's output;
        for a channel group, the layer before its own groups)."""
        idx = [s.name for s in net.layers].index(name)
        j = net.input_of(idx)
        if j < 0:
            return self.input_bits
        prev = self.layers[j].act_bits
        assert prev is not None
        return prev

    def predicted_loss(self, net: NetworkSpec, sens) -> np.ndarray:
        """Per-group predicted loss increase of this allocation under Sensitivity `sens`:
        weights per unit, each activation once (channel groups share their layer's, which
        the sensitivity holds under the layer's name)."""
        weights = {la.name: la.weight_bits for la in self.layers}
        acts: dict[str, int | None] = {}
        for spec, la in zip(net.layers, self.layers):
            acts.setdefault(spec.act_group, la.act_bits)
        return sens.predicted(weights, acts)

    def avg_weight_bits(self, net: NetworkSpec) -> float:
        """Parameter-weighted average weight width: the quantity --budget bounds."""
        total = sum(net.layer(la.name).params * la.weight_bits for la in self.layers)
        return total / net.total_params

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Allocation":
        return cls(
            target=d["target"],
            layers=[LayerAllocation(**la) for la in d["layers"]],
            input_bits=d.get("input_bits", 8),
            solver=d.get("solver", {}),
        )

    def save(self, path: Path) -> None:
        """Write the allocation without the solver's wall times, so that the file depends only
        on the inputs (the same seed and inputs give a byte-identical file); the times are in
        report.json."""
        d = self.to_dict()
        d["solver"] = _without_times(d["solver"])
        Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Allocation":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def uniform(cls, net: NetworkSpec, bits: int, target: str = "uniform") -> "Allocation":
        return cls(
            target=target,
            layers=[
                LayerAllocation(s.name, bits, bits if s.has_output_act else None) for s in net.layers
            ],
        )


TIME_KEYS = ("wall_time_s", "tables_s", "cpu_time_s", "tables_cpu_s")


def _without_times(obj):
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if k not in TIME_KEYS}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj
