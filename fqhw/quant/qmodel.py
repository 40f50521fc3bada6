"""Brevitas model of a FairCNN under an Allocation, and its integer trace.

Quantizer choices (all of them absorbed exactly by FINN's streamlining):

- input: 8-bit unsigned, constant scale 2^-8 (not learned). The model input is pixel/256,
  so the input codes are exactly the uint8 pixels and every backend starts from the same
  integers.
- weights: narrow-range signed integers of the allocated width with one float scale per
  output channel, taken from the channel's max |w| (Brevitas `Int8WeightPerChannelFloat`).
  Per-channel scales keep 2..4-bit layers usable; FINN moves the scale past the MatMul and
  folds it, together with BatchNorm, into the next layer's thresholds (or into the final
  output Mul for the head), so the integer datapath only ever sees the weight codes.
- activations: QuantReLU, unsigned, allocated width, one learned float scale per tensor
  (Brevitas `Uint8ActPerTensorFloat`), initialised from activation statistics by
  `calibrate`. FINN turns BN + ReLU + quantizer into a MultiThreshold / MVAU thresholds.
- head: bias-free QuantLinear: no float add after the last integer accumulator, whose
  value is what `integer_trace` reports as "head.acc".

Float scales and a float BatchNorm mean the activation codes are defined by real-number
rounding of (integer accumulator x scales, BN) at the code boundaries. Every tool that
evaluates this in float32 (Brevitas itself, onnxruntime for QONNX, and FINN, which derives
its integer thresholds in float32) lands on the wrong side of a boundary for a handful of
pre-activations per million that sit within ~1e-7 (relative) of it; the reference trace is
therefore computed in float64 on the same quantized parameters (`float64_twin`).

`snap_thresholds` (fqhw.quant.snap; after the last training step, before export) removes
that ambiguity itself: it puts every code boundary the integer accumulator can reach far from an integer
(nudging the BatchNorm bias, and within 0.1% the BN scale), so that float32 and float64
evaluations round every activation the same way.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from brevitas.graph.calibrate import calibration_mode
from brevitas.nn import QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant_tensor import QuantTensor
from torch import nn

from fqhw.allocator.allocation import Allocation
from fqhw.data.dataset import INPUT_SCALE
from fqhw.errors import FqhwError
from fqhw.intcodes import INT_TOL
from fqhw.models.cnn import FairCNN, copy_pool
from fqhw.quant.layers import ActQuant, InputQuant, QuantLayer, WeightQuant, int_codes, quant_conv_like


class QuantFairCNN(nn.Module):
    """Same module names as FairCNN (features.<i>.{conv,bn,relu,pool}, flatten, head),
    plus `input_quant` in front. `layers` maps allocation names to QuantLayer in order."""

    def __init__(self, float_model: FairCNN, alloc: Allocation):
        super().__init__()
        cfg = float_model.cfg
        self.cfg = cfg
        if alloc.input_bits != 8:
            raise FqhwError(f"only 8-bit inputs are supported (allocation has input_bits={alloc.input_bits})")
        self.input_quant = QuantIdentity(act_quant=InputQuant, return_quant_tensor=True)
        names = [f"features.{i}.conv" for i in range(len(cfg.channels))] + ["head"]
        known = {la.name for la in alloc.layers}
        missing = [n for n in names if n not in known]
        extra = sorted(known - set(names))
        if missing or extra:
            raise FqhwError(
                f"allocation does not match the model: missing {missing}, unknown {extra}; "
                f"expected layers {names}"
            )
        blocks = []
        for i, fblock in enumerate(float_model.features):
            la = alloc.layer(f"features.{i}.conv")
            if la.act_bits is None:
                raise FqhwError(f"layer features.{i}.conv needs act_bits (its ReLU is quantized)")
            fconv: nn.Conv2d = fblock.conv
            conv = quant_conv_like(fconv, la.weight_bits)
            bn = nn.BatchNorm2d(fblock.bn.num_features, eps=fblock.bn.eps, momentum=fblock.bn.momentum)
            relu = QuantReLU(act_quant=ActQuant, bit_width=la.act_bits, return_quant_tensor=True)
            pool = copy_pool(fblock.pool)
            blocks.append(nn.Sequential(OrderedDict(conv=conv, bn=bn, relu=relu, pool=pool)))
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        lh = alloc.layer("head")
        fhead: nn.Linear = float_model.head
        if fhead.bias is not None:
            raise FqhwError("the head must be bias-free (FairCNN's is)")
        self.head = QuantLinear(
            fhead.in_features,
            fhead.out_features,
            bias=False,
            weight_quant=WeightQuant,
            weight_bit_width=lh.weight_bits,
            return_quant_tensor=False,
        )
        self.load_float_weights(float_model)
        self._names = names
        self._alloc_bits = {la.name: (la.weight_bits, la.act_bits) for la in alloc.layers}

    @property
    def layers(self) -> "OrderedDict[str, QuantLayer]":
        out: OrderedDict[str, QuantLayer] = OrderedDict()
        for i, block in enumerate(self.features):
            name = f"features.{i}.conv"
            w, a = self._alloc_bits[name]
            out[name] = QuantLayer(name, f"features.{i}", block.conv, block.relu, w, a)
        w, _ = self._alloc_bits["head"]
        out["head"] = QuantLayer("head", "head", self.head, None, w, None)
        return out

    def load_float_weights(self, float_model: FairCNN) -> None:
        with torch.no_grad():
            for qb, fb in zip(self.features, float_model.features):
                qb.conv.weight.copy_(fb.conv.weight)
                qb.bn.load_state_dict(fb.bn.state_dict())
            self.head.weight.copy_(float_model.head.weight)

    def forward(self, x):
        x = self.input_quant(x)
        x = self.features(x)
        x = self.flatten(x)
        return self.head(x)


def build_quant_model(float_model: FairCNN, alloc: Allocation) -> QuantFairCNN:
    """A Brevitas copy of `float_model` quantized as `alloc` says (weights and BN stats copied).

    Activation scales start at Brevitas' defaults: run `calibrate` before using the model.
    An allocation with channel-group units ("<layer>:g<k>") gets the grouped model (one
    quantized layer per group, `fqhw.quant.channel_groups`), which has the same interface.
    """
    from fqhw.quant.channel_groups import build_grouped_quant_model, has_channel_groups

    if has_channel_groups(alloc):
        return build_grouped_quant_model(float_model, alloc)
    qmodel = QuantFairCNN(float_model, alloc)
    qmodel.train(float_model.training)
    scale = float(qmodel.input_quant.act_quant.scale())
    if scale != INPUT_SCALE:
        raise AssertionError(f"input quantizer scale {scale!r} is not exactly {INPUT_SCALE!r}")
    return qmodel


def calibrate(qmodel: nn.Module, loader, batches: int = 8) -> nn.Module:
    """Initialise the activation scales from statistics over `batches` batches of `loader`.

    The loader yields tensors or tuples whose first element is the model input. BatchNorm
    running statistics are left untouched (the model runs in eval mode).
    """
    was_training = qmodel.training
    qmodel.eval()
    n = 0
    with torch.no_grad(), calibration_mode(qmodel):
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            qmodel(x)
            n += 1
            if n >= batches:
                break
    if n == 0:
        raise FqhwError("calibration loader yielded no batches")
    qmodel.train(was_training)
    return qmodel


def float64_twin(qmodel: QuantFairCNN) -> QuantFairCNN:
    """A float64 copy of `qmodel` with exactly its quantized parameters.

    A plain `.double()` copy would recompute the weight scales (max |w| / (2^(b-1) - 1)) and
    the activation scales (threshold / (2^a - 1)) in float64, which moves them by up to half
    a float32 ulp and can flip a weight code. Here every weight is set to code x float32
    scale (exact in float64) and every learned activation threshold to float32 scale x
    (2^a - 1), so the twin's codes and scales equal the original's bit for bit (checked).
    """
    import copy

    twin = copy.deepcopy(qmodel).double()
    with torch.no_grad():
        for (name, ql), tl in zip(qmodel.layers.items(), twin.layers.values()):
            qw = ql.compute.quant_weight()
            w_int = int_codes(qw, f"{name} weight")
            w_scale = qw.scale.detach().double()
            tl.compute.weight.copy_(w_int.double() * w_scale)
            tw = tl.compute.quant_weight()
            if not (torch.equal(int_codes(tw, f"{name} weight"), w_int) and torch.equal(tw.scale.detach(), w_scale)):
                raise AssertionError(f"{name}: the float64 twin's weight codes or scales differ")
            if ql.act is not None:
                a_scale = ql.act.act_quant.scale().detach().double()
                levels = float(2 ** int(ql.act.act_quant.bit_width()) - 1)
                impl = tl.act.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl
                impl.value.copy_(a_scale * levels)
                if not torch.equal(tl.act.act_quant.scale().detach(), a_scale):
                    raise AssertionError(f"{name}: the float64 twin's activation scale differs")
    return twin


def integer_trace(qmodel: QuantFairCNN, x: torch.Tensor, precision: str = "float64") -> dict[str, np.ndarray]:
    """Integer codes of the Brevitas model on input `x` (N, C, H, W floats = pixel/256),
    int64 NCHW.

    Keys: "input", "<layer>.act" for each layer with an output activation (QuantReLU codes,
    before pooling), "head.acc" (integer head weights x integer input codes, exact).

    precision="float64" (the default, the reference for bit-exactness) runs
    `float64_twin(qmodel)`: the same quantized parameters, evaluated with float64
    arithmetic, so a code flips only if its pre-activation lies within ~1e-15 of a rounding
    boundary. precision="float32" runs the model itself, as training and evaluation do:
    its float32 convolution sums put about one activation code in a million (at 6-8 bit
    activations) on the other side of a rounding boundary than exact arithmetic does.
    """
    if precision == "float64":
        qmodel = float64_twin(qmodel)
        x = x.double()
    elif precision != "float32":
        raise ValueError(f"precision must be 'float64' or 'float32', not {precision!r}")
    # float32 head outputs carry rounding error: their check allows a relative slack
    return trace_codes(qmodel, x, rel_tol=1e-4)


def trace_codes(qmodel: nn.Module, x: torch.Tensor, rel_tol: float = 0.0) -> dict[str, np.ndarray]:
    """The integer trace of any model shaped like QuantFairCNN (`input_quant`, `layers` with
    `.act`, a quantized `head`), evaluated as it is: hooks capture the QuantTensors, their
    codes are read off, and the head's accumulator is computed in int64 and checked against
    the model's float output (within rel_tol relative, INT_TOL absolute).

    Channel groups (`fqhw.quant.channel_groups`): the groups of a layer share one act
    module, called once per group in channel order; its outputs are concatenated along the
    channels under the layer's key "<layer>.act". A grouped head's accumulator is the
    concatenation of its groups' (their weights stacked in order)."""
    captured: dict[str, object] = {}
    act_out: dict[str, list[QuantTensor]] = {}
    hooks = []

    def keep(key):
        def hook(module, inputs, output):
            captured[key] = output

        return hook

    def keep_input(key):
        def hook(module, inputs):
            captured[key] = inputs[0]

        return hook

    def append(key):
        def hook(module, inputs, output):
            act_out[key].append(output)

        return hook

    hooks.append(qmodel.input_quant.register_forward_hook(keep("input")))
    act_modules: dict[int, str] = {}
    head_units = []
    for name, ql in qmodel.layers.items():
        if ql.act is None:
            head_units.append(ql)
        elif id(ql.act) not in act_modules:  # a shared act (channel groups): one hook
            key = f"{ql.group or name}.act"
            act_modules[id(ql.act)] = key
            act_out[key] = []
            hooks.append(ql.act.register_forward_hook(append(key)))
    hooks.append(qmodel.head.register_forward_pre_hook(keep_input("head.in")))
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            out = qmodel(x)
            qws = [ql.compute.quant_weight() for ql in head_units]
            w_int = torch.cat([int_codes(qw, "head weight") for qw in qws], dim=0)
            w_scale = torch.cat([qw.scale.double().reshape(-1) for qw in qws])
    finally:
        for h in hooks:
            h.remove()
        qmodel.train(was_training)

    trace: dict[str, np.ndarray] = {}
    trace["input"] = int_codes(captured.pop("input"), "input").numpy()
    expect = torch.round(x.double() / INPUT_SCALE).clamp(0, 255).to(torch.int64).numpy()
    if not np.array_equal(trace["input"], expect):
        raise AssertionError("input codes differ from round(x * 256)")
    head_in_qt = captured.pop("head.in")
    for key, outs in act_out.items():
        trace[key] = torch.cat([int_codes(qt, key) for qt in outs], dim=1).numpy()
    a_int = int_codes(head_in_qt, "head input")  # pooled, flattened codes of the last ReLU
    acc = a_int.numpy() @ w_int.numpy().T  # exact int64 arithmetic
    trace["head.acc"] = acc
    # the float head output must be the accumulator times the scales (a consistency check of
    # what the model computes, not a source of the integers)
    approx = out.double().numpy() / (float(head_in_qt.scale) * w_scale.numpy())
    slack = rel_tol * np.maximum(1.0, np.abs(acc)) + INT_TOL
    if not (np.abs(approx - acc) <= slack).all():
        raise AssertionError("head output is not integer accumulator x scales")
    return trace
