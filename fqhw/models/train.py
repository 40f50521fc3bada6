"""Training and evaluation of a classifier on grouped images, and a cache of trained models.

`train_float` trains any nn.Module that maps (N, C, H, W) inputs in [0, 1) to class logits
(the float FairCNN, and equally a Brevitas model for QAT): AdamW (or SGD with momentum) and a
cosine learning-rate schedule stepped per batch, random horizontal and vertical flips and 90
degree rotations (lesion images have no canonical orientation). By default it keeps the
weights of the epoch with the best validation accuracy (overall accuracy, ties to the later
epoch); `select="last"` keeps the last epoch's.

Determinism: given `seed`, the initial weights (when `init_seed` re-initializes them), the
shuffling and the augmentation are fixed; torch.use_deterministic_algorithms(True) is set for
the duration of the call (and restored after), so the same seed on the same machine and
torch build gives the same weights.

Devices: training runs on fqhw.models.distributed.device() (the GPU when there is one) and
the model is handed back on the device it came on. Under torchrun with several processes the
model trains under DistributedDataParallel, `batch_size` being the global batch that the
ranks share (see fqhw.models.distributed for what that keeps and what it changes).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.dataset import INPUT_SCALE, DataSplits, GroupedImages
from ..errors import FqhwError
from . import distributed as dist


@dataclass
class TrainResult:
    epochs: int
    selected_epoch: int  # 1-based epoch whose weights the model now holds
    selection: str  # "best-val" or "last"
    val_acc: float  # validation accuracy of the kept weights
    seconds: float
    history: list[dict] = field(default_factory=list)  # per epoch: loss, train_acc, val_acc, lr

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


def _augment(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-sample random flips (H and V) and a random 90-degree rotation (square images),
    chosen by the codes r in [0, 8) (drawn for the whole global batch, so that every rank's
    generator stays in step)."""
    out = x.clone()
    hflip = (r & 1).bool()
    vflip = (r & 2).bool()
    rot = (r & 4).bool()
    if hflip.any():
        out[hflip] = out[hflip].flip(-1)
    if vflip.any():
        out[vflip] = out[vflip].flip(-2)
    if rot.any() and x.shape[-1] == x.shape[-2]:
        out[rot] = out[rot].transpose(-1, -2)
    return out


