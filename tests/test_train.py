"""train_float, evaluate and the trained-model cache, on tiny inputs."""
import json

import numpy as np
import pytest
import torch

from fqhw.data.synthetic import SyntheticDermConfig, generate
from fqhw.errors import FqhwError
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.models.train import TrainResult, cached_float_model, evaluate, train_float
from fqhw.stepcache import CACHE_VERSION, input_key

torch.set_num_threads(1)
TINY = CNNConfig(image_size=16, num_classes=4, channels=(8, 16))


@pytest.fixture(scope="module")
def splits():
    return generate(SyntheticDermConfig(seed=0, n_train=256, n_val=64, n_test=64, image_size=16, noise_std=2.0))


def build():
    torch.manual_seed(0)
    return FairCNN(TINY)


def test_tiny_training_reduces_loss(splits):
    model = build()
    r = train_float(model, splits, epochs=4, lr=1e-2, batch_size=32, seed=0, progress=False)
    assert isinstance(r, TrainResult) and len(r.history) == 4
    assert r.losses[-1] < r.losses[0]
    assert r.selection == "best-val"
    best = max(h["val_acc"] for h in r.history)
    assert r.val_acc == best and r.history[r.selected_epoch - 1]["val_acc"] == best
    # the model holds the selected epoch's weights
    assert (evaluate(model, splits.val) == splits.val.labels).mean() == pytest.approx(best)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the call


def test_same_seed_same_weights(splits):
    a, b = build(), build()
    ra = train_float(a, splits, epochs=1, lr=1e-2, batch_size=32, seed=7, progress=False, select="last")
    rb = train_float(b, splits, epochs=1, lr=1e-2, batch_size=32, seed=7, progress=False, select="last")
    assert ra.selection == "last" and ra.selected_epoch == 1
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_evaluate(splits):
    model = build()
    model.train()
    p = evaluate(model, splits.test, batch_size=10)
    assert p.dtype == np.int64 and p.shape == (64,) and p.min() >= 0 and p.max() < 4
    assert model.training  # mode restored


def test_bad_arguments(splits):
    with pytest.raises(FqhwError, match="epochs"):
        train_float(build(), splits, epochs=0, lr=1e-3, batch_size=8, seed=0, progress=False)
    with pytest.raises(FqhwError, match="optimizer"):
        train_float(build(), splits, epochs=1, lr=1e-3, batch_size=8, seed=0, progress=False, optimizer="lbfgs")


def test_cache_miss_then_hit(splits, tmp_path):
    calls = []

    def train_fn(model):
        calls.append(1)
        return train_float(model, splits, epochs=1, lr=1e-2, batch_size=64, seed=0, progress=False)

    key = {"model": TINY.to_dict(), "data": {"seed": 0}, "epochs": 1}
    m1, info1, hit1 = cached_float_model(key, build, train_fn, tmp_path)
    m2, info2, hit2 = cached_float_model(key, build, train_fn, tmp_path)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert info1["epochs"] == 1 and json.loads(json.dumps(info1)) == info2
    for va, vb in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(va, vb)
    assert np.array_equal(evaluate(m1, splits.test), evaluate(m2, splits.test))
    h = input_key({"step": "float_model", "cache_version": CACHE_VERSION, "inputs": key})
    entry = tmp_path / "steps" / "float_model" / h
    assert (entry / "model.pt").exists() and (entry / "info.json").exists() and (entry / "inputs.json").exists()
    assert not list(entry.parent.glob(".*"))  # no temporary folder left behind
    # another key misses; key order does not matter
    assert input_key(dict(reversed(list(key.items())))) == input_key(key)
    _, _, hit3 = cached_float_model({**key, "epochs": 2}, build, lambda m: {"note": "x"}, tmp_path)
    assert not hit3
    # a corrupt entry is retrained, not trusted
    (entry / "model.pt").write_bytes(b"garbage")
    _, _, hit4 = cached_float_model(key, build, train_fn, tmp_path)
    assert not hit4 and len(calls) == 2
