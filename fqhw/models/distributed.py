"""Where training runs: one CPU process, one GPU, or one process per GPU under torchrun.

fqhw's training loops (`train_float`, QAT `finetune`) are written once; these helpers make
them run on `device()` and, when torchrun started several processes (WORLD_SIZE > 1), with
DistributedDataParallel (DDP). With one process every helper is a no-op that returns its
input unchanged, so single-process results are bit for bit what they were without them.

How a batch is shared. `batch_size` stays the *global* batch: every rank draws the same
shuffle and augmentation codes from the same seed (so the random streams stay in step with a
single process), and each rank takes its contiguous share of every global batch
(`batch_share`). The number of optimizer steps, the learning-rate schedule and the meaning
of every hyperparameter are thus independent of the number of ranks, and every rank has the
same number of batches by construction. DDP averages gradients over ranks; each rank scales
its loss by W * n_rank / n (`BatchShare.scale`), so the average is the gradient of the whole
batch's mean loss even when the shares differ by a sample. A rank whose share of a short
last batch is empty runs one padding sample with weight 0, because DDP needs every rank in
every all-reduce.

What still differs from one process: BatchNorm normalises with each rank's own batch
statistics (SyncBatchNorm does not run on the CPU), and DDP keeps rank 0's running
statistics (`sync_buffers`); and float sums are taken in another order. So a DDP run is not
bit-identical to a single-process one; the ranks are identical to each other.

Validation is exact and identical on every rank: each rank predicts a contiguous slice of
the validation set and the integer predictions are all-gathered (`gather_rows`), so the
best-epoch choice is made on the same integers everywhere.

Files and printing belong to rank 0 (`is_main`, `run_on_main`); the compile flow uses
`run_on_main`, `from_main` and `barrier` so that only rank 0 writes while the others train
with it.
"""
from __future__ import annotations

import atexit
import itertools
import os
from datetime import timedelta
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fqhw.errors import FqhwError


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (one GPU per torchrun process), else the CPU."""
    if torch.cuda.is_available():
        lr = local_rank()
        count = torch.cuda.device_count()
        if lr >= count:
            raise FqhwError(f"LOCAL_RANK={lr} but only {count} GPU(s) are visible: start at most {count} processes per machine")
        return torch.device("cuda", lr)
    return torch.device("cpu")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_from_env(timeout_s: float | None = None) -> tuple[int, int]:
    """(rank, world size). Joins the process group when torchrun set WORLD_SIZE > 1.

    Backend nccl when CUDA is available, gloo on the CPU; rendezvous from torchrun's
    MASTER_ADDR/MASTER_PORT. Idempotent: a second call (or a group someone else set up)
    is reused. A group created here is destroyed at exit. timeout_s bounds every
    collective, a wait for rank 0 (`run_on_main`) included (None: torch's default, 10 min
    for nccl, 30 min for gloo): raise it when rank 0 alone runs something longer.
    """
    if _dist_ready():
        return rank(), world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not torch.distributed.is_available():
        raise FqhwError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend, timeout=None if timeout_s is None else timedelta(seconds=timeout_s))
    atexit.register(cleanup)
    return rank(), world_size()


def rank() -> int:
    return torch.distributed.get_rank() if _dist_ready() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _dist_ready() else 1


def is_distributed() -> bool:
    """Whether there is more than one rank to cooperate with."""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints progress."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def cleanup() -> None:
    """Leave the process group (no-op when there is none)."""
    if _dist_ready():
        torch.distributed.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the GPU for nccl, the CPU for gloo."""
    return device() if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled). Every rank must call it, in the same order."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(fn: Callable, *args, share: bool = True, **kwargs) -> Any:
    """fn(*args, **kwargs) on rank 0 only; every rank waits for it.

    share=True: every rank returns rank 0's result (it must pickle); share=False: the other
    ranks return None. If fn raises on rank 0, rank 0 re-raises it and the others raise an
    FqhwError naming it, rather than waiting forever in their next collective.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the other ranks, then re-raised
            error = e
    ok, shared, message = from_main(
        (error is None, result if share and error is None else None, None if error is None else f"{type(error).__name__}: {error}")
    )
    if error is not None:
        raise error
    if not ok:
        raise FqhwError(f"rank 0 failed: {message}")
    return result if is_main() else shared


@dataclass(frozen=True)
class BatchShare:
    """This rank's rows of one global batch of `total` samples."""

    rows: slice  # into the global batch
    count: int  # real samples in `rows` (0: one padding sample, weight 0)
    total: int
    world: int

    @property
    def whole(self) -> bool:
        """One process: the share is the whole batch and no loss rescaling is needed."""
        return self.world == 1

    @property
    def scale(self) -> float:
        """Factor for this rank's mean loss, so that DDP's average over ranks is the
        gradient of the whole batch's mean loss (0 for a padding share)."""
        return self.count * self.world / self.total


