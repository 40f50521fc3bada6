"""FINN's CNV (`--model cnv`): its geometry, and the whole flow on it through FINN."""
from __future__ import annotations

import json

import onnx
import pytest

from fqhw.cli import main
from fqhw.errors import FqhwError
from fqhw.models.registry import create
from fqhw.network import network_spec

CNV = ["--model", "cnv", "--model-arg", "width=0.125", "--data-n-train", "160", "--data-n-val", "60", "--data-n-test", "60",
       "--epochs", "1", "--qat-epochs", "1", "--verify-images", "4", "--quiet"]


def test_cnv_geometry_is_finns():
    m = create("cnv", 4, 32)
    convs = [b.conv for b in m.features]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.kernel_size[0] for c in convs] == [3] * 6 + [1, 1] and all(c.padding[0] == 0 for c in convs)
    assert [type(b.pool).__name__ for b in m.features] == ["Identity", "MaxPool2d", "Identity", "MaxPool2d"] + ["Identity"] * 4
    net = network_spec(m, (3, 32, 32))
    # 30, 28 (pool 14), 12, 10 (pool 5), 3, 1; the two FC layers are 1x1 on a 1x1 map
    assert [s.out_hw for s in net.layers[:6]] == [(30, 30), (28, 28), (12, 12), (10, 10), (3, 3), (1, 1)]
    assert [(s.mw, s.mh, s.out_hw) for s in net.layers[6:]] == [(256, 512, (1, 1)), (512, 512, (1, 1)), (512, 4, (1, 1))]
    assert sum(p.numel() for p in m.parameters() if p.dim() > 1) == net.total_params
    narrow = create("cnv", 4, 32, width=0.25)
    assert [b.conv.out_channels for b in narrow.features] == [16, 16, 32, 32, 64, 64, 128, 128]


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=64), "cnv takes 32 px images"),
    (dict(width=0), "width must be positive"),
    (dict(channels=(8, 8)), "cnv takes --model-arg width=W only"),
])
def test_cnv_refuses_bad_arguments(kwargs, match):
    size = kwargs.pop("image_size", 32)
    with pytest.raises(FqhwError, match=match):
        create("cnv", 4, size, **kwargs)


@pytest.mark.slow
def test_cnv_compiles_through_finn_bit_exact_and_simulates(tmp_path, capsys):
    from fqhw.simulate import build_test_data, simulate

    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["compile", "--target", "pynq-z2", "--budget", "4", "--out", str(out), "--cache-dir", str(cache), *CNV]) == 0
    report = json.loads((out / "report.json").read_text())
    be = report["bit_exact"]
    assert be["first_mismatch"] is None and be["backends"] == ["brevitas", "qonnx", "finn"]
    assert len(be["keys"]) == 10 and all(v == 0 for m in be["mismatches"].values() for v in m.values())
    alloc = json.loads((out / "allocation.json").read_text())
    free = [la for la in alloc["layers"] if la["name"] not in ("features.0.conv", "head")]
    assert len(free) == 7 and alloc["solver"]["avg_weight_bits"] <= 4.0
    ops = [n.op_type for n in onnx.load(out / "finn" / "11_estimates.onnx").graph.node]
    assert sum(o.startswith("MVAU") for o in ops) == 9 and sum(o.startswith("Pool") for o in ops) == 2
    hw = report["hardware"]["finn"]
    assert hw["outside_nodes"] == ["Transpose_0 (Transpose)", "Mul_0 (Mul)"]  # only the layout and the scale on the host
    # the simulator runs the build and agrees with FINN and qonnx
    res = simulate(out, build_test_data(out), cross_check=4)
    assert res.bitexact is not None and res.bitexact.ok
    assert res.metrics["n"] == report["accuracy"]["compiled"]["n"]


def test_cnv_refuses_hls4ml_before_any_work(tmp_path, capsys):
    out = tmp_path / "h"
    rc = main(["compile", "--backend", "hls4ml", "--out", str(out), "--cache-dir", str(tmp_path / "c"), *CNV])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--backend hls4ml builds the default CNN only, not cnv" in err[0]
    assert not out.exists() and not (tmp_path / "c").exists()
