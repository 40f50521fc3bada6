"""Power-of-two quantization of a FairCNN: the scheme the hls4ml backend needs.

FINN absorbs per-channel float weight scales, BatchNorm and per-tensor float activation
scales into integer thresholds (fqhw.quant.qmodel). hls4ml does not: it maps every tensor
onto an `ap_fixed` type, so a scale is only exact when it is a power of two (the binary
point of the type), and a float BatchNorm or an unquantized bias is computed in whatever
fixed-point type the layer is given and rounds differently from Brevitas. So this scheme:

- BatchNorm is folded into the convolution when the model is built (w' = w * g / sd,
  b = beta - mean * g / sd, sd = sqrt(var + eps)) and QAT trains the folded conv: the
  exported graph has no BatchNormalization for hls4ml to evaluate in fixed point.
- weights: narrow-range signed integers of the allocated width with one power-of-two
  scale per tensor, 2^round(log2(max |w| / (2^(b-1) - 1))) (Brevitas
  `Int8WeightPerTensorFixedPoint` with the exponent rounded, not ceiled: see
  `Po2WeightQuant`). Per-channel scales are refused by hls4ml together with a bias, and a
  per-channel po2 scale would not fit one `ap_fixed` weight type either.
- bias: quantized to 32-bit integers on the accumulator's grid (scale = input scale x
  weight scale, Brevitas `Int32Bias`): the bias is then an exact addend of the integer
  accumulator in every tool (an unquantized bias was seen to be off by up to 3 codes).
  32 bits rather than 16 because the accumulator grid can be as fine as 2^-17 (8-bit
  input at 2^-8, a weight scale of 2^-9), where a 16-bit bias would clip at 0.25.
- activations: unsigned, the allocated width, a learned power-of-two scale per tensor
  (Brevitas `Uint8ActPerTensorFixedPoint`, exponent rounded, initialised by
  `fqhw.quant.qmodel.calibrate`).
  hls4ml turns each such Quant into a linear activation of type ufixed<a, a + log2(s)>,
  rounding half to even (AP_RND_CONV) like torch.round and qonnx.
- input: the same constant 2^-8 unsigned 8-bit quantizer as the FINN scheme
  (fqhw.quant.qmodel.InputQuant): 2^-8 is a power of two, the input codes are the pixels.
- pooling as in FairCNN (2x2 max pools, a global max pool last), then the bias-free
  QuantLinear head, whose integer accumulator is the model's integer output.

Every value in the model is then an integer times a power of two, and the accumulator of
every layer is an exact integer in Brevitas (float64), qonnx and hls4ml's fixed point:
ties at k + 0.5 do occur (y / s_a is a dyadic rational) but every tool rounds them half to
even, so there is nothing like FINN's threshold snapping to do.

`po2_integer_trace` gives the same keys as `fqhw.quant.qmodel.integer_trace` ("input",
"<layer>.act" before pooling, "head.acc"), so `fqhw.backends.verify.check_bit_exact` can
compare it with `qonnx_integer_trace` and the hls4ml C simulation.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import torch
from brevitas.core.function_wrapper import RoundSte
from brevitas.nn import QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant import Int8WeightPerTensorFixedPoint, Int32Bias, Uint8ActPerTensorFixedPoint
from torch import nn

from fqhw.allocator.allocation import Allocation
from fqhw.data.dataset import INPUT_SCALE
from fqhw.errors import FqhwError
from fqhw.models.cnn import FairCNN, copy_pool
from fqhw.quant.layers import InputQuant, QuantLayer, int_codes, quant_conv_like
from fqhw.quant.qmodel import trace_codes

SCHEME = "po2"  # the name reports and the flow use for this quantization scheme


class Po2WeightQuant(Int8WeightPerTensorFixedPoint):
    """Narrow signed weights, one power-of-two scale per tensor, width set per layer.

    The exponent is log2(max |w| / (2^(b-1) - 1)) *rounded* (Brevitas' default ceils it,
    which never clips but leaves on average a quarter, at worst half, of the range unused):
    on the default FairCNN at uniform 4 bits, rounding raised test accuracy after
    calibration from 63.0 to 79.7 % (bench/po2_vs_finn.py setup); the few largest weights
    saturate instead."""

    restrict_value_float_to_int_impl = RoundSte


class Po2ActQuant(Uint8ActPerTensorFixedPoint):
    """Unsigned activations, one learned power-of-two scale per tensor, width set per layer;
    the learned log2 scale is rounded (not ceiled) for the same reason as the weights'
    (uniform 4-bit after QAT: worst group 50.0 % with ceiled, 54.0 % with rounded
    activation exponents, both with rounded weight exponents)."""

    restrict_value_float_to_int_impl = RoundSte


class Po2BiasQuant(Int32Bias):
    """32-bit bias on the accumulator grid (input scale x weight scale)."""


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a conv that computes bn(conv(x)) in eval mode, in float64 then
    cast back, so the fold itself adds no rounding beyond float32's."""
    w = conv.weight.detach().double()
    sd = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    g = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(sd)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(sd)
    b0 = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(sd)
    k = g / sd
    weight = w * k.reshape(-1, 1, 1, 1)
    bias = beta + (b0 - bn.running_mean.detach().double()) * k
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


