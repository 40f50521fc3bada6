"""Shared fixtures: one tiny end-to-end compile, reused by the tests that read its output."""
from __future__ import annotations

import numpy as np
import pytest

from fqhw.fairness.sensitivity import Sensitivity

from fqhw.cli import main

TINY = [
    "--data-n-train", "240", "--data-n-val", "120", "--data-n-test", "120", "--data-image-size", "16",
    "--channels", "4,8", "--epochs", "1", "--qat-epochs", "1", "--quiet",
]


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    out, cache = root / "out", root / "cache"
    assert main(["compile", "--out", str(out), "--cache-dir", str(cache), *TINY]) == 0
    return out, cache


def sensitivity(net, seed=0, decay=2.0):
    """Loss increase halving per extra bit (gentle enough that targets trade widths
    differently), proportional to each layer's share of the parameters."""
    rng = np.random.default_rng(seed)
    w, a = {}, {}
    for s in net.layers:
        f = rng.uniform(0.5, 2.0, 2) * s.params / net.total_params
        w[s.name] = {b: f * decay ** (-(b - 2)) for b in range(2, 9)}
        if s.has_output_act:
            a[s.name] = {b: rng.uniform(0.2, 1.0, 2) * 0.3 * decay ** (-(b - 2)) for b in range(2, 9)}
    return Sensitivity(["light", "dark"], w, a)
