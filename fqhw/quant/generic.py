"""Brevitas models of timm classifiers under an Allocation: ResNets (FINN's scheme, residual
adds included) and transformers (linear layers quantized, the rest float); their QONNX
export, the integer codes Brevitas and qonnx compute, and how far FINN takes each.

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
from fqhw.intcodes import COMPUTE_LAYERS_KEY, INT_TOL
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
        _head_check(out.double().numpy(), acc, scale, bias, "Brevitas fc")
        return "fc.acc", acc, scale


# --------------------------------------------------------------------------- threshold margins


def _resnet_bn_quant_points(qmodel: QuantResNet):
    """(layer, conv, bn, output quantizer, input quantizer) for every conv of a QuantResNet:
    the points where FINN turns BN + quantizer into integer thresholds on the conv's
    accumulator. The input quantizer gives the accumulator's scale and range."""
    points = [("conv1", qmodel.conv1, qmodel.bn1, qmodel.act1, qmodel.input_quant)]
    block_in = qmodel.act1
    for b in qmodel.blocks():
        prev = block_in
        for i, n in enumerate(b.stages):
            out = getattr(b, f"act{i + 1}") if n != b.last else b.join_quant
            points.append((f"{b.prefix}.{n}", getattr(b, n), getattr(b, f"bn{i + 1}"), out, prev))
            prev = out
        if b.downsample is not None:
            points.append((f"{b.prefix}.downsample.0", b.downsample[0], b.downsample[1], b.join_quant, block_in))
        block_in = b.act_out
    return points


def _quant_scale_bits(q) -> tuple[float, int, bool]:
    aq = q.act_quant
    return float(aq.scale()), int(aq.bit_width()), bool(aq.is_signed)


def _resnet_geometry(qmodel: QuantResNet):
    """Per conv: the threshold geometry dict of fqhw.quant.qmodel (`threshold_geometry`'s
    keys), in float64 from the model's quantized parameters. A signed output quantizer
    (the join's) has its codes -2^(b-1) .. 2^(b-1) - 1: shifted by 2^(b-1) they are the
    unsigned case, which is folded into the BN mean (mean - 2^(b-1) s_a sd / gamma), so the
    same boundary arithmetic applies; "offset_mean" records that shift."""
    out = OrderedDict()
    with torch.no_grad():
        for name, conv, bn, outq, inq in _resnet_bn_quant_points(qmodel):
            s_in, in_bits, in_signed = _quant_scale_bits(inq)
            if in_signed:
                raise FqhwError(f"{name}: a conv reading signed activations cannot be snapped")
            in_max = 2**in_bits - 1
            qw = conv.quant_weight()
            w_int = int_codes(qw, f"{name} weight").numpy().reshape(qw.value.shape[0], -1)
            s_w = qw.scale.detach().double().numpy().reshape(-1)
            var = bn.running_var.detach().double().numpy()
            mean = bn.running_mean.detach().double().numpy()
            gamma = bn.weight.detach().double().numpy()
            beta = bn.bias.detach().double().numpy()
            sd = np.sqrt(var + float(bn.eps))
            s_a, bits, signed = _quant_scale_bits(outq)
            levels = 2**bits - 1
            offset = np.zeros_like(mean)
            if signed:  # y + 2^(b-1) s_a has the unsigned boundaries (k + 0.5) s_a, k = 0 .. 2^b - 2
                offset = 2 ** (bits - 1) * s_a * sd / gamma
            m = mean - offset
            inv = gamma / sd
            out[name] = {
                "bn": bn,
                "signed": signed,
                "A": s_in * s_w * inv,
                "B": beta - m * inv,
                "s_a": s_a,
                "levels": levels,
                "acc_lo": in_max * np.minimum(w_int, 0).sum(axis=1).astype(np.float64),
                "acc_hi": in_max * np.maximum(w_int, 0).sum(axis=1).astype(np.float64),
                "s_in": s_in,
                "s_w": s_w,
                "gamma": gamma,
                "beta": beta,
                "mean": m,
                "offset_mean": offset,
                "sd": sd,
            }
    return out