class Po2FairCNN(nn.Module):
    """FairCNN with BN folded and power-of-two quantizers (see the module docstring).

    Module names follow FairCNN where a module survives (features.<i>.conv / .relu / .pool,
    flatten, head; no .bn), plus `input_quant`; `layers` maps the allocation's units to
    `QuantLayer` in order, like `QuantFairCNN.layers`, so that `export_qonnx` names the
    QONNX layers the same way.

    Output-channel groups (allocation units "<layer>:g<k>", fqhw.quant.channel_groups): a
    grouped conv becomes a `GroupedConvBlock` without BatchNorm, features.<i>.groups.<k>.conv,
    one QuantConv2d per group with its own weight width and so its own power-of-two weight
    scale (per-tensor over the group's channels: that is what one hls4ml weight type per
    conv holds), its slice of the folded weights and bias, and its own Int32 bias on its own
    accumulator grid; ONE QuantReLU for the whole layer, so the groups' outputs share one
    scale and their concatenation is a plain concatenation of codes. A grouped head is
    refused: its groups' accumulators would sit on different grids, which the single
    integer output of the hls4ml design does not express (the flow never groups the head).
    """

    scheme = SCHEME

    def __init__(self, float_model: FairCNN, alloc: Allocation, weight_quant=Po2WeightQuant, act_quant=Po2ActQuant):
        from fqhw.quant.channel_groups import GroupedConvBlock, group_conv_geometry, layer_groups
        from fqhw.units import parse_unit

        super().__init__()
        cfg = float_model.cfg
        self.cfg = cfg
        if alloc.input_bits != 8:
            raise FqhwError(f"only 8-bit inputs are supported (allocation has input_bits={alloc.input_bits}); set input_bits to 8")
        names = [f"features.{i}.conv" for i in range(len(float_model.features))] + ["head"]
        known = {parse_unit(la.name)[0] for la in alloc.layers}
        missing = [n for n in names if n not in known]
        extra = sorted(known - set(names))
        if missing or extra:
            raise FqhwError(
                f"allocation does not match the model: missing {missing}, unknown {extra}; "
                f"give one entry per layer of {names}, or its channel groups '<layer>:g<k>'"
            )
        out_ch = {f"features.{i}.conv": fb.conv.out_channels for i, fb in enumerate(float_model.features)}
        out_ch["head"] = float_model.head.out_features
        self.plan = layer_groups(alloc, names, out_ch)  # groups 0..G-1, contiguous, dividing, one act width
        if self.plan["head"].grouped:
            raise FqhwError(
                "the po2 (hls4ml) scheme does not split the head into channel groups: give the head one unit "
                "(--channel-groups splits the convs after the first only)"
            )
        for la in alloc.layers:
            if not 2 <= la.weight_bits <= 16:
                raise FqhwError(f"layer {la.name}: weight_bits={la.weight_bits} is outside 2..16; choose a width in that range")
        self.input_quant = QuantIdentity(act_quant=InputQuant, return_quant_tensor=True)
        blocks = []
        for i, fblock in enumerate(float_model.features):
            name = f"features.{i}.conv"
            lg = self.plan[name]
            if lg.act_bits is None or not 2 <= lg.act_bits <= 16:
                raise FqhwError(f"layer {name}: act_bits={lg.act_bits}; its ReLU output needs a width in 2..16")
            fconv: nn.Conv2d = fblock.conv
            relu = QuantReLU(act_quant=act_quant, bit_width=lg.act_bits, return_quant_tensor=True)
            pool = copy_pool(fblock.pool)
            if lg.grouped:
                part = group_conv_geometry(fconv, len(lg.units))
                convs = [quant_conv_like(part, la.weight_bits, weight_quant, bias=True, bias_quant=Po2BiasQuant) for la in lg.units]
                blocks.append(GroupedConvBlock(convs, None, relu, pool))
            else:
                conv = quant_conv_like(fconv, lg.units[0].weight_bits, weight_quant, bias=True, bias_quant=Po2BiasQuant)
                blocks.append(nn.Sequential(OrderedDict(conv=conv, relu=relu, pool=pool)))
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        fhead: nn.Linear = float_model.head
        if fhead.bias is not None:
            raise FqhwError("the head must be bias-free (FairCNN's is): its integer accumulator is the output")
        lh = alloc.layer("head")
        self.head = QuantLinear(
            fhead.in_features,
            fhead.out_features,
            bias=False,
            weight_quant=weight_quant,
            weight_bit_width=lh.weight_bits,
            return_quant_tensor=False,
        )
        self._names = names
        self.load_float_weights(float_model)

    @property
    def layers(self) -> "OrderedDict[str, QuantLayer]":
        """One QuantLayer per allocation unit, in allocation order; a channel group's `act`
        is its layer's shared QuantReLU and its `group` names the layer."""
        out: OrderedDict[str, QuantLayer] = OrderedDict()
        for i, block in enumerate(self.features):
            lg = self.plan[f"features.{i}.conv"]
            if lg.grouped:
                for k, (la, g) in enumerate(zip(lg.units, block.groups)):
                    out[la.name] = QuantLayer(la.name, f"features.{i}.groups.{k}", g.conv, block.relu, la.weight_bits, la.act_bits, group=lg.layer)
            else:
                la = lg.units[0]
                out[la.name] = QuantLayer(la.name, f"features.{i}", block.conv, block.relu, la.weight_bits, la.act_bits)
        la = self.plan["head"].units[0]
        out["head"] = QuantLayer("head", "head", self.head, None, la.weight_bits, None)
        return out

    def load_float_weights(self, float_model: FairCNN) -> None:
        """Copy the float weights, folding each block's BatchNorm (running statistics) into
        its conv; a grouped conv's groups get their slices of the folded weight and bias
        (folding is per output channel, so fold-then-slice is slice-then-fold)."""
        from fqhw.quant.channel_groups import group_slices

        with torch.no_grad():
            for i, (qb, fb) in enumerate(zip(self.features, float_model.features)):
                w, b = fold_bn(fb.conv, fb.bn)
                if self.plan[f"features.{i}.conv"].grouped:
                    for g, sl in zip(qb.groups, group_slices(w.shape[0], len(qb.groups))):
                        g.conv.weight.copy_(w[sl])
                        g.conv.bias.copy_(b[sl])
                else:
                    qb.conv.weight.copy_(w)
                    qb.conv.bias.copy_(b)
            self.head.weight.copy_(float_model.head.weight)

    def forward(self, x):
        x = self.input_quant(x)
        x = self.features(x)
        x = self.flatten(x)
        return self.head(x)


