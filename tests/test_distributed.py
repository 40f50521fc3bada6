"""Training under torchrun with DistributedDataParallel: two gloo processes on the CPU.

One torchrun launch (this file run as a script, see `_worker`) trains each case on 2 ranks
and writes every rank's weights; the tests compare them with each other and with the same
training on one process. A DDP run is compared with a tolerance, not exactly: the gradient
of the whole batch is summed in another order (each rank sums its share, then the all-reduce
sums the ranks), so float results agree only to rounding. The models compared with a single
process have no BatchNorm: under DDP, BatchNorm normalises each rank's share by its own
statistics, which a single process cannot reproduce on the whole batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fqhw.data.dataset import DataSplits
from fqhw.errors import FqhwError
from fqhw.models import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
N_SGD, SGD_BATCH, N_QAT = 67, 33, 61  # SGD batches of 33, 33, 1: shares 17/16 and 1 + padding; QAT 31/30
QAT_LAMBDA = 2.0


def _splits():
    from fqhw.data.registry import load_data
    from fqhw.data.synthetic import SyntheticDermConfig

    cfg = SyntheticDermConfig(seed=0, n_train=512, n_val=97, n_test=16, image_size=16, noise_std=2.0)
    return load_data("builtin", image_size=16, seed=0, builtin=cfg)


def _head(splits: DataSplits, n: int) -> DataSplits:
    return DataSplits(splits.train.subset(np.arange(n)), splits.val, splits.test)


def _cnn():
    from fqhw.models.cnn import CNNConfig, FairCNN

    torch.manual_seed(0)
    return FairCNN(CNNConfig(image_size=16, num_classes=4, channels=(4, 8)))


def _plain():
    """A float CNN without BatchNorm (see the module docstring)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(64, 4))


class _QuantPlain(nn.Module):
    """A Brevitas model without BatchNorm: 4-bit weights, a learned 4-bit activation scale."""

    def __init__(self):
        super().__init__()
        from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU

        from fqhw.quant.layers import ActQuant, InputQuant, WeightQuant

        self.inp = QuantIdentity(act_quant=InputQuant, return_quant_tensor=True)
        self.conv = QuantConv2d(3, 4, 3, padding=1, bias=False, weight_quant=WeightQuant, weight_bit_width=4)
        self.relu = QuantReLU(act_quant=ActQuant, bit_width=4, return_quant_tensor=True)
        self.pool = nn.MaxPool2d(4)
        self.head = QuantLinear(64, 4, bias=False, weight_quant=WeightQuant, weight_bit_width=4)

    def forward(self, x):
        return self.head(self.pool(self.relu(self.conv(self.inp(x)))).flatten(1))


