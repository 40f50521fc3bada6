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
from fqhw.backends.finn.build import finn_build
from fqhw.backends.finn.common import FinnBuild
from fqhw.backends.finn.execute import finn_integer_trace, threshold_check
from fqhw.backends.qonnx_export import export_qonnx, qonnx_integer_trace
from fqhw.backends.verify import check_bit_exact, require_bit_exact
from fqhw.errors import BitExactError, FqhwError
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.quant.qmodel import build_quant_model, calibrate, integer_trace
from fqhw.quant.snap import snap_thresholds, threshold_margins

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


# --------------------------------------------------------------------------- threshold margins
#
# The default 32x32 FairCNN with per-channel float weight scales, learned float activation
# scales and a randomised BatchNorm: without snapping, some pre-activations sit within
# float32 error of a code boundary, and FINN (float32 thresholds) or a float32 execution
# rounds them the other way. After `snap_thresholds` every reachable boundary is far from an
# integer accumulator value, so all backends must agree exactly.

BIG = (3, 32, 32)
# (weight bits, activation bits) per layer and folding (PE, SIMD); the head has no activation.
# "act8": 8-bit activations, weights narrow enough that every reachable accumulator stays
# below ~1.2e6, where FINN's float32 threshold arithmetic (a few ulps) is below the margin.
SNAP_CASES = {
    "act8": [(8, 8, 4, 9), (6, 8, 4, 16), (5, 8, 4, 16), (6, None, 1, 16)],
    "mixed": [(8, 5, 16, 27), (3, 4, 2, 48), (5, 6, 8, 32), (6, None, 2, 16)],
}


def _big_alloc(case: str) -> Allocation:
    names = ["features.0.conv", "features.1.conv", "features.2.conv", "head"]
    return Allocation("pynq-z2", [LayerAllocation(n, w, a, pe, simd) for n, (w, a, pe, simd) in zip(names, SNAP_CASES[case])])


def _big_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *BIG), generator=g).float() / 256


def _big_quant_model(case: str):
    torch.manual_seed(3)
    fm = FairCNN().eval()
    with torch.no_grad():
        for bn in (b.bn for b in fm.features):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    alloc = _big_alloc(case)
    qm = build_quant_model(fm, alloc)
    calib = _big_images(64, seed=4)
    calibrate(qm, [(calib[i : i + 16],) for i in range(0, 64, 16)], batches=4)
    return qm.eval(), alloc