def build_po2_model(float_model: FairCNN, alloc: Allocation, weight_quant=Po2WeightQuant, act_quant=Po2ActQuant) -> Po2FairCNN:
    """A power-of-two Brevitas copy of `float_model` (BN folded) quantized as `alloc` says.

    Activation scales start at Brevitas' defaults: run `fqhw.quant.qmodel.calibrate` before
    fine-tuning (`fqhw.quant.qat.finetune`) or using the model.
    """
    if not isinstance(float_model, FairCNN):
        raise FqhwError(
            f"the po2 (hls4ml) scheme is built for the default FairCNN, got {type(float_model).__name__}; "
            "use the default model (--model cnn)"
        )
    qmodel = Po2FairCNN(float_model, alloc, weight_quant=weight_quant, act_quant=act_quant)
    qmodel.train(float_model.training)
    scale = float(qmodel.input_quant.act_quant.scale())
    if scale != INPUT_SCALE:
        raise AssertionError(f"input quantizer scale {scale!r} is not exactly {INPUT_SCALE!r}")
    return qmodel


def split_po2_model(qmodel: Po2FairCNN, float_model: FairCNN, alloc: Allocation) -> Po2FairCNN:
    """The po2 model of `alloc` (whole layers or channel groups) holding the parameters of
    `qmodel` (a calibrated or trained po2 model, usually of whole layers): each group gets its
    slice of the folded weights and bias, every activation quantizer's state (its learned
    scale) is copied. With every group at its layer's widths and its power-of-two weight
    exponent equal to the layer's (each group's max |w| in the same rounding bucket: the
    weight scale is per tensor, so a group of small weights gets a finer one), the two
    compute the same function, the check that splitting by itself changes nothing.
    `float_model` gives the geometry."""
    from fqhw.quant.channel_groups import group_slices

    split = build_po2_model(float_model, alloc)
    with torch.no_grad():
        for i, (sb, qb) in enumerate(zip(split.features, qmodel.features)):
            if qmodel.plan[f"features.{i}.conv"].grouped:
                raise FqhwError(f"features.{i}.conv of the source model is already split; split a model of whole layers")
            w, b = qb.conv.weight, qb.conv.bias
            if split.plan[f"features.{i}.conv"].grouped:
                for g, sl in zip(sb.groups, group_slices(w.shape[0], len(sb.groups))):
                    g.conv.weight.copy_(w[sl])
                    g.conv.bias.copy_(b[sl])
            else:
                sb.conv.weight.copy_(w)
                sb.conv.bias.copy_(b)
            sb.relu.load_state_dict(qb.relu.state_dict())
        split.input_quant.load_state_dict(qmodel.input_quant.state_dict())
        split.head.weight.copy_(qmodel.head.weight)
    split.train(qmodel.training)
    return split