def evaluate(model: nn.Module, data: GroupedImages, batch_size: int = 512) -> np.ndarray:
    """Predicted class per sample (int64 array), model in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    preds = []
    dev = dist.model_device(model)
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                x = torch.from_numpy(data.images[start : start + batch_size].astype(np.float32) * INPUT_SCALE).to(dev)
                preds.append(model(x).argmax(dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, dtype=np.int64)


def train_float(
    model: nn.Module,
    splits: DataSplits,
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    optimizer: str = "adamw",
    weight_decay: float = 1e-4,
    augment: bool = True,
    select: str = "best",
    warmup_frac: float = 0.05,
) -> TrainResult:
    """Train `model` in place on splits.train, validating on splits.val after each epoch.

    select="best" keeps the epoch with the best validation accuracy; "last" keeps the last.
    optimizer: "adamw" (default) or "sgd" (momentum 0.9, nesterov). The learning rate warms up
    linearly over warmup_frac of the steps, then follows a cosine to 0.
    """
    if epochs < 1:
        raise FqhwError(f"epochs={epochs} must be at least 1")
    if batch_size < 1:
        raise FqhwError(f"batch_size={batch_size} must be at least 1")
    if not lr > 0:
        raise FqhwError(f"lr={lr} must be positive")
    if select not in ("best", "last"):
        raise FqhwError(f"select={select!r} must be 'best' or 'last'")

    dist.init_from_env()
    dev, home = dist.device(), dist.model_device(model)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        x_all, y_all, _ = splits.train.tensors()
        n = len(y_all)
        model.to(dev)
        net = dist.wrap(model)  # the model itself on one process
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
        else:
            raise FqhwError(f"optimizer={optimizer!r} must be 'adamw' or 'sgd'")
        steps_per_epoch = (n + batch_size - 1) // batch_size
        total = epochs * steps_per_epoch
        warm = max(1, int(warmup_frac * total))

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + np.cos(np.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        loss_fn = nn.CrossEntropyLoss()
        history: list[dict] = []
        best_acc, best_epoch, best_state = -1.0, 0, None
        t0 = time.perf_counter()
        bar = tqdm(total=total, disable=None if progress and dist.is_main() else True, desc="train", unit="batch", leave=False)
        for epoch in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct = 0.0, 0
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                part = dist.batch_share(len(idx))  # this rank's rows of the global batch
                codes = torch.randint(0, 8, (len(idx),), generator=gen) if augment else None
                x, y = x_all[idx[part.rows]], y_all[idx[part.rows]]
                if augment:
                    x = _augment(x, codes[part.rows])
                x, y = x.to(dev), y.to(dev)
                logits = net(x)
                loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                (loss if part.whole else loss * part.scale).backward()
                opt.step()
                sched.step()
                loss_v = loss.detach().item()
                loss_sum += loss_v * part.count
                correct += int((logits.argmax(1) == y).sum()) if part.count else 0
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_v:.3f}", refresh=False)
            loss_sum, correct = dist.all_sum(loss_sum, correct)
            dist.sync_buffers(model)  # every rank evaluates and keeps the same weights
            val_pred = dist.gather_rows(lambda rows: evaluate(model, rows), splits.val)
            val_acc = float((val_pred == splits.val.labels).mean())
            history.append(
                {"epoch": epoch, "loss": loss_sum / n, "train_acc": correct / n, "val_acc": val_acc, "lr": opt.param_groups[0]["lr"]}
            )
            bar.set_postfix(epoch=epoch, loss=f"{loss_sum / n:.3f}", val=f"{val_acc:.3f}")
            if select == "best" and val_acc >= best_acc:
                best_acc, best_epoch, best_state = val_acc, epoch, copy.deepcopy(model.state_dict())
        bar.close()
        del net  # the model is used alone from here on
        if select == "best" and best_state is not None:
            model.load_state_dict(best_state)
        else:
            best_epoch, best_acc = epochs, history[-1]["val_acc"]
        model.eval()
        return TrainResult(
            epochs=epochs,
            selected_epoch=best_epoch,
            selection="best-val" if select == "best" else "last",
            val_acc=best_acc,
            seconds=time.perf_counter() - t0,
            history=history,
        )
    finally:
        model.to(home)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


# ---------------------------------------------------------------------------------------
# cache


def cached_float_model(
    cfg_key: dict,
    build_fn: Callable[[], nn.Module],
    train_fn: Callable[[nn.Module], dict | TrainResult],
    cache_dir: str | os.PathLike,
) -> tuple[nn.Module, dict, bool]:
    """(model, info, hit): the trained model for cfg_key, from cache_dir if it is there.

    On a miss: model = build_fn(); info = train_fn(model) (a JSON-serialisable dict or a
    TrainResult); state_dict and info are stored as one step-cache entry (fqhw.stepcache:
    written whole or not at all). On a hit, build_fn() then load_state_dict(torch.load(...,
    weights_only=True)). An unreadable entry is retrained and replaced.
    """
    from fqhw.outputs import save_tensors
    from fqhw.stepcache import StepCache

    def compute():
        model = build_fn()
        result = train_fn(model)
        return model, result.to_dict() if isinstance(result, TrainResult) else dict(result or {})

    def write(value, folder: Path) -> None:
        model, info = value
        save_tensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / "model.pt")
        (folder / "info.json").write_text(json.dumps(info, indent=2) + "\n")

    def load(folder: Path):
        model = build_fn()
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
        return model, json.loads((folder / "info.json").read_text())

    got = StepCache(cache_dir).run("float_model", cfg_key, compute, write, load)
    model, info = got.value
    model.eval()
    return model, info, got.hit
