"""Threshold margins of the FINN scheme's model (fqhw.quant.qmodel), and snapping them.

A conv layer with an output activation computes, per output channel c,
    y = A_c * acc + B_c,   code = clamp(round(y / s_a), 0, 2^a - 1)
where acc is the integer accumulator (integer weights x integer input codes),
A_c = s_in * s_w[c] * gamma_c / sqrt(var_c + eps) and B_c = beta_c - mean_c * gamma_c /
sqrt(var_c + eps). The code changes where y / s_a crosses k + 0.5, i.e. at the accumulator
values t_k = ((k + 0.5) * s_a - B_c) / A_c, an arithmetic progression. acc is an integer,
so if every boundary that acc can reach lies at least `margin` away from an integer, every
evaluation whose error (in accumulator units) is below the margin rounds the same way.

`snap_thresholds` (after the last training step, before export) makes that hold: weights
set exactly onto their quantization grid (`project_weights`), then the BatchNorm bias (and
within 0.1% the BN scale) of every channel nudged so that every reachable code boundary is
far from an integer, and float32 and float64 evaluations round every activation alike.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from brevitas.nn import QuantConv2d

from fqhw.errors import FqhwError
from fqhw.quant.layers import int_codes
from fqhw.quant.qmodel import QuantFairCNN

SNAP_MARGIN = 1e-3  # default required margin, in accumulator units


def _affine(s_in, s_w, gamma, beta, mean, sd):
    """(A, B) of the pre-activation y = A * acc + B, in float64 (scalars or arrays alike)."""
    inv = gamma / sd
    return s_in * s_w * inv, beta - mean * inv


def layer_geometry(A, B, s_a: float, levels: int, in_max: float, w_int: np.ndarray, **pieces) -> dict:
    """One layer's entry of `threshold_geometry`: y = A * acc + B per channel, the code
    grid (s_a, levels), the accumulator range reachable with input codes up to `in_max`
    (w_int: (C_out, K) integer weights), and the pieces A and B are made of."""
    return {
        "A": A,
        "B": B,
        "s_a": s_a,
        "levels": levels,
        "acc_lo": in_max * np.minimum(w_int, 0).sum(axis=1).astype(np.float64),
        "acc_hi": in_max * np.maximum(w_int, 0).sum(axis=1).astype(np.float64),
        **pieces,
    }


def threshold_geometry(qmodel: QuantFairCNN) -> "OrderedDict[str, dict]":
    """Per conv layer with an output activation, in float64 from the model's quantized
    parameters (the float32 values it holds, exactly): {"A", "B" (per channel; the
    pre-activation is y = A * acc + B), "s_a", "levels" (2^a - 1), "acc_lo", "acc_hi" (per
    channel: the accumulator range reachable with any input codes), and the pieces of A
    and B: "s_in", "s_w", "gamma", "beta", "mean", "sd" (sqrt(var + eps))}."""
    out: OrderedDict[str, dict] = OrderedDict()
    with torch.no_grad():
        # what the next layer reads; the channel groups of a layer all read what the layer
        # before them wrote, not each other's output
        s_next, q_next = float(qmodel.input_quant.act_quant.scale()), 2**8 - 1
        current = None
        for name, ql in qmodel.layers.items():
            if ql.act is None:
                continue
            if (ql.group or name) != current:
                current = ql.group or name
                s_in, q_in_max = s_next, q_next
            if not isinstance(ql.compute, QuantConv2d):
                raise FqhwError(f"{name}: threshold margins are defined for conv layers only")
            qw = ql.compute.quant_weight()
            w_int = int_codes(qw, f"{name} weight").numpy().reshape(qw.value.shape[0], -1)
            s_w = qw.scale.detach().double().numpy().reshape(-1)
            bn = qmodel.get_submodule(ql.block).bn
            var = bn.running_var.detach().double().numpy()
            mean = bn.running_mean.detach().double().numpy()
            gamma = bn.weight.detach().double().numpy() if bn.weight is not None else np.ones_like(var)
            beta = bn.bias.detach().double().numpy() if bn.bias is not None else np.zeros_like(var)
            sd = np.sqrt(var + float(bn.eps))
            A, B = _affine(s_in, s_w, gamma, beta, mean, sd)
            s_a = float(ql.act.act_quant.scale())
            levels = 2 ** int(ql.act.act_quant.bit_width()) - 1
            out[name] = layer_geometry(A, B, s_a, levels, q_in_max, w_int, s_in=s_in, s_w=s_w, gamma=gamma, beta=beta, mean=mean, sd=sd)
            s_next, q_next = s_a, levels
    return out


def code_boundaries(A: float, B: float, s_a: float, levels: int, lo: float, hi: float, with_k: bool = False):
    """The code boundaries t_k in accumulator units that an accumulator in [lo, hi] can reach
    (with one unit of slack on each side); with_k: also their indices k."""
    k = np.arange(levels, dtype=np.float64)
    if A == 0.0:
        return (np.empty(0), k[:0]) if with_k else np.empty(0)
    t = ((k + 0.5) * s_a - B) / A
    keep = (t >= lo - 1.0) & (t <= hi + 1.0)
    return (t[keep], k[keep]) if with_k else t[keep]


def _dist_to_int(t: np.ndarray) -> np.ndarray:
    return np.abs(t - np.round(t))


def min_margin(t: np.ndarray) -> float:
    return float(_dist_to_int(t).min()) if t.size else 0.5


def _best_shift(t: np.ndarray, tie_tol: float, need: float | None = None) -> float:
    """A shift u (accumulator units, |u| <= 0.5) of the boundaries t away from the integers.

    need None: the u that maximises min_k dist(t_k + u, Z), the one nearest to zero among
    those within a factor (1 - tie_tol) of the best. need given (and achievable): the u
    nearest to zero with min_k dist(t_k + u, Z) >= need.

    With z = -u mod 1 the point of the unit circle that the integers move to, dist(t_k + u, Z)
    is the circular distance of z from frac(t_k): the best z is the middle of the widest gap
    between the sorted fractional parts (half a gap >= 1 / (2K) for K boundaries)."""
    if t.size == 0:
        return 0.0
    f = np.unique(t - np.floor(t))
    lo = f
    hi = np.append(f[1:], f[0] + 1.0)  # the last gap wraps around
    half = (hi - lo) / 2.0
    best = float(half.max())
    target = need if need is not None and need <= best else best * (1.0 - tie_tol)
    best_u = None
    for a, b in zip(lo[half >= target] + target, hi[half >= target] - target):
        for n in (np.floor(a), np.floor(a) + 1.0, np.floor(a) + 2.0):
            z = min(max(n, a), b)
            u = float(n - z)
            if best_u is None or abs(u) < abs(best_u):
                best_u = u
    return float(best_u)


def threshold_margins(qmodel: QuantFairCNN) -> "OrderedDict[str, dict]":
    """Per conv layer with an output activation: the smallest distance (accumulator units)
    from a reachable code boundary to an integer, overall ("min_margin") and per channel
    ("channel_margin"), and the number of reachable boundaries ("boundaries")."""
    out: OrderedDict[str, dict] = OrderedDict()
    for name, g in threshold_geometry(qmodel).items():
        margins, count = [], 0
        for c in range(len(g["A"])):
            t = code_boundaries(g["A"][c], g["B"][c], g["s_a"], g["levels"], g["acc_lo"][c], g["acc_hi"][c])
            margins.append(min_margin(t))
            count += t.size
        out[name] = {"min_margin": float(min(margins)), "channel_margin": np.asarray(margins), "boundaries": count}
    return out


def project_weights(qmodel: QuantFairCNN, max_iter: int = 4) -> dict[str, int]:
    """Set every float weight to its dequantized value (code x scale, float32), so that
    weight / scale is an integer up to a few float32 ulps and rounds to the same code in any
    precision: a weight whose quotient sat within float32 error of k + 0.5 had a code that
    depended on the precision of the division (Brevitas and FINN divide in float32, a
    float64 execution of the QONNX file in float64). Codes are unchanged; the per-channel
    scale (max |w| / (2^(b-1) - 1)) may move by an ulp. Returns {layer: weights changed}."""
    changed: dict[str, int] = {}
    with torch.no_grad():
        for name, ql in qmodel.layers.items():
            w = ql.compute.weight
            codes = int_codes(ql.compute.quant_weight(), f"{name} weight")
            before = w.detach().clone()
            for _ in range(max_iter):
                qw = ql.compute.quant_weight()
                value = qw.value.detach().to(w.dtype)
                if torch.equal(value, w.detach()):
                    break
                w.copy_(value)
            qw = ql.compute.quant_weight()
            if not torch.equal(int_codes(qw, f"{name} weight"), codes):
                raise AssertionError(f"{name}: projecting the weights onto their grid changed a code")
            q = w.detach().double() / qw.scale.detach().double()
            if float((q - codes.double()).abs().max()) > 1e-4:
                raise AssertionError(f"{name}: projected weights are not on their grid")
            changed[name] = int((before != w.detach()).sum())
    return changed


def _f32_near(x: float, n: int = 3) -> list[np.float32]:
    """The float32 nearest to x and its n neighbours on each side."""
    c = np.float32(x)
    out, up, down = [c], c, c
    for _ in range(n):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        out += [up, down]
    return out


FLOAT32_ULPS = 8.0  # default margin to keep, in float32 ulps of a channel's largest magnitude


def _float32_magnitude(g: dict, c: int, A: float, t: np.ndarray, k: np.ndarray) -> float:
    """The largest magnitude, in accumulator units, that a float32 evaluation of channel c
    handles on the way to a code: the reachable accumulators and boundaries, the boundary
    levels (k + 0.5) * s_a, beta and the BN mean (each divided by the channel's scale A).
    FINN's float32 threshold derivation was seen to err by up to 2.9 float32 ulps of it (8-bit
    FairCNN layers, random weights and BN)."""
    mags = [abs(g["acc_lo"][c]), abs(g["acc_hi"][c]), abs(g["beta"][c] / A), abs(g["mean"][c] / (g["s_in"] * g["s_w"][c]))]
    if t.size:
        mags += [float(np.abs(t).max()), float(((k + 0.5) * g["s_a"]).max() / abs(A))]
    return max(mags)


def snap_channel(
    g: dict, c: int, tie_tol: float, max_scale_change: float, floor: float, float32_ulps: float | None
) -> tuple[np.float32, np.float32, float, float]:
    """(gamma, beta) float32 for channel c of a layer's geometry `g`, and the margin they give
    and the margin needed: max(floor, float32_ulps float32 ulps of the channel's largest
    magnitude), or the largest possible for float32_ulps None.

    A channel that has the needed margin is left alone. Otherwise beta is shifted by the
    smallest amount that gives it; where beta alone cannot, gamma too is scaled by at most
    `max_scale_change` (relative) so that the boundary spacing in accumulator units is a
    multiple of 1/m (every boundary then sits near one of m evenly spaced points between
    two integers), about the middle reachable boundary, and beta is shifted for that gamma.
    Where even that falls short, the largest margin found is taken."""
    s_a, levels, lo, hi = g["s_a"], g["levels"], g["acc_lo"][c], g["acc_hi"][c]
    gamma0, beta0 = np.float32(g["gamma"][c]), np.float32(g["beta"][c])

    def geom(gm, bt):
        return _affine(g["s_in"], g["s_w"][c], float(gm), float(bt), g["mean"][c], g["sd"][c])

    def margin(gm, bt) -> float:
        A, B = geom(gm, bt)
        return min_margin(code_boundaries(A, B, s_a, levels, lo, hi))

    A0, B0 = geom(gamma0, beta0)
    if A0 == 0.0:  # y = B constant: keep B / s_a off the half-integers
        v = B0 / s_a
        if abs(v - np.floor(v) - 0.5) < 0.25:
            return gamma0, np.float32(float(beta0) + (np.round(v) - v) * s_a), 0.5, floor
        return gamma0, beta0, 0.5, floor
    t0, k0 = code_boundaries(A0, B0, s_a, levels, lo, hi, with_k=True)
    if t0.size == 0:  # no boundary within reach: one code for every input
        return gamma0, beta0, 0.5, floor
    need = None if float32_ulps is None else max(floor, float32_ulps * 2.0**-24 * _float32_magnitude(g, c, A0, t0, k0))
    current = min_margin(t0)
    if need is not None and current >= need:
        return gamma0, beta0, current, need
    # a need above 1/3 is more than even a grid of m = 1 promises (about 0.45): go for the
    # largest margin instead
    search = need if need is not None and need <= 1.0 / 3.0 else None

    def beta_opts(gm, bt, rel, aim):
        """(margin, relative gamma change, |beta change|, gamma, beta) for gamma gm near
        the shift from beta bt that `_best_shift` picks for `aim`."""
        A, B = geom(gm, bt)
        u = _best_shift(code_boundaries(A, B, s_a, levels, lo, hi), tie_tol, aim)
        cands = _f32_near(float(bt) - A * u) + ([bt] if u == 0.0 else [])
        return [(margin(gm, b), rel, abs(float(b) - float(beta0)), gm, b) for b in cands]

    def grid_opts(want, beat):
        """Options with gamma scaled so that the boundary spacing d (accumulator units per
        activation step) becomes a multiple of 1/m: for want None the coarsest grid within
        the limit, else the smallest change of scale giving a grid coarse enough for a
        margin `want`; only grids whose ideal margin 1/(2m) beats `beat`."""
        if max_scale_change <= 0 or t0.size < 2:
            return []
        d = s_a / abs(A0)
        grids = []  # (relative change, m, new spacing)
        for m in range(1, t0.size + 1):
            if 1.0 / (2 * m) <= beat or (want is not None and 1.0 / (2 * m) < 1.5 * want):
                break
            d_new = np.round(d * m) / m
            if d_new > 0 and abs(d_new - d) <= d * max_scale_change:
                grids.append((abs(d_new - d) / d, m, d_new))
                if want is None:
                    break
        if not grids:
            return []
        _, m, d_new = min(grids)
        mid = len(t0) // 2  # keep the middle reachable boundary in place
        out = []
        for gm in _f32_near(float(gamma0) * d / d_new):
            A1, _ = geom(gm, beta0)
            bt = np.float32((k0[mid] + 0.5) * s_a - A1 * t0[mid] + g["mean"][c] * (float(gm) / g["sd"][c]))
            out += beta_opts(gm, bt, abs(float(gm) / float(gamma0) - 1.0), None if want is None else want * 1.1)
        return out

    opts = []
    if search is not None:  # the smallest change that gives the needed margin
        opts = beta_opts(gamma0, beta0, 0.0, search * 1.1)  # aim a little inside: beta is float32
        if max(o[0] for o in opts) < search:
            opts += grid_opts(search, max(o[0] for o in opts))
        enough = [o for o in opts if o[0] >= search]
        if enough:
            m, _, _, gm, bt = min(enough, key=lambda o: (o[1], o[2], -o[0]))
            return gm, bt, m, need
    # the largest margin, the smallest change among near-equal ones
    opts += beta_opts(gamma0, beta0, 0.0, None)
    opts += grid_opts(None, max(o[0] for o in opts))
    best = max(o[0] for o in opts)
    m, _, _, gm, bt = min((o for o in opts if o[0] >= best * (1.0 - tie_tol)), key=lambda o: (o[1], o[2], -o[0]))
    return gm, bt, m, (need if need is not None else m)


def snap_thresholds(
    qmodel: QuantFairCNN,
    margin: float = SNAP_MARGIN,
    float32_ulps: float | None = FLOAT32_ULPS,
    max_scale_change: float = 1e-3,
    tie_tol: float = 0.05,
) -> dict:
    """Post-QAT: remove the rounding ambiguity of every activation code.

    1. `project_weights`: weights exactly on their quantization grid (codes unchanged).
    2. For each conv layer with an output activation and each output channel, move the
       code boundaries t_k (accumulator units, see `threshold_geometry`) away from the
       integers the accumulator takes, by nudging the BatchNorm bias beta (float32):
       the shift nearest to zero that gives every reachable boundary the needed margin.
       With K reachable boundaries a shift always reaches >= 1/(2K) (up to the float32
       resolution of beta, reported as "max_beta_ulp_acc").
       Needed margin: max(`margin`, `float32_ulps` float32 ulps of the largest magnitude a
       float32 evaluation of the channel handles, see `_float32_magnitude`). A channel that
       has it is left alone; `float32_ulps=None` instead maximises every channel's margin
       (the shift nearest to zero among those within (1 - tie_tol) of the best).
    3. Where beta alone cannot give the needed margin (8-bit activations: 1/(2K) = 0.002,
       while float32 errs by up to ~0.1-0.5 at the 1e6-sized accumulators of 8-bit layers),
       the channel's BN scale gamma changes too, by at most `max_scale_change` (relative),
       so that the boundary spacing becomes a multiple of 1/m accumulator units: every
       boundary then sits near one of m points evenly spaced between two integers, margins
       near 1/(2m) instead of 1/(2K). The middle reachable boundary stays in place.

    Why the margin: acc is an integer, so any evaluation whose error (in accumulator units)
    is below the margin gives exactly the codes of exact arithmetic. Float64 evaluations (the
    Brevitas twin, the QONNX graph run in float64) err by ~1e-10; FINN derives its integer
    thresholds in float32 and was seen to err by up to 3 float32 ulps of the magnitude above,
    the float32 Brevitas model likewise; `float32_ulps`=8 leaves a factor of ~2.7.

    Raises FqhwError if some layer ends below `margin`. Returns stats: per layer the margin
    before and after ("min_margin_before", "min_margin"), the largest needed margin
    ("max_needed_margin") and the channels that fell short of theirs
    ("channels_short_of_need", "min_margin_short_of_need": their largest margin was taken;
    typically channels with a tiny BN scale, whose |beta / A| is huge), the largest change of beta
    relative to |beta| + 1e-12 ("max_rel_beta_change"), of gamma ("max_rel_gamma_change"),
    the largest move of a reachable code boundary in activation steps
    ("max_boundary_shift_steps"), channels changed; overall "min_margin",
    "max_rel_beta_change", "max_rel_gamma_change", "channels_short_of_need";
    "weights_projected" per layer.

    The head has no activation: its accumulator is an integer in every backend, nothing to
    snap. Run this after the last training step (training moves beta again), before export.
    """
    if not 0 < margin < 0.5:
        raise ValueError(f"margin must be in (0, 0.5), got {margin}")
    was_training = qmodel.training
    qmodel.eval()
    stats: dict = {
        "margin": float(margin),
        "float32_ulps": float32_ulps,
        "max_scale_change": float(max_scale_change),
        "tie_tol": float(tie_tol),
        "layers": OrderedDict(),
    }
    try:
        stats["weights_projected"] = project_weights(qmodel)
        before = threshold_margins(qmodel)
        for name, g in threshold_geometry(qmodel).items():
            bn = qmodel.get_submodule(qmodel.layers[name].block).bn
            if bn.bias is None or bn.weight is None:
                raise FqhwError(f"{name}: BatchNorm without affine parameters cannot be snapped")
            n = len(g["A"])
            new_gamma = np.empty(n, np.float32)
            new_beta = np.empty(n, np.float32)
            margins, needs = np.empty(n), np.empty(n)
            shift = 0.0
            for c in range(n):
                new_gamma[c], new_beta[c], margins[c], needs[c] = snap_channel(
                    g, c, tie_tol, max_scale_change, margin, float32_ulps
                )
                A0, B0 = g["A"][c], g["B"][c]
                A1, B1 = _affine(g["s_in"], g["s_w"][c], float(new_gamma[c]), float(new_beta[c]), g["mean"][c], g["sd"][c])
                t0, k = code_boundaries(A0, B0, g["s_a"], g["levels"], g["acc_lo"][c], g["acc_hi"][c], with_k=True)
                if t0.size and A0 != 0.0 and A1 != 0.0:
                    t1 = ((k + 0.5) * g["s_a"] - B1) / A1
                    shift = max(shift, float(np.abs(t1 - t0).max() * abs(A0) / g["s_a"]))
            with torch.no_grad():
                bn.weight.copy_(torch.from_numpy(new_gamma).to(bn.weight.dtype))
                bn.bias.copy_(torch.from_numpy(new_beta).to(bn.bias.dtype))
            d_beta = np.abs(new_beta.astype(np.float64) - g["beta"])
            d_gamma = np.abs(new_gamma.astype(np.float64) / g["gamma"] - 1.0)
            stats["layers"][name] = {
                "channels": n,
                "channels_changed": int(((d_beta > 0) | (d_gamma > 0)).sum()),
                "channels_scaled": int((d_gamma > 0).sum()),
                "channels_short_of_need": int((margins < needs).sum()),
                "min_margin_short_of_need": float(margins[margins < needs].min()) if (margins < needs).any() else None,
                "boundaries": int(before[name]["boundaries"]),
                "min_margin_before": float(before[name]["min_margin"]),
                "min_margin": float(margins.min()),
                "median_channel_margin": float(np.median(margins)),
                "max_needed_margin": float(needs.max()),
                "max_rel_beta_change": float((d_beta / (np.abs(g["beta"]) + 1e-12)).max()),
                "max_rel_gamma_change": float(d_gamma.max()),
                "max_boundary_shift_steps": shift,
                # float32 resolution of beta in accumulator units: how finely a boundary
                # can be placed by beta alone (the 1/(2K) bound holds up to half of this)
                "max_beta_ulp_acc": float(
                    max((float(np.spacing(np.abs(b))) / abs(a) for a, b in zip(g["A"], new_beta) if a != 0.0), default=0.0)
                ),
            }
        after = threshold_margins(qmodel)  # recomputed from the model as it now is
        for name, st in stats["layers"].items():
            if abs(after[name]["min_margin"] - st["min_margin"]) > 1e-9:
                raise AssertionError(f"{name}: the margin recomputed from the model differs")
        bad = {n: st["min_margin"] for n, st in stats["layers"].items() if st["min_margin"] < margin}
        if bad:
            raise FqhwError(f"threshold margin below {margin} after snapping: {bad}")
    finally:
        qmodel.train(was_training)
    vals = list(stats["layers"].values())
    stats["min_margin"] = min((st["min_margin"] for st in vals), default=0.5)
    stats["max_rel_beta_change"] = max((st["max_rel_beta_change"] for st in vals), default=0.0)
    stats["max_rel_gamma_change"] = max((st["max_rel_gamma_change"] for st in vals), default=0.0)
    stats["channels_short_of_need"] = sum(st["channels_short_of_need"] for st in vals)
    return stats