# --------------------------------------------------------------------------- integer view


def _is_po2(s: torch.Tensor) -> bool:
    s = s.detach().double().reshape(-1)
    if s.numel() == 0 or not torch.all(s == s[0]) or float(s[0]) <= 0:
        return False
    m, _ = math.frexp(float(s[0]))
    return m == 0.5


def scales(qmodel: Po2FairCNN) -> dict:
    """Per layer, the power-of-two exponents the hardware types are built from:
    {"input": e_in, "<layer>": {"weight": e_w, "act": e_a or None, "bias_bits": 32 or None}},
    scale = 2^e. Raises AssertionError if a scale is not a single power of two (it would not
    be exact in hls4ml)."""
    was_training = qmodel.training
    qmodel.eval()
    out: dict = {}
    try:
        with torch.no_grad():
            s_in = qmodel.input_quant.act_quant.scale()
            if not _is_po2(s_in):
                raise AssertionError("input scale is not a power of two")
            out["input"] = int(round(math.log2(float(s_in))))
            for name, ql in qmodel.layers.items():
                qw = ql.compute.quant_weight()
                if not _is_po2(qw.scale):
                    raise AssertionError(f"{name}: weight scale is not one power of two")
                d = {"weight": int(round(math.log2(float(qw.scale.reshape(-1)[0])))), "act": None, "bias_bits": None}
                if ql.act is not None:
                    sa = ql.act.act_quant.scale()
                    if not _is_po2(sa):
                        raise AssertionError(f"{name}: activation scale is not a power of two")
                    d["act"] = int(round(math.log2(float(sa))))
                if getattr(ql.compute, "bias", None) is not None:
                    d["bias_bits"] = int(Po2BiasQuant.bit_width)
                out[name] = d
    finally:
        qmodel.train(was_training)
    return out


def float64_po2_twin(qmodel: Po2FairCNN) -> Po2FairCNN:
    """A float64 copy of `qmodel` whose quantized parameters equal the original's bit for bit.

    Why float64: with power-of-two scales every product is exact, but a float32 sum of
    27..576 products loses bits once the accumulator passes 2^24 grid steps (8-bit inputs and
    weights, a 3x3x64 fan-in), and then a code can come out differently from hls4ml's exact
    fixed point. A plain `.double()` copy suffices here (unlike the FINN scheme's float
    scales): float32 weights are exact in float64, w / 2^e is exact in both, and the
    exponents are recomputed from the same values; the weight codes, weight scales and
    activation scales are checked to be unchanged all the same (a log2 landing within
    float32 error of k + 0.5 would round differently).
    """
    twin = copy.deepcopy(qmodel).double()
    twin.eval()
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            for (name, ql), tl in zip(qmodel.layers.items(), twin.layers.values()):
                qw, tw = ql.compute.quant_weight(), tl.compute.quant_weight()
                if not (torch.equal(int_codes(tw, f"{name} weight"), int_codes(qw, f"{name} weight")) and torch.equal(tw.scale.detach(), qw.scale.detach().double())):
                    raise AssertionError(f"{name}: the float64 twin's weight codes or scale differ")
                if ql.act is not None:
                    if not torch.equal(tl.act.act_quant.scale().detach(), ql.act.act_quant.scale().detach().double()):
                        raise AssertionError(f"{name}: the float64 twin's activation scale differs")
    finally:
        qmodel.train(was_training)
    return twin


