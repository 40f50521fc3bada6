"""Output-channel groups: a FairCNN layer built as one quantized layer per channel group.

The allocator may give the output channels of a layer different weight widths, in groups
(`fqhw.network.split_channel_groups`: units "<layer>:g<k>", each MH / G channels, the
groups of a layer sharing one activation width). QONNX's Quant node, FINN and hls4ml need
one scalar width per quantizer, so such a layer is built here as G layers:

    x --+-- conv_0 (w_0 bits) - BN[slice 0] --+-- act (shared) - pool --+
        |   ...                                                          +-- cat -> next
        +-- conv_G-1 (w_G-1 bits) - BN[slice G-1] - act (shared) - pool -+

- conv_k holds output channels [k*m, (k+1)*m) of the float conv (m = C_out / G) with its
  own weight quantizer; BN_k is the same slice of the float BatchNorm. Weight scales are
  per output channel, so slicing changes no weight code and no scale.
- ONE QuantReLU instance quantizes every group's output: the groups share the layer's
  activation width and, being one quantizer, one scale, so the concatenation is a plain
  concatenation of integer codes (Brevitas' cat of QuantTensors checks that the scales
  agree) and the next layer reads one tensor on one grid, exactly as the unsplit layer.
- each group pools its own channels before the concatenation (max pooling is per
  channel, so this is the same function): that is how FINN builds it and how
  `fqhw.hwmodels.finn` prices it (each group its own MVAU and pool; FINN joins the
  streams with a StreamingConcat and forks the input with a DuplicateStreams).
- a grouped head is G bias-free QuantLinears whose float outputs are concatenated; its
  integer accumulator is the concatenation of theirs.

So the grouped model computes exactly what the unsplit one computes when all groups have
the same width (checked in tests), and its integer trace uses the unsplit keys
("<layer>.act" is the concatenation of the groups' codes in channel order): the traces of
the grouped and the unsplit model, and of every backend, compare key for key.

`GroupedQuantFairCNN` has the interface of `fqhw.quant.qmodel.QuantFairCNN` (input_quant,
features, flatten, head, `layers`: one `QuantLayer` per allocation unit), so calibration,
QAT, `snap_thresholds`, `integer_trace` and `export_qonnx` take it as they are;
`fqhw.quant.qmodel.build_quant_model` builds it for an allocation with channel groups.
The power-of-two scheme of the hls4ml backend (`fqhw.quant.po2.Po2FairCNN`) builds its
grouped convs from the same pieces (`layer_groups`, `group_conv_geometry`, a
`GroupedConvBlock` without BatchNorm, which it folds into each group's conv and bias).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.errors import FqhwError
from fqhw.models.cnn import FairCNN, copy_pool
from fqhw.units import parse_unit

@dataclass(frozen=True)
class LayerGroups:
    """The allocation units of one model layer: itself, or its channel groups in order."""

    layer: str  # the float model's name, e.g. "features.1.conv"
    units: tuple[LayerAllocation, ...]  # one (whole layer) or G (groups 0..G-1)

    @property
    def grouped(self) -> bool:
        return parse_unit(self.units[0].name)[1] is not None

    @property
    def act_bits(self) -> int | None:
        return self.units[0].act_bits


def has_channel_groups(alloc: Allocation) -> bool:
    """Whether any unit of `alloc` is a channel group ("<layer>:g<k>")."""
    return any(parse_unit(la.name)[1] is not None for la in alloc.layers)


def layer_groups(alloc: Allocation, layer_names: list[str], out_channels: dict[str, int]) -> "OrderedDict[str, LayerGroups]":
    """The units of each layer of the model (in `layer_names` order), checked: every unit
    belongs to a model layer, groups are numbered 0..G-1 and contiguous in the allocation,
    G divides the layer's output channels, and the groups share one activation width (the
    allocator ties them; a built model can only have one, see the module docstring)."""
    by_layer: dict[str, list[tuple[int | None, LayerAllocation]]] = {}
    seen_order: list[str] = []
    for la in alloc.layers:
        layer, k = parse_unit(la.name)
        if layer not in layer_names:
            raise FqhwError(f"allocation unit {la.name!r} is not a layer of the model (layers: {layer_names})")
        if seen_order and seen_order[-1] != layer and layer in by_layer:
            raise FqhwError(f"the channel groups of {layer} are not contiguous in the allocation")
        if not seen_order or seen_order[-1] != layer:
            seen_order.append(layer)
        by_layer.setdefault(layer, []).append((k, la))
    missing = [n for n in layer_names if n not in by_layer]
    if missing:
        raise FqhwError(f"allocation does not match the model: layers {missing} have no unit")
    out: OrderedDict[str, LayerGroups] = OrderedDict()
    for name in layer_names:
        entries = by_layer[name]
        ks = [k for k, _ in entries]
        if ks == [None]:
            out[name] = LayerGroups(name, (entries[0][1],))
            continue
        if None in ks or ks != list(range(len(ks))):
            raise FqhwError(f"{name}: channel groups must be {name}:g0 .. :g{len(ks) - 1} in order, got {[la.name for _, la in entries]}")
        g = len(ks)
        if out_channels[name] % g:
            raise FqhwError(f"{name}: {g} channel groups do not divide its {out_channels[name]} output channels")
        acts = {la.act_bits for _, la in entries}
        if len(acts) != 1:
            raise FqhwError(f"{name}: its channel groups must share one activation width, got {sorted(acts, key=str)}")
        out[name] = LayerGroups(name, tuple(la for _, la in entries))
    return out


def group_slices(channels: int, groups: int) -> list[slice]:
    """The output channels of each of `groups` equal groups, in order (k*m .. (k+1)*m)."""
    if groups < 1 or channels % groups:
        raise FqhwError(f"{groups} channel groups do not divide {channels} output channels")
    m = channels // groups
    return [slice(k * m, (k + 1) * m) for k in range(groups)]


def group_conv_geometry(fconv: nn.Conv2d, groups: int) -> nn.Conv2d:
    """A bias-free float conv with `fconv`'s geometry but 1/`groups` of its output channels:
    the template each group's quantized conv is built from (`quant_conv_like`)."""
    m = group_slices(fconv.out_channels, groups)[0].stop
    return nn.Conv2d(fconv.in_channels, m, fconv.kernel_size, stride=fconv.stride, padding=fconv.padding, groups=fconv.groups, bias=False)