@pytest.fixture(scope="module")
def snapped(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("snap")
    x = _big_images(64, seed=5)
    out = {}
    for case in SNAP_CASES:
        qm, alloc = _big_quant_model(case)
        before = None
        if case == "act8":  # FINN's thresholds before snapping, for the record
            p0 = export_qonnx(qm, BIG, root / f"{case}_raw.onnx")
            before = finn_build(p0, alloc, root / f"{case}_raw_finn").threshold_check
        params = {k: v.detach().clone() for k, v in qm.state_dict().items()}
        stats = snap_thresholds(qm)
        path = export_qonnx(qm, BIG, root / f"{case}.onnx")
        on_disk = path.read_bytes()
        build = finn_build(path, alloc, root / f"{case}_finn")
        traces = {
            "brevitas": integer_trace(qm, x),
            "brevitas_fp32": integer_trace(qm, x, precision="float32"),
            "qonnx": qonnx_integer_trace(path, x),
            "finn": finn_integer_trace(build, x),
        }
        assert path.read_bytes() == on_disk  # the float64 run works on a copy
        out[case] = dict(qm=qm, alloc=alloc, params=params, stats=stats, path=path, build=build, traces=traces, before=before)
    out["x"] = x
    return out


@pytest.mark.parametrize("case", list(SNAP_CASES))
def test_snapping_achieves_the_margin(snapped, case):
    r = snapped[case]
    stats = r["stats"]
    assert set(stats["layers"]) == {"features.0.conv", "features.1.conv", "features.2.conv"}
    assert stats["min_margin"] >= stats["margin"]
    # every channel got the margin it needs (8 float32 ulps of its largest magnitude), or,
    # where that is more than can be had (tiny BN scales: |beta / A| ~ 1e6), nearly 0.5
    for st in stats["layers"].values():
        assert st["channels_short_of_need"] == 0 or st["min_margin_short_of_need"] > 0.4
    recomputed = threshold_margins(r["qm"])
    for name, st in stats["layers"].items():
        assert st["min_margin"] > st["min_margin_before"], name
        assert recomputed[name]["min_margin"] == pytest.approx(st["min_margin"], abs=1e-9)
        assert recomputed[name]["min_margin"] >= stats["margin"]
        # a small change to the model: code boundaries move by a fraction of a step
        assert st["max_boundary_shift_steps"] < 0.2, name
        assert st["max_rel_gamma_change"] <= stats["max_scale_change"] * 1.0001, name
    if case == "act8":  # 8-bit: needs far above 1/(2K) = 0.002, met with the scale grid
        assert max(st["max_needed_margin"] for st in stats["layers"].values()) > 0.01
        assert max(st["channels_scaled"] for st in stats["layers"].values()) > 0
    # only the BN affine parameters (and weights, onto their grid) changed
    state = r["qm"].state_dict()
    for key, old in r["params"].items():
        if not key.endswith((".bn.weight", ".bn.bias", ".weight")):
            assert torch.equal(state[key], old), key


def test_snapping_again_changes_nothing(snapped):
    """Every channel of a snapped model has its margin: a second snap leaves it alone."""
    import copy

    for case in SNAP_CASES:
        qm = copy.deepcopy(snapped[case]["qm"])
        state = {k: v.clone() for k, v in qm.state_dict().items()}
        again = snap_thresholds(qm)
        assert again["max_rel_gamma_change"] == 0.0 and again["max_rel_beta_change"] == 0.0
        assert all(torch.equal(v, state[k]) for k, v in qm.state_dict().items())


def test_maximising_the_margin(snapped):
    """float32_ulps=None maximises every channel's margin (at least 1/(2K) per channel up to
    the float32 resolution of beta; far more with the scale grid)."""
    qm, alloc = _big_quant_model("mixed")
    best = snap_thresholds(qm, float32_ulps=None)
    default = snapped["mixed"]["stats"]
    for name, st in best["layers"].items():
        assert st["min_margin"] >= 0.95 * default["layers"][name]["min_margin"], name
        assert st["median_channel_margin"] >= default["layers"][name]["median_channel_margin"] - 1e-9, name
    # beta alone (the scale kept): the widest-gap shift
    qm, alloc = _big_quant_model("mixed")
    beta_only = snap_thresholds(qm, float32_ulps=None, max_scale_change=0.0, margin=1e-4)
    assert beta_only["max_rel_gamma_change"] == 0.0
    for name, st in beta_only["layers"].items():
        levels = 2 ** dict(zip(["features.0.conv", "features.1.conv", "features.2.conv"], [5, 4, 6]))[name] - 1
        assert st["min_margin"] >= 1 / (2 * levels) - st["max_beta_ulp_acc"] / 2, name


def test_snapping_keeps_the_weight_codes(snapped):
    for case in SNAP_CASES:
        qm = snapped[case]["qm"]
        for name, ql in qm.layers.items():
            qw = ql.compute.quant_weight()
            q = ql.compute.weight.detach().double() / qw.scale.detach().double()
            # on the grid: the code is unambiguous in any precision
            assert float((q - torch.round(q)).abs().max()) < 1e-4, name


@pytest.mark.parametrize("case", list(SNAP_CASES))
def test_snapped_backends_bit_exact(snapped, case):
    traces = snapped[case]["traces"]
    result = check_bit_exact(traces)
    assert result.ok, result.first_mismatch
    assert result.n_images == 64
    assert traces["brevitas"]["features.0.conv.act"].shape == (64, 16, 32, 32)
    assert traces["brevitas"]["head.acc"].shape == (64, 4)


def test_finn_threshold_check(snapped):
    before = snapped["act8"]["before"]
    assert before["differing"] > 0  # FINN's float32 thresholds were off before snapping
    for case in SNAP_CASES:
        build: FinnBuild = snapped[case]["build"]
        check = build.threshold_check
        assert check["ok"] and check["differing"] == 0, check
        assert set(check["layers"]) == {"features.0.conv", "features.1.conv", "features.2.conv"}
        for layer in check["layers"].values():
            assert layer["thresholds"] > 0 and layer["weights_differing"] == 0
        assert build.summary()["thresholds_differing"] == 0
        saved = json.loads((Path(build.build_dir) / "report" / "threshold_check.json").read_text())
        assert saved["differing"] == 0
        assert FinnBuild.load(build.build_dir).threshold_check == json.loads(json.dumps(check))


def test_threshold_check_reads_the_qonnx_file(snapped, tmp_path):
    """A BN bias edited in the QONNX file after the FINN build moves the float64 thresholds:
    the check must see it (it reads the file, not the Brevitas model)."""
    r = snapped["mixed"]
    model = onnx.load(r["path"])
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    inits = {i.name: i for i in model.graph.initializer}
    beta = numpy_helper.to_array(inits[bn.input[2]]).copy()
    beta += 0.25
    inits[bn.input[2]].CopyFrom(numpy_helper.from_array(beta, bn.input[2]))
    bad = tmp_path / "tampered.onnx"
    onnx.save(model, bad)
    build: FinnBuild = r["build"]
    check = threshold_check(bad, build.dataflow_model, build.mvau_of_layer)
    assert not check["ok"]
    assert check["layers"]["features.0.conv"]["differing"] > 0
    assert check["layers"]["features.1.conv"]["differing"] == 0


def test_qonnx_float64_and_float32_runs(snapped):
    r = snapped["mixed"]
    x = snapped["x"][:4]
    t32 = qonnx_integer_trace(r["path"], x, precision="float32")
    assert all(a.dtype == np.int64 for a in t32.values())
    assert set(t32) == set(r["traces"]["qonnx"])
    with pytest.raises(ValueError):
        qonnx_integer_trace(r["path"], x, precision="float16")


def test_float64_copy_is_lowered_and_double(snapped):
    from onnx import TensorProto

    from fqhw.backends.qonnx_export import float64_copy

    m = float64_copy(snapped["mixed"]["path"])
    ops = [n.op_type for n in m.graph.node]
    assert "Conv" not in ops and ops.count("Im2Col") == 3 and ops.count("MatMul") == 4
    floats = [i.name for i in m.graph.initializer if i.data_type == TensorProto.FLOAT and i.name != "fqhw_f64_one"]
    assert floats == []
    for vi in list(m.graph.input) + list(m.graph.value_info):
        assert vi.type.tensor_type.elem_type != TensorProto.FLOAT or vi.name.endswith("_codes"), vi.name


def test_best_shift_is_the_widest_gap():
    """_best_shift against a brute-force search: the max-min distance to the integers, at
    least 1/(2K), and the shift nearest to zero among near-equal ones."""
    from fqhw.quant.snap import _best_shift, min_margin

    rng = np.random.default_rng(0)
    grid = np.linspace(-0.5, 0.5, 20001)
    for _ in range(30):
        k = int(rng.integers(1, 60))
        t = rng.uniform(-1e4, 1e4) + rng.uniform(0.3, 50.0) * np.arange(k)
        u = _best_shift(t, tie_tol=0.0)
        got = min_margin(t + u)
        brute = max(min_margin(t + g) for g in grid[::20])
        assert got >= brute - 1e-3 and got >= 1 / (2 * k) - 1e-9
        assert abs(u) <= 0.5
        # with a tolerance, never a worse margin than allowed and never a larger shift
        u2 = _best_shift(t, tie_tol=0.2)
        assert min_margin(t + u2) >= 0.8 * got - 1e-9 and abs(u2) <= abs(u) + 1e-12
        # a needed margin: the smallest shift that gives it
        need = 0.5 * got
        u3 = _best_shift(t, tie_tol=0.0, need=need)
        assert min_margin(t + u3) >= need - 1e-9
        ok = [g for g in grid[::4] if min_margin(t + g) >= need + 1e-6]
        assert abs(u3) <= min(abs(g) for g in ok) + 1e-9


# --------------------------------------------------------------------------- finishing the build
#
# finn_build leaves in its folder what FINN needs to finish the bitfile on a machine with
# Vivado: FINN's build configuration, its folding configuration and the dataflow model.


def _hw_nodes(model):
    return [n for n in model.graph.node if n.domain.startswith("finn.custom_op.fpgadataflow")]


def test_build_config_loads_with_finns_loader(flow):
    """FINN's own loader (DataflowBuildConfig.construct_from, what `finn build` uses) reads
    the configuration: board, part, clock, shell, the folding file, FINN's remaining steps."""
    from finn.builder.build_dataflow_config import (
        DataflowBuildConfig,
        DataflowOutputType,
        ShellFlowType,
        default_build_dataflow_steps,
    )

    from fqhw.backends.finn.synth import FOLDING_CONFIG, SYNTH_CONFIG, SYNTH_MODEL, SYNTH_SCRIPT

    build: FinnBuild = flow["build"]
    root = Path(build.build_dir)
    assert Path(build.synth_config) == root / SYNTH_CONFIG
    cfg = DataflowBuildConfig.construct_from(root / SYNTH_CONFIG)
    assert cfg.board == build.board == "Pynq-Z2"
    assert cfg._resolve_fpga_part() == build.part == "xc7z020clg400-1"
    assert cfg.synth_clk_period_ns == build.clock_ns
    assert cfg.shell_flow_type == ShellFlowType.VIVADO_ZYNQ
    assert cfg.folding_config_file == (root / FOLDING_CONFIG).absolute()
    assert DataflowOutputType.BITFILE in cfg.generate_outputs
    start = default_build_dataflow_steps.index("step_apply_folding_config")
    assert cfg.steps == default_build_dataflow_steps[start:]
    assert cfg.steps[-3:] == ["step_synthesize_bitfile", "step_make_driver", "step_deployment_package"]
    # the model the remaining steps start from, a run script and a README naming the command
    assert (root / SYNTH_MODEL).exists() and Path(build.dataflow_model) == root / SYNTH_MODEL
    script = (root / SYNTH_SCRIPT).read_text()
    assert "finn\" build --batch" in script or "finn}\" build --batch" in script
    assert SYNTH_CONFIG in script and SYNTH_MODEL in script
    assert (root / SYNTH_SCRIPT).stat().st_mode & 0o111
    readme = (root / "FINISH_BUILD.md").read_text()
    assert f"bash {SYNTH_SCRIPT}" in readme and "finn build --batch" in readme
    # the saved record keeps them, relative to the folder
    again = FinnBuild.load(root)
    assert again.synth_config == build.synth_config and again.board == "Pynq-Z2"
    assert json.loads((root / "finn_build.json").read_text())["synth_config"] == SYNTH_CONFIG


def test_folding_config_is_the_allocations(flow):
    """Every HW node is in FINN's folding configuration; each MVAU's PE/SIMD is the
    allocation's, every other node's folding is what finn_build applied; and FINN's
    ApplyConfig with that file alone turns the unfolded graph into the folded one."""
    from finn.transformation.general import ApplyConfig
    from finn.transformation.qonnx.give_unique_node_names_recursive import GiveUniqueNodeNamesRecursive
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    from fqhw.backends.finn.synth import FOLDING_ATTRS

    build: FinnBuild = flow["build"]
    folding = json.loads(Path(build.folding_config).read_text())
    df = ModelWrapper(build.dataflow_model)
    hw = _hw_nodes(df)
    assert set(folding) == {"Defaults"} | {n.name for n in hw}
    alloc_of_node = {build.mvau_of_layer[la.name]: la for la in flow["alloc"].layers}
    assert len(alloc_of_node) == 3
    for node in hw:
        cfg = folding[node.name]
        if node.name in alloc_of_node:
            la = alloc_of_node[node.name]
            assert (cfg["PE"], cfg["SIMD"]) == (la.pe, la.simd), node.name
        for key, value in build.folding[node.name].items():
            assert cfg[key] == value, (node.name, key)
    # FINN re-names nodes before applying the file: the names must already be its names
    renamed = df.transform(GiveUniqueNodeNamesRecursive())
    assert [n.name for n in renamed.graph.node] == [n.name for n in df.graph.node]
    # the file alone carries the folding: applied to the graph before folding
    unfolded = ModelWrapper(next(s.model for s in build.steps if s.name == "specialize_layers"))
    refolded = unfolded.transform(ApplyConfig(build.folding_config))
    before = {n.name: n for n in unfolded.graph.node}
    changed = 0
    for a, b in zip(refolded.graph.node, df.graph.node):
        assert a.name == b.name
        ia, ib = getCustomOp(a), getCustomOp(b)
        types = ia.get_nodeattr_types()
        for attr in FOLDING_ATTRS:
            if attr in types:
                assert ia.get_nodeattr(attr) == ib.get_nodeattr(attr), (a.name, attr)
                changed += getCustomOp(before[a.name]).get_nodeattr(attr) != ib.get_nodeattr(attr)
    assert changed > 0  # the unfolded graph really was different


def test_finns_own_steps_reproduce_the_estimates(flow, tmp_path, monkeypatch):
    """FINN's builder, from the written configuration and model, runs the first of the
    remaining steps (those that need no Xilinx tools: applying the folding file, bit-width
    minimisation, transpose decomposition, estimate reports): its estimates are fqhw's and
    its integer parameters and node settings those of the verified graph."""
    import os

    import finn.xsi
    from finn.builder.build_dataflow_config import DataflowBuildConfig
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    if "XILINX_VIVADO" not in os.environ and "SimEngine" not in vars(finn.xsi):
        # the builder imports finn.xsi.SimEngine, a type name only there; looking it up
        # starts FINN's XSI simulator set-up, which needs Vivado
        monkeypatch.setitem(vars(finn.xsi), "SimEngine", None)
    monkeypatch.setenv("FINN_BUILD_DIR", str(tmp_path / "finn_tmp"))
    from finn.builder.build_dataflow_steps import build_dataflow_step_lookup

    build: FinnBuild = flow["build"]
    cfg = DataflowBuildConfig.construct_from(Path(build.synth_config))
    cfg.output_dir = str(tmp_path / "out")
    ours = ModelWrapper(build.dataflow_model)
    model = ModelWrapper(build.dataflow_model)
    ran = cfg.steps[: cfg.steps.index("step_generate_estimate_reports") + 1]
    assert ran == ["step_apply_folding_config", "step_minimize_bit_width", "step_transpose_decomposition", "step_generate_estimate_reports"]
    for name in ran:
        model = build_dataflow_step_lookup[name](model, cfg)
    report = Path(build.build_dir) / "report"
    for name in ("estimate_layer_cycles.json", "estimate_layer_resources.json", "estimate_network_performance.json"):
        assert json.loads((tmp_path / "out" / "report" / name).read_text()) == json.loads((report / name).read_text()), name
    assert [n.name for n in model.graph.node] == [n.name for n in ours.graph.node]
    for a, b in zip(model.graph.node, ours.graph.node):
        assert list(a.input) == list(b.input) and list(a.output) == list(b.output)
        ia, ib = getCustomOp(a), getCustomOp(b)
        for attr in ia.get_nodeattr_types():
            va, vb = ia.get_nodeattr(attr), ib.get_nodeattr(attr)
            assert np.array_equal(np.asarray(va), np.asarray(vb)), (a.name, attr)
    for init in ours.graph.initializer:
        np.testing.assert_array_equal(model.get_initializer(init.name), ours.get_initializer(init.name))
        assert model.get_tensor_datatype(init.name) == ours.get_tensor_datatype(init.name)


def _snapshot(folder: Path) -> dict:
    import hashlib

    return {
        str(p.relative_to(folder)): (p.is_dir(), p.stat().st_mtime_ns, None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
    }


def _no_xilinx(monkeypatch, path: str):
    for var in ("XILINX_VIVADO", "XILINX_HLS", "XILINX_VITIS", "FINN_TOOL_DIR_OVERRIDE", "FINN_XILINX_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", path)


def test_synth_without_vivado_names_what_is_missing(flow, tmp_path, monkeypatch):
    """No Vivado: a one-line FqhwError naming what is missing, how to get it and the
    command to run elsewhere; the build folder is left exactly as it was."""
    from fqhw.backends.finn.synth import SYNTH_OUTPUT, finn_synth

    build: FinnBuild = flow["build"]
    root = Path(build.build_dir)
    empty = tmp_path / "bin"
    empty.mkdir()
    _no_xilinx(monkeypatch, str(empty))
    before = _snapshot(root)
    with pytest.raises(FqhwError) as err:
        finn_synth(root)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("--synth needs Vivado")
    assert "vivado not on PATH and XILINX_VIVADO unset" in msg
    assert "vitis_hls" in msg and "2022.2" in msg and "settings64.sh" in msg
    assert f"`bash finish_build.sh` in {root}" in msg
    assert _snapshot(root) == before
    assert not (root / SYNTH_OUTPUT).exists()
    # the compile output folder (holding finn/) is accepted as well, with the same result
    with pytest.raises(FqhwError, match="--synth needs Vivado"):
        finn_synth(root.parent)
    # upstream FINN's docker variable is named as not read
    monkeypatch.setenv("FINN_XILINX_PATH", "/tools/Xilinx")
    with pytest.raises(FqhwError, match="FINN_XILINX_PATH=/tools/Xilinx .*settings64.sh"):
        finn_synth(root)
    assert _snapshot(root) == before


def test_synth_refuses_a_folder_without_finns_configuration(tmp_path):
    from fqhw.backends.finn.synth import finn_synth

    with pytest.raises(FqhwError, match="lacks dataflow_build_config.json"):
        finn_synth(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _fake_tools(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        p = folder / name
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(0o755)


def test_synth_tool_detection(tmp_path, monkeypatch):
    """What finn-plus reads: XILINX_VIVADO with a version in its path, vivado and the HLS
    tool of that version (vitis_hls, vitis-run after 2024.2) on PATH or in
    FINN_TOOL_DIR_OVERRIDE, Vitis for Alveo, a C++ compiler."""
    from fqhw.backends.finn.synth import check_synth_tools, synth_tools_missing

    bin_ = tmp_path / "bin"
    _fake_tools(bin_, ["vivado", "vitis_hls", "g++"])
    _no_xilinx(monkeypatch, str(bin_))
    assert synth_tools_missing() == ["vivado is on PATH (%s) but XILINX_VIVADO is unset" % (bin_ / "vivado")]
    monkeypatch.setenv("XILINX_VIVADO", "/opt/Xilinx/Vivado/2022.2")
    assert synth_tools_missing() == []
    check_synth_tools()  # nothing missing: no error
    monkeypatch.setenv("XILINX_VIVADO", "/opt/Xilinx/Vivado/current")
    assert any("names no version" in m for m in synth_tools_missing())
    monkeypatch.setenv("XILINX_VIVADO", "/opt/Xilinx/2025.1/Vivado")
    assert synth_tools_missing() == ["vitis-run (Vitis HLS) not on PATH"]
    monkeypatch.setenv("XILINX_VIVADO", "/opt/Xilinx/Vivado/2024.2")
    missing = synth_tools_missing("vitis_alveo")
    assert missing == ["XILINX_VITIS unset (Alveo builds use Vitis)", "v++ not on PATH"]
    with pytest.raises(FqhwError, match=r"--synth needs Vivado and Vitis HLS and Vitis \(XILINX_VITIS unset"):
        check_synth_tools("/some/build", "vitis_alveo")
    # FINN_TOOL_DIR_OVERRIDE replaces PATH for the Xilinx tools
    shim = tmp_path / "shim"
    _fake_tools(shim, ["vivado"])
    monkeypatch.setenv("FINN_TOOL_DIR_OVERRIDE", str(shim))
    assert synth_tools_missing() == [f"vitis_hls (Vitis HLS) not in FINN_TOOL_DIR_OVERRIDE={shim}"]


def test_synth_runs_finns_command(flow, tmp_path, monkeypatch):
    """With the tools there, finn_synth runs FINN's `finn build` (an argument list, in the
    build folder) and reads FINN's verdict; a stand-in finn command plays FINN here."""
    import shutil
    import sys

    from fqhw.backends.finn.synth import SYNTH_CONFIG, SYNTH_MODEL, finn_synth

    root = tmp_path / "finn"
    shutil.copytree(flow["build"].build_dir, root)
    bin_ = tmp_path / "bin"
    _fake_tools(bin_, ["vivado", "vitis_hls", "g++"])
    _no_xilinx(monkeypatch, str(bin_))
    monkeypatch.setenv("XILINX_VIVADO", "/opt/Xilinx/Vivado/2022.2")
    fake = tmp_path / "finn_fake"  # a Python script: the stand-in needs nothing on PATH
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "from pathlib import Path\n"
        "Path('../argv.txt').write_text('\\n'.join([os.getcwd(), *sys.argv[1:]]))\n"
        "out = Path('vivado_build')\n"
        "for d in ('report', 'bitfile', 'deploy'):\n"
        "    (out / d).mkdir(parents=True, exist_ok=True)\n"
        "(out / 'report' / 'metadata_builder.json').write_text(json.dumps({'status': os.environ['FAKE_STATUS']}))\n"
        "(out / 'report' / 'post_synth_resources.json').write_text(json.dumps({'LUT': 1234}))\n"
        "(out / 'bitfile' / 'finn-accel.bit').write_bytes(b'')\n"
        "print('FINN ran')\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_STATUS", "ok")
    result = finn_synth(root, finn_command=str(fake), skip_dep_update=True)
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    assert Path(argv[0]).resolve() == root.resolve()
    assert argv[1:] == ["build", "--batch", "--skip-dep-update", "--build-path", "vivado_build/finn_tmp", SYNTH_CONFIG, SYNTH_MODEL]
    assert result.bitfile == str(root.resolve() / "vivado_build" / "bitfile" / "finn-accel.bit")
    assert result.resources == {"LUT": 1234}
    assert "FINN ran" in Path(result.log).read_text()
    # `finn build` exits 0 when a step failed: FINN's status decides
    monkeypatch.setenv("FAKE_STATUS", "failed")
    with pytest.raises(FqhwError, match="FINN could not finish the build .*status failed.*finn_synth.log"):
        finn_synth(root, finn_command=str(fake))