def _bounds(n: int, r: int, w: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank r: contiguous, sizes differ by at most one, the larger first
    (so rank 0, whose buffers DDP keeps, always holds real samples)."""
    q, rem = divmod(n, w)
    lo = r * q + min(r, rem)
    return lo, lo + q + (1 if r < rem else 0)


def batch_share(n: int) -> BatchShare:
    """This rank's share of a global batch of n samples (all of it on one process)."""
    w = world_size()
    lo, hi = _bounds(n, rank(), w)
    if hi == lo:  # fewer samples than ranks: pad with the batch's first sample, weight 0
        return BatchShare(slice(0, 1), 0, n, w)
    return BatchShare(slice(lo, hi), hi - lo, n, w)


def wrap(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """`model` itself on one process; under torchrun a DistributedDataParallel around it.

    Train through the wrapper and keep using `model` itself for evaluation, state dicts and
    everything after training (the wrapper adds a "module." prefix and collectives). The
    model must already be on `device()`.

    find_unused_parameters stays False for fqhw's models, Brevitas ones included: a learned
    activation scale that is still collecting statistics enters the graph as 0 * scale
    (Brevitas does that so its gradient exists), so every parameter gets a gradient each
    step; and the statistics buffer it is initialised from is a registered buffer, which DDP
    broadcasts from rank 0, so the scale starts equal on every rank.
    """
    if not is_distributed():
        return model
    dev = device()
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=find_unused_parameters
    )


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them at the start of each forward, so after the last training step of an
    epoch each rank holds its own; before evaluating or saving they are made rank 0's, as
    the next forward would.
    """
    if not is_distributed():
        return
    for b in model.buffers():
        torch.distributed.broadcast(b, src=0)


def all_sum(*values: float) -> tuple:
    """Each value summed over ranks (ints stay ints; exact up to 2**53)."""
    if not is_distributed():
        return values
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return tuple(int(s) if isinstance(v, (int, np.integer)) else float(s) for v, s in zip(values, t.tolist()))


def shard_rows(n: int) -> tuple[int, int]:
    """This rank's contiguous rows [lo, hi) of an n-row data set, for evaluation."""
    return _bounds(n, rank(), world_size())


def gather_rows(fn: Callable[[Any], np.ndarray], data) -> np.ndarray:
    """fn(data) as one int64 array, each rank computing fn on its rows and all-gathering.

    `data` has `__len__` and `subset(indices)` (GroupedImages); fn maps a subset to one
    integer per row (predicted classes). Integers make the result exact and identical on
    every rank, so decisions taken on it (the best epoch) agree.
    """
    if not is_distributed():
        return fn(data)
    n, w = len(data), world_size()
    lo, hi = shard_rows(n)
    mine = np.asarray(fn(data.subset(np.arange(lo, hi))), dtype=np.int64) if hi > lo else np.zeros(0, dtype=np.int64)
    width = -(-n // w)
    buf = torch.zeros(width, dtype=torch.int64, device=_comm_device())
    buf[: hi - lo] = torch.from_numpy(mine)
    parts = [torch.empty_like(buf) for _ in range(w)]
    torch.distributed.all_gather(parts, buf)
    return np.concatenate([p[: b - a].cpu().numpy() for p, (a, b) in zip(parts, (_bounds(n, r, w) for r in range(w)))])


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """t summed over ranks (a new tensor on t's device; t itself on one process)."""
    if not is_distributed():
        return t
    s = t.detach().to(_comm_device(), copy=True)
    torch.distributed.all_reduce(s)
    return s.to(t.device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU if it has neither."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if t is None else t.device