class GroupedConvBlock(nn.Module):
    """One FairCNN block whose conv is split into output-channel groups (see the module
    docstring): groups.<k>.conv / groups.<k>.bn per group, one shared `relu`, one `pool`
    (stateless, applied to each group). `bns` None: no BatchNorm (the power-of-two scheme,
    fqhw.quant.po2, folds it into each group's conv and bias), groups.<k>.conv only."""

    def __init__(self, convs: list[nn.Module], bns: list[nn.BatchNorm2d] | None, relu: nn.Module, pool: nn.MaxPool2d):
        super().__init__()
        if bns is None:
            self.groups = nn.ModuleList(nn.Sequential(OrderedDict(conv=c)) for c in convs)
        else:
            self.groups = nn.ModuleList(nn.Sequential(OrderedDict(conv=c, bn=b)) for c, b in zip(convs, bns))
        self.relu = relu
        self.pool = pool

    def forward(self, x):
        return torch.cat([self.pool(self.relu(g(x))) for g in self.groups], dim=1)


class GroupedHead(nn.Module):
    """A bias-free head split into output-channel groups: one QuantLinear per group, float
    outputs concatenated (each group's output is its integer accumulator times its scales)."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        self.groups = nn.ModuleList(linears)

    def forward(self, x):
        return torch.cat([lin(x) for lin in self.groups], dim=1)


class GroupedQuantFairCNN(nn.Module):
    """The FINN-scheme quantized FairCNN (`fqhw.quant.qmodel.QuantFairCNN`'s quantizers)
    with each layer built as its allocation units say: whole, or one quantized layer per
    output-channel group. `layers` has one QuantLayer per unit, in allocation order."""

    def __init__(self, float_model: FairCNN, alloc: Allocation):
        from brevitas.nn import QuantIdentity, QuantLinear, QuantReLU

        from fqhw.quant.layers import ActQuant, InputQuant, QuantLayer, WeightQuant, quant_conv_like

        super().__init__()
        cfg = float_model.cfg
        self.cfg = cfg
        if alloc.input_bits != 8:
            raise FqhwError(f"only 8-bit inputs are supported (allocation has input_bits={alloc.input_bits})")
        if float_model.head.bias is not None:
            raise FqhwError("the head must be bias-free (FairCNN's is)")
        names = [f"features.{i}.conv" for i in range(len(cfg.channels))] + ["head"]
        out_ch = {f"features.{i}.conv": c for i, c in enumerate(cfg.channels)}
        out_ch["head"] = float_model.head.out_features
        self.plan = layer_groups(alloc, names, out_ch)
        self.input_quant = QuantIdentity(act_quant=InputQuant, return_quant_tensor=True)
        units: list[QuantLayer] = []
        blocks = []
        for i, fblock in enumerate(float_model.features):
            lg = self.plan[f"features.{i}.conv"]
            if lg.act_bits is None:
                raise FqhwError(f"layer features.{i}.conv needs act_bits (its ReLU is quantized)")
            fconv: nn.Conv2d = fblock.conv
            relu = QuantReLU(act_quant=ActQuant, bit_width=lg.act_bits, return_quant_tensor=True)
            pool = copy_pool(fblock.pool)
            bn_args = dict(eps=fblock.bn.eps, momentum=fblock.bn.momentum)
            if not lg.grouped:
                la = lg.units[0]
                conv = quant_conv_like(fconv, la.weight_bits)
                bn = nn.BatchNorm2d(fblock.bn.num_features, **bn_args)
                blocks.append(nn.Sequential(OrderedDict(conv=conv, bn=bn, relu=relu, pool=pool)))
                units.append(QuantLayer(la.name, f"features.{i}", conv, relu, la.weight_bits, la.act_bits))
                continue
            part = group_conv_geometry(fconv, len(lg.units))
            m = part.out_channels
            convs = [quant_conv_like(part, la.weight_bits) for la in lg.units]
            bns = [nn.BatchNorm2d(m, **bn_args) for _ in lg.units]
            blocks.append(GroupedConvBlock(convs, bns, relu, pool))
            for k, (la, conv) in enumerate(zip(lg.units, convs)):
                units.append(QuantLayer(la.name, f"features.{i}.groups.{k}", conv, relu, la.weight_bits, la.act_bits, group=lg.layer))
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        fhead: nn.Linear = float_model.head
        lh = self.plan["head"]
        if lh.act_bits is not None:
            raise FqhwError("the head has no output activation: its act_bits must be None")

        def linear(out_features: int, bits: int) -> QuantLinear:
            return QuantLinear(
                fhead.in_features, out_features, bias=False, weight_quant=WeightQuant, weight_bit_width=int(bits), return_quant_tensor=False
            )

        if lh.grouped:
            m = fhead.out_features // len(lh.units)
            lins = [linear(m, la.weight_bits) for la in lh.units]
            self.head = GroupedHead(lins)
            for k, (la, lin) in enumerate(zip(lh.units, lins)):
                units.append(QuantLayer(la.name, f"head.groups.{k}", lin, None, la.weight_bits, None, group="head"))
        else:
            la = lh.units[0]
            self.head = linear(fhead.out_features, la.weight_bits)
            units.append(QuantLayer(la.name, "head", self.head, None, la.weight_bits, None))
        self._unit_names = [u.name for u in units]
        self.load_float_weights(float_model)

    @property
    def layers(self) -> "OrderedDict[str, object]":
        """One QuantLayer per allocation unit, in allocation order (a group's `block` holds
        its own `bn`; its `act` is the layer's shared QuantReLU; `group` names the layer)."""
        from fqhw.quant.layers import QuantLayer

        out: OrderedDict[str, QuantLayer] = OrderedDict()
        for i, block in enumerate(self.features):
            lg = self.plan[f"features.{i}.conv"]
            if isinstance(block, GroupedConvBlock):
                for k, (la, g) in enumerate(zip(lg.units, block.groups)):
                    out[la.name] = QuantLayer(la.name, f"features.{i}.groups.{k}", g.conv, block.relu, la.weight_bits, la.act_bits, group=lg.layer)
            else:
                la = lg.units[0]
                out[la.name] = QuantLayer(la.name, f"features.{i}", block.conv, block.relu, la.weight_bits, la.act_bits)
        lh = self.plan["head"]
        if isinstance(self.head, GroupedHead):
            for k, (la, lin) in enumerate(zip(lh.units, self.head.groups)):
                out[la.name] = QuantLayer(la.name, f"head.groups.{k}", lin, None, la.weight_bits, None, group="head")
        else:
            la = lh.units[0]
            out[la.name] = QuantLayer(la.name, "head", self.head, None, la.weight_bits, None)
        return out

    def load_float_weights(self, float_model: FairCNN) -> None:
        """Each group gets its slice of the float layer's output channels (conv weights,
        BatchNorm affine parameters and running statistics)."""
        with torch.no_grad():
            for qb, fb in zip(self.features, float_model.features):
                if isinstance(qb, GroupedConvBlock):
                    m = fb.conv.out_channels // len(qb.groups)
                    for k, g in enumerate(qb.groups):
                        sl = slice(k * m, (k + 1) * m)
                        g.conv.weight.copy_(fb.conv.weight[sl])
                        g.bn.load_state_dict(_bn_slice(fb.bn.state_dict(), sl))
                else:
                    qb.conv.weight.copy_(fb.conv.weight)
                    qb.bn.load_state_dict(fb.bn.state_dict())
            if isinstance(self.head, GroupedHead):
                m = float_model.head.out_features // len(self.head.groups)
                for k, lin in enumerate(self.head.groups):
                    lin.weight.copy_(float_model.head.weight[k * m : (k + 1) * m])
            else:
                self.head.weight.copy_(float_model.head.weight)

    def forward(self, x):
        x = self.input_quant(x)
        x = self.features(x)
        x = self.flatten(x)
        return self.head(x)


def _bn_slice(state: dict, sl: slice) -> dict:
    """The BatchNorm state for channels `sl` (per-channel tensors sliced, counters kept)."""
    return {k: (v[sl].clone() if v.dim() == 1 else v.clone()) for k, v in state.items()}


def build_grouped_quant_model(float_model: FairCNN, alloc: Allocation) -> GroupedQuantFairCNN:
    """A Brevitas copy of `float_model` with each layer built as `alloc`'s units say (whole
    or in output-channel groups); weights and BN statistics copied, activation scales at
    Brevitas' defaults (run `fqhw.quant.qmodel.calibrate`)."""
    from fqhw.data.dataset import INPUT_SCALE

    qmodel = GroupedQuantFairCNN(float_model, alloc)
    qmodel.train(float_model.training)
    scale = float(qmodel.input_quant.act_quant.scale())
    if scale != INPUT_SCALE:
        raise AssertionError(f"input quantizer scale {scale!r} is not exactly {INPUT_SCALE!r}")
    return qmodel


def split_quant_model(qmodel: nn.Module, float_model: FairCNN, alloc: Allocation) -> GroupedQuantFairCNN:
    """The grouped model of `alloc` with the quantized parameters of the whole-layer model
    `qmodel` (a calibrated or trained `QuantFairCNN`): weights and BatchNorm sliced per
    group, every activation quantizer's state (its learned scale) copied. With every group
    at its layer's widths in `qmodel`, the two compute the same function: the check that
    splitting by itself changes nothing. `float_model` gives the geometry."""
    grouped = build_grouped_quant_model(float_model, alloc)
    with torch.no_grad():
        # weights and BN through a FairCNN-shaped carrier holding qmodel's current values
        carrier = FairCNN(float_model.cfg)
        for cb, qb in zip(carrier.features, qmodel.features):
            cb.conv.weight.copy_(qb.conv.weight)
            cb.bn.load_state_dict(qb.bn.state_dict())
        carrier.head.weight.copy_(qmodel.head.weight)
        grouped.load_float_weights(carrier)
        grouped.input_quant.load_state_dict(qmodel.input_quant.state_dict())
        for gb, qb in zip(grouped.features, qmodel.features):
            gb.relu.load_state_dict(qb.relu.state_dict())
    grouped.train(qmodel.training)
    return grouped
