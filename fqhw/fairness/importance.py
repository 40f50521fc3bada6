"""Group-aware importance: the predicted loss increase per layer, width and group.

A second-order (diagonal Fisher) estimate, in the spirit of HAWQ/FairGRAPE: for group g,
    dL_g(layer weights at b bits) ~= 1/2 * sum_i F_g,i * (w_i - Q_b(w_i))^2
    dL_g(layer output at a bits)  ~= 1/2 * sum_j F_g,j * Delta_a^2 / 12
with F_g the per-sample empirical Fisher (mean squared gradient of the loss over group g's
samples), Q_b the symmetric per-output-channel weight quantizer the deployed model uses, and
Delta_a = range / (2^a - 1) the step of an unsigned a-bit activation quantizer whose range
is the observed activation maximum. Per-sample (not per-batch) gradients matter: a batch
gradient averages away most of the curvature.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fqhw.data.dataset import GroupedImages
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.network import NetworkSpec


def quantize_weight_per_channel(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric narrow-range per-output-channel quantization, scale = max|w| / (2^(b-1) - 1)."""
    flat = w.reshape(w.shape[0], -1)
    qmax = 2 ** (bits - 1) - 1
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.round(flat / scale).clamp(-qmax, qmax) * scale).reshape(w.shape)


def _activation_module(model: nn.Module, layer: str) -> nn.Module | None:
    """The ReLU that follows a conv layer named '<block>.conv' (FairCNN naming)."""
    if not layer.endswith(".conv"):
        return None
    return dict(model.named_modules()).get(layer[: -len("conv")] + "relu")


def group_sensitivity(
    model: nn.Module,
    net: NetworkSpec,
    data: GroupedImages,
    bits: range = range(2, 9),
    max_per_group: int = 256,
    batch_size: int = 64,
    seed: int = 0,
) -> Sensitivity:
    """Sensitivity of the float `model` for each layer of `net`, per group of `data`."""
    model = model.eval()
    modules = dict(model.named_modules())
    weights = {spec.name: modules[spec.name].weight for spec in net.layers}
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    weight_keys = {spec.name: spec.name + ".weight" for spec in net.layers}

    def sample_loss(wp, x, y):
        out = functional_call(model, ({**params, **wp}, buffers), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    x_all, y_all, g_all = data.tensors()
    rng = np.random.default_rng(seed)
    G = data.num_groups
    w_fisher = {name: [torch.zeros_like(w) for _ in range(G)] for name, w in weights.items()}
    a_fisher: dict[str, list[float]] = {}
    a_range: dict[str, float] = {}
    counts = np.zeros(G, dtype=np.int64)

    act_mods = {spec.name: _activation_module(model, spec.name) for spec in net.layers if spec.has_output_act}
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(_m, _i, out):
            out.retain_grad()
            captured[name] = out

        return hook

    for g in range(G):
        idx = np.flatnonzero(g_all.numpy() == g)
        if len(idx) == 0:
            continue
        idx = rng.permutation(idx)[:max_per_group]
        counts[g] = len(idx)
        for start in range(0, len(idx), batch_size):
            sel = torch.from_numpy(idx[start : start + batch_size])
            x, y = x_all[sel], y_all[sel]
            # Weights: per-sample gradients, squared and summed.
            grads = per_sample_grad({k: params[k] for k in weight_keys.values()}, x, y)
            for name, key in weight_keys.items():
                w_fisher[name][g] += (grads[key] ** 2).sum(0)
            # Activations: the gradient of the summed loss w.r.t. an activation is per sample.
            hooks = [m.register_forward_hook(capture(n)) for n, m in act_mods.items() if m is not None]
            try:
                with torch.enable_grad():
                    out = model(x.requires_grad_(False))
                    loss = nn.functional.cross_entropy(out, y, reduction="sum")
                    loss.backward()
            finally:
                for h in hooks:
                    h.remove()
            for n, a in captured.items():
                a_fisher.setdefault(n, [0.0] * G)
                a_fisher[n][g] += float((a.grad**2).sum())
                a_range[n] = max(a_range.get(n, 0.0), float(a.detach().max()))
            model.zero_grad(set_to_none=True)
            captured.clear()

    weight_table: dict[str, dict[int, np.ndarray]] = {}
    for name, w in weights.items():
        w = w.detach()
        weight_table[name] = {}
        for b in bits:
            err2 = (w - quantize_weight_per_channel(w, b)) ** 2
            weight_table[name][b] = np.array(
                [0.5 * float((w_fisher[name][g] * err2).sum()) / max(counts[g], 1) for g in range(G)]
            )
    act_table: dict[str, dict[int, np.ndarray]] = {}
    for name in act_mods:
        act_table[name] = {}
        for b in bits:
            step = a_range.get(name, 0.0) / (2**b - 1)
            noise = step**2 / 12.0
            act_table[name][b] = np.array(
                [0.5 * a_fisher.get(name, [0.0] * G)[g] * noise / max(counts[g], 1) for g in range(G)]
            )
    return Sensitivity(groups=list(data.group_names), weight=weight_table, act=act_table, method="fisher")
