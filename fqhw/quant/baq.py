"""BAQ: weights and per-unit weight widths learned together, then projected by the solver.

FairQuant's BAQ mode (see shared/notes/fairquant-method.md, "BAQ (learnable bits)") trains
the bit width of every unit alongside the weights, under a bitrate and a fairness term. Its
bits are only soft-regularised, so nothing guarantees that the result meets the budget or
fits a board. Here the learned widths are a *proposal*: the CP-SAT allocator projects them
onto the nearest allocation that meets the budget exactly and fits the target (its resource
caps, its throughput floor), and the deployable model is then built by the normal path
(`build_quant_model` + `calibrate` + QAT) from the weights BAQ trained.

    alloc_warm = allocate(net, sens, cost, budget=B, pinned=...)       # the solver's choice
    res = learn_bits(float_model, alloc_warm, splits, net, budget=B, ...)
    res.allocation                      # projected: avg weight bits <= B, fits the target
    qmodel, qat = recover(res.float_model(float_model), res.allocation, splits, net, budget=B)

Design choices (and why):

- A torch fake-quant twin (`BAQFairCNN`), not Brevitas' PARAMETER bit width: a unit here
  may be a channel group of a layer (fqhw.network.split_channel_groups), the dead zone is
  not a Brevitas quantizer, and iterative QAT must quantize some units of a layer and not
  others. The twin keeps FairCNN's module names; its weight quantizer is a
  `torch.nn.utils.parametrize` parametrization of each conv / linear weight.
- Width: b_cont = (b_min - 1/2 + e) + (b_max - b_min + 1 - 2e) * sigmoid(logit), e = 0.01,
  so that round(b_cont) takes every width in [b_min, b_max] with equal room (the
  reference's tanh(|logit|) has a dead gradient at 0 and needs a huge logit to start at
  b_max). The forward pass uses round(b_cont) (straight-through estimator); the logit is
  initialised so that b_cont equals the warm-start width.
- Quantizer: the deployed rule, symmetric narrow-range per output channel with
  scale = max|w| / (2^(b-1) - 1). Rounding of the weights is straight-through in the
  LSQ sense (w_q = scale * (round(u) + u - stopgrad(u)), u = w / scale), so the loss sees
  the rounding error through the scale, and through it the width: that is the gradient the
  bit logits get from the task loss (a pure identity STE would give them none).
- Dead zone, per unit, relative to each channel's max|w|: d = sigmoid(dz_logit) * max|w|,
  initialised near 0 (sigmoid(-8) = 3e-4). Weights with |w| < d/2 become 0. Two rules:
  "grid" (default) zeroes them on the deployed grid, so the quantized weights remain codes
  of the deployed quantizer and the dead zone is exactly a pruning mask; its gradient comes
  through a sigmoid surrogate of the mask (straight-through). "reference" is the
  reference's offset grid (step = (max|w| - d/2) / M, w_q = sign(w) (q step + d/2)), whose
  levels the deployed quantizer cannot represent: for comparison with the paper only.
- Bitrate term (`bitrate_penalty`): R_b = relu(avg - B)^2 + under_weight * relu(B - avg)^2
  on the parameter-weighted average of the continuous widths. Two-sided, so the average is
  driven *to* the budget: from above firmly, from below gently (a width the budget allows
  should be used, but the task loss may keep the average a little under it). The
  continuous widths are used because the projection reads them too; the solver, not the
  penalty, makes the budget exact.
- Activation widths stay those of the warm start (the solver chose them for the hardware):
  the twin quantizes each ReLU output to that width with a learned per-tensor threshold
  (unsigned, like the deployed QuantReLU), and the projection pins them.
- Projection (`project`): `allocate` with a one-group Sensitivity "projection",
  weight[u][b] = params(u) * |b - b_learned(u)| (or squared), activation tables zero and the
  activations pinned to the warm start's widths, the warm start's weight pins, throughput
  floor and hardware objective, loss_slack 0. Stage 1 then minimises the parameter-weighted
  distance to the learned widths under the budget and the target's caps (hard), and the
  hardware stages break ties toward throughput. The warm start itself is feasible for this
  problem, so the projection exists whenever the warm start did. The nearest allocation can
  leave budget unused (the continuous average sits at the budget, but rounding a large
  layer down frees bits); `fill_budget=True` adds a second solve that only raises widths
  from there, to use what the budget and the caps still allow.
- Every function that returns an allocation for deployment checks the budget exactly
  (`check_budget_met`, rational arithmetic as the allocator's) and raises `BudgetError`.

The twin and its quantizers live in fqhw.quant.baq_model, the budget check and the
projection in fqhw.quant.projection; here: `learn_bits`, `recover`, `iterative_qat`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fqhw.allocator.allocation import Allocation
from fqhw.data.dataset import DataSplits
from fqhw.errors import FqhwError
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.models.cnn import FairCNN
from fqhw.network import NetworkSpec, network_spec
from fqhw.quant.baq_model import BIT_RANGE, BAQFairCNN, Unit
from fqhw.quant.projection import BudgetError, bitrate_penalty, check_budget_met, project
from fqhw.quant.qat import QATResult, evaluate_groups, fairness_loss


# ------------------------------------------------------------------ training helpers


def _optimizer(groups: list[dict], steps: int):
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    return opt, sched


def _steps_per_epoch(splits: DataSplits, batch_size: int) -> int:
    return (len(splits.train) + batch_size - 1) // batch_size


# ------------------------------------------------------------------ BAQ


@dataclass
class BAQResult:
    allocation: Allocation  # projected: meets the budget, fits the target
    learned_bits: dict[str, float]  # continuous widths at the end of BAQ
    learned_bits_rounded: dict[str, int]  # the widths BAQ's forward pass used at the end
    dead_zone: dict[str, float]  # per unit, relative to max|w|
    warm_start: dict[str, int]
    history: list[dict] = field(default_factory=list)  # per epoch
    float_state: dict = field(default_factory=dict)  # FairCNN state dict: start of recovery
    model: BAQFairCNN | None = None  # the BAQ twin as trained (not deployable)

    def float_model(self, like: FairCNN) -> FairCNN:
        """A copy of `like` holding the BAQ-trained float weights (and BatchNorm state)."""
        model = copy.deepcopy(like)
        model.load_state_dict(self.float_state)
        model.eval()
        return model

    def summary(self) -> dict:
        return {
            "warm_start": self.warm_start,
            "learned_bits": {k: round(v, 3) for k, v in self.learned_bits.items()},
            "projected": {la.name: la.weight_bits for la in self.allocation.layers},
            "final_epoch": self.history[-1] if self.history else None,
        }


def learn_bits(
    float_model: FairCNN,
    alloc_warm: Allocation,
    splits: DataSplits,
    net: NetworkSpec,
    *,
    budget: float,
    epochs: int = 3,
    lr: float = 5e-4,
    bit_lr: float = 0.05,
    dead_zone_lr: float = 0.01,
    fairness_lambda: float = 0.5,
    bitrate_lambda: float = 2.0,
    under_weight: float = 0.25,
    seed: int = 0,
    batch_size: int = 64,
    cost_model=None,
    pinned: dict[str, int] | None = None,
    min_fps: float | None = None,
    objective: str | None = None,
    weight_only: bool = False,
    dead_zone: str | None = "grid",
    bit_range: tuple[int, int] = BIT_RANGE,
    project_from: str = "continuous",
    squared_distance: bool = False,
    fill_budget: bool = False,
    calib_batches: int = 8,
    time_limit_s: float = 30.0,
    progress: bool = False,
    desc: str = "BAQ",
) -> BAQResult:
    """Train weights, per-unit widths and dead zones together from the warm start, then
    project the learned widths onto a feasible allocation with the solver.

    loss = CE + fairness_lambda * (max_g L_g - min_g L_g) + bitrate_lambda * R_b
    (`fairness_loss`, `bitrate_penalty`). Weights, BatchNorm and activation thresholds use
    `lr`, the bit and dead-zone logits `bit_lr` (AdamW, cosine schedule, no weight decay).
    Activation widths stay the warm start's (weight_only=True: activations in float during
    BAQ; the projected allocation still has the warm start's activation widths).

    pinned / min_fps / objective default to what the warm start was allocated with
    (alloc_warm.solver["pinned"], ["min_fps"], ["hardware_objective"]); pass {} to unpin.
    Pinned units keep their width throughout. The last epoch's state is kept (its widths are
    what is projected); the history records, per epoch, the average width (continuous and
    rounded), the loss terms and the twin's validation mean / worst group accuracy (at the
    learned widths, before projection). project_from: "continuous" or "rounded" widths;
    squared_distance and fill_budget: see `project`.
    """
    if epochs < 1:
        raise FqhwError("BAQ needs at least one epoch")
    if project_from not in ("continuous", "rounded"):
        raise FqhwError(f"project_from must be 'continuous' or 'rounded', not {project_from!r}")
    solver = alloc_warm.solver or {}
    if pinned is None:
        pinned = {k: int(v) for k, v in (solver.get("pinned") or {}).items()}
    if min_fps is None:
        min_fps = solver.get("min_fps")
    if objective is None:
        objective = solver.get("hardware_objective")
    from fqhw.allocator.cpsat import check_budget

    # fail before training when no width vector can meet the budget with these pins
    check_budget(net, budget, alloc_warm.target, bits=range(bit_range[0], bit_range[1] + 1), pinned=pinned)
    torch.manual_seed(seed)
    model = BAQFairCNN(
        float_model, alloc_warm, net, learn_bits=True, weight_only=weight_only, pinned=pinned, bit_range=bit_range, dead_zone=dead_zone
    )
    model.calibrate(splits.train.loader(batch_size, shuffle=True, seed=seed), batches=calib_batches)
    steps = epochs * _steps_per_epoch(splits, batch_size)
    opt, sched = _optimizer(
        [
            {"params": model.model_parameters() + model.act_parameters(), "lr": lr},
            {"params": model.bit_parameters(), "lr": bit_lr},
            {"params": model.dead_zone_parameters(), "lr": dead_zone_lr},
        ],
        steps,
    )
    history: list[dict] = []
    for epoch in range(epochs):
        model.train()
        sums = {"loss": 0.0, "ce": 0.0, "fairness": 0.0, "bitrate": 0.0}
        n = 0
        loader = splits.train.loader(batch_size, shuffle=True, seed=seed + epoch)
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=None if progress else True, leave=False)
        for x, y, g in bar:
            logits = model(x)
            task = fairness_loss(logits, y, g, fairness_lambda)
            ce = nn.functional.cross_entropy(logits, y)
            rate = bitrate_penalty(model.avg_bits(), budget, under_weight)
            loss = task + bitrate_lambda * rate
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            k = len(y)
            sums["loss"] += float(loss.detach()) * k
            sums["ce"] += float(ce.detach()) * k
            sums["fairness"] += float((task - ce).detach()) * k
            sums["bitrate"] += float(rate.detach()) * k
            n += k
        val = evaluate_groups(model, splits.val)
        history.append(
            {
                "epoch": epoch + 1,
                **{f"train_{k}": v / max(n, 1) for k, v in sums.items()},
                "avg_bits": float(model.avg_bits().detach()),
                "avg_bits_rounded": float(model.avg_bits(rounded=True).detach()),
                "bits": model.unit_bits(rounded=True),
                "val_mean_group_acc": val["mean_group_acc"],
                "val_worst_group_acc": val["worst_group_acc"],
            }
        )
    model.eval()
    learned = model.unit_bits(rounded=False)
    rounded = model.unit_bits(rounded=True)
    alloc = project(
        net, rounded if project_from == "rounded" else learned, alloc_warm, budget=budget, cost_model=cost_model, pinned=pinned,
        min_fps=min_fps, objective=objective, bits=range(bit_range[0], bit_range[1] + 1), squared=squared_distance,
        fill_budget=fill_budget, time_limit_s=time_limit_s, seed=seed,
    )
    alloc.solver["baq"] = {
        "epochs": epochs, "lr": lr, "bit_lr": bit_lr, "dead_zone_lr": dead_zone_lr, "fairness_lambda": fairness_lambda, "bitrate_lambda": bitrate_lambda,
        "under_weight": under_weight, "weight_only": weight_only, "dead_zone": dead_zone, "project_from": project_from,
        "seed": seed,
    }
    return BAQResult(
        allocation=alloc,
        learned_bits=learned,
        learned_bits_rounded=rounded,
        dead_zone=model.unit_dead_zone(),
        warm_start={la.name: la.weight_bits for la in alloc_warm.layers},
        history=history,
        float_state=model.float_state(prune_dead_zone=dead_zone == "grid"),
        model=model,
    )


def recover(
    float_model: FairCNN | dict,
    alloc: Allocation,
    splits: DataSplits,
    net: NetworkSpec,
    *,
    budget: float,
    like: FairCNN | None = None,
    epochs: int = 3,
    lr: float = 5e-4,
    fairness_lambda: float = 0.5,
    seed: int = 0,
    calib_batches: int = 8,
    progress: bool = False,
    desc: str = "QAT after BAQ",
):
    """The deployable model from BAQ's weights: `build_quant_model` at the projected
    allocation, `calibrate`, `finetune` (the flow's normal QAT; the flow additionally runs
    `snap_thresholds` before export, as for any quant model). `float_model` is a FairCNN
    or a FairCNN state dict (then `like` gives the architecture).

    Returns (qmodel, QATResult). Raises BudgetError if the allocation is over budget,
    before and after (the model's widths are checked against the allocation)."""
    from fqhw.quant.qat import finetune
    from fqhw.quant.qmodel import build_quant_model, calibrate

    check_budget_met(net, alloc, budget)
    if isinstance(float_model, dict):
        if like is None:
            raise FqhwError("recover: a state dict needs `like` (a FairCNN of the same architecture)")
        model = copy.deepcopy(like)
        model.load_state_dict(float_model)
    else:
        model = float_model
    model.eval()
    torch.manual_seed(seed)
    qmodel = build_quant_model(model, alloc)
    calibrate(qmodel, splits.train.loader(64, shuffle=True, seed=seed), batches=calib_batches)
    res: QATResult = finetune(qmodel, splits, epochs=epochs, lr=lr, fairness_lambda=fairness_lambda, seed=seed, progress=progress, desc=desc)
    for name, ql in qmodel.layers.items():
        if ql.weight_bits != alloc.layer(name).weight_bits or int(ql.compute.quant_weight().bit_width) != ql.weight_bits:
            raise BudgetError(f"{name}: the quant model's weight width differs from the allocation's")
    check_budget_met(net, alloc, budget)
    return qmodel, res


# ------------------------------------------------------------------ iterative QAT


@dataclass
class IterativeQATResult:
    model: BAQFairCNN  # every unit quantized and frozen at the end
    stages: list[dict]  # per stage: units frozen, per-epoch history
    frozen: dict[str, torch.Tensor]  # per unit: its weight rows as frozen (on the grid)
    float_state: dict  # FairCNN state dict: quantized weights, trained BatchNorm

    def float_model(self, like: FairCNN) -> FairCNN:
        model = copy.deepcopy(like)
        model.load_state_dict(self.float_state)
        model.eval()
        return model


def _stage_plan(units: list[Unit], stages: int | Sequence[Sequence[str]], order: str, sens: Sensitivity | None, alloc: Allocation):
    if not isinstance(stages, int):
        plan = [list(s) for s in stages]
        flat = [n for s in plan for n in s]
        if sorted(flat) != sorted(u.name for u in units):
            raise FqhwError("the stages must name every unit exactly once")
        return plan
    if stages < 1:
        raise FqhwError("iterative QAT needs at least one stage")
    if order == "size":
        key = {u.name: u.params for u in units}
    elif order == "importance":
        if sens is None:
            raise FqhwError("order='importance' needs a Sensitivity")
        key = {u.name: float(np.max(sens.weight[u.name][alloc.layer(u.name).weight_bits])) for u in units}
    else:
        raise FqhwError(f"order must be 'size' or 'importance', not {order!r}")
    ranked = sorted(units, key=lambda u: (-key[u.name], [v.name for v in units].index(u.name)))
    return [[u.name for u in part] for part in np.array_split(np.array(ranked, dtype=object), min(stages, len(units))) if len(part)]


def iterative_qat(
    float_model: FairCNN,
    alloc: Allocation,
    splits: DataSplits,
    net: NetworkSpec | None = None,
    *,
    stages: int | Sequence[Sequence[str]] = 3,
    order: str = "size",
    sens: Sensitivity | None = None,
    epochs_per_stage: int = 1,
    lr: float = 5e-4,
    fairness_lambda: float = 0.5,
    weight_only: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    calib_batches: int = 8,
    progress: bool = False,
) -> IterativeQATResult:
    """Quantize and freeze the units in stages, fine-tuning what is still float after each.

    The units are ranked (order="size": most parameters first; "importance": largest
    worst-group sensitivity at the allocated width first, needs `sens`) and split into
    `stages` near-equal stages, or `stages` lists the unit names per stage. Stage s: the
    weights of its units are set to their quantized values (allocation widths, deployed
    rule) and frozen (restored after every optimiser step, so they stay bit-identical);
    then `epochs_per_stage` epochs fine-tune the still-float units, BatchNorm and the
    activation thresholds (activations are quantized throughout, unless weight_only).
    After the last stage every weight is on its grid; `float_state` loads into
    `build_quant_model` (whose quantizer maps on-grid weights onto the same codes) for
    deployment, after `calibrate`."""
    net = net or network_spec(float_model, (float_model.cfg.in_channels, float_model.cfg.image_size, float_model.cfg.image_size))
    torch.manual_seed(seed)
    model = BAQFairCNN(float_model, alloc, net, learn_bits=False, weight_only=weight_only, dead_zone=None)
    for q in model.quantizers().values():
        q.quantized.fill_(False)
    model.calibrate(splits.train.loader(batch_size, shuffle=True, seed=seed), batches=calib_batches)
    plan = _stage_plan(model.units, stages, order, sens, alloc)
    by_name = {u.name: u for u in model.units}
    frozen: dict[str, torch.Tensor] = {}
    records: list[dict] = []

    def restore():
        with torch.no_grad():
            for name, rows in frozen.items():
                u = by_name[name]
                model.latent_weight(u.layer)[u.start : u.stop].copy_(rows)

    for s, names in enumerate(plan):
        with torch.no_grad():
            for name in names:
                u = by_name[name]
                q = model.quantizer(u.layer)
                q.quantized[q.unit_names.index(name)] = True
                w = model.latent_weight(u.layer)
                wq = q(w)  # this unit's rows are now quantized (others as they are)
                frozen[name] = wq[u.start : u.stop].detach().clone()
        restore()
        history = []
        if epochs_per_stage > 0:
            opt, sched = _optimizer(
                [{"params": model.model_parameters() + model.act_parameters(), "lr": lr}],
                epochs_per_stage * _steps_per_epoch(splits, batch_size),
            )
            for epoch in range(epochs_per_stage):
                model.train()
                total, n = 0.0, 0
                loader = splits.train.loader(batch_size, shuffle=True, seed=seed + 1000 * s + epoch)
                bar = tqdm(loader, desc=f"iterative QAT stage {s + 1}/{len(plan)}", disable=None if progress else True, leave=False)
                for x, y, g in bar:
                    loss = fairness_loss(model(x), y, g, fairness_lambda)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    restore()
                    total += float(loss.detach()) * len(y)
                    n += len(y)
                val = evaluate_groups(model, splits.val)
                history.append({"epoch": epoch + 1, "train_loss": total / max(n, 1), "val_mean_group_acc": val["mean_group_acc"],
                                "val_worst_group_acc": val["worst_group_acc"]})
        records.append({"stage": s + 1, "units": list(names), "frozen_so_far": list(frozen), "history": history})
    model.eval()
    return IterativeQATResult(model=model, stages=records, frozen=frozen, float_state=model.float_state(prune_dead_zone=False))
