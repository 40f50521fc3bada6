"""Power-of-two quantization -> QONNX -> hls4ml (VivadoAccelerator, pynq-z2): the project is
written, its C simulation compiles with g++, and its integers equal Brevitas' and qonnx's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.backends.hls4ml.build import hls4ml_build
from fqhw.backends.hls4ml.csim import hls4ml_integer_trace
from fqhw.backends.hls4ml.record import Hls4mlBuild
from fqhw.backends.qonnx_export import export_qonnx, qonnx_integer_trace
from fqhw.backends.verify import check_bit_exact, require_bit_exact
from fqhw.data.registry import load_data
from fqhw.data.synthetic import SyntheticDermConfig
from fqhw.errors import FqhwError
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.quant.po2 import build_po2_model, float64_po2_twin, fold_bn, po2_integer_trace, scales
from fqhw.quant.qat import finetune
from fqhw.quant.qmodel import build_quant_model, calibrate

SIZE = 16
SHAPE = (3, SIZE, SIZE)
NAMES = ["features.0.conv", "features.1.conv", "head"]
# (weight bits, activation bits, PE, SIMD); MW x MH: features.0 27 x 4, features.1 36 x 8,
# head 8 x 4. "mixed": W 8/4/3, A (input 8) 6/4, folded (hls4ml ReuseFactor > 1, Resource
# strategy); "uniform8": everything 8-bit, fully parallel (ReuseFactor 1, Latency strategy).
CASES = {
    "mixed": [(8, 6, 2, 9), (4, 4, 4, 4), (3, None, 1, 8)],
    "uniform8": [(8, 8, 4, 27), (8, 8, 8, 36), (8, None, 4, 8)],
}
N_VERIFY = 32


def _alloc(case: str) -> Allocation:
    return Allocation("pynq-z2", [LayerAllocation(n, w, a, pe, simd) for n, (w, a, pe, simd) in zip(NAMES, CASES[case])])


@pytest.fixture(scope="module")
def data():
    return load_data("builtin", builtin=SyntheticDermConfig(n_train=240, n_val=120, n_test=120, image_size=SIZE))


def _float_model(num_classes: int) -> FairCNN:
    torch.manual_seed(0)
    fm = FairCNN(CNNConfig(image_size=SIZE, channels=(4, 8), num_classes=num_classes)).eval()
    with torch.no_grad():  # a non-trivial BatchNorm to fold, some channels with negative gamma
        for bn in (b.bn for b in fm.features):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return fm


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hls4ml")
    x, _, _ = data.test.tensors()
    x = x[:N_VERIFY]
    out = {"x": x, "root": root}
    for case in CASES:
        fm = _float_model(data.train.num_classes)
        alloc = _alloc(case)
        qm = build_po2_model(fm, alloc)
        calibrate(qm, data.train.loader(64, shuffle=True, seed=0), batches=4)
        before = {k: v.detach().clone() for k, v in qm.state_dict().items()}
        qat = finetune(qm, data, epochs=1, progress=False)
        path = export_qonnx(qm, SHAPE, root / f"{case}.onnx")
        build = hls4ml_build(path, alloc, root / f"{case}_hls4ml")
        traces = {
            "brevitas": po2_integer_trace(qm, x),
            "qonnx": qonnx_integer_trace(path, x),
            "hls4ml": hls4ml_integer_trace(build, x),
        }
        out[case] = dict(fm=fm, qm=qm, alloc=alloc, before=before, qat=qat, path=path, build=build, traces=traces)
    return out


def test_bn_fold_gives_the_models_integer_weights(data):
    fm = _float_model(data.train.num_classes)
    block = fm.features[0]
    w, b = fold_bn(block.conv, block.bn)
    x, _, _ = data.test.tensors()
    with torch.no_grad():  # in float the folded conv agrees with conv + BN to float32 rounding, not exactly
        ref = block.bn(block.conv(x[:8]))
        got = torch.nn.functional.conv2d(x[:8], w, b, padding=1)
    assert torch.allclose(ref, got, atol=1e-5)
    # the integers: the po2 model's weight codes are the folded weights on the scheme's grid,
    # narrow range, one scale per tensor, 2^(round(log2 max |w|) - (b - 1)) (Brevitas' PowerOfTwoIntScaling)
    alloc = _alloc("mixed")
    qm = build_po2_model(fm, alloc)
    with torch.no_grad():
        for i, name in enumerate(NAMES[:2]):
            wf, _ = fold_bn(fm.features[i].conv, fm.features[i].bn)
            top = 2 ** (alloc.layer(name).weight_bits - 1) - 1
            qw = qm.layers[name].compute.quant_weight()
            scale = float(qw.scale.reshape(-1)[0])
            assert scale == 2.0 ** (round(float(torch.log2(wf.abs().max()))) - (alloc.layer(name).weight_bits - 1))
            want = torch.clamp(torch.round(wf.double() / scale), -top, top).to(torch.int64)
            assert torch.equal(qw.int().to(torch.int64), want), name


def test_po2_model_structure(built):
    for case in CASES:
        qm, alloc = built[case]["qm"], built[case]["alloc"]
        assert list(qm.layers) == NAMES
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in qm.modules())
        sc = scales(qm)  # raises unless every scale is one power of two
        assert sc["input"] == -8
        for name, ql in qm.layers.items():
            la = alloc.layer(name)
            assert int(ql.compute.quant_weight().bit_width) == la.weight_bits
            if la.act_bits is not None:
                assert int(ql.act.act_quant.bit_width()) == la.act_bits
                assert sc[name]["bias_bits"] == 32 and ql.compute.bias is not None
        assert qm.head.bias is None


def test_po2_model_trains(built):
    r = built["mixed"]
    assert r["qat"].epochs_run == 1 and np.isfinite(r["qat"].history[0]["train_loss"])
    state = r["qm"].state_dict()
    assert not torch.equal(state["features.0.conv.weight"], r["before"]["features.0.conv.weight"])


def test_state_dict_round_trip(built, data):
    """The flow caches a quant model as its state dict: rebuilt and loaded, same integers."""
    r = built["mixed"]
    again = build_po2_model(r["fm"], r["alloc"])
    again.load_state_dict(r["qm"].state_dict())
    tr = po2_integer_trace(again.eval(), built["x"][:4])
    for k, v in tr.items():
        np.testing.assert_array_equal(v, r["traces"]["brevitas"][k][:4])


def test_float64_twin_keeps_codes(built):
    qm = built["uniform8"]["qm"]
    twin = float64_po2_twin(qm)
    for ql, tl in zip(qm.layers.values(), twin.layers.values()):
        a, b = ql.compute.quant_weight(), tl.compute.quant_weight()
        assert torch.equal(a.int().long(), b.int().long()) and torch.equal(a.scale.double(), b.scale)


def test_export_is_po2_without_batchnorm(built):
    model = onnx.load(built["mixed"]["path"])
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2 and ops.count("Relu") == 2
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for q in (n for n in model.graph.node if n.op_type == "Quant"):
        s = float(np.asarray(inits[q.input[1]]).reshape(-1)[0])
        assert np.frexp(s)[0] == 0.5, q.name
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        assert len(conv.input) == 3  # the folded BN's bias, quantized
    again = export_qonnx(built["mixed"]["qm"], SHAPE, built["root"] / "again.onnx")
    assert again.read_bytes() == built["mixed"]["path"].read_bytes()


def test_project_written(built):
    build: Hls4mlBuild = built["mixed"]["build"]
    project = Path(build.project_dir)
    for f in (
        "firmware/myproject.cpp",
        "firmware/myproject_axi.cpp",  # the AXI-stream wrapper
        "firmware/parameters.h",
        "axi_stream_driver.py",  # the PYNQ driver
        "design.tcl",  # block design: Zynq PS + AXI DMA
        "build_prj.tcl",
        "hls4ml_config.yml",
    ):
        assert (project / f).is_file(), f
    assert build.board == "pynq-z2" and build.part == "xc7z020clg400-1" and build.backend == "VivadoAccelerator"
    assert build.compile_s > 0 and build.io_type == "io_stream"
    s = build.summary()
    assert set(s["precisions"]) == set(NAMES) | {"input"}
    saved = json.loads((Path(build.out_dir) / "hls4ml_build.json").read_text())
    assert saved["precisions"] == json.loads(json.dumps(build.precisions))
    # the trace is compiled for the C simulation only, out of synthesis
    cpp = (project / "firmware/myproject.cpp").read_text()
    assert "#ifndef __SYNTHESIS__" in cpp and "save_layer_output" in cpp


def test_precisions_follow_allocation(built):
    build: Hls4mlBuild = built["mixed"]["build"]
    p = build.precisions
    assert p["input"]["result"] == "ufixed<8,0,RND_CONV,SAT>"
    sc = build.scale_exp
    for name, (w, a, _, _) in zip(NAMES, CASES["mixed"]):
        assert p[name]["weight"] == f"fixed<{w},{w + sc[name]['weight']},RND_CONV,SAT_SYM>"
        if a is not None:
            assert p[name]["act"] == f"ufixed<{a},{a + sc[name]['act']},RND_CONV,SAT>"
        acc = build.accumulator_bits[name]
        assert p[name]["accum"].startswith(f"fixed<{acc},")
    # a 27-input 8x8-bit dot product plus bias needs at least 8 + 8 + log2(27) bits, the
    # 36-input 4x6-bit one far fewer
    assert build.accumulator_bits["features.0.conv"] < 8 + 8 + 5 + 2
    assert build.accumulator_bits["features.1.conv"] < build.accumulator_bits["features.0.conv"]
    assert build.reuse_factors["features.0.conv"]["requested"] == (27 // 9) * (4 // 2)
    assert built["uniform8"]["build"].reuse_factors["features.0.conv"] == {"requested": 1, "used": 1}


@pytest.mark.parametrize("case", list(CASES))
def test_csim_brevitas_qonnx_bit_exact(built, case):
    traces = built[case]["traces"]
    for backend, tr in traces.items():
        assert set(tr) == {"input", "features.0.conv.act", "features.1.conv.act", "head.acc"}, backend
        assert all(a.dtype == np.int64 for a in tr.values()), backend
    result = check_bit_exact(traces)
    assert result.ok, result.first_mismatch
    assert result.n_images == N_VERIFY
    require_bit_exact(result)
    ref = traces["brevitas"]
    np.testing.assert_array_equal(ref["input"], np.round(built["x"].numpy() * 256).astype(np.int64))
    assert ref["features.1.conv.act"].shape == (N_VERIFY, 8, SIZE // 2, SIZE // 2)
    # the check is not vacuous: activations and logits vary
    for key in ("features.0.conv.act", "features.1.conv.act"):
        assert ref[key].max() > 0 and (ref[key] > 0).mean() > 0.05, key
    assert len(np.unique(ref["head.acc"])) > 10


def test_fp32_scheme_is_refused(data, tmp_path):
    """The FINN scheme (float scales, BatchNorm) is not exact in hls4ml: a clear error."""
    fm = _float_model(data.train.num_classes)
    alloc = _alloc("mixed")
    qm = build_quant_model(fm, alloc)
    calibrate(qm, data.train.loader(64, shuffle=True, seed=0), batches=2)
    path = export_qonnx(qm.eval(), SHAPE, tmp_path / "finn.onnx")
    with pytest.raises(FqhwError, match="power of two"):
        hls4ml_build(path, alloc, tmp_path / "h", compile=False)


def test_allocation_mismatch_is_refused(built, tmp_path):
    with pytest.raises(FqhwError, match="W8/A8"):
        hls4ml_build(built["mixed"]["path"], _alloc("uniform8"), tmp_path / "h", compile=False)
    bad = Allocation("pynq-z2", [LayerAllocation("features.0.conv", 8, 8), LayerAllocation("head", 8, None)])
    with pytest.raises(FqhwError, match="missing"):
        build_po2_model(built["mixed"]["fm"], bad)
    with pytest.raises(FqhwError, match="io_type"):
        hls4ml_build(built["mixed"]["path"], _alloc("mixed"), tmp_path / "h", io_type="io_serial")


def test_saved_build_can_move_and_run(built, tmp_path):
    """A saved build (hls4ml_build.json) runs its C simulation again without hls4ml, from a
    copied folder: what the flow needs to resume after the hls4ml step."""
    import shutil

    from fqhw.backends.hls4ml.csim import compiled_weights_dir, ensure_csim_here

    src = built["uniform8"]["build"]
    moved = tmp_path / "moved"
    shutil.copytree(src.out_dir, moved)
    build = Hls4mlBuild.load(moved)
    assert build.model is None and Path(build.library).parent.parent == (moved / "project").resolve()
    # The library was compiled with the original folder's absolute weights path; the flow
    # renames that folder, so hide it here as the flow would (reading it would exit(1)).
    original = (Path(src.project_dir) / "firmware" / "weights").resolve()
    hidden = original.with_name("weights.hidden")
    original.rename(hidden)
    try:
        assert compiled_weights_dir(build) == str(original)
        assert ensure_csim_here(build) is True  # rebuilt with the project's build_lib.sh
        assert compiled_weights_dir(build) == str((moved / "project" / "firmware" / "weights").resolve())
        assert ensure_csim_here(build) is False  # already reads its own folder
        again = hls4ml_integer_trace(build, built["x"][:4])
    finally:
        hidden.rename(original)
    for key, ref in built["uniform8"]["traces"]["hls4ml"].items():
        np.testing.assert_array_equal(again[key], ref[:4])
    with pytest.raises(FqhwError, match="no hls4ml build"):
        Hls4mlBuild.load(tmp_path / "nothing")


@pytest.mark.slow
def test_compile_with_the_hls4ml_backend(compiled, tmp_path):
    """`fqhw compile --backend hls4ml`: the power-of-two scheme (baselines too), an hls4ml
    project for the PYNQ-Z2, and its C simulation bit-exact with Brevitas and qonnx."""
    import json

    from conftest import TINY

    from fqhw.cli import main

    _, cache = compiled
    out = tmp_path / "h"
    assert main(["compile", "--out", str(out), "--cache-dir", str(cache), *TINY, "--backend", "hls4ml"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["bit_exact"]["ok"] is True and rep["bit_exact"]["backends"] == ["brevitas", "qonnx", "hls4ml"]
    assert rep["hardware"]["finn"] is None and rep["hardware"]["hls4ml"]["board"] == "pynq-z2"
    assert rep["qat"]["threshold_snap"] is None  # power-of-two scales need no snapping
    assert (out / "hls4ml" / "hls4ml_build.json").is_file()
    md = (out / "report.md").read_text()
    assert "## hls4ml project (VivadoAccelerator" in md and "FINN estimates" not in md
    assert not rep["steps"]["baselines"]["reused"]  # the FINN scheme's baselines are not this scheme's


def test_hls4ml_backend_refuses_other_boards(tmp_path, capsys):
    from conftest import TINY

    from fqhw.cli import main

    rc = main(["compile", "--out", str(tmp_path / "x"), *TINY, "--backend", "hls4ml", "--target", "zcu104"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--backend hls4ml builds for the PYNQ-Z2" in err[0]
    assert not (tmp_path / "x").exists()
