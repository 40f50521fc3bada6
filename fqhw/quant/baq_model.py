"""BAQ's fake-quant twin of a FairCNN (`BAQFairCNN`): per allocation unit a weight
quantizer whose width is learned (`LearnedWidthWeightQuant`: a sigmoid-bounded continuous
width, rounded straight-through, with an optional learned dead zone), activations
fake-quantized at the warm start's widths (`ActFakeQuant`). See fqhw.quant.baq for the
design choices and the training."""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from fqhw.allocator.allocation import Allocation
from fqhw.errors import FqhwError
from fqhw.models.cnn import FairCNN
from fqhw.network import NetworkSpec, network_spec

BIT_RANGE = (2, 8)
ROUND_EDGE = 0.01  # b_cont stays this far inside [b_min - 1/2, b_max + 1/2]
DEAD_ZONE_INIT = -8.0  # dz_logit at start: d = sigmoid(-8) * max|w| = 3.4e-4 * max|w|
DEAD_ZONE_TAU = 0.5  # width of the dead zone's surrogate sigmoid, in quantization steps
DEAD_ZONE_MODES = ("grid", "reference")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (exactly: x - x.detach() is exactly 0), identity backward."""
    return torch.round(x).detach() + (x - x.detach())


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

