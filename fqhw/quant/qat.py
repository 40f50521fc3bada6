"""Quantization-aware fine-tuning with FairQuant's fairness term.

loss = CE + lambda_f * (max_g L_g - min_g L_g), the group losses taken over the groups
present in each minibatch. The epoch kept is the one with the best validation worst-group
accuracy (ties: best mean-group accuracy), so the choice is made on validation data and the
test split only reports.
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


@dataclass
class QATResult:
    epochs_run: int
    best_epoch: int
    history: list[dict] = field(default_factory=list)  # per epoch: train loss, val mean/worst


def fairness_loss(logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    loss = ce.mean()
    if lam > 0:
        group_losses = torch.stack([ce[g == k].mean() for k in torch.unique(g)])
        if len(group_losses) > 1:
            loss = loss + lam * (group_losses.max() - group_losses.min())
    return loss


@torch.no_grad()
def predict(model: nn.Module, data: GroupedImages, batch_size: int = 256) -> np.ndarray:
    model.eval()
    x, _, _ = data.tensors()
    return np.concatenate([model(x[i : i + batch_size]).argmax(1).numpy() for i in range(0, len(x), batch_size)])


def evaluate_groups(model: nn.Module, data: GroupedImages) -> dict:
    return group_metrics(data.labels, predict(model, data), data.groups, data.group_names, data.num_classes)


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
    """Fine-tune `model` in place; on return it holds the weights of the best epoch."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * ((len(splits.train) + batch_size - 1) // batch_size)))
    history: list[dict] = []
    best_key, best_state, best_epoch = None, None, 0
    for epoch in range(epochs):
        model.train()
        loader = splits.train.loader(batch_size, shuffle=True, seed=seed + epoch)
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=None if progress else True, leave=False)  # None: off when not a terminal
        for x, y, g in bar:
            loss = fairness_loss(model(x), y, g, fairness_lambda)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(y)
            n += len(y)
        val = evaluate_groups(model, splits.val)
        history.append({"epoch": epoch + 1, "train_loss": total / max(n, 1), "val_mean_group_acc": val["mean_group_acc"], "val_worst_group_acc": val["worst_group_acc"]})
        key = (val["worst_group_acc"], val["mean_group_acc"])
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return QATResult(epochs_run=epochs, best_epoch=best_epoch, history=history)
