"""BAQ: weights and per-unit weight widths learned together, then projected by the solver.

FairQuant's BAQ mode (see shared/notes/fairquant-method.md, "BAQ (learnable bits)") trains
the bit width of every unit alongside the weights, under a bitrate and a fairness term. Its
bits are only soft-regularised, so nothing guarantees that the result meets the budget or
fits a board. Here the learned widths are a *proposal*: the CP-SAT allocator projects them
onto the nearest allocation that meets the budget exactly and fits the target (its resource
caps, its throughput floor), and the deployable model is then built by the normal path
(`build_quant_model` + `calibrate` + QAT) from the weights BAQ trained.

    alloc_warm = allocate(net, sens, cost, budget=B, pinned=...)       # the solver's choice
    res = learn_bits(float_model, alloc_warm, splits, net, budget=B, ...)
    res.allocation                      # projected: avg weight bits <= B, fits the target
    qmodel, qat = recover(res.float_model(float_model), res.allocation, splits, net, budget=B)

Design choices (and why):

- A torch fake-quant twin (`BAQFairCNN`), not Brevitas' PARAMETER bit width: a unit here
  may be a channel group of a layer (fqhw.network.split_channel_groups), the dead zone is
  not a Brevitas quantizer, and iterative QAT must quantize some units of a layer and not
  others. The twin keeps FairCNN's module names; its weight quantizer is a
  `torch.nn.utils.parametrize` parametrization of each conv / linear weight.
- Width: b_cont = (b_min - 1/2 + e) + (b_max - b_min + 1 - 2e) * sigmoid(logit), e = 0.01,
  so that round(b_cont) takes every width in [b_min, b_max] with equal room (the
  reference's tanh(|logit|) has a dead gradient at 0 and needs a huge logit to start at
  b_max). The forward pass uses round(b_cont) (straight-through estimator); the logit is
  initialised so that b_cont equals the warm-start width.
- Quantizer: the deployed rule, symmetric narrow-range per output channel with
  scale = max|w| / (2^(b-1) - 1). Rounding of the weights is straight-through in the
  LSQ sense (w_q = scale * (round(u) + u - stopgrad(u)), u = w / scale), so the loss sees
  the rounding error through the scale, and through it the width: that is the gradient the
  bit logits get from the task loss (a pure identity STE would give them none).
- Dead zone, per unit, relative to each channel's max|w|: d = sigmoid(dz_logit) * max|w|,
  initialised near 0 (sigmoid(-8) = 3e-4). Weights with |w| < d/2 become 0. Two rules:
  "grid" (default) zeroes them on the deployed grid, so the quantized weights remain codes
  of the deployed quantizer and the dead zone is exactly a pruning mask; its gradient comes
  through a sigmoid surrogate of the mask (straight-through). "reference" is the
  reference's offset grid (step = (max|w| - d/2) / M, w_q = sign(w) (q step + d/2)), whose
  levels the deployed quantizer cannot represent: for comparison with the paper only.
- Bitrate term (`bitrate_penalty`): R_b = relu(avg - B)^2 + under_weight * relu(B - avg)^2
  on the parameter-weighted average of the continuous widths. Two-sided, so the average is
  driven *to* the budget: from above firmly, from below gently (a width the budget allows
  should be used, but the task loss may keep the average a little under it). The
  continuous widths are used because the projection reads them too; the solver, not the
  penalty, makes the budget exact.
- Activation widths stay those of the warm start (the solver chose them for the hardware):
  the twin quantizes each ReLU output to that width with a learned per-tensor threshold
  (unsigned, like the deployed QuantReLU), and the projection pins them.
- Projection (`project`): `allocate` with a one-group Sensitivity "projection",
  weight[u][b] = params(u) * |b - b_learned(u)| (or squared), activation tables zero and the
  activations pinned to the warm start's widths, the warm start's weight pins, throughput
  floor and hardware objective, loss_slack 0. Stage 1 then minimises the parameter-weighted
  distance to the learned widths under the budget and the target's caps (hard), and the
  hardware stages break ties toward throughput. The warm start itself is feasible for this
  problem, so the projection exists whenever the warm start did. The nearest allocation can
  leave budget unused (the continuous average sits at the budget, but rounding a large
  layer down frees bits); `fill_budget=True` adds a second solve that only raises widths
  from there, to use what the budget and the caps still allow.
- Every function that returns an allocation for deployment checks the budget exactly
  (`check_budget_met`, rational arithmetic as the allocator's) and raises `BudgetError`.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from fqhw.allocator.allocation import Allocation
from fqhw.data.dataset import DataSplits
from fqhw.errors import FqhwError
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.models.cnn import FairCNN
from fqhw.network import NetworkSpec, network_spec
from fqhw.quant.qat import QATResult, evaluate_groups, fairness_loss

BIT_RANGE = (2, 8)
ROUND_EDGE = 0.01  # b_cont stays this far inside [b_min - 1/2, b_max + 1/2]
DEAD_ZONE_INIT = -8.0  # dz_logit at start: d = sigmoid(-8) * max|w| = 3.4e-4 * max|w|
DEAD_ZONE_TAU = 0.5  # width of the dead zone's surrogate sigmoid, in quantization steps
DEAD_ZONE_MODES = ("grid", "reference")


class BudgetError(FqhwError):
    """An allocation meant for deployment is over the bit budget (a bug of the caller or of
    the projection: the projection's solver makes the budget a hard constraint)."""


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (exactly: x - x.detach() is exactly 0), identity backward."""
    return torch.round(x).detach() + (x - x.detach())


# ------------------------------------------------------------------ units


@dataclass(frozen=True)
class Unit:
    """One allocation unit: a whole layer or an output-channel group of one."""

    name: str  # allocation name: the layer's, or "<layer>:g<k>" for a channel group
    layer: str  # module path in FairCNN: "features.<i>.conv" or "head"
    start: int  # its output channels are [start, stop)
    stop: int
    params: int


def units_of(net: NetworkSpec) -> list[Unit]:
    """The units of `net` in stream order, with the output channels each covers.

    A channel group k of MH outputs covers channels [k * MH, (k + 1) * MH) of its layer,
    which is how split_channel_groups numbers them."""
    units = []
    for spec in net.layers:
        layer = spec.group or spec.name
        start = spec.group_index * spec.mh
        units.append(Unit(spec.name, layer, start, start + spec.mh, spec.params))
    return units


# ------------------------------------------------------------------ quantizers


class LearnedWidthWeightQuant(nn.Module):
    """Parametrization of one layer's weight: per-unit learned width and dead zone.

    Buffers `unit_of_channel` (which unit each output channel belongs to), `fixed_bits`
    (widths of units whose width is not learned: pinned ones, or all of them with
    learn=False) and `learned` (which units learn), `quantized` (units whose channels are
    quantized at all: iterative QAT leaves some in float)."""

    def __init__(
        self,
        out_channels: int,
        units: Sequence[Unit],
        init_bits: Sequence[float],
        learned: Sequence[bool],
        bit_range: tuple[int, int] = BIT_RANGE,
        dead_zone: str | None = "grid",
    ):
        super().__init__()
        b_min, b_max = int(bit_range[0]), int(bit_range[1])
        if b_min < 2 or b_max < b_min:
            raise FqhwError(f"bit range {bit_range} must satisfy 2 <= b_min <= b_max")
        if dead_zone is not None and dead_zone not in DEAD_ZONE_MODES:
            raise FqhwError(f"dead zone {dead_zone!r} is not one of {DEAD_ZONE_MODES} or None")
        self.b_min, self.b_max, self.dead_zone_mode = b_min, b_max, dead_zone
        self.unit_names = [u.name for u in units]
        owner = torch.full((out_channels,), -1, dtype=torch.long)
        for k, u in enumerate(units):
            owner[u.start : u.stop] = k
        if (owner < 0).any():
            raise FqhwError(f"units {self.unit_names} do not cover all {out_channels} output channels of {units[0].layer}")
        self.register_buffer("unit_of_channel", owner)
        init = torch.tensor([float(b) for b in init_bits])
        self.register_buffer("fixed_bits", init.clone())
        self.register_buffer("learned", torch.tensor([bool(v) for v in learned]))
        self.register_buffer("quantized", torch.ones(len(units), dtype=torch.bool))
        self.bit_logit = nn.Parameter(self._logit_of(init.clamp(b_min, b_max)))
        self.dz_logit = nn.Parameter(torch.full((len(units),), DEAD_ZONE_INIT))
        self.bit_logit.requires_grad_(bool(self.learned.any()))
        self.dz_logit.requires_grad_(dead_zone is not None)

    # widths
    @property
    def _lo(self) -> float:
        return self.b_min - 0.5 + ROUND_EDGE

    @property
    def _span(self) -> float:
        return self.b_max - self.b_min + 1 - 2 * ROUND_EDGE

    def _logit_of(self, bits: torch.Tensor) -> torch.Tensor:
        p = ((bits - self._lo) / self._span).clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p)

    def bits_continuous(self) -> torch.Tensor:
        """(U,) widths before rounding (the fixed width for units that do not learn)."""
        learned = self._lo + self._span * torch.sigmoid(self.bit_logit)
        return torch.where(self.learned, learned, self.fixed_bits)

    def bits(self) -> torch.Tensor:
        """(U,) integer widths used by the forward pass; straight-through to the logits."""
        return _round_ste(self.bits_continuous()).clamp(self.b_min, self.b_max)

    def set_bits(self, bits: Sequence[float]) -> None:
        """Set every unit's width (learned ones through their logits)."""
        b = torch.as_tensor([float(v) for v in bits], dtype=self.fixed_bits.dtype)
        with torch.no_grad():
            self.bit_logit.copy_(self._logit_of(b))
            self.fixed_bits.copy_(torch.where(self.learned, self.fixed_bits, b))

    def dead_zone(self) -> torch.Tensor:
        """(U,) dead zone width d relative to each channel's max|w| (0 when disabled)."""
        if self.dead_zone_mode is None:
            return torch.zeros_like(self.dz_logit)
        return torch.sigmoid(self.dz_logit)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.reshape(w.shape[0], -1)
        owner = self.unit_of_channel
        b = self.bits()[owner]
        M = (torch.pow(2.0, b - 1) - 1)[:, None]
        amax = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        mag = flat.abs()
        d = None
        if self.dead_zone_mode is not None:
            d = (self.dead_zone()[owner])[:, None] * amax
        if self.dead_zone_mode == "reference":
            step = (amax - d / 2) / M
            q = _round_ste(torch.minimum(torch.clamp((mag - d / 2) / step, min=0.0), M))
            wq = torch.sign(flat) * (q * step + d / 2)
            scale = step
        else:
            scale = amax / M
            q = _round_ste(flat / scale)
            wq = torch.maximum(torch.minimum(q, M), -M) * scale
        if d is not None:
            hard = (mag >= d / 2).to(flat.dtype)
            soft = torch.sigmoid((mag - d / 2) / (DEAD_ZONE_TAU * scale))
            wq = wq * (hard + (soft - soft.detach()))  # exactly `hard` forward
        out = torch.where(self.quantized[owner][:, None], wq, flat)
        return out.reshape(w.shape)


class ActFakeQuant(nn.Module):
    """ReLU followed by an unsigned `bits`-bit quantizer with a learned per-tensor threshold
    (scale = threshold / (2^bits - 1)), as the deployed QuantReLU. The threshold is set by
    `BAQFairCNN.calibrate` from a high percentile of the activations."""

    PERCENTILE = 99.99

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.threshold = nn.Parameter(torch.tensor(1.0))
        self._observed: list[float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        if self._observed is not None:
            flat = x.detach().reshape(-1)
            k = max(1, int(math.ceil(flat.numel() * self.PERCENTILE / 100.0)))
            self._observed.append(float(flat.kthvalue(k).values))
            return x
        levels = float(2**self.bits - 1)
        scale = self.threshold.abs().clamp_min(1e-8) / levels
        return torch.clamp(_round_ste(x / scale), 0.0, levels) * scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


# ------------------------------------------------------------------ the twin


class BAQFairCNN(nn.Module):
    """A fake-quant twin of the deployed model for BAQ, weight-only QAT and iterative QAT.

    Same module names as FairCNN (features.<i>.{conv,bn,relu,pool}, flatten, head). Every
    conv / linear weight is parametrized by a `LearnedWidthWeightQuant` (its latent float
    weight is `<layer>.parametrizations.weight.original`); each ReLU is an `ActFakeQuant` at
    the allocation's activation width, or a plain ReLU with `weight_only=True`. The input
    (pixel / 256) is already on the deployed 8-bit input grid.

    learn_bits=False fixes every width at the allocation's (a fixed-width twin); units named
    in `pinned` never learn. `net` gives the units (whole layers, or channel groups from
    split_channel_groups); by default the layers of `float_model`."""

    def __init__(
        self,
        float_model: FairCNN,
        alloc: Allocation,
        net: NetworkSpec | None = None,
        *,
        learn_bits: bool = True,
        weight_only: bool = False,
        pinned: dict[str, int] | None = None,
        bit_range: tuple[int, int] = BIT_RANGE,
        dead_zone: str | None = "grid",
    ):
        super().__init__()
        cfg = float_model.cfg
        self.cfg = cfg
        if net is None:
            net = network_spec(float_model, (cfg.in_channels, cfg.image_size, cfg.image_size))
        self.net = net
        self.weight_only = bool(weight_only)
        self.units = units_of(net)
        body = copy.deepcopy(float_model).cpu()
        self.features, self.flatten, self.head = body.features, body.flatten, body.head
        pinned = dict(pinned or {})
        known = {u.name for u in self.units}
        unknown = sorted(set(pinned) - known)
        if unknown:
            raise FqhwError(f"pinned units {unknown} are not in the network (units: {', '.join(sorted(known))})")
        names = {la.name for la in alloc.layers}
        missing = [u.name for u in self.units if u.name not in names]
        if missing:
            raise FqhwError(f"the allocation has no entry for units {missing}")
        modules = dict(self.named_modules())
        self._layers: list[str] = list(OrderedDict.fromkeys(u.layer for u in self.units))
        for layer in self._layers:
            mod = modules.get(layer)
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                raise FqhwError(f"unit layer {layer!r} is not a conv or linear module of the model")
            us = [u for u in self.units if u.layer == layer]
            init = [alloc.layer(u.name).weight_bits for u in us]
            for u in us:
                if u.name in pinned and not bit_range[0] <= pinned[u.name] <= bit_range[1]:
                    raise FqhwError(f"pinned width {pinned[u.name]} of {u.name!r} is outside {bit_range}")
            init = [pinned.get(u.name, b) for u, b in zip(us, init)]
            learned = [learn_bits and u.name not in pinned for u in us]
            quant = LearnedWidthWeightQuant(mod.weight.shape[0], us, init, learned, bit_range, dead_zone)
            parametrize.register_parametrization(mod, "weight", quant)
        for i, block in enumerate(self.features):
            spec_name = f"features.{i}.conv"
            act_bits = next((alloc.layer(u.name).act_bits for u in self.units if u.layer == spec_name), None)
            if weight_only:
                block.relu = nn.ReLU()
            else:
                if act_bits is None:
                    raise FqhwError(f"layer {spec_name} needs act_bits (its ReLU is quantized)")
                block.relu = ActFakeQuant(act_bits)

    # ---- access
    def module(self, layer: str) -> nn.Module:
        return self.get_submodule(layer)

    def quantizer(self, layer: str) -> LearnedWidthWeightQuant:
        return self.module(layer).parametrizations.weight[0]

    def quantizers(self) -> "OrderedDict[str, LearnedWidthWeightQuant]":
        return OrderedDict((layer, self.quantizer(layer)) for layer in self._layers)

    def latent_weight(self, layer: str) -> nn.Parameter:
        """The float weight behind the quantizer (what the optimiser updates)."""
        return self.module(layer).parametrizations.weight.original

    def act_quantizers(self) -> list[ActFakeQuant]:
        return [m for m in self.modules() if isinstance(m, ActFakeQuant)]

    def _per_unit(self, fn) -> dict[str, torch.Tensor]:
        out = {}
        for q in self.quantizers().values():
            vals = fn(q)
            out.update({n: vals[k] for k, n in enumerate(q.unit_names)})
        return {u.name: out[u.name] for u in self.units}

    def unit_bits(self, rounded: bool = False) -> dict[str, float]:
        """Per unit: its current width, continuous (before the straight-through rounding)
        or the integer the forward pass uses."""
        with torch.no_grad():
            got = self._per_unit(lambda q: q.bits() if rounded else q.bits_continuous())
        return {k: (int(round(float(v))) if rounded else float(v)) for k, v in got.items()}

    def unit_dead_zone(self) -> dict[str, float]:
        with torch.no_grad():
            return {k: float(v) for k, v in self._per_unit(lambda q: q.dead_zone()).items()}

    def set_unit_bits(self, bits: dict[str, float]) -> None:
        for q in self.quantizers().values():
            cur = q.bits_continuous().detach()
            q.set_bits([bits.get(n, float(cur[k])) for k, n in enumerate(q.unit_names)])

    def avg_bits(self, rounded: bool = False) -> torch.Tensor:
        """Parameter-weighted average width (differentiable): the quantity the budget bounds."""
        per = self._per_unit(lambda q: q.bits() if rounded else q.bits_continuous())
        total = sum(u.params for u in self.units)
        return sum(per[u.name] * u.params for u in self.units) / total

    def bit_parameters(self) -> list[nn.Parameter]:
        return [q.bit_logit for q in self.quantizers().values() if q.bit_logit.requires_grad]

    def dead_zone_parameters(self) -> list[nn.Parameter]:
        return [q.dz_logit for q in self.quantizers().values() if q.dz_logit.requires_grad]

    def act_parameters(self) -> list[nn.Parameter]:
        return [a.threshold for a in self.act_quantizers()]

    def model_parameters(self) -> list[nn.Parameter]:
        """Weights and BatchNorm parameters: everything but the quantizers' own."""
        skip = {id(p) for p in [*self.bit_parameters(), *self.dead_zone_parameters(), *self.act_parameters()]}
        skip |= {id(q.bit_logit) for q in self.quantizers().values()} | {id(q.dz_logit) for q in self.quantizers().values()}
        return [p for p in self.parameters() if id(p) not in skip and p.requires_grad]

    # ---- calibration and export
    @torch.no_grad()
    def calibrate(self, loader, batches: int = 8) -> "BAQFairCNN":
        """Activation thresholds from the PERCENTILE of each ReLU's output over `batches`
        batches (mean over batches), the model in eval mode; then the weights' quantization
        as it stands. No-op for a weight-only twin."""
        acts = self.act_quantizers()
        if not acts:
            return self
        was = self.training
        self.eval()
        n = 0
        try:
            for a in acts:
                a._observed = []
            for batch in loader:
                self(batch[0] if isinstance(batch, (tuple, list)) else batch)
                n += 1
                if n >= batches:
                    break
            if n == 0:
                raise FqhwError("calibration loader yielded no batches")
            for a in acts:
                a.threshold.copy_(torch.tensor(max(float(np.mean(a._observed)), 1e-3)))
        finally:
            for a in acts:
                a._observed = None
            self.train(was)
        return self

    @torch.no_grad()
    def float_state(self, prune_dead_zone: bool = True) -> dict[str, torch.Tensor]:
        """A FairCNN state dict holding this twin's latent weights and BatchNorm state: the
        start of the recovery fine-tune. prune_dead_zone zeroes the weights the dead zone
        zeroes in the forward pass (on the "grid" rule those are zeros of the deployed
        quantizer too, so the deployed model starts where BAQ ended)."""
        out = OrderedDict()
        for k, v in self.state_dict().items():
            if ".parametrizations.weight.original" in k:
                layer = k.split(".parametrizations.")[0]
                w = v.clone()
                q = self.quantizer(layer)
                if prune_dead_zone and q.dead_zone_mode is not None:
                    flat = w.reshape(w.shape[0], -1)
                    amax = flat.abs().amax(dim=1, keepdim=True)
                    d = q.dead_zone()[q.unit_of_channel][:, None] * amax
                    flat[flat.abs() < d / 2] = 0.0
                out[f"{layer}.weight"] = w
            elif ".parametrizations.weight." in k or k.endswith(".threshold"):
                continue  # quantizer state: not part of the float model
            else:
                out[k] = v.clone()
        return out

    def to_float_model(self, like: FairCNN, prune_dead_zone: bool = True) -> FairCNN:
        """A FairCNN (a copy of `like`) with this twin's trained float weights."""
        model = copy.deepcopy(like)
        model.load_state_dict(self.float_state(prune_dead_zone))
        model.eval()
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.features(x)))