def _quant_plain(splits: DataSplits):
    from fqhw.quant.qmodel import calibrate

    torch.manual_seed(2)
    q = _QuantPlain()
    calibrate(q, splits.train.loader(32, shuffle=True, seed=0), batches=2)  # the scale becomes a learned parameter
    return q


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker(out: Path) -> None:
    """Every case on this rank; writes rank<r>.json and the weights (torchrun runs 2 of these)."""
    from fqhw.allocator.allocation import Allocation
    from fqhw.models.train import evaluate, train_float
    from fqhw.network import network_spec
    from fqhw.quant.qat import _shared_fairness_loss, finetune
    from fqhw.quant.qmodel import build_quant_model, calibrate

    torch.set_num_threads(1)
    rank, world = dist.init_from_env()
    splits = _splits()
    rec: dict = {"rank": rank, "world": world, "device": str(dist.device()), "main": dist.is_main()}

    # the FairCNN (with BatchNorm), three epochs, as the flow trains it
    m = _cnn()
    r = train_float(m, splits, epochs=3, lr=1e-2, batch_size=32, seed=0, progress=False)
    rec["float"] = {**r.to_dict(), "seconds": None, "digest": _digest(m),
                    "local_val_acc": float((evaluate(m, splits.val) == splits.val.labels).mean())}
    if rank == 0:  # the model is free of DDP again: a backward on one rank alone must not wait for the other
        m.train()
        nn.functional.cross_entropy(m(splits.train.tensors()[0][:8]), splits.train.tensors()[1][:8]).backward()
    dist.barrier()

    # one epoch of SGD in three steps (shares 17/16, 17/16, and 1 + a padded rank)
    p = _plain()
    train_float(p, _head(splits, N_SGD), epochs=1, lr=0.05, batch_size=SGD_BATCH, seed=1, optimizer="sgd", select="last", progress=False)
    torch.save(p.state_dict(), out / f"sgd{rank}.pt")

    # QAT: one step on a global batch of 61, shares 31/30
    q = _quant_plain(splits)
    finetune(q, _head(splits, N_QAT), epochs=1, lr=1e-3, fairness_lambda=QAT_LAMBDA, batch_size=N_QAT, seed=0, progress=False)
    torch.save(q.state_dict(), out / f"qat{rank}.pt")

    # the DDP-averaged gradient of the shared fairness loss, before any optimizer
    q = _quant_plain(splits)
    net = dist.wrap(q)
    x, y, g = (t[:N_QAT] for t in splits.train.tensors())
    part = dist.batch_share(N_QAT)
    loss, value = _shared_fairness_loss(net(x[part.rows]), y[part.rows], g[part.rows], QAT_LAMBDA, part, splits.train.num_groups)
    loss.backward()
    del net
    torch.save({k: v.grad for k, v in q.named_parameters()}, out / f"grad{rank}.pt")
    rec["shared_loss_value"] = value

    # the flow's QAT model (BatchNorm, learned activation scales), one epoch
    fm = _cnn()
    qm = build_quant_model(fm, Allocation.uniform(network_spec(fm, splits.train.input_shape), 4))
    calibrate(qm, splits.train.loader(32, shuffle=True, seed=0), batches=2)
    qr = finetune(qm, splits, epochs=1, lr=5e-4, fairness_lambda=0.5, batch_size=32, seed=0, progress=False)
    rec["quant"] = {"digest": _digest(qm), "best_epoch": qr.best_epoch, "history": qr.history}

    rec["run_on_main"] = dist.run_on_main(lambda: f"from rank {dist.rank()}")
    (out / f"rank{rank}.json").write_text(json.dumps(rec))
    dist.cleanup()


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Output folder of one 2-process torchrun launch of `_worker`."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, recs


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_close_and_moved(ddp_sd: dict, ref: nn.Module, init: nn.Module, rtol: float, atol: float) -> None:
    """DDP weights equal the single-process ones to rounding, and training moved them by far
    more than that (else the comparison would prove nothing)."""
    moved = 0.0
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ddp_sd[k], v, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
        moved = max(moved, float((v - init.state_dict()[k]).abs().max()))
    assert moved > 100 * atol


def test_device_is_cpu_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.device() == torch.device("cpu")


def test_device_is_cuda_local_rank_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert dist.device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.device() == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(FqhwError, match="LOCAL_RANK=2 but only 2 GPU"):
        dist.device()


def test_one_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init_from_env() == (0, 1) and dist.is_main() and not dist.is_distributed()
    share = dist.batch_share(7)
    assert (share.rows, share.count, share.whole, share.scale) == (slice(0, 7), 7, True, 1.0)
    model = _plain()
    assert dist.wrap(model) is model
    assert dist.all_sum(1.5, 3) == (1.5, 3)
    assert dist.run_on_main(lambda a: a + 1, 1) == 2
    splits = _splits()
    got = dist.gather_rows(lambda d: np.arange(len(d)), splits.val)
    assert np.array_equal(got, np.arange(len(splits.val)))
    dist.barrier()
    dist.sync_buffers(model)