def resnet_threshold_margins(qmodel: QuantResNet) -> "OrderedDict[str, float]":
    """Per conv: the smallest distance (accumulator units) from a reachable code boundary
    of its output quantizer to an integer (0.5 where none is reachable)."""
    from fqhw.quant.qmodel import code_boundaries, min_margin

    out = OrderedDict()
    for name, g in _resnet_geometry(qmodel).items():
        out[name] = min(
            min_margin(code_boundaries(g["A"][c], g["B"][c], g["s_a"], g["levels"], g["acc_lo"][c], g["acc_hi"][c]))
            for c in range(len(g["A"]))
        )
    return out


def snap_resnet_thresholds(qmodel: QuantResNet, margin: float | None = None, float32_ulps: float | None = None) -> dict:
    """fqhw.quant.qmodel.snap_thresholds for a QuantResNet: move every code boundary that a
    conv's integer accumulator can reach away from the integers (BatchNorm beta nudged; for
    the unsigned ReLU quantizers also gamma within 0.1 %), so that FINN's float32 threshold
    derivation rounds every activation as exact arithmetic does.

    Why: FINN computes its integer thresholds in float32. On a ResNet-18 (random BN, 7-bit
    stem weights, 6-bit activations) one stem accumulator of 62,813 sat 0.0026 below its
    exact boundary and FINN's threshold put it on the other side: 1 code of 10.4 million
    differed from Brevitas and qonnx. The join quantizers (signed) keep gamma: the shift that
    makes them look unsigned is folded into the BN mean and depends on gamma.
    The thresholds behind the residual adds (ReLU after the add, identity-shortcut
    requantization) have no BN to nudge; they compare small integer sums and are not moved.
    Run after the last training step, before export. Returns per layer the margin before
    and after and the channels changed."""
    from fqhw.quant.qmodel import FLOAT32_ULPS, SNAP_MARGIN, project_weights, snap_channel

    margin = SNAP_MARGIN if margin is None else margin
    float32_ulps = FLOAT32_ULPS if float32_ulps is None else float32_ulps
    was_training = qmodel.training
    qmodel.eval()
    stats = {"weights_projected": project_weights(qmodel), "layers": OrderedDict()}
    before = resnet_threshold_margins(qmodel)
    try:
        for name, g in _resnet_geometry(qmodel).items():
            n = len(g["A"])
            gam, bet = np.empty(n, np.float32), np.empty(n, np.float32)
            for c in range(n):
                gm, bt, _, _ = snap_channel(g, c, 0.05, 0.0 if g["signed"] else 1e-3, margin, float32_ulps)
                gam[c], bet[c] = gm, bt
            bn = g["bn"]
            changed = int(((gam != g["gamma"].astype(np.float32)) | (bet != g["beta"].astype(np.float32))).sum())
            with torch.no_grad():
                bn.weight.copy_(torch.from_numpy(gam).to(bn.weight.dtype))
                bn.bias.copy_(torch.from_numpy(bet).to(bn.bias.dtype))
            stats["layers"][name] = {"channels": n, "channels_changed": changed, "min_margin_before": float(before[name])}
        after = resnet_threshold_margins(qmodel)
        for name, st in stats["layers"].items():
            st["min_margin"] = float(after[name])
    finally:
        qmodel.train(was_training)
    stats["min_margin"] = min(st["min_margin"] for st in stats["layers"].values())
    if stats["min_margin"] < margin:
        low = min(stats["layers"], key=lambda k: stats["layers"][k]["min_margin"])
        raise FqhwError(f"{low}: threshold margin {stats['min_margin']:.3g} below {margin} after snapping")
    return stats


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


def _head_check(out: np.ndarray, acc: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, what: str) -> None:
    """The float output must be accumulator x scale (+ bias): a consistency check."""
    approx = (out - (0.0 if bias is None else bias)) / scale
    slack = 1e-4 * np.maximum(1.0, np.abs(acc)) + INT_TOL
    if not (np.abs(approx - acc) <= slack).all():
        raise AssertionError(f"{what}: output is not integer accumulator x scales (+ bias)")





# --------------------------------------------------------------------------- QONNX export and execution