def weight_only_model(float_model: FairCNN, alloc: Allocation, net: NetworkSpec | None = None) -> BAQFairCNN:
    """The reference's setting: weights fake-quantized at the allocation's widths (per
    output channel, the deployed rule), activations left in float.

    NOT deployable: an integer dataflow accelerator (FINN) needs quantized activations;
    this model exists to compare with the paper's numbers. Evaluate it with
    `fqhw.quant.qat.evaluate_groups`, fine-tune it with `fqhw.quant.qat.finetune` (the widths
    are fixed: only weights and BatchNorm train)."""
    return BAQFairCNN(float_model, alloc, net, learn_bits=False, weight_only=True, dead_zone=None)


# ------------------------------------------------------------------ budget and projection


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


# ------------------------------------------------------------------ training helpers


def _optimizer(groups: list[dict], steps: int):
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    return opt, sched


def _steps_per_epoch(splits: DataSplits, batch_size: int) -> int:
    return (len(splits.train) + batch_size - 1) // batch_size


# ------------------------------------------------------------------ BAQ


@dataclass
class BAQResult:
    allocation: Allocation  # projected: meets the budget, fits the target
    learned_bits: dict[str, float]  # continuous widths at the end of BAQ
    learned_bits_rounded: dict[str, int]  # the widths BAQ's forward pass used at the end
    dead_zone: dict[str, float]  # per unit, relative to max|w|
    warm_start: dict[str, int]
    history: list[dict] = field(default_factory=list)  # per epoch
    float_state: dict = field(default_factory=dict)  # FairCNN state dict: start of recovery
    model: BAQFairCNN | None = None  # the BAQ twin as trained (not deployable)

    def float_model(self, like: FairCNN) -> FairCNN:
        """A copy of `like` holding the BAQ-trained float weights (and BatchNorm state)."""
        model = copy.deepcopy(like)
        model.load_state_dict(self.float_state)
        model.eval()
        return model

    def summary(self) -> dict:
        return {
            "warm_start": self.warm_start,
            "learned_bits": {k: round(v, 3) for k, v in self.learned_bits.items()},
            "projected": {la.name: la.weight_bits for la in self.allocation.layers},
            "final_epoch": self.history[-1] if self.history else None,
        }


