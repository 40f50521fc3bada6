"""A QuantResNet's activation code boundaries moved off float rounding error (as
fqhw.quant.snap.snap_thresholds does for the default CNN): the margin of every reachable
boundary to an integer accumulator (`resnet_threshold_margins`), and the BatchNorm nudges
that make it large enough (`snap_resnet_thresholds`), so that FINN's float32 thresholds and
every float64 evaluation round each activation the same way."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from fqhw.errors import FqhwError
from fqhw.quant.generic import QuantResNet
from fqhw.quant.layers import int_codes
from fqhw.quant.snap import layer_geometry

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
            out[name] = layer_geometry(
                s_in * s_w * inv, beta - m * inv, s_a, levels, in_max, w_int,
                bn=bn, signed=signed, s_in=s_in, s_w=s_w, gamma=gamma, beta=beta, mean=m, offset_mean=offset, sd=sd,
            )
    return out


def resnet_threshold_margins(qmodel: QuantResNet) -> "OrderedDict[str, float]":
    """Per conv: the smallest distance (accumulator units) from a reachable code boundary
    of its output quantizer to an integer (0.5 where none is reachable)."""
    from fqhw.quant.snap import code_boundaries, min_margin

    out = OrderedDict()
    for name, g in _resnet_geometry(qmodel).items():
        out[name] = min(
            min_margin(code_boundaries(g["A"][c], g["B"][c], g["s_a"], g["levels"], g["acc_lo"][c], g["acc_hi"][c]))
            for c in range(len(g["A"]))
        )
    return out


def snap_resnet_thresholds(qmodel: QuantResNet, margin: float | None = None, float32_ulps: float | None = None) -> dict:
    """fqhw.quant.snap.snap_thresholds for a QuantResNet: move every code boundary that a
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
    from fqhw.quant.snap import FLOAT32_ULPS, SNAP_MARGIN, project_weights, snap_channel

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

