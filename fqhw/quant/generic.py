"""Brevitas models of timm classifiers under an Allocation: ResNets (FINN's scheme, residual
adds included) and transformers (linear layers quantized, the rest float), and the integer
codes Brevitas computes. Their QONNX export and qonnx's integer codes:
fqhw.backends.qonnx_generic; a ResNet's code boundaries snapped: fqhw.quant.resnet_snap.

ResNet quantizers (the FairCNN ones of fqhw.quant.qmodel, plus one per residual add):

- input: 8-bit unsigned, scale 2^-8 (the uint8 pixels are the input codes).
- every Conv2d / Linear: narrow signed weights of the layer's allocated width, one float
  scale per output channel (FINN folds them, with BatchNorm, into thresholds).
- every ReLU inside a block and the stem's: unsigned, the layer's act_bits, learned
  per-tensor scale.
- residual add: both operands (the block's last conv + BN, and the shortcut: the block
  input or the downsample conv + BN) go through ONE signed quantizer, so they share scale
  and width and FINN can add their codes (AddStreams); its width is the act_bits of the
  block's last conv, which a downsample conv must share (`NetworkSpec.joins`). The ReLU
  after the add is quantized (unsigned) at that width too: the block's output activation.
- global average pool and classifier: the pool averages codes (FINN: GlobalAccPool, an
  integer sum, and a Mul by 1/N moved into the output scale); the classifier keeps its float
  bias, applied after the integer accumulator ("fc.acc" = integer weights x summed codes)
  by the host, together with the output scale.

Bit-exactness is checked on integers only, as for FairCNN: Brevitas is evaluated on a
float64 twin with exactly its quantized parameters, the QONNX file with qonnx's executor in
float64 (fqhw.backends.qonnx_export's float64 copy of the graph).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant import Int8ActPerTensorFloat
from brevitas.quant_tensor import QuantTensor
from torch import nn

from fqhw.allocator.allocation import Allocation
from fqhw.data.dataset import INPUT_SCALE
from fqhw.errors import FqhwError
from fqhw.intcodes import INT_TOL
from fqhw.quant.layers import ActQuant, InputQuant, WeightQuant, int_codes, quant_conv_like


class JoinQuant(Int8ActPerTensorFloat):
    """Signed activations at a residual add, per-tensor learned float scale; width set per join."""


def _value(x):
    return x.value if isinstance(x, QuantTensor) else x


def _qconv(conv: nn.Conv2d, bits: int) -> QuantConv2d:
    if conv.bias is not None:
        raise FqhwError("a conv with a bias in a ResNet is not supported (timm's ResNets have none)")
    if conv.dilation not in ((1, 1), 1):
        raise FqhwError(f"dilated convs are not supported (dilation {conv.dilation})")
    q = quant_conv_like(conv, bits)
    with torch.no_grad():
        q.weight.copy_(conv.weight)
    return q


def _qlinear(lin: nn.Linear, bits: int) -> QuantLinear:
    q = QuantLinear(
        lin.in_features, lin.out_features, bias=lin.bias is not None, weight_quant=WeightQuant,
        weight_bit_width=int(bits), return_quant_tensor=False,
    )
    with torch.no_grad():
        q.weight.copy_(lin.weight)
        if lin.bias is not None:
            q.bias.copy_(lin.bias)
    return q


def _bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
    out.load_state_dict(bn.state_dict())
    return out


def _relu(bits: int) -> QuantReLU:
    return QuantReLU(act_quant=ActQuant, bit_width=int(bits), return_quant_tensor=True)


class _Recorder:
    """Collects (key, QuantTensor) of every activation quantizer call during one forward."""

    def __init__(self):
        self.items: list[tuple[str, QuantTensor]] = []

    def __call__(self, key: str, qt):
        self.items.append((key, qt))
        return qt


def _act_bits(alloc: Allocation, name: str) -> int:
    la = alloc.layer(name)
    if la.act_bits is None:
        raise FqhwError(f"layer {name} needs act_bits (its output activation is quantized)")
    return int(la.act_bits)


class QuantResBlock(nn.Module):
    """A timm BasicBlock / Bottleneck with quantized convs, ReLUs and a shared join quantizer.

    Submodule names are the float block's (conv1, bn1, act1, ..., downsample.0 / .1) so that
    layer names match the float model's and `NetworkSpec`; `join_quant` quantizes both
    operands of the add, `act_out` the ReLU after it."""

    def __init__(self, block: nn.Module, prefix: str, alloc: Allocation):
        super().__init__()
        convs = [n for n in ("conv1", "conv2", "conv3") if isinstance(getattr(block, n, None), nn.Conv2d)]
        for n in ("se", "aa"):
            m = getattr(block, n, None)
            if m is not None and not isinstance(m, nn.Identity):
                raise FqhwError(f"{prefix}: timm block option {n!r} is not supported")
        self.prefix = prefix
        self.stages = convs
        last = convs[-1]
        self.last = last
        for i, n in enumerate(convs):
            name = f"{prefix}.{n}"
            setattr(self, n, _qconv(getattr(block, n), alloc.layer(name).weight_bits))
            setattr(self, f"bn{i + 1}", _bn(getattr(block, f"bn{i + 1}")))
            if n != last:
                setattr(self, f"act{i + 1}", _relu(_act_bits(alloc, name)))
        join_bits = _act_bits(alloc, f"{prefix}.{last}")
        if block.downsample is not None:
            ds = block.downsample
            if not (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)):
                raise FqhwError(f"{prefix}: only a conv + BN downsample is supported (not avg_down)")
            ds_name = f"{prefix}.downsample.0"
            ds_bits = _act_bits(alloc, ds_name)
            if ds_bits != join_bits:
                raise FqhwError(
                    f"{prefix}: the residual add needs one activation width for {prefix}.{last} "
                    f"({join_bits} bits) and {ds_name} ({ds_bits} bits)"
                )
            self.downsample = nn.Sequential(OrderedDict([("0", _qconv(ds[0], alloc.layer(ds_name).weight_bits)), ("1", _bn(ds[1]))]))
        else:
            self.downsample = None
        self.join_quant = QuantIdentity(act_quant=JoinQuant, bit_width=join_bits, return_quant_tensor=True)
        self.act_out = _relu(join_bits)
        self.record: Callable | None = None

    def _rec(self, key, qt):
        return self.record(key, qt) if self.record is not None else qt

    def forward(self, x):
        shortcut = x
        for i, n in enumerate(self.stages):
            x = getattr(self, f"bn{i + 1}")(getattr(self, n)(x))
            if n != self.last:
                x = self._rec(f"{self.prefix}.{n}.act", getattr(self, f"act{i + 1}")(x))
        main = self._rec(f"{self.prefix}.{self.last}.act", self.join_quant(x))
        if self.downsample is not None:
            sc = self._rec(f"{self.prefix}.downsample.0.act", self.join_quant(self.downsample(shortcut)))
        else:
            sc = self._rec(f"{self.prefix}.shortcut", self.join_quant(_value(shortcut)))
        y = _value(main) + _value(sc)
        return self._rec(f"{self.prefix}.out", self.act_out(y))


@dataclass(frozen=True)
class GenericLayer:
    """One allocation layer of a generic quant model: its name and compute module."""

    name: str
    compute: nn.Module
    weight_bits: int
    act_bits: int | None


def _generic_layers(names, alloc_bits: dict, compute_of: Callable[[str], nn.Module]) -> "OrderedDict[str, GenericLayer]":
    """The allocation layers of a generic quant model, in `names` order, each with its widths
    and its quantized compute module (`compute_of(name)`)."""
    return OrderedDict((n, GenericLayer(n, compute_of(n), *alloc_bits[n])) for n in names)


class QuantResNet(nn.Module):
    """A timm ResNet (BasicBlock or Bottleneck, conv + BN downsample, plain stem) quantized
    as the module docstring says. Module names follow timm's (conv1, layer1.0.conv1, ...,
    fc), so allocation layer names are `network_spec`'s."""

    family = "resnet"

    def __init__(self, float_model: nn.Module, alloc: Allocation):
        super().__init__()
        if alloc.input_bits != 8:
            raise FqhwError(f"only 8-bit inputs are supported (allocation has input_bits={alloc.input_bits})")
        for attr in ("conv1", "bn1", "maxpool", "layer1", "fc"):
            if not hasattr(float_model, attr):
                raise FqhwError(f"not a timm ResNet: it has no {attr!r}")
        if not isinstance(float_model.conv1, nn.Conv2d):
            raise FqhwError("only the plain single-conv ResNet stem is supported (not deep / tiered stems)")
        if not isinstance(float_model.fc, nn.Linear):
            raise FqhwError("the ResNet classifier must be one Linear layer")
        names = [n for n, m in float_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        known = [la.name for la in alloc.layers]
        missing, extra = [n for n in names if n not in known], [n for n in known if n not in names]
        if missing or extra:
            raise FqhwError(f"allocation does not match the model: missing {missing}, unknown {extra}")
        self.input_quant = QuantIdentity(act_quant=InputQuant, return_quant_tensor=True)
        self.conv1 = _qconv(float_model.conv1, alloc.layer("conv1").weight_bits)
        self.bn1 = _bn(float_model.bn1)
        self.act1 = _relu(_act_bits(alloc, "conv1"))
        mp = float_model.maxpool
        if not isinstance(mp, (nn.MaxPool2d, nn.Identity)):
            raise FqhwError(f"stem pool {type(mp).__name__} is not supported")
        self.maxpool = copy.deepcopy(mp)
        self.stage_names = []
        for s in range(1, 5):
            stage = getattr(float_model, f"layer{s}", None)
            if stage is None:
                continue
            blocks = [QuantResBlock(b, f"layer{s}.{i}", alloc) for i, b in enumerate(stage)]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{s}")
        pool = getattr(float_model.global_pool, "pool_type", "avg")
        if pool != "avg":
            raise FqhwError(f"global pool {pool!r} is not supported (avg only)")
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        fc_bits = alloc.layer("fc").weight_bits
        self.fc = _qlinear(float_model.fc, fc_bits)
        self._names = names
        self._alloc_bits = {la.name: (la.weight_bits, la.act_bits) for la in alloc.layers}
        self.record: Callable | None = None

    @property
    def layers(self) -> "OrderedDict[str, GenericLayer]":
        return _generic_layers(self._names, self._alloc_bits, self.get_submodule)

    def blocks(self) -> list[QuantResBlock]:
        return [b for s in self.stage_names for b in getattr(self, s)]

    def set_recorder(self, rec: Callable | None) -> None:
        self.record = rec
        for b in self.blocks():
            b.record = rec

    def _rec(self, key, qt):
        return self.record(key, qt) if self.record is not None else qt

    def forward(self, x):
        x = self._rec("input", self.input_quant(x))
        x = self._rec("conv1.act", self.act1(self.bn1(self.conv1(x))))
        x = self.maxpool(x)
        for s in self.stage_names:
            x = getattr(self, s)(x)
        self._rec("fc.in", x)
        x = self.flatten(self.global_pool(_value(x)))
        return self.fc(x)

    def head_accumulator(self, head_in: QuantTensor, out: torch.Tensor):
        """("fc.acc", integer accumulator, its float scale): the classifier's integer weights x
        the summed codes of the last block (GlobalAccPool), checked against the float output."""
        a_int = int_codes(head_in, "fc input")  # N, C, H, W codes of the last block
        n_pix = int(a_int.shape[-1] * a_int.shape[-2])
        summed = a_int.sum(dim=(-1, -2)).numpy()  # GlobalAccPool: an integer sum
        qw = self.fc.quant_weight()
        w_int = int_codes(qw, "fc weight").numpy()
        acc = summed @ w_int.T
        scale = float(head_in.scale) * qw.scale.detach().double().numpy().reshape(-1) / n_pix
        bias = None if self.fc.bias is None else self.fc.bias.detach().double().numpy()
        head_check(out.double().numpy(), acc, scale, bias, "Brevitas fc")
        return "fc.acc", acc, scale


def quantize_model(float_model: nn.Module, alloc: Allocation) -> nn.Module:
    """A Brevitas copy of a model quantized as `alloc` says (FairCNN: fqhw.quant.qmodel's
    QuantFairCNN; a timm ResNet: `QuantResNet`; a timm transformer: `QuantTransformer`).
    Weights and BN statistics are copied, activation scales start at Brevitas' defaults:
    run `fqhw.quant.qmodel.calibrate` before use."""
    from fqhw.models.cnn import FairCNN

    if isinstance(float_model, FairCNN):
        from fqhw.quant.qmodel import build_quant_model

        return build_quant_model(float_model, alloc)
    if all(hasattr(float_model, a) for a in ("layer1", "conv1", "fc")):
        q = QuantResNet(float_model, alloc)
    elif _is_transformer(float_model):
        q = QuantTransformer(float_model, alloc)
    else:
        raise FqhwError(f"{type(float_model).__name__}: no generic quantizer for this model (ResNets and timm transformers)")
    q.train(float_model.training)
    scale = float(q.input_quant.act_quant.scale())
    if scale != INPUT_SCALE:
        raise AssertionError(f"input quantizer scale {scale!r} is not exactly {INPUT_SCALE!r}")
    return q


# --------------------------------------------------------------------------- integer traces


def float64_twin(qmodel: nn.Module) -> nn.Module:
    """A float64 copy of a generic quant model with exactly its quantized parameters: every
    weight set to code x float32 scale, every learned activation scale's parameter to float32
    scale x the quantizer's integer range, so the twin's codes and scales equal the
    original's bit for bit (checked). Why: `.double()` alone would recompute the scales in
    float64 and move them by up to half a float32 ulp (see fqhw.quant.qmodel.float64_twin)."""
    twin = copy.deepcopy(qmodel).double()
    with torch.no_grad():
        src = dict(qmodel.named_modules())
        for name, tm in twin.named_modules():
            om = src[name]
            if isinstance(om, (QuantConv2d, QuantLinear)):
                qw = om.quant_weight()
                w_int = int_codes(qw, f"{name} weight")
                w_scale = qw.scale.detach().double()
                tm.weight.copy_(w_int.double() * w_scale)
                tw = tm.quant_weight()
                if not (torch.equal(int_codes(tw, f"{name} weight"), w_int) and torch.equal(tw.scale.detach(), w_scale)):
                    raise AssertionError(f"{name}: the float64 twin's weight codes or scales differ")
            elif isinstance(om, (QuantReLU, QuantIdentity)):
                tq = tm.act_quant.fused_activation_quant_proxy.tensor_quant
                impl = tq.scaling_impl
                if not isinstance(getattr(impl, "value", None), torch.Tensor):
                    continue  # a constant scale (the input's 2^-8): exact in any precision
                a_scale = om.act_quant.scale().detach().double()
                levels = tq.int_scaling_impl(torch.tensor(float(om.act_quant.bit_width()), dtype=torch.float64))
                impl.value.copy_(a_scale * levels.double())
                if not torch.equal(tm.act_quant.scale().detach(), a_scale):
                    raise AssertionError(f"{name}: the float64 twin's activation scale differs")
    return twin


def integer_trace(qmodel: nn.Module, x: torch.Tensor, precision: str = "float64") -> "OrderedDict[str, np.ndarray]":
    """Integer codes of a generic quant model on `x` (N, C, H, W floats = pixel/256), int64,
    in execution order.

    ResNet keys: "input"; "<layer>.act" for each conv's output activation (a block's last
    conv and a downsample conv: the join quantizer's codes of that operand);
    "<block>.shortcut" (the join quantizer's codes of an identity shortcut); "<block>.out"
    (the ReLU after the add); "fc.acc" (integer classifier weights x the sum over the pool
    window of the last block's codes: exact, before the 1/N, the scales and the bias).
    Transformer keys: see `QuantTransformer`.

    precision="float64" (the reference) runs `float64_twin`; "float32" the model itself."""
    if precision == "float64":
        model, x = float64_twin(qmodel), x.double()
    elif precision == "float32":
        model = qmodel
    else:
        raise ValueError(f"precision must be 'float64' or 'float32', not {precision!r}")
    rec = _Recorder()
    model.set_recorder(rec)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.set_recorder(None)
        model.train(was_training)
    trace: OrderedDict[str, np.ndarray] = OrderedDict()
    head_in = None
    for key, qt in rec.items:
        if key == "fc.in" or key.endswith(".head_in"):
            head_in = (key, qt)
            continue
        trace[key] = int_codes(qt, key).numpy()
    expect = torch.round(x.double() / INPUT_SCALE).clamp(0, 255).to(torch.int64).numpy()
    if not np.array_equal(trace["input"], expect):
        raise AssertionError("input codes differ from round(x * 256)")
    with torch.no_grad():
        head = model.head_accumulator(None if head_in is None else head_in[1], out)
    if head is not None:
        trace[head[0]] = head[1]
    return per_image(trace, x.shape[0]) if isinstance(qmodel, QuantTransformer) else trace


def head_check(out: np.ndarray, acc: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, what: str) -> None:
    """The float output must be accumulator x scale (+ bias): a consistency check."""
    approx = (out - (0.0 if bias is None else bias)) / scale
    slack = 1e-4 * np.maximum(1.0, np.abs(acc)) + INT_TOL
    if not (np.abs(approx - acc) <= slack).all():
        raise AssertionError(f"{what}: output is not integer accumulator x scales (+ bias)")


# --------------------------------------------------------------------------- transformers


def _is_transformer(model: nn.Module) -> bool:
    """A timm model with attention blocks (DeiT / ViT, TinyViT)."""
    return any(type(m).__name__ == "Attention" for m in model.modules())


class _QuantCompute(nn.Module):
    """A quantized Conv2d / Linear followed by a signed output quantizer (None for the
    classifier): the transformer layers' unit of allocation."""

    def __init__(self, key: str, compute: nn.Module, act_bits: int | None):
        super().__init__()
        self.key = key
        self.compute = compute
        self.out_quant = (
            None if act_bits is None else QuantIdentity(act_quant=JoinQuant, bit_width=int(act_bits), return_quant_tensor=True)
        )
        self.record: Callable | None = None

    def forward(self, x):
        y = self.compute(_value(x))
        if self.out_quant is None:
            return y
        q = self.out_quant(y)
        if self.record is not None:
            self.record(f"{self.key}.out", q)
        return _value(q)


class QuantTransformer(nn.Module):
    """A timm transformer with every Conv2d / Linear quantized: weights at the layer's
    allocated width (per-channel scale), each layer's output through a signed per-tensor
    quantizer of its act_bits, the input as the default model's (uint8 codes). Attention
    products, softmax, LayerNorm and GELU stay float: enough for the QONNX export, its
    execution and the cost models, not a FINN-buildable model (`finn_refusal` says what
    FINN leaves in software). Fused attention is turned off so that the export has plain
    MatMul / Softmax nodes instead of an opset-14+ attention op."""

    family = "transformer"

    def __init__(self, float_model: nn.Module, alloc: Allocation):
        super().__init__()
        if alloc.input_bits != 8:
            raise FqhwError(f"only 8-bit inputs are supported (allocation has input_bits={alloc.input_bits})")
        model = copy.deepcopy(float_model)
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        known = [la.name for la in alloc.layers]
        missing, extra = [n for n in names if n not in known], [n for n in known if n not in names]
        if missing or extra:
            raise FqhwError(f"allocation does not match the model: missing {missing}, unknown {extra}")
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        self._wrappers: dict[str, _QuantCompute] = {}
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            fm = getattr(parent, attr)
            la = alloc.layer(name)
            if isinstance(fm, nn.Conv2d):
                q = quant_conv_like(fm, la.weight_bits, bias=fm.bias is not None)
                with torch.no_grad():
                    q.weight.copy_(fm.weight)
                    if fm.bias is not None:
                        q.bias.copy_(fm.bias)
            else:
                q = _qlinear(fm, la.weight_bits)
            w = _QuantCompute(name, q, la.act_bits)
            setattr(parent, attr, w)
            self._wrappers[name] = w
        self.input_quant = QuantIdentity(act_quant=InputQuant, return_quant_tensor=True)
        self.body = model
        self._names = names
        self._alloc_bits = {la.name: (la.weight_bits, la.act_bits) for la in alloc.layers}
        self.record: Callable | None = None

    @property
    def layers(self) -> "OrderedDict[str, GenericLayer]":
        return _generic_layers(self._names, self._alloc_bits, lambda n: self._wrappers[n].compute)

    def set_recorder(self, rec: Callable | None) -> None:
        self.record = rec
        for w in self._wrappers.values():
            w.record = rec

    def forward(self, x):
        q = self.input_quant(x)
        if self.record is not None:
            self.record("input", q)
        return self.body(_value(q))

    def head_accumulator(self, head_in, out):
        return None  # the classifier reads a float LayerNorm output: no integer accumulator


def per_image(trace: "OrderedDict[str, np.ndarray]", n: int) -> "OrderedDict[str, np.ndarray]":
    """Each tensor with `n` images on its first axis. Window attention (TinyViT) runs its
    windows as a batch of n x windows, image-major in both torch and the exported graph: those
    tensors become (n, windows, ...), so that traces compare image by image."""
    out = OrderedDict()
    for k, v in trace.items():
        if v.ndim and v.shape[0] != n:
            if v.shape[0] % n:
                raise ValueError(f"{k}: first axis {v.shape[0]} is not a multiple of the {n} images")
            v = v.reshape(n, v.shape[0] // n, *v.shape[1:])
        out[k] = v
    return out