def _weight_source(model, node):
    """The float weight constant behind a Conv / Gemm / MatMul node (through its weight Quant)."""
    from fqhw.onnxgraph import const_value, producer_of

    t = node.input[1]
    q = producer_of(model, t)
    if q is not None and q.op_type == "Quant":
        t = q.input[0]
    return const_value(model, t)


def export_generic_qonnx(qmodel: nn.Module, input_shape, path):
    """Export a generic quant model to a cleaned QONNX file at `path` (fqhw's `export_qonnx`,
    the same exporter and clean-up as the default model) and record in its metadata which
    Conv / Gemm node is which allocation layer, found by its float weight constant (equal,
    element for element, to exactly one layer's weight): the integer trace of the file and
    the FINN build then name their values without any Brevitas object.

    First every weight is set to its dequantized value (fqhw.quant.qmodel.project_weights:
    codes unchanged): a weight whose weight / scale sat within float32 error of k + 0.5
    otherwise gets one code from Brevitas and FINN (float32 division) and another from a
    float64 execution (seen once in the 11 M weights of a ResNet-18)."""
    import json

    import onnx

    from fqhw.backends.qonnx_export import export_qonnx
    from fqhw.quant.qmodel import project_weights

    if isinstance(qmodel, QuantResNet):
        side = min(int(v) for v in tuple(input_shape)[-2:])
        if side < 64:
            raise FqhwError(
                f"a ResNet's QONNX export needs inputs of at least 64 x 64 px (got {side}): below that "
                "layer4's 3 x 3 convs see a 1 x 1 map, which qonnx's Im2Col (and FINN's conv lowering) refuses"
            )
    project_weights(qmodel)
    path = export_qonnx(qmodel, input_shape, path)
    model = onnx.load(str(path))
    weights = {n: l.compute.weight.detach().cpu().numpy() for n, l in qmodel.layers.items()}
    found: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = _weight_source(model, node)
        if w is None:
            continue  # an activation x activation product (attention)
        hits = [n for n, lw in weights.items() if lw.shape == w.shape and np.array_equal(lw, w)]
        if len(hits) != 1:
            raise FqhwError(f"QONNX node {node.name}: its weight matches {len(hits)} layers ({hits}), not one")
        found[node.name] = hits[0]
    missing = [n for n in weights if n not in found.values()]
    if missing:
        raise FqhwError(f"QONNX export: no Conv/Gemm/MatMul node found for layers {missing}")
    model.metadata_props.add(key=COMPUTE_LAYERS_KEY, value=json.dumps(found, sort_keys=True))
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def _float64_exec_copy(path):
    """qonnx_export's float64 copy of the graph (convs lowered, Quant split so the codes are
    an output), with each GlobalAveragePool as ReduceMean over H, W: onnxruntime has no
    float64 GlobalAveragePool, and the two define the same mean."""
    from onnx import helper

    from fqhw.backends.qonnx_export import float64_copy

    from onnx import TensorProto

    wrapper = float64_copy(path)
    for n in wrapper.graph.node:
        if n.op_type == "GlobalAveragePool":
            n.op_type = "ReduceMean"
            n.attribute.extend([helper.make_attribute("axes", [2, 3]), helper.make_attribute("keepdims", 1)])
    # onnxruntime has no float64 Erf (a transformer's GELU): it runs in float32 between two
    # Casts, the one op of the graph that is not float64 (its error, ~1e-7 relative, moves a
    # code only for a value that close to a rounding boundary; the check would show it)
    for i, n in reversed(list(enumerate(wrapper.graph.node))):
        if n.op_type != "Erf":
            continue
        x32, y32 = n.input[0] + "_f32", n.output[0] + "_f32"
        shape = wrapper.get_tensor_shape(n.input[0])
        wrapper.set_tensor_shape(x32, shape, TensorProto.FLOAT)
        wrapper.set_tensor_shape(y32, shape, TensorProto.FLOAT)
        cast_in = helper.make_node("Cast", [n.input[0]], [x32], to=TensorProto.FLOAT, name=n.name + "_cast_in")
        cast_out = helper.make_node("Cast", [y32], [n.output[0]], to=TensorProto.DOUBLE, name=n.name + "_cast_out")
        n.input[0], n.output[0] = x32, y32
        wrapper.graph.node.insert(i + 1, cast_out)
        wrapper.graph.node.insert(i, cast_in)
    return wrapper


