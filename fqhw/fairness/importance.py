"""Group-aware importance: per-weight scores per group, and from them the predicted loss
increase per layer, width and group (the Sensitivity the CP-SAT allocator consumes).

Four ways to score a weight for group g (`method`), each accumulated over calibration
batches drawn from group g's samples only (so L_g is group g's mean cross-entropy):

    fisher    F_g,i = mean over g's samples of (dl/dw_i)^2      per-sample empirical Fisher
    gradient  |dL_g/dw_i|                                       (FairQuant's "gradient")
    grape     (dL_g/dw_i * w_i)^2                               (after FairGRAPE)
    hawq      H_g,ii ~= mean over Rademacher z of z_i * (H_g z)_i  (Hutchinson, per layer;
              after HAWQ)

For gradient, grape and hawq the per-batch score is averaged over the group's batches,
each batch weighted by its sample count; fisher averages over samples (per-sample, not
per-batch, gradients: a batch gradient averages away most of the curvature).

Groups are the sensitive attribute (`group_by="attribute"`, data.groups) or the target
classes (`group_by="class"`, data.labels).

The predicted loss increase of quantizing a layer's weights to b bits, with
delta_i = w_i - Q_b(w_i) the real error of the per-channel quantizer the deployed model uses
(`quantize_weight_per_channel`):

    fisher    dL_g ~= 1/2 * sum_i F_g,i * delta_i^2                   (second order, F ~ H)
    hawq      dL_g ~= max(0, 1/2 * sum_i H_g,ii * delta_i^2)          (second order, exact
              diagonal in expectation; the per-weight estimates are noisy and may be
              negative, so they are summed first and only the layer total is floored at 0)
    grape     dL_g ~= sum_i grape_g,i * (delta_i / w_i)^2 = sum_i (dL_g/dw_i * delta_i)^2
              (FairGRAPE's score is the squared first-order change when w_i is removed,
              delta_i = w_i; rescaled to the quantization perturbation. A weight at 0 is
              not moved by the symmetric quantizer, so its term is 0.)
    gradient  dL_g ~= sum_i |dL_g/dw_i| * |delta_i|      (first order, a bound on |dL_g|)

Activations: every method keeps the Fisher activation table (one per layer with an output
activation),
    dL_g(layer output at a bits) ~= 1/2 * sum_j F_g,j * Delta_a^2 / 12
with Delta_a = range / (2^a - 1) the step of an unsigned a-bit quantizer whose range is the
observed activation maximum. Only the weight tables change with `method`. The grape and
gradient tables are not second-order loss estimates, so their scale next to the (Fisher)
activation table is not fisher's: on a small trained FairCNN (synthetic data, 4 bits) the
summed weight tables were, relative to fisher's, gradient 33x, grape 0.035x, hawq 1.2x, so
a solver reading gradient tables all but ignores the activations and one reading grape
tables favours them.

hawq follows HAWQ (Dong et al., ICCV 2019; HAWQ-V2, NeurIPS 2020), which measures a
layer's sensitivity by its Hessian spectrum / trace estimated with Hutchinson's method; here
the diagonal itself weights each weight's own quantization error.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fqhw.data.dataset import GroupedImages
from fqhw.errors import FqhwError
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.network import NetworkSpec

METHODS = ("fisher", "gradient", "grape", "hawq")
GROUP_BY = ("attribute", "class")
HVP_CHUNK = 64  # Hutchinson draws per batched Hessian-vector product


def quantize_weight_per_channel(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric narrow-range per-output-channel quantization, scale = max|w| / (2^(b-1) - 1)."""
    flat = w.reshape(w.shape[0], -1)
    qmax = 2 ** (bits - 1) - 1
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.round(flat / scale).clamp(-qmax, qmax) * scale).reshape(w.shape)


