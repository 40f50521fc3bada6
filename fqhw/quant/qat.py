"""Quantization-aware fine-tuning with FairQuant's fairness term.

loss = CE + lambda_f * (max_g L_g - min_g L_g), the group losses taken over the groups
present in each minibatch. The epoch kept is the one with the best validation worst-group
accuracy (ties: best mean-group accuracy), so the choice is made on validation data and the
test split only reports.

Like train_float, it trains on fqhw.models.distributed.device() and, under torchrun with
several processes, under DistributedDataParallel with `batch_size` as the global batch; the
fairness term is then still the whole global batch's (`_shared_fairness_loss`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fqhw.data.dataset import DataSplits, GroupedImages
from fqhw.fairness.metrics import group_metrics
from fqhw.models import distributed as dist


@dataclass
class QATResult:
    epochs_run: int
    best_epoch: int
    history: list[dict] = field(default_factory=list)  # per epoch: train loss, val mean/worst
    # the settings this run used (tune(): the ones chosen on validation)
    fairness_lambda: float | None = None
    lr: float | None = None
    # tune(): every candidate's settings, best epoch and validation accuracies
    candidates: list[dict] = field(default_factory=list)


# (fairness weight, learning rate) pairs `tune` tries by default: the fixed defaults
# (0.5, 5e-4) and a doubling of each. Four QAT runs per allocation.
DEFAULT_GRID: tuple[tuple[float, float], ...] = ((0.5, 5e-4), (1.0, 5e-4), (0.5, 1e-3), (1.0, 1e-3))


def fairness_loss(logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    loss = ce.mean()
    if lam > 0:
        group_losses = torch.stack([ce[g == k].mean() for k in torch.unique(g)])
        if len(group_losses) > 1:
            loss = loss + lam * (group_losses.max() - group_losses.min())
    return loss


def _shared_fairness_loss(
    logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor, lam: float, part: dist.BatchShare, num_groups: int
) -> tuple[torch.Tensor, float]:
    """(loss to backpropagate on this rank, fairness_loss of the whole global batch).

    The group losses, and so the groups with the largest and smallest loss, are those of
    the whole global batch as on one process: per-group CE sums and counts are summed over
    ranks (detached), and this rank's loss is W * (its CE sum / n + lam * (its CE sum in the
    worst group / that group's count - the same for the best group)). DDP's average of the
    ranks' gradients is then the gradient of fairness_loss on the whole batch. Taking the
    max-min over each rank's share instead would change the objective (the extremes of
    half batches are further apart). Ties between group losses go to the lower group index.
    """
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    if part.count == 0:  # a padding sample: in the graph, out of every sum
        ce = ce * 0.0
    w = float(part.count > 0)
    stats = torch.zeros(2 * num_groups, dtype=torch.float64, device=ce.device)
    stats.index_add_(0, g, ce.detach().double() * w).index_add_(0, g + num_groups, torch.full_like(ce, w, dtype=torch.float64))
    stats = dist.all_sum_tensor(stats)
    sums, counts = stats[:num_groups], stats[num_groups:]
    value = float(sums.sum()) / part.total
    loss = ce.sum() * (part.world / part.total)
    present = torch.nonzero(counts > 0).flatten()
    if lam > 0 and len(present) > 1:
        means = sums[present] / counts[present]
        hi, lo = int(present[int(means.argmax())]), int(present[int(means.argmin())])
        value += lam * float(means.max() - means.min())
        term = ce[g == hi].sum() / float(counts[hi]) - ce[g == lo].sum() / float(counts[lo])
        loss = loss + (lam * part.world) * term
    return loss, value


@torch.no_grad()
def predict(model: nn.Module, data: GroupedImages, batch_size: int = 256) -> np.ndarray:
    model.eval()
    x, _, _ = data.tensors()
    dev = dist.model_device(model)
    return np.concatenate([model(x[i : i + batch_size].to(dev)).argmax(1).cpu().numpy() for i in range(0, len(x), batch_size)])


def evaluate_groups(model: nn.Module, data: GroupedImages, sharded: bool = False) -> dict:
    """Group metrics of the model's predictions on `data`.

    sharded=True is for code that every rank runs (the training loops): each rank predicts
    its slice and the integer predictions are all-gathered, so all ranks get the same metrics.
    """
    pred = dist.gather_rows(lambda rows: predict(model, rows), data) if sharded else predict(model, data)
    return group_metrics(data.labels, pred, data.groups, data.group_names, data.num_classes)


def finetune(
    model: nn.Module,
    splits: DataSplits,
    epochs: int,
    lr: float = 5e-4,
    fairness_lambda: float = 0.5,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    desc: str = "QAT",
) -> QATResult:
    """Fine-tune `model` in place; on return it holds the weights of the best epoch, on the
    device it came on."""
    dist.init_from_env()
    dev, home = dist.device(), dist.model_device(model)
    torch.manual_seed(seed)
    model.to(dev)
    net = dist.wrap(model)  # the model itself on one process
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * ((len(splits.train) + batch_size - 1) // batch_size)))
    history: list[dict] = []
    best_key, best_state, best_epoch = None, None, 0
    for epoch in range(epochs):
        model.train()
        loader = splits.train.loader(batch_size, shuffle=True, seed=seed + epoch)
        total, n = 0.0, 0
        # None: off when not a terminal
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=None if progress and dist.is_main() else True, leave=False)
        for x, y, g in bar:
            part = dist.batch_share(len(y))  # this rank's rows of the global batch
            x, y, g = x[part.rows].to(dev), y[part.rows].to(dev), g[part.rows].to(dev)
            if part.whole:
                loss = value = fairness_loss(net(x), y, g, fairness_lambda)
            else:
                loss, value = _shared_fairness_loss(net(x), y, g, fairness_lambda, part, splits.train.num_groups)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(value) * part.total
            n += part.total
        dist.sync_buffers(model)  # every rank evaluates and keeps the same weights
        val = evaluate_groups(model, splits.val, sharded=True)
        history.append({"epoch": epoch + 1, "train_loss": total / max(n, 1), "val_mean_group_acc": val["mean_group_acc"], "val_worst_group_acc": val["worst_group_acc"]})
        key = (val["worst_group_acc"], val["mean_group_acc"])
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    del net  # the model is used alone from here on
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    model.to(home)
    return QATResult(epochs_run=epochs, best_epoch=best_epoch, history=history, fairness_lambda=fairness_lambda, lr=lr)


def _val_key(res: QATResult) -> tuple[float, float]:
    """The selection rule of finetune's epochs, for whole runs: best validation worst-group
    accuracy, ties broken by mean-group accuracy."""
    h = res.history[res.best_epoch - 1]
    return (h["val_worst_group_acc"], h["val_mean_group_acc"])


def better(res: QATResult, best: QATResult | None) -> bool:
    """Whether run `res` beats `best` (None: no run yet) under tune's rule: the higher
    validation (worst-group, mean-group) accuracy of their chosen epochs; on a tie the
    earlier run stays."""
    return best is None or (bool(res.history) and _val_key(res) > _val_key(best))


def candidate_summary(res: QATResult) -> dict:
    """One tuning candidate as tune() lists it in QATResult.candidates."""
    worst, mean = _val_key(res) if res.history else (None, None)
    return {"fairness_lambda": res.fairness_lambda, "lr": res.lr, "best_epoch": res.best_epoch, "val_worst_group_acc": worst,
            "val_mean_group_acc": mean}


def tune(
    model: nn.Module,
    splits: DataSplits,
    epochs: int,
    grid: tuple[tuple[float, float], ...] = DEFAULT_GRID,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    desc: str = "QAT",
) -> QATResult:
    """Fine-tune from the same starting weights once per (fairness weight, learning rate) in
    `grid` and keep the run with the best validation worst-group accuracy (ties: mean-group
    accuracy; further ties: the earlier grid entry), so that these choices, like the epoch,
    are made on validation data and the test split only reports. On return `model` holds
    the chosen run's weights.

    Every candidate starts from the same state (calibration included) and the same seed:
    the runs differ only in the settings being chosen."""
    if not grid:
        raise ValueError("tune needs at least one (fairness_lambda, lr) pair")
    start = copy.deepcopy(model.state_dict())
    best: QATResult | None = None
    best_state = None
    candidates = []
    for lam, lr in grid:
        model.load_state_dict(start)
        res = finetune(model, splits, epochs, lr=lr, fairness_lambda=lam, batch_size=batch_size, seed=seed, progress=progress,
                       desc=f"{desc} (lambda {lam:g}, lr {lr:g})")
        candidates.append(candidate_summary(res))
        if better(res, best):
            best, best_state = res, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    best.candidates = candidates
    return best