def _resnet_quant_keys(model, layer_of: dict[str, str]) -> "OrderedDict[str, object]":
    """Key (as `integer_trace` names them) -> activation Quant node of an exported QuantResNet,
    from the graph's structure: each activation Quant is traced back through BN / Relu /
    MaxPool to what produced it (the graph input, a Conv of a known layer, an Add, or
    another Quant: an identity shortcut's requantization)."""
    from fqhw.onnxgraph import const_value, consumers_of, producer_of

    gin = model.graph.input[0].name
    keys: OrderedDict[str, object] = OrderedDict()
    pending_shortcut = []
    for q in model.graph.node:
        if q.op_type != "Quant" or const_value(model, q.input[0]) is not None:
            continue
        t, src = q.input[0], None
        while True:
            if t == gin:
                src = "input"
                break
            p = producer_of(model, t)
            if p is None:
                raise FqhwError(f"Quant node {q.name}: cannot trace its input")
            if p.op_type in ("BatchNormalization", "Relu", "MaxPool"):
                t = p.input[0]
                continue
            src = p
            break
        if src == "input":
            keys["input"] = q
        elif src.op_type == "Conv":
            keys[f"{layer_of[src.name]}.act"] = q
        elif src.op_type == "Add":
            main = [producer_of(model, i) for i in src.input]
            owners = [k for k, v in keys.items() if v in main and k.endswith(".act")]
            main_key = [k for k in owners if ".downsample." not in k]
            if len(main_key) != 1:
                raise FqhwError(f"Add node {src.name}: cannot tell its residual branch")
            block = main_key[0].rsplit(".", 2)[0]
            keys[f"{block}.out"] = q
        elif src.op_type == "Quant":
            pending_shortcut.append(q)
        else:
            raise FqhwError(f"Quant node {q.name} follows {src.op_type}, which a QuantResNet does not have")
    for q in pending_shortcut:  # named by the add it feeds: the one whose other operand is known
        adds = [c for c in consumers_of(model, q.output[0]) if c.op_type == "Add"]
        if len(adds) != 1:
            raise FqhwError(f"identity-shortcut Quant {q.name} does not feed one Add")
        other = [producer_of(model, i) for i in adds[0].input if i != q.output[0]]
        owner = [k for k, v in keys.items() if v in other]
        if len(owner) != 1:
            raise FqhwError(f"identity-shortcut Quant {q.name}: cannot tell its block")
        keys[f"{owner[0].rsplit('.', 2)[0]}.shortcut"] = q
    return keys