def _activation_module(model: nn.Module, layer: str) -> nn.Module | None:
    """The module whose output is the activation a layer's act_bits quantize.

    FairCNN: the ReLU after '<block>.conv'. timm ResNet: 'convK' -> 'actK' of the same
    block (a block's last conv: the ReLU after the residual add, the join's activation);
    a downsample conv -> its conv + BN (the shortcut operand of the add). Anything else
    (a transformer's linear layers, whose outputs are quantized as they are): the layer."""
    modules = dict(model.named_modules())
    if layer.endswith(".conv"):
        return modules.get(layer[: -len("conv")] + "relu")
    parent, _, leaf = layer.rpartition(".")
    if leaf.startswith("conv") and leaf[4:].isdigit():
        return modules.get(f"{parent}.act{leaf[4:]}" if parent else f"act{leaf[4:]}")
    if layer.endswith(".downsample.0"):
        return modules.get(layer[: -len(".0")])
    return modules.get(layer)


def _check_options(method: str, group_by: str) -> None:
    if method not in METHODS:
        raise FqhwError(f"unknown importance method {method!r}; known: {', '.join(METHODS)}")
    if group_by not in GROUP_BY:
        raise FqhwError(f"unknown group_by {group_by!r}; known: {', '.join(GROUP_BY)}")


def group_ids(data: GroupedImages, group_by: str = "attribute") -> tuple[np.ndarray, list[str]]:
    """(group index per sample, group names) for `group_by` "attribute" or "class"."""
    _check_options("fisher", group_by)
    if group_by == "class":
        return np.asarray(data.labels), list(data.class_names)
    return np.asarray(data.groups), list(data.group_names)


def _layer_names(net: NetworkSpec) -> list[str]:
    """Module names of the compute layers (a channel group's module is its layer's)."""
    return list(dict.fromkeys(spec.group or spec.name for spec in net.layers))


class _Scores:
    """What one pass over the calibration data gathers: per-weight score sums per group,
    sample counts, and the activation Fisher sums and ranges."""

    def __init__(self, names, weights, G):
        self.names = names
        self.weights = weights
        self.w_sum = {name: [torch.zeros_like(w) for _ in range(G)] for name, w in weights.items()}
        self.a_fisher: dict[str, list[float]] = {}
        self.a_range: dict[str, float] = {}
        self.counts = np.zeros(G, dtype=np.int64)
        self.act_layers: list[str] = []