def po2_integer_trace(qmodel: Po2FairCNN, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Integer codes of the po2 Brevitas model on `x` (N, C, H, W floats = pixel/256), int64,
    NCHW, evaluated on `float64_po2_twin` (exact: see there).

    Keys as `fqhw.quant.qmodel.integer_trace`: "input", "<layer>.act" (each ReLU's codes,
    before pooling), "head.acc" (integer head weights x integer head input codes, exact
    int64). These are the integers the hls4ml C simulation must reproduce.
    """
    return trace_codes(float64_po2_twin(qmodel), x.detach().double())


def integer_outputs(qmodel: Po2FairCNN, x: torch.Tensor) -> np.ndarray:
    """The head's integer accumulator (N, classes) int64: the logits in units of the head's
    scale, what the hls4ml C simulation's output must equal."""
    return po2_integer_trace(qmodel, x)["head.acc"]


# --------------------------------------------------------------------------- accuracy cost


def compare_schemes(
    float_model: FairCNN,
    splits,
    allocations: dict[str, Allocation],
    qat_epochs: int = 3,
    qat_lr: float = 5e-4,
    fairness_lambda: float = 0.5,
    seed: int = 0,
    calib_batches: int = 8,
    progress: bool = False,
) -> dict:
    """The accuracy the po2 (hls4ml) scheme costs against the FINN float-scale scheme, on the
    same float model, data and allocation, with the flow's recipe for each (calibrate on the
    training split, QAT with the fairness term, keep the best validation epoch; the FINN
    model then gets `snap_thresholds`, as the flow does before its export).

    Why both before and after QAT: the po2 scheme loses accuracy in two places, the per-tensor
    power-of-two weight scale (up to half of the weight range unused, channels with a small BN
    scale left with few levels after folding) and the power-of-two activation scale; the
    calibrated numbers show the raw loss, the QAT numbers what fine-tuning wins back.

    Returns {"float": test metrics, "<alloc>": {"finn": {"calibrated", "qat"}, "po2": {...},
    "delta_qat" / "delta_calibrated": po2 minus finn for overall_acc, mean_group_acc,
    worst_group_acc (points of accuracy x 100), "seconds"}}; metrics as
    `fqhw.quant.qat.evaluate_groups` returns them (test split).
    """
    import time

    from fqhw.quant.qat import evaluate_groups, finetune
    from fqhw.quant.qmodel import build_quant_model, calibrate
    from fqhw.quant.snap import snap_thresholds

    keys = ("overall_acc", "mean_group_acc", "worst_group_acc")

    def brief(m: dict) -> dict:
        out = {k: float(m[k]) for k in keys if k in m}
        if "worst_group" in m:
            out["worst_group"] = m["worst_group"]
        return out

    result: dict = {"float": brief(evaluate_groups(float_model, splits.test)), "qat_epochs": qat_epochs}
    builders = {"finn": build_quant_model, "po2": build_po2_model}
    for name, alloc in allocations.items():
        entry: dict = {}
        for scheme, build in builders.items():
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            qm = build(float_model, alloc)
            calibrate(qm, splits.train.loader(64, shuffle=True, seed=seed), batches=calib_batches)
            calibrated = brief(evaluate_groups(qm, splits.test))
            finetune(qm, splits, epochs=qat_epochs, lr=qat_lr, fairness_lambda=fairness_lambda, seed=seed, progress=progress, desc=f"QAT {scheme} {name}")
            if scheme == "finn":
                snap_thresholds(qm)
            entry[scheme] = {"calibrated": calibrated, "qat": brief(evaluate_groups(qm, splits.test)), "seconds": time.perf_counter() - t0}
        for stage in ("calibrated", "qat"):
            entry[f"delta_{stage}"] = {
                k: 100.0 * (entry["po2"][stage][k] - entry["finn"][stage][k]) for k in keys if k in entry["po2"][stage]
            }
        result[name] = entry
    return result