def qonnx_integer_trace_generic(path, x) -> "OrderedDict[str, np.ndarray]":
    """Run a QONNX file exported by `export_generic_qonnx` from a QuantResNet on `x` (N, C, H,
    W floats = pixel/256) with qonnx's executor in float64, one image at a time; return the
    int64 codes under the keys `integer_trace` uses ("input", "<layer>.act",
    "<block>.shortcut", "<block>.out", "fc.acc"). The Quant nodes' codes are read directly
    (the float64 copy splits each Quant so that its integer output is a tensor); "fc.acc" is
    the integer classifier weights x the summed codes of the last block, checked against
    the Gemm's float output."""
    import json

    import onnx

    from fqhw.intcodes import CODES_SUFFIX, to_int
    from fqhw.onnxgraph import const_value, node_attrs, producer_of, quant_params
    from qonnx.core.onnx_exec import execute_onnx

    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if COMPUTE_LAYERS_KEY not in meta:
        raise FqhwError(f"{path}: not exported by export_generic_qonnx (no {COMPUTE_LAYERS_KEY} metadata)")
    layer_of = json.loads(meta[COMPUTE_LAYERS_KEY])
    keys = _resnet_quant_keys(model, layer_of)
    heads = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and layer_of.get(n.name) == "fc"]
    if len(heads) != 1:
        raise FqhwError("the QONNX graph has no single classifier Gemm named fc")
    head = heads[0]
    wq = producer_of(model, head.input[1])
    t = head.input[0]
    while True:  # Flatten / GlobalAveragePool back to the last block's Quant
        p = producer_of(model, t)
        if p is None or p.op_type == "Quant":
            break
        if p.op_type not in ("Flatten", "Reshape", "GlobalAveragePool"):
            raise FqhwError(f"the classifier input passes through {p.op_type}")
        t = p.input[0]
    if p is None:
        raise FqhwError("cannot find the Quant node that feeds the classifier")
    head_q = p
    transB = node_attrs(head).get("transB", 0) == 1
    bias = const_value(model, head.input[2]).astype(np.float64) if len(head.input) > 2 else None
    wrapper = _float64_exec_copy(path)
    iname = model.graph.input[0].name
    per_key: dict[str, list[np.ndarray]] = {}
    for i in range(x.shape[0]):
        ctx = execute_onnx(wrapper, {iname: x[i : i + 1].astype(np.float64)}, return_full_exec_context=True)

        def codes(q, what):
            s, z = quant_params(ctx, model, q)
            direct = to_int(ctx[q.output[0] + CODES_SUFFIX], np.ones(1), z, what)
            via_scale = to_int(ctx[q.output[0]], s, z, what)
            if not np.array_equal(direct, via_scale):
                raise AssertionError(f"{what}: codes x scale / scale is not the codes")
            return direct, s

        for key, q in keys.items():
            per_key.setdefault(key, []).append(codes(q, key)[0])
        w_int, ws = codes(wq, "fc weight")
        a_int, a_s = codes(head_q, "fc input")
        n_pix = int(a_int.shape[-1] * a_int.shape[-2])
        acc = a_int.sum(axis=(-1, -2)) @ (w_int.T if transB else w_int)
        scale = float(a_s.reshape(-1)[0]) * ws.astype(np.float64).reshape(-1) / n_pix
        _head_check(ctx[head.output[0]].astype(np.float64), acc, scale, bias, "QONNX Gemm")
        per_key.setdefault("fc.acc", []).append(acc)
    return OrderedDict((k, np.concatenate(v, axis=0)) for k, v in per_key.items())


def compare_traces(ref: dict, other: dict, names=("brevitas", "qonnx")) -> dict:
    """Per key: element count and number of differing integers (keys must be the same)."""
    if set(ref) != set(other):
        raise FqhwError(
            f"{names[0]} and {names[1]} report different values: only in {names[0]} "
            f"{sorted(set(ref) - set(other))}, only in {names[1]} {sorted(set(other) - set(ref))}"
        )
    out = {}
    for k in ref:
        a, b = np.asarray(ref[k]), np.asarray(other[k])
        if a.shape != b.shape:
            raise FqhwError(f"{k}: shape {a.shape} in {names[0]}, {b.shape} in {names[1]}")
        out[k] = {"n": int(a.size), "differ": int((a != b).sum())}
    return out



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


def export_transformer_qonnx(qmodel: QuantTransformer, input_shape, path, opset: int = 17):
    """Export a QuantTransformer to a cleaned QONNX file with Brevitas' exporter directly.

    Why not fqhw.backends.qonnx_export.export_qonnx: it exports at opset 13, where
    LayerNormalization does not exist (it would be decomposed into ReduceMean / Pow / Sqrt
    / Div); at opset 17 it stays one op, which is what finn-plus' LayerNorm conversion
    looks for. The layer metadata is the same as `export_generic_qonnx` writes."""
    import contextlib
    import io
    import json
    import tempfile
    import warnings
    from pathlib import Path

    from brevitas.export import export_qonnx as brevitas_export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    from fqhw.onnxgraph import canonical
    from fqhw.quant.qmodel import project_weights

    project_weights(qmodel)  # see export_generic_qonnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (1,) + tuple(int(s) for s in input_shape)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            raw = Path(tmp) / "raw.onnx"
            brevitas_export_qonnx(qmodel, args=torch.zeros(shape), export_path=str(raw), dynamo=False, opset_version=opset)
            model = cleanup_model(ModelWrapper(str(raw)))
    finally:
        qmodel.train(was_training)
    proto = canonical(model.model)
    weights = {n: l.compute.weight.detach().cpu().numpy() for n, l in qmodel.layers.items()}
    found = {}
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            w = _weight_source(proto, node)
            if w is None:
                continue
            hits = [n for n, lw in weights.items() if lw.shape == w.shape and np.array_equal(lw, w)]
            if len(hits) != 1:
                # timm's linear layers export as MatMul with the weight transposed
                hits = [n for n, lw in weights.items() if lw.T.shape == w.shape and np.array_equal(lw.T, w)]
            if len(hits) == 1:
                found[node.name] = hits[0]
    proto.metadata_props.add(key=COMPUTE_LAYERS_KEY, value=json.dumps(found, sort_keys=True))
    path.write_bytes(proto.SerializeToString(deterministic=True))
    return path


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