def learn_bits(
    float_model: FairCNN,
    alloc_warm: Allocation,
    splits: DataSplits,
    net: NetworkSpec,
    *,
    budget: float,
    epochs: int = 3,
    lr: float = 5e-4,
    bit_lr: float = 0.05,
    dead_zone_lr: float = 0.01,
    fairness_lambda: float = 0.5,
    bitrate_lambda: float = 2.0,
    under_weight: float = 0.25,
    seed: int = 0,
    batch_size: int = 64,
    cost_model=None,
    pinned: dict[str, int] | None = None,
    min_fps: float | None = None,
    objective: str | None = None,
    weight_only: bool = False,
    dead_zone: str | None = "grid",
    bit_range: tuple[int, int] = BIT_RANGE,
    project_from: str = "continuous",
    squared_distance: bool = False,
    fill_budget: bool = False,
    calib_batches: int = 8,
    time_limit_s: float = 30.0,
    progress: bool = False,
    desc: str = "BAQ",
) -> BAQResult:
    """Train weights, per-unit widths and dead zones together from the warm start, then
    project the learned widths onto a feasible allocation with the solver.

    loss = CE + fairness_lambda * (max_g L_g - min_g L_g) + bitrate_lambda * R_b
    (`fairness_loss`, `bitrate_penalty`). Weights, BatchNorm and activation thresholds use
    `lr`, the bit and dead-zone logits `bit_lr` (AdamW, cosine schedule, no weight decay).
    Activation widths stay the warm start's (weight_only=True: activations in float during
    BAQ; the projected allocation still has the warm start's activation widths).

    pinned / min_fps / objective default to what the warm start was allocated with
    (alloc_warm.solver["pinned"], ["min_fps"], ["hardware_objective"]); pass {} to unpin.
    Pinned units keep their width throughout. The last epoch's state is kept (its widths are
    what is projected); the history records, per epoch, the average width (continuous and
    rounded), the loss terms and the twin's validation mean / worst group accuracy (at the
    learned widths, before projection). project_from: "continuous" or "rounded" widths;
    squared_distance and fill_budget: see `project`.
    """
    if epochs < 1:
        raise FqhwError("BAQ needs at least one epoch")
    if project_from not in ("continuous", "rounded"):
        raise FqhwError(f"project_from must be 'continuous' or 'rounded', not {project_from!r}")
    solver = alloc_warm.solver or {}
    if pinned is None:
        pinned = {k: int(v) for k, v in (solver.get("pinned") or {}).items()}
    if min_fps is None:
        min_fps = solver.get("min_fps")
    if objective is None:
        objective = solver.get("hardware_objective")
    from fqhw.allocator.cpsat import check_budget

    # fail before training when no width vector can meet the budget with these pins
    check_budget(net, budget, alloc_warm.target, bits=range(bit_range[0], bit_range[1] + 1), pinned=pinned)
    torch.manual_seed(seed)
    model = BAQFairCNN(
        float_model, alloc_warm, net, learn_bits=True, weight_only=weight_only, pinned=pinned, bit_range=bit_range, dead_zone=dead_zone
    )
    model.calibrate(splits.train.loader(batch_size, shuffle=True, seed=seed), batches=calib_batches)
    steps = epochs * _steps_per_epoch(splits, batch_size)
    opt, sched = _optimizer(
        [
            {"params": model.model_parameters() + model.act_parameters(), "lr": lr},
            {"params": model.bit_parameters(), "lr": bit_lr},
            {"params": model.dead_zone_parameters(), "lr": dead_zone_lr},
        ],
        steps,
    )
    history: list[dict] = []
    for epoch in range(epochs):
        model.train()
        sums = {"loss": 0.0, "ce": 0.0, "fairness": 0.0, "bitrate": 0.0}
        n = 0
        loader = splits.train.loader(batch_size, shuffle=True, seed=seed + epoch)
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=None if progress else True, leave=False)
        for x, y, g in bar:
            logits = model(x)
            task = fairness_loss(logits, y, g, fairness_lambda)
            ce = nn.functional.cross_entropy(logits, y)
            rate = bitrate_penalty(model.avg_bits(), budget, under_weight)
            loss = task + bitrate_lambda * rate
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            k = len(y)
            sums["loss"] += float(loss.detach()) * k
            sums["ce"] += float(ce.detach()) * k
            sums["fairness"] += float((task - ce).detach()) * k
            sums["bitrate"] += float(rate.detach()) * k
            n += k
        val = evaluate_groups(model, splits.val)
        history.append(
            {
                "epoch": epoch + 1,
                **{f"train_{k}": v / max(n, 1) for k, v in sums.items()},
                "avg_bits": float(model.avg_bits().detach()),
                "avg_bits_rounded": float(model.avg_bits(rounded=True).detach()),
                "bits": model.unit_bits(rounded=True),
                "val_mean_group_acc": val["mean_group_acc"],
                "val_worst_group_acc": val["worst_group_acc"],
            }
        )
    model.eval()
    learned = model.unit_bits(rounded=False)
    rounded = model.unit_bits(rounded=True)
    alloc = project(
        net, rounded if project_from == "rounded" else learned, alloc_warm, budget=budget, cost_model=cost_model, pinned=pinned,
        min_fps=min_fps, objective=objective, bits=range(bit_range[0], bit_range[1] + 1), squared=squared_distance,
        fill_budget=fill_budget, time_limit_s=time_limit_s, seed=seed,
    )
    alloc.solver["baq"] = {
        "epochs": epochs, "lr": lr, "bit_lr": bit_lr, "dead_zone_lr": dead_zone_lr, "fairness_lambda": fairness_lambda, "bitrate_lambda": bitrate_lambda,
        "under_weight": under_weight, "weight_only": weight_only, "dead_zone": dead_zone, "project_from": project_from,
        "seed": seed,
    }
    return BAQResult(
        allocation=alloc,
        learned_bits=learned,
        learned_bits_rounded=rounded,
        dead_zone=model.unit_dead_zone(),
        warm_start={la.name: la.weight_bits for la in alloc_warm.layers},
        history=history,
        float_state=model.float_state(prune_dead_zone=dead_zone == "grid"),
        model=model,
    )