def _accumulate(
    model: nn.Module,
    net: NetworkSpec,
    data: GroupedImages,
    method: str,
    group_by: str,
    max_per_group: int,
    batch_size: int,
    seed: int,
    draws: int,
    activations: bool,
) -> tuple[_Scores, list[str]]:
    _check_options(method, group_by)
    if method == "hawq" and draws < 1:
        raise FqhwError(f"hawq needs at least one Hutchinson draw, got draws={draws}")
    model = model.eval()
    modules = dict(model.named_modules())
    names = _layer_names(net)
    missing = [n for n in names if not isinstance(modules.get(n), (nn.Conv2d, nn.Linear))]
    if missing:
        raise FqhwError(f"the model has no Conv2d/Linear module named {', '.join(map(repr, missing))}; the network spec must be read from this model")
    weights = {name: modules[name].weight for name in names}
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    weight_keys = {name: name + ".weight" for name in names}

    def sample_loss(wp, x, y):
        out = functional_call(model, ({**params, **wp}, buffers), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    x_all, y_all, _ = data.tensors()
    gid, group_names = group_ids(data, group_by)
    rng = np.random.default_rng(seed)
    zgen = torch.Generator().manual_seed(seed)
    G = len(group_names)
    acc = _Scores(names, weights, G)

    act_mods = (
        {spec.act_group: _activation_module(model, spec.act_group) for spec in net.layers if spec.has_output_act}
        if activations
        else {}
    )
    acc.act_layers = list(act_mods)
    wlist = [weights[n] for n in names]

    def weight_step(g: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch of group g's samples to the weight score sums."""
        if method == "fisher":
            # Per-sample gradients, squared and summed.
            grads = per_sample_grad({k: params[k] for k in weight_keys.values()}, x, y)
            for name, key in weight_keys.items():
                acc.w_sum[name][g] += (grads[key] ** 2).sum(0)
            return
        with torch.enable_grad():
            loss = nn.functional.cross_entropy(model(x), y)  # L_g on this batch
            gs = torch.autograd.grad(loss, wlist, create_graph=method == "hawq")
            if method == "gradient":
                scores = [gi.abs() for gi in gs]
            elif method == "grape":
                scores = [(gi * wi.detach()) ** 2 for gi, wi in zip(gs, wlist)]
            else:
                scores = _hutchinson(gs, wlist, draws, zgen)
        for name, sc in zip(names, scores):  # a batch counts by its samples
            acc.w_sum[name][g] += len(y) * sc.detach()

    frozen = [w for w in wlist if not w.requires_grad]
    for w in frozen:  # autograd needs them; the caller's setting is restored below
        w.requires_grad_(True)
    try:
        _loop(acc, model, gid, x_all, y_all, rng, max_per_group, batch_size, weight_step, act_mods)
    finally:
        for w in frozen:
            w.requires_grad_(False)
    return acc, group_names


def _loop(acc: _Scores, model, gid, x_all, y_all, rng, max_per_group, batch_size, weight_step, act_mods) -> None:
    """Group by group, batches of up to `batch_size` of at most `max_per_group` samples of
    the group: the weight scores (`weight_step`), then the activation Fisher."""
    G = len(acc.counts)
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(_m, _i, out):
            out.retain_grad()
            captured[name] = out

        return hook

    for g in range(G):
        idx = np.flatnonzero(gid == g)
        if len(idx) == 0:
            continue
        idx = rng.permutation(idx)[:max_per_group]
        acc.counts[g] = len(idx)
        for start in range(0, len(idx), batch_size):
            sel = torch.from_numpy(idx[start : start + batch_size])
            x, y = x_all[sel], y_all[sel]
            weight_step(g, x, y)
            if not act_mods:
                continue
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
                acc.a_fisher.setdefault(n, [0.0] * G)
                acc.a_fisher[n][g] += float((a.grad**2).sum())
                acc.a_range[n] = max(acc.a_range.get(n, 0.0), float(a.detach().max()))
            model.zero_grad(set_to_none=True)
            captured.clear()


def _hutchinson(gs, ws, draws: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Hutchinson's estimate of the Hessian diagonal (Bekas et al. 2007; HAWQ-V2 uses the
    same trick for the layer trace): for Rademacher z (entries +-1, E[z z^T] = I),
    E[z * (H z)] = diag(H), and H z is one more backward pass through the gradient graph
    (double backprop: the gradient of g . z), so the Hessian is never formed.

    z is drawn one layer at a time (one Hessian-vector product per layer and draw): the
    error of an entry is z_i * sum_{j != i} H_ij z_j, and a z spanning every layer adds the
    cross-layer blocks to it, which are not small away from a minimum (on an untrained
    FairCNN they swamped the head's diagonal entirely)."""
    est = [torch.zeros_like(w) for w in ws]
    for k, (gk, wk) in enumerate(zip(gs, ws)):
        for start in range(0, draws, HVP_CHUNK):  # draws batched through one vmapped backward
            n = min(HVP_CHUNK, draws - start)
            z = (torch.randint(0, 2, (n, *wk.shape), generator=gen) * 2 - 1).to(wk.dtype)
            (hz,) = torch.autograd.grad(gk, wk, grad_outputs=z, retain_graph=True, is_grads_batched=True)
            est[k] += (z * hz).sum(0)
    return [e / draws for e in est]


def importance_maps(
    model: nn.Module,
    net: NetworkSpec,
    data: GroupedImages,
    method: str = "grape",
    group_by: str = "attribute",
    max_per_group: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    draws: int = 8,
) -> dict[str, torch.Tensor]:
    """Raw per-weight importance per group: {layer: tensor (G, *weight.shape)}, the mean
    score over each group's calibration samples (all zero for a group with no samples).
    G is the number of groups of `group_by` (data.num_groups, or data.num_classes for
    "class"); the layers are the Conv2d/Linear modules of `net`. hawq's maps are the signed
    Hessian-diagonal estimates (`draws` Rademacher vectors per batch); the reducers
    (fqhw.fairness.reducers) take their magnitude."""
    acc, _ = _accumulate(model, net, data, method, group_by, max_per_group, batch_size, seed, draws, activations=False)
    return _means(acc)


def _means(acc: _Scores) -> dict[str, torch.Tensor]:
    den = torch.from_numpy(np.maximum(acc.counts, 1)).to(torch.float32)
    out = {}
    for name, per_group in acc.w_sum.items():
        stacked = torch.stack(per_group)
        out[name] = stacked / den.reshape(-1, *([1] * (stacked.dim() - 1)))
    return out


def _units(net: NetworkSpec):
    """(unit name, module name, output-channel rows) of every allocation unit: a whole layer
    (rows None), or a channel group "<layer>:g<k>", which owns its layer's k-th contiguous
    block of MH / groups output channels."""
    for spec in net.layers:
        if spec.group:
            yield spec.name, spec.group, slice(spec.group_index * spec.mh, (spec.group_index + 1) * spec.mh)
        else:
            yield spec.name, spec.name, None


def weight_table(
    maps: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    method: str,
    bits=range(2, 9),
    net: NetworkSpec | None = None,
) -> dict[str, dict[int, np.ndarray]]:
    """Per unit and width, the predicted loss increase per group (the module docstring's
    formula for `method`) from per-weight maps {layer: (G, *w.shape)} and the float weights
    {layer: w}. The units are `net`'s (channel groups get their rows of the layer), or, with
    no `net`, the layers of `maps`."""
    _check_options(method, "attribute")
    units = list(_units(net)) if net is not None else [(n, n, None) for n in maps]
    table: dict[str, dict[int, np.ndarray]] = {}
    for unit, name, rows in units:
        w = weights[name].detach().to(torch.float64)
        m = maps[name].detach().to(torch.float64)
        if rows is not None:
            w, m = w[rows], m[:, rows]
        safe_w = torch.where(w != 0, w, torch.ones_like(w))
        table[unit] = {}
        for b in bits:
            delta = w - quantize_weight_per_channel(w, b)
            if method in ("fisher", "hawq"):
                vals = 0.5 * (m * delta**2).flatten(1).sum(1)
                if method == "hawq":
                    vals = vals.clamp_min(0.0)
            elif method == "grape":
                ratio = torch.where(w != 0, delta / safe_w, torch.zeros_like(w))
                vals = (m * ratio**2).flatten(1).sum(1)
            else:
                vals = (m.abs() * delta.abs()).flatten(1).sum(1)
            table[unit][b] = vals.numpy().astype(np.float64)
    return table


def group_sensitivity(
    model: nn.Module,
    net: NetworkSpec,
    data: GroupedImages,
    bits: range = range(2, 9),
    max_per_group: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    method: str = "fisher",
    group_by: str = "attribute",
    draws: int = 8,
) -> Sensitivity:
    """Sensitivity of the float `model` for each layer of `net`, per group of `data`
    (`group_by` "attribute": data.groups; "class": the target classes). `method` picks
    the weight score and its loss formula (module docstring); the activation table is the
    Fisher one for every method. `draws`: Hutchinson vectors per batch (hawq only)."""
    acc, group_names = _accumulate(model, net, data, method, group_by, max_per_group, batch_size, seed, draws, activations=True)
    G = len(group_names)
    counts = acc.counts
    weights = acc.weights
    if method == "fisher":
        # computed as it always was (float32 sums, then divided by the count), so that the
        # fisher tables stay identical
        w_table: dict[str, dict[int, np.ndarray]] = {}
        for unit, name, rows in _units(net):
            w = weights[name].detach()
            sums = acc.w_sum[name]
            if rows is not None:
                w, sums = w[rows], [s[rows] for s in sums]
            w_table[unit] = {}
            for b in bits:
                err2 = (w - quantize_weight_per_channel(w, b)) ** 2
                w_table[unit][b] = np.array(
                    [0.5 * float((sums[g] * err2).sum()) / max(counts[g], 1) for g in range(G)]
                )
    else:
        w_table = weight_table(_means(acc), weights, method, bits, net=net)
    act_table: dict[str, dict[int, np.ndarray]] = {}
    for name in acc.act_layers:
        act_table[name] = {}
        for b in bits:
            step = acc.a_range.get(name, 0.0) / (2**b - 1)
            noise = step**2 / 12.0
            act_table[name][b] = np.array(
                [0.5 * acc.a_fisher.get(name, [0.0] * G)[g] * noise / max(counts[g], 1) for g in range(G)]
            )
    label = method if group_by == "attribute" else f"{method}/class"
    return Sensitivity(groups=group_names, weight=w_table, act=act_table, method=label)
