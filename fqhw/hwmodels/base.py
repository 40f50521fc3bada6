"""CostModel: prices one layer at one choice, and states the target's limits.

The allocator knows nothing of any target beyond this interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fqhw.network import LayerSpec


@dataclass(frozen=True)
class LayerCost:
    cycles: int  # the slowest unit of the layer: what bounds the pipeline's throughput
    resources: dict[str, float] = field(default_factory=dict)  # e.g. LUT, BRAM_18K, DSP
    # sum of the layer's unit cycles (a pessimistic latency, as FINN's critical path);
    # None: same as cycles
    latency_cycles: int | None = None
    # per hardware unit the target builds for the layer: op type, folding, cycles, resources
    units: tuple[dict, ...] = ()

    @property
    def latency(self) -> int:
        return self.cycles if self.latency_cycles is None else self.latency_cycles


@dataclass(frozen=True)
class TargetLimits:
    """What the target offers, after its utilisation limits (the allocator's hard caps)."""

    name: str
    part: str
    clock_hz: float
    totals: dict[str, float]  # raw device totals
    utilisation: dict[str, float]  # fraction of each total a design may use

    def cap(self, resource: str) -> float:
        return self.totals[resource] * self.utilisation.get(resource, 1.0)


class CostModel(Protocol):
    """Required: `limits`, `folding_options`, `layer_cost`. Optional hooks the allocator and
    `price` use when a model has them:
      buildable(layer, weight_bits, in_bits, out_bits, pe, simd) -> bool
          False for a choice the target's tools refuse (e.g. an HLS stream too wide);
      extras_options(net, input_bits) -> list[LayerCost]
          units built outside the compute layers (e.g. FINN's input thresholding), one
          LayerCost per folding option; the allocator picks one;
      schedule: "dataflow" (default: every layer is its own hardware, throughput is set by
          the slowest) or "sequential" (one array runs the layers one after another:
          cycles per image are the sum of the layers');
      default_objective: what the allocator optimises after the loss unless told
          ("throughput", "resources", "latency" or "energy");
      price_table(layer, w_vals, ai_vals, ao_vals, folds, resources, metrics)
          -> (rows, n_priced): every buildable choice at once, rows of (w, a_in, a_out or -1,
          fold index, cycles, *ceil(resources), *metrics), the same numbers as layer_cost.
      prices_by_shape: True when a layer's price depends only on its shape (every field
          but the name and channel-group labels): the allocator then prices repeated shapes
          once;
    Priced quantities the target does not cap (in resources but not limits.totals, e.g.
    "energy_pJ") are reported and may be minimised, never capped.
    """

    limits: TargetLimits

    def folding_options(self, layer: LayerSpec) -> list[tuple[int, int]]:
        """(pe, simd) pairs this target can build for the layer."""

    def layer_cost(
        self, layer: LayerSpec, weight_bits: int, in_bits: int, out_bits: int | None, pe: int, simd: int
    ) -> LayerCost:
        """Cost of the layer (and the units FINN builds with it: sliding window, pooling)."""
