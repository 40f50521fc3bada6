"""Brevitas -> QONNX -> FINN on a tiny CNN: export, build, estimates and bit-exactness."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.backends.finn_build import FinnBuild, finn_build, finn_integer_trace
from fqhw.backends.qonnx_export import export_qonnx, qonnx_integer_trace
from fqhw.backends.verify import check_bit_exact, require_bit_exact
from fqhw.errors import BitExactError, FqhwError
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.quant.qmodel import build_quant_model, calibrate, integer_trace

CFG = CNNConfig(image_size=8, channels=(4, 8), num_classes=3)
SHAPE = (CFG.in_channels, CFG.image_size, CFG.image_size)
# (name, weight bits, activation bits, PE, SIMD): features.0 is 27 -> 4, features.1 36 -> 8,
# head 8 -> 3
LAYERS = [("features.0.conv", 8, 4, 2, 9), ("features.1.conv", 3, 2, 4, 4), ("head", 4, None, 3, 8)]


def _alloc(layers=LAYERS) -> Allocation:
    return Allocation("pynq-z2", [LayerAllocation(n, w, a, pe, simd) for n, w, a, pe, simd in layers])


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), generator=g).float() / 256


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fm = FairCNN(CFG).eval()
    with torch.no_grad():  # non-trivial BatchNorm, some channels with negative gamma
        for bn in (b.bn for b in fm.features):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    alloc = _alloc()
    qm = build_quant_model(fm, alloc)
    calib = _images(32, seed=1)
    calibrate(qm, [(calib[i : i + 8],) for i in range(0, 32, 8)], batches=4)
    qm.eval()
    root = tmp_path_factory.mktemp("backends")
    qonnx_path = export_qonnx(qm, SHAPE, root / "model.onnx")
    build = finn_build(qonnx_path, alloc, root / "finn")
    x = _images(4, seed=2)
    traces = {
        "brevitas": integer_trace(qm, x),  # float64 twin: the exact reference
        "brevitas_fp32": integer_trace(qm, x, precision="float32"),
        "qonnx": qonnx_integer_trace(qonnx_path, x),
        "finn": finn_integer_trace(build, x),
    }
    return dict(qm=qm, alloc=alloc, root=root, qonnx=qonnx_path, build=build, x=x, traces=traces)


def test_float64_twin_has_the_same_quantized_parameters(flow):
    from fqhw.quant.qmodel import float64_twin

    qm = flow["qm"]
    twin = float64_twin(qm)
    for ql, tl in zip(qm.layers.values(), twin.layers.values()):
        a, b = ql.compute.quant_weight(), tl.compute.quant_weight()
        assert torch.equal(a.int().long(), b.int().long())
        assert torch.equal(a.scale.double(), b.scale)
        if ql.act is not None:
            assert torch.equal(ql.act.act_quant.scale().double(), tl.act.act_quant.scale())


def test_quant_model_mirrors_float_model(flow):
    qm = flow["qm"]
    assert list(qm.layers) == [n for n, *_ in LAYERS]
    for (name, w, a, _, _), ql in zip(LAYERS, qm.layers.values()):
        assert ql.weight_bits == w and ql.act_bits == a
        assert int(ql.compute.quant_weight().bit_width) == w
        if a is not None:
            assert int(ql.act.act_quant.bit_width()) == a
    assert float(qm.input_quant.act_quant.scale()) == 2.0**-8


def test_export_exists_and_is_deterministic(flow):
    path = flow["qonnx"]
    assert path.exists() and path.stat().st_size > 0
    again = export_qonnx(flow["qm"], SHAPE, flow["root"] / "again.onnx")
    assert again.read_bytes() == path.read_bytes()


def test_traces_have_expected_keys_and_integers(flow):
    x = flow["x"]
    for backend, tr in flow["traces"].items():
        assert set(tr) == {"input", "features.0.conv.act", "features.1.conv.act", "head.acc"}, backend
        assert all(a.dtype == np.int64 for a in tr.values()), backend
        assert tr["input"].shape == (4, *SHAPE)
        assert tr["features.0.conv.act"].shape == (4, 4, 8, 8)
        assert tr["features.1.conv.act"].shape == (4, 8, 4, 4)
        assert tr["head.acc"].shape == (4, 3)
    np.testing.assert_array_equal(flow["traces"]["brevitas"]["input"], np.round(x.numpy() * 256).astype(np.int64))
    acts = flow["traces"]["brevitas"]
    assert acts["features.0.conv.act"].max() <= 15 and acts["features.1.conv.act"].max() <= 3
    assert acts["features.0.conv.act"].max() > 0  # calibration gave a usable scale


def test_brevitas_qonnx_finn_bit_exact(flow):
    result = check_bit_exact(flow["traces"])
    assert result.ok, result.first_mismatch
    assert result.n_images == 4
    assert all(n == 0 for pairs in result.mismatches.values() for n in pairs.values())
    require_bit_exact(result)


def test_dataflow_graph_is_all_hw(flow):
    build: FinnBuild = flow["build"]
    df = onnx.load(build.dataflow_model)
    assert all(n.domain.startswith("finn.custom_op.fpgadataflow") for n in df.graph.node)
    assert sum(n.op_type.startswith("MVAU") for n in df.graph.node) == 3
    outside = [o.split(" (")[1].rstrip(")") for o in build.outside_nodes]
    assert set(outside) <= {"Transpose", "Reshape", "Flatten", "Mul"}
    # the folding from the allocation reached the MVAUs
    for name, _, _, pe, simd in LAYERS:
        assert (build.layer_estimates[name]["pe"], build.layer_estimates[name]["simd"]) == (pe, simd)


def test_estimates_exist_and_are_positive(flow):
    build: FinnBuild = flow["build"]
    assert set(build.layer_estimates) == {n for n, *_ in LAYERS}
    for name, est in build.layer_estimates.items():
        assert est["cycles"] > 0 and est["mvau_cycles"] > 0, name
        assert est["LUT"] > 0, name
        assert build.node_estimates[est["mvau"]]["layer"] == name
    # MVAU cycles are FINN's (MH/PE) * (MW/SIMD) * output pixels
    assert build.layer_estimates["features.0.conv"]["mvau_cycles"] == (4 // 2) * (27 // 9) * 64
    assert build.fps > 0 and build.latency_ns > 0 and build.totals["LUT"] > 0
    report = Path(build.build_dir) / "report"
    for name in (
        "estimate_layer_cycles.json",
        "estimate_layer_resources.json",
        "estimate_network_performance.json",
        "estimate_fqhw_layers.json",
    ):
        assert (report / name).exists(), name
    perf = json.loads((report / "estimate_network_performance.json").read_text())
    assert perf["estimated_throughput_fps"] == pytest.approx(build.fps)
    assert [s.name for s in build.steps][:4] == ["input_codes", "qonnx_to_finn", "tidy_up", "streamline"]
    assert all(Path(s.model).exists() for s in build.steps)
    assert FinnBuild.load(build.build_dir).layer_estimates == build.layer_estimates


def test_one_changed_weight_is_caught(flow, tmp_path):
    """Change one head weight code in the QONNX file: the check must name head.acc."""
    model = onnx.load(flow["qonnx"])
    head = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm"))
    wq = next(n for n in model.graph.node if n.output[0] == head.input[1])
    inits = {i.name: i for i in model.graph.initializer}
    w = numpy_helper.to_array(inits[wq.input[0]]).copy()  # (in, out) for MatMul
    scale = numpy_helper.to_array(inits[wq.input[1]])
    assert head.op_type == "MatMul" and w.shape == (8, 3)
    # a feature that is non-zero on image 0, so the change must reach the accumulator
    feats = flow["traces"]["brevitas"]["features.1.conv.act"][0].max(axis=(1, 2))
    j = int(np.argmax(feats))
    assert feats[j] > 0
    s = float(np.asarray(scale).reshape(-1)[0])
    code = round(float(w[j, 0]) / s)
    w[j, 0] += -3 * s if code > 0 else 3 * s  # moves the 4-bit code by 3, inside [-7, 7]
    inits[wq.input[0]].CopyFrom(numpy_helper.from_array(w, wq.input[0]))
    bad = tmp_path / "tampered.onnx"
    onnx.save(model, bad)
    tampered = qonnx_integer_trace(bad, flow["x"])
    result = check_bit_exact({"brevitas": flow["traces"]["brevitas"], "qonnx": tampered})
    assert not result.ok
    assert result.first_mismatching_key == "head.acc"
    assert result.mismatches["head.acc"]["brevitas vs qonnx"] >= 1
    assert result.mismatches["features.1.conv.act"]["brevitas vs qonnx"] == 0
    with pytest.raises(BitExactError, match="head.acc"):
        require_bit_exact(result)


def test_check_bit_exact_reports_shape_and_missing_keys():
    a = {"input": np.zeros((2, 3), np.int64), "head.acc": np.zeros((2, 4), np.int64)}
    b = {"input": np.zeros((2, 3), np.int64)}
    r = check_bit_exact({"a": a, "b": b})
    assert not r.ok and r.first_mismatching_key == "head.acc" and "missing" in r.first_mismatch
    c = {"input": np.zeros((2, 3), np.int64), "head.acc": np.zeros((2, 5), np.int64)}
    assert "shape" in check_bit_exact({"a": a, "c": c}).first_mismatch
    d = {"input": np.zeros((2, 3), np.int64), "head.acc": np.array([[0, 0, 0, 0], [0, 0, 1, 0]])}
    r = check_bit_exact({"a": a, "d": d})
    assert r.mismatches["head.acc"]["a vs d"] == 1 and "(1, 2)" in r.first_mismatch
    with pytest.raises(TypeError):
        check_bit_exact({"a": a, "f": {"input": np.zeros((2, 3)), "head.acc": np.zeros((2, 4))}})


def test_folding_that_does_not_divide_is_refused(flow, tmp_path):
    layers = [list(la) for la in LAYERS]
    layers[1][3] = 3  # PE 3 does not divide the 8 outputs of features.1
    with pytest.raises(FqhwError, match="features.1.conv"):
        finn_build(flow["qonnx"], _alloc([tuple(la) for la in layers]), tmp_path / "bad")


def test_compute_op_left_outside_the_partition_is_refused(flow, tmp_path):
    """An op FINN cannot map (here an Exp after the logits) must fail the build by name."""
    model = onnx.load(flow["qonnx"])
    out = model.graph.output[0]
    old_name = out.name
    for node in model.graph.node:
        node.output[:] = [f"{old_name}_pre" if o == old_name else o for o in node.output]
    model.graph.node.append(onnx.helper.make_node("Exp", [f"{old_name}_pre"], [old_name], name="Exp_0"))
    bad = tmp_path / "exp.onnx"
    onnx.save(model, bad)
    with pytest.raises(FqhwError, match="Exp_0"):
        finn_build(bad, flow["alloc"], tmp_path / "exp_build")


def test_saved_build_can_move(flow, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(flow["build"].build_dir, moved)
    build = FinnBuild.load(moved)
    assert Path(build.dataflow_model).parent == moved.resolve() and Path(build.dataflow_model).exists()
    assert all(Path(s.model).exists() and Path(s.model).parent == moved.resolve() for s in build.steps)
    again = finn_integer_trace(build, flow["x"][:1])
    for key, ref in flow["traces"]["finn"].items():
        np.testing.assert_array_equal(again[key], ref[:1])
    assert build.summary()["fps"] == pytest.approx(flow["build"].fps)