def qonnx_integer_trace_transformer(path, x) -> "OrderedDict[str, np.ndarray]":
    """The integer codes a QONNX file exported by `export_transformer_qonnx` computes on `x`
    (N, C, H, W floats = pixel/256), under `integer_trace`'s transformer keys: "input" and
    "<layer>.out" (each quantized layer's output quantizer). Run with qonnx's executor in
    float64 (fqhw.backends.qonnx_export's float64 copy: Quant split so that its codes are a
    tensor), one image at a time, like the ResNet trace; the float ops between quantizers
    (attention, softmax, LayerNorm, GELU) run in float64 in both this and Brevitas' float64
    twin, so the codes agree unless a value falls within float64 error of a rounding
    boundary."""
    import json

    import onnx

    from fqhw.intcodes import CODES_SUFFIX, to_int
    from fqhw.onnxgraph import consumers_of, quant_params
    from qonnx.core.onnx_exec import execute_onnx

    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if COMPUTE_LAYERS_KEY not in meta:
        raise FqhwError(f"{path}: not exported by export_transformer_qonnx (no {COMPUTE_LAYERS_KEY} metadata)")
    layer_of = json.loads(meta[COMPUTE_LAYERS_KEY])
    gin = model.graph.input[0].name
    keys: OrderedDict[str, object] = OrderedDict()
    inputs = [n for n in consumers_of(model, gin) if n.op_type == "Quant"]
    if len(inputs) != 1:
        raise FqhwError(f"{path}: the graph input does not feed one Quant node")
    keys["input"] = inputs[0]
    for node in model.graph.node:
        layer = layer_of.get(node.name)
        if layer is None:
            continue
        t, q = node.output[0], None
        for _ in range(4):  # the bias Add (a MatMul's), then the layer's output quantizer
            nxt = consumers_of(model, t)
            if len(nxt) != 1:
                break
            if nxt[0].op_type == "Quant":
                q = nxt[0]
                break
            if nxt[0].op_type != "Add":
                break
            t = nxt[0].output[0]
        if q is not None:
            keys[f"{layer}.out"] = q
    wrapper = _float64_exec_copy(path)
    per_key: dict[str, list[np.ndarray]] = {}
    for i in range(x.shape[0]):
        ctx = execute_onnx(wrapper, {gin: x[i : i + 1].astype(np.float64)}, return_full_exec_context=True)
        for key, q in keys.items():
            _s, z = quant_params(ctx, model, q)
            per_key.setdefault(key, []).append(to_int(ctx[q.output[0] + CODES_SUFFIX], np.ones(1), z, key))
    return per_image(OrderedDict((k, np.concatenate(v, axis=0)) for k, v in per_key.items()), x.shape[0])


def qonnx_execute(path, x) -> np.ndarray:
    """The output of the QONNX file at `path` on `x` (N, C, H, W), run image by image with
    qonnx's executor as the file is (float32): a check that the export runs and computes
    the model's function, not an integer comparison."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.change_batchsize import ChangeBatchSize

    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    wrapper = ModelWrapper(str(path))
    iname = wrapper.graph.input[0].name
    if wrapper.get_tensor_shape(iname)[0] != 1:
        wrapper = wrapper.transform(ChangeBatchSize(1))
    oname = wrapper.graph.output[0].name
    outs = [execute_onnx(wrapper, {iname: x[i : i + 1].astype(np.float32)})[oname] for i in range(x.shape[0])]
    return np.concatenate(outs, axis=0)
