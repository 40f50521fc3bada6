"""`fqhw simulate` on an hls4ml build: the simulator built from the power-of-two QONNX file,
run over the whole test split, cross-checked bit for bit against qonnx and the hls4ml C
simulation; a disagreement or a damaged folder is reported, never passed over."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.backends.hls4ml.build import hls4ml_build
from fqhw.backends.hls4ml.csim import compiled_weights_dir, ensure_csim_here
from fqhw.backends.hls4ml.record import Hls4mlBuild
from fqhw.backends.intsim import IntegerSimulator
from fqhw.backends.qonnx_export import export_qonnx
from fqhw.cli import main
from fqhw.data.dataset import INPUT_SCALE
from fqhw.errors import FqhwError
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.quant.po2 import build_po2_model, po2_integer_trace
from fqhw.quant.qmodel import calibrate
from fqhw.simulate import build_test_data, simulate

# the shape of conftest.TINY's compile (16-pixel images, channels 4,8, 4 classes), whose
# config.json the folder borrows so that its test split is the one simulate regenerates
SIZE, CHANNELS, CLASSES = 16, (4, 8), 4
ALLOC = [("features.0.conv", 8, 6, 2, 9), ("features.1.conv", 4, 4, 4, 4), ("head", 3, None, 1, 8)]


@pytest.fixture(scope="module")
def hls_folder(compiled, tmp_path_factory):
    """A compile output folder of the hls4ml backend (config.json, model.qonnx.onnx,
    hls4ml/), built in one place and then renamed, as the flow does with its partial
    folder: the C simulation was compiled for the old path."""
    out, _ = compiled
    root = tmp_path_factory.mktemp("simhls")
    first, final = root / "partial", root / "out"
    first.mkdir()
    shutil.copy(out / "config.json", first / "config.json")
    data = build_test_data(out)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    fm = FairCNN(CNNConfig(image_size=SIZE, channels=CHANNELS, num_classes=CLASSES)).eval()
    with torch.no_grad():  # a BatchNorm worth folding, some channels with negative gamma
        for bn in (b.bn for b in fm.features):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    alloc = Allocation("pynq-z2", [LayerAllocation(*a) for a in ALLOC])
    qm = build_po2_model(fm, alloc)
    x = torch.from_numpy(data.images[:64].astype(np.float32) * np.float32(INPUT_SCALE))
    calibrate(qm, [(x[i : i + 16],) for i in range(0, 64, 16)], batches=4)
    qm.eval()
    path = export_qonnx(qm, (3, SIZE, SIZE), first / "model.qonnx.onnx")
    hls4ml_build(path, alloc, first / "hls4ml")
    shutil.move(str(first), str(final))
    return final, qm, data


def test_simulate_hls4ml_build_is_bit_exact_over_the_test_split(hls_folder):
    folder, qm, data = hls_folder
    build = Hls4mlBuild.load(folder / "hls4ml")
    assert compiled_weights_dir(build) != str((folder / "hls4ml" / "project" / "firmware" / "weights").resolve())
    res = simulate(folder, data, cross_check=24)
    # the C simulation was rebuilt for the folder it is in now (it would have exit()ed the process)
    assert any("rebuilt the hls4ml C simulation" in n for n in res.notes)
    assert compiled_weights_dir(Hls4mlBuild.load(folder / "hls4ml")) == str((folder / "hls4ml" / "project" / "firmware" / "weights").resolve())
    assert res.simulator_source == "qonnx"
    assert res.cross_check_backends == ["intsim", "qonnx", "hls4ml"]
    assert res.bitexact.ok, res.bitexact.first_mismatch
    assert res.bitexact.n_images == 24
    assert set(res.bitexact.keys) == {"input", "features.0.conv.act", "features.1.conv.act", "head.acc"}
    # every prediction of the whole split is the po2 Brevitas model's (its exact float64 twin)
    x = torch.from_numpy(data.images.astype(np.float64) * INPUT_SCALE)
    acc = po2_integer_trace(qm, x)["head.acc"]
    assert res.n_images == len(data) == len(acc)
    np.testing.assert_array_equal(res.predictions, acc.argmax(axis=1))
    assert res.metrics["overall_acc"] == float((acc.argmax(axis=1) == data.labels).mean())
    assert len(np.unique(acc)) > 20  # the check is not vacuous
    # nothing left to rebuild the second time
    assert not ensure_csim_here(Hls4mlBuild.load(folder / "hls4ml"))


def test_fqhw_simulate_cli_on_hls4ml_build(hls_folder, capsys):
    folder, _, data = hls_folder
    assert main(["simulate", str(folder), "--json", "--cross-check", "8"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bit_exact"]["ok"] and res["bit_exact"]["backends"] == ["intsim", "qonnx", "hls4ml"]
    assert res["n_images"] == len(data) and res["simulator_source"] == "qonnx"
    # --data: the same data set named explicitly, and another split of it
    assert main(["simulate", str(folder / "hls4ml"), "--data", "builtin", "--split", "val", "--cross-check", "4", "--json"]) == 0
    val = json.loads(capsys.readouterr().out)
    assert val["bit_exact"]["ok"] and val["n_images"] == len(build_test_data(folder, split="val"))
    assert main(["simulate", str(folder), "--data", "fitzpatrick17k:/nonexistent/f17k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fqhw: error:") and "/nonexistent/f17k" in err[0]


def _linked_copy(folder, dst):
    """config.json and model.qonnx.onnx copied, hls4ml/ a link to the original (its
    compiled C simulation stays where it was built)."""
    dst.mkdir()
    shutil.copy(folder / "config.json", dst / "config.json")
    shutil.copy(folder / "model.qonnx.onnx", dst / "model.qonnx.onnx")
    (dst / "hls4ml").symlink_to(folder / "hls4ml", target_is_directory=True)
    return dst


def test_changed_qonnx_weight_is_reported(hls_folder, tmp_path, capsys):
    """One head weight changed in model.qonnx.onnx: the simulator and qonnx read the file
    and agree with each other, the C simulation does not: reported, exit code 1."""
    import onnx
    from onnx import numpy_helper

    folder, _, data = hls_folder
    copy = _linked_copy(folder, tmp_path / "bad")
    model = onnx.load(str(copy / "model.qonnx.onnx"))
    head = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm"))
    wq = next(n for n in model.graph.node if n.output[0] == head.input[1])
    init = next(i for i in model.graph.initializer if i.name == wq.input[0])
    scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == wq.input[1])).reshape(-1)[0])
    w = numpy_helper.to_array(init).copy()
    # the weight of the input channel that is largest over the checked images, one code up
    sim = IntegerSimulator.from_qonnx(folder / "model.qonnx.onnx")
    last = sim.run(data.images[:16])["features.1.conv.act"].max(axis=(2, 3)).sum(axis=0)
    i = int(last.argmax())
    bits = int(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == wq.input[3])))
    top = 2 ** (bits - 1) - 1  # narrow range: codes -top..top
    code = int(np.clip(np.round(w[i, 0] / scale), -top, top))
    w[i, 0] = (code - 1 if code > -top else code + 1) * scale  # exactly one code away
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(copy / "model.qonnx.onnx"))

    res = simulate(copy, data, cross_check=16)
    assert not res.bitexact.ok
    assert res.bitexact.first_mismatching_key == "head.acc"
    assert res.bitexact.mismatches["head.acc"]["intsim vs qonnx"] == 0
    assert res.bitexact.mismatches["head.acc"]["intsim vs hls4ml"] > 0
    assert res.bitexact.mismatches["features.1.conv.act"]["intsim vs hls4ml"] == 0
    assert main(["simulate", str(copy), "--cross-check", "16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disagrees with qonnx, hls4ml" in err[0] and "head.acc" in err[0]


def test_damaged_folders_give_one_line_errors(hls_folder, compiled, tmp_path, capsys):
    folder, _, data = hls_folder
    # a truncated QONNX file
    bad = _linked_copy(folder, tmp_path / "trunc")
    blob = (bad / "model.qonnx.onnx").read_bytes()
    (bad / "model.qonnx.onnx").write_bytes(blob[: len(blob) // 3])
    assert main(["simulate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable ONNX model" in err[0] and "fqhw compile" in err[0]
    # no QONNX file at all
    (bad / "model.qonnx.onnx").unlink()
    with pytest.raises(FqhwError, match="model.qonnx.onnx is missing"):
        simulate(bad, data)
    # the C simulation's weight files gone: an error, not the C code's exit(1)
    nowt = tmp_path / "nowt"
    # (without manifest.json, which would name the first missing file before the simulator looks)
    shutil.copytree(folder, nowt, ignore=lambda d, names: [n for n in names if n.endswith(".txt") and d.endswith("weights")
                                                           or n == "manifest.json"])
    with pytest.raises(FqhwError, match="holds no weight files"):
        simulate(nowt, data, cross_check=2)
    # not a compile output folder
    (tmp_path / "empty").mkdir()
    assert main(["simulate", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a compile output folder" in err[0]
    # a FINN build's QONNX file has float scales: the QONNX route refuses it by name
    out, _ = compiled
    with pytest.raises(FqhwError, match="not one power of two"):
        IntegerSimulator.from_qonnx(out / "model.qonnx.onnx")