def recover(
    float_model: FairCNN | dict,
    alloc: Allocation,
    splits: DataSplits,
    net: NetworkSpec,
    *,
    budget: float,
    like: FairCNN | None = None,
    epochs: int = 3,
    lr: float = 5e-4,
    fairness_lambda: float = 0.5,
    seed: int = 0,
    calib_batches: int = 8,
    progress: bool = False,
    desc: str = "QAT after BAQ",
):
    """The deployable model from BAQ's weights: `build_quant_model` at the projected
    allocation, `calibrate`, `finetune` (the flow's normal QAT; the flow additionally runs
    `snap_thresholds` before export, as for any quant model). `float_model` is a FairCNN
    or a FairCNN state dict (then `like` gives the architecture).

    Returns (qmodel, QATResult). Raises BudgetError if the allocation is over budget,
    before and after (the model's widths are checked against the allocation)."""
    from fqhw.quant.qat import finetune
    from fqhw.quant.qmodel import build_quant_model, calibrate

    check_budget_met(net, alloc, budget)
    if isinstance(float_model, dict):
        if like is None:
            raise FqhwError("recover: a state dict needs `like` (a FairCNN of the same architecture)")
        model = copy.deepcopy(like)
        model.load_state_dict(float_model)
    else:
        model = float_model
    model.eval()
    torch.manual_seed(seed)
    qmodel = build_quant_model(model, alloc)
    calibrate(qmodel, splits.train.loader(64, shuffle=True, seed=seed), batches=calib_batches)
    res: QATResult = finetune(qmodel, splits, epochs=epochs, lr=lr, fairness_lambda=fairness_lambda, seed=seed, progress=progress, desc=desc)
    for name, ql in qmodel.layers.items():
        if ql.weight_bits != alloc.layer(name).weight_bits or int(ql.compute.quant_weight().bit_width) != ql.weight_bits:
            raise BudgetError(f"{name}: the quant model's weight width differs from the allocation's")
    check_budget_met(net, alloc, budget)
    return qmodel, res