@pytest.mark.parametrize("n, world, expect", [
    (7, 2, [(slice(0, 4), 4), (slice(4, 7), 3)]),
    (1, 2, [(slice(0, 1), 1), (slice(0, 1), 0)]),  # rank 1 pads with weight 0
    (5, 3, [(slice(0, 2), 2), (slice(2, 4), 2), (slice(4, 5), 1)]),
])
def test_batch_share_splits_and_weights(monkeypatch, n, world, expect):
    monkeypatch.setattr(dist, "world_size", lambda: world)
    losses = np.random.default_rng(0).uniform(0, 3, n)  # per-sample losses of one global batch
    averaged = 0.0
    for r, (rows, count) in enumerate(expect):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        s = dist.batch_share(n)
        assert (s.rows, s.count, s.total, s.whole) == (rows, count, n, False)
        averaged += s.scale * losses[s.rows].mean() / world  # what DDP's mean over ranks computes
    assert averaged == pytest.approx(losses.mean(), rel=1e-12)


def test_ddp_ranks_agree(ddp):
    out, (r0, r1) = ddp
    assert (r0["world"], r1["world"], r0["rank"], r1["rank"]) == (2, 2, 0, 1)
    assert r0["device"] == r1["device"] == "cpu" and r0["main"] and not r1["main"]
    assert r0["float"] == {**r1["float"], "local_val_acc": r0["float"]["local_val_acc"]}  # weights, history, choice
    assert r0["quant"] == r1["quant"]
    for name in ("sgd", "qat", "grad"):
        a, b = _load(out / f"{name}0.pt"), _load(out / f"{name}1.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert r0["run_on_main"] == r1["run_on_main"] == "from rank 0"


def test_ddp_float_training_learns(ddp):
    _, (r0, _) = ddp
    f = r0["float"]
    losses = [h["loss"] for h in f["history"]]
    assert losses[-1] < losses[0]
    assert f["val_acc"] > 0.4  # 4 balanced classes: chance is 0.25
    # the all-gathered validation accuracy is the whole validation set's, exactly
    assert f["val_acc"] == f["local_val_acc"] == max(h["val_acc"] for h in f["history"])


def test_ddp_sgd_steps_equal_single_process_steps(ddp):
    """Three SGD steps (momentum, so a doubled or halved gradient would show): the DDP
    weights are the single-process ones to rounding, with uneven and padded shares."""
    from fqhw.models.train import train_float

    out, _ = ddp
    ref, init = _plain(), _plain()
    train_float(ref, _head(_splits(), N_SGD), epochs=1, lr=0.05, batch_size=SGD_BATCH, seed=1, optimizer="sgd", select="last", progress=False)
    _assert_close_and_moved(_load(out / "sgd0.pt"), ref, init, rtol=1e-4, atol=1e-6)


def test_ddp_fairness_gradient_is_the_whole_batch_gradient(ddp):
    """The DDP-averaged gradient of the shared QAT loss equals the gradient of fairness_loss
    on the whole batch (max-min over the global batch's groups), quantizer scales included."""
    from fqhw.quant.qat import fairness_loss

    out, (r0, _) = ddp
    splits = _splits()
    q = _quant_plain(splits)
    x, y, g = (t[:N_QAT] for t in splits.train.tensors())
    assert len(torch.unique(g)) > 1
    loss = fairness_loss(q(x), y, g, QAT_LAMBDA)
    loss.backward()
    grads = _load(out / "grad0.pt")
    assert "relu.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl.value" in grads
    for k, p in q.named_parameters():
        assert float(p.grad.abs().max()) > 0, k
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert r0["shared_loss_value"] == pytest.approx(loss.item(), rel=1e-5)


def test_ddp_qat_step_equals_single_process_step(ddp):
    from fqhw.quant.qat import finetune

    out, _ = ddp
    splits = _splits()
    ref, init = _quant_plain(splits), _quant_plain(splits)
    finetune(ref, _head(splits, N_QAT), epochs=1, lr=1e-3, fairness_lambda=QAT_LAMBDA, batch_size=N_QAT, seed=0, progress=False)
    _assert_close_and_moved(_load(out / "qat0.pt"), ref, init, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
