"""The pieces every Brevitas quantization scheme of a FairCNN is built from: the quantizers
of FINN's scheme (input, weights, activations: see fqhw.quant.qmodel), a conv with a float
conv's geometry, the `QuantLayer` record of one allocation unit, and the checked integer
codes of a QuantTensor. fqhw.quant.qmodel (whole layers), fqhw.quant.channel_groups
(output-channel groups) and fqhw.quant.po2 (hls4ml's power-of-two scheme) build on these."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from brevitas.core.scaling import ScalingImplType
from brevitas.nn import QuantConv2d, QuantReLU
from brevitas.quant import Int8WeightPerChannelFloat, Uint8ActPerTensorFloat
from brevitas.quant_tensor import QuantTensor
from torch import nn

from fqhw.intcodes import INT_TOL


class InputQuant(Uint8ActPerTensorFloat):
    """8-bit unsigned input, constant scale 2^-8 (threshold 255/256 over int scale 255)."""

    scaling_impl_type = ScalingImplType.CONST
    max_val = 255.0 / 256.0  # scale = threshold / (2^8 - 1) = 2^-8 exactly


class WeightQuant(Int8WeightPerChannelFloat):
    """Narrow signed weights, per-output-channel float scale from max |w|; width set per layer."""


class ActQuant(Uint8ActPerTensorFloat):
    """Unsigned activations, per-tensor learned float scale; width set per layer."""


def quant_conv_like(fconv: nn.Conv2d, weight_bits: int, weight_quant=None, bias: bool = False, bias_quant=None) -> QuantConv2d:
    """A Brevitas conv with `fconv`'s geometry (channels, kernel, stride, padding, groups) at
    `weight_bits`; its weights are not copied (each scheme fills them its own way: as they
    are, or with BatchNorm folded in). Every quantization scheme builds its convs here."""
    extra = {} if bias_quant is None else {"bias_quant": bias_quant}
    return QuantConv2d(
        fconv.in_channels, fconv.out_channels, fconv.kernel_size, stride=fconv.stride, padding=fconv.padding,
        groups=fconv.groups, bias=bias, weight_quant=WeightQuant if weight_quant is None else weight_quant, weight_bit_width=int(weight_bits),
        return_quant_tensor=False, **extra,
    )


@dataclass(frozen=True)
class QuantLayer:
    """One allocation layer of the quant model: its compute module and output quantizer."""

    name: str  # allocation / float-model name, e.g. "features.0.conv" or "head"
    block: str  # name of the enclosing module path, e.g. "features.0" or "head"
    compute: nn.Module  # QuantConv2d or QuantLinear
    act: QuantReLU | None  # None for the head
    weight_bits: int
    act_bits: int | None
    # for a channel-group unit "<layer>:g<k>" (fqhw.quant.channel_groups), the layer it is a
    # group of: the groups read the same input and share `act` (one quantizer); "" otherwise
    group: str = ""


def int_codes(qt: QuantTensor, what: str) -> torch.Tensor:
    """Integer codes of a QuantTensor, checked to be within INT_TOL of integers and in range."""
    if not isinstance(qt, QuantTensor):
        raise AssertionError(f"{what}: expected a QuantTensor, got {type(qt).__name__}")
    pre = (qt.value.double() / qt.scale.double()) + qt.zero_point.double()
    rounded = torch.round(pre)
    err = float((pre - rounded).abs().max()) if pre.numel() else 0.0
    if err > INT_TOL:
        raise AssertionError(f"{what}: value/scale is {err:.3g} away from an integer")
    bits = int(qt.bit_width)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if bool(qt.signed) else (0, 2**bits - 1)
    if rounded.numel() and (rounded.min() < lo or rounded.max() > hi):
        raise AssertionError(f"{what}: codes outside [{lo}, {hi}]")
    return rounded.to(torch.int64)