# ------------------------------------------------------------------ iterative QAT


@dataclass
class IterativeQATResult:
    model: BAQFairCNN  # every unit quantized and frozen at the end
    stages: list[dict]  # per stage: units frozen, per-epoch history
    frozen: dict[str, torch.Tensor]  # per unit: its weight rows as frozen (on the grid)
    float_state: dict  # FairCNN state dict: quantized weights, trained BatchNorm

    def float_model(self, like: FairCNN) -> FairCNN:
        model = copy.deepcopy(like)
        model.load_state_dict(self.float_state)
        model.eval()
        return model


def _stage_plan(units: list[Unit], stages: int | Sequence[Sequence[str]], order: str, sens: Sensitivity | None, alloc: Allocation):
    if not isinstance(stages, int):
        plan = [list(s) for s in stages]
        flat = [n for s in plan for n in s]
        if sorted(flat) != sorted(u.name for u in units):
            raise FqhwError("the stages must name every unit exactly once")
        return plan
    if stages < 1:
        raise FqhwError("iterative QAT needs at least one stage")
    if order == "size":
        key = {u.name: u.params for u in units}
    elif order == "importance":
        if sens is None:
            raise FqhwError("order='importance' needs a Sensitivity")
        key = {u.name: float(np.max(sens.weight[u.name][alloc.layer(u.name).weight_bits])) for u in units}
    else:
        raise FqhwError(f"order must be 'size' or 'importance', not {order!r}")
    ranked = sorted(units, key=lambda u: (-key[u.name], [v.name for v in units].index(u.name)))
    return [[u.name for u in part] for part in np.array_split(np.array(ranked, dtype=object), min(stages, len(units))) if len(part)]


def iterative_qat(
    float_model: FairCNN,
    alloc: Allocation,
    splits: DataSplits,
    net: NetworkSpec | None = None,
    *,
    stages: int | Sequence[Sequence[str]] = 3,
    order: str = "size",
    sens: Sensitivity | None = None,
    epochs_per_stage: int = 1,
    lr: float = 5e-4,
    fairness_lambda: float = 0.5,
    weight_only: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    calib_batches: int = 8,
    progress: bool = False,
) -> IterativeQATResult:
    """Quantize and freeze the units in stages, fine-tuning what is still float after each.

    The units are ranked (order="size": most parameters first; "importance": largest
    worst-group sensitivity at the allocated width first, needs `sens`) and split into
    `stages` near-equal stages, or `stages` lists the unit names per stage. Stage s: the
    weights of its units are set to their quantized values (allocation widths, deployed
    rule) and frozen (restored after every optimiser step, so they stay bit-identical);
    then `epochs_per_stage` epochs fine-tune the still-float units, BatchNorm and the
    activation thresholds (activations are quantized throughout, unless weight_only).
    After the last stage every weight is on its grid; `float_state` loads into
    `build_quant_model` (whose quantizer maps on-grid weights onto the same codes) for
    deployment, after `calibrate`."""
    net = net or network_spec(float_model, (float_model.cfg.in_channels, float_model.cfg.image_size, float_model.cfg.image_size))
    torch.manual_seed(seed)
    model = BAQFairCNN(float_model, alloc, net, learn_bits=False, weight_only=weight_only, dead_zone=None)
    for q in model.quantizers().values():
        q.quantized.fill_(False)
    model.calibrate(splits.train.loader(batch_size, shuffle=True, seed=seed), batches=calib_batches)
    plan = _stage_plan(model.units, stages, order, sens, alloc)
    by_name = {u.name: u for u in model.units}
    frozen: dict[str, torch.Tensor] = {}
    records: list[dict] = []

    def restore():
        with torch.no_grad():
            for name, rows in frozen.items():
                u = by_name[name]
                model.latent_weight(u.layer)[u.start : u.stop].copy_(rows)

    for s, names in enumerate(plan):
        with torch.no_grad():
            for name in names:
                u = by_name[name]
                q = model.quantizer(u.layer)
                q.quantized[q.unit_names.index(name)] = True
                w = model.latent_weight(u.layer)
                wq = q(w)  # this unit's rows are now quantized (others as they are)
                frozen[name] = wq[u.start : u.stop].detach().clone()
        restore()
        history = []
        if epochs_per_stage > 0:
            opt, sched = _optimizer(
                [{"params": model.model_parameters() + model.act_parameters(), "lr": lr}],
                epochs_per_stage * _steps_per_epoch(splits, batch_size),
            )
            for epoch in range(epochs_per_stage):
                model.train()
                total, n = 0.0, 0
                loader = splits.train.loader(batch_size, shuffle=True, seed=seed + 1000 * s + epoch)
                bar = tqdm(loader, desc=f"iterative QAT stage {s + 1}/{len(plan)}", disable=None if progress else True, leave=False)
                for x, y, g in bar:
                    loss = fairness_loss(model(x), y, g, fairness_lambda)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    restore()
                    total += float(loss.detach()) * len(y)
                    n += len(y)
                val = evaluate_groups(model, splits.val)
                history.append({"epoch": epoch + 1, "train_loss": total / max(n, 1), "val_mean_group_acc": val["mean_group_acc"],
                                "val_worst_group_acc": val["worst_group_acc"]})
        records.append({"stage": s + 1, "units": list(names), "frozen_so_far": list(frozen), "history": history})
    model.eval()
    return IterativeQATResult(model=model, stages=records, frozen=frozen, float_state=model.float_state(prune_dead_zone=False))
