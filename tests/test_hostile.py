"""Hostile and broken input: each is one `fqhw: error:` line, a non-zero exit, and no output
or staging folder left behind (issue 6)."""
from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from fqhw.cli import main
from fqhw.data.synthetic import SyntheticDermConfig
from fqhw.models.cnn import CNNConfig, FairCNN

from conftest import TINY

CLASSES = SyntheticDermConfig().num_classes


def run_cli(args):
    proc = subprocess.run([sys.executable, "-m", "fqhw.cli", *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def lines_of(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def assert_left_nothing(root: pathlib.Path) -> None:
    """Only the inputs folder (and an untouched cache) may be left under root: no output, no staging folder."""
    assert not (root / "out").exists()
    assert sorted(p.name for p in root.iterdir() if p.name not in ("in", "cache")) == []


def compile_fails(root: pathlib.Path, *args, needle: str, cmd: str = "compile") -> str:
    out_args = ["--out", str(root / "out")] if cmd == "compile" else []
    rc, _, err = run_cli([cmd, *out_args, "--cache-dir", str(root / "cache"), *TINY, *args])
    lines = lines_of(err)
    assert rc != 0 and len(lines) == 1, err
    assert lines[0].startswith("fqhw: error: ") and needle in lines[0], lines[0]
    assert_left_nothing(root)
    return lines[0]


def tiny_model(channels=(4, 8), classes=CLASSES) -> FairCNN:
    torch.manual_seed(0)
    return FairCNN(CNNConfig(in_channels=3, image_size=16, num_classes=classes, channels=channels))


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    return d


# ---------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this runs os.mkdir(marker): what a hostile checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_checkpoint_is_refused_without_running(tmp_path, inputs):
    marker = inputs / "pwned"
    path = inputs / "evil.pt"
    torch.save({"state_dict": tiny_model().state_dict(), "extra": _Payload(marker)}, path)
    line = compile_fails(tmp_path, "--checkpoint", str(path), needle="is not a weights-only file (it would run code when loaded)")
    assert "torch.save(model.state_dict()" in line
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_truncated_checkpoint(tmp_path, inputs):
    path = inputs / "cut.pt"
    torch.save(tiny_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    compile_fails(tmp_path, "--checkpoint", str(path), needle="cannot be read (truncated or not a torch.save file")


def test_missing_checkpoint(tmp_path, inputs):
    compile_fails(tmp_path, "--checkpoint", str(inputs / "nope.pt"), needle="nope.pt not found")


def test_nan_weights(tmp_path, inputs):
    state = tiny_model().state_dict()
    state["head.weight"][0, 0] = float("nan")
    path = inputs / "nan.pt"
    torch.save(state, path)
    compile_fails(tmp_path, "--checkpoint", str(path), needle="tensor 'head.weight' holds NaN or Inf values")


def test_wrong_shape_checkpoint(tmp_path, inputs):
    path = inputs / "wide.pt"
    torch.save({"state_dict": tiny_model(channels=(4, 16)).state_dict()}, path)
    compile_fails(tmp_path, "--checkpoint", str(path),
                  needle="'features.1.conv.weight' has shape (16, 4, 3, 3) in the checkpoint but (8, 4, 3, 3) in the model")


def test_checkpoint_with_an_extra_layer(tmp_path, inputs):
    path = inputs / "deeper.pt"
    torch.save(tiny_model(channels=(4, 8, 8)).state_dict(), path)
    compile_fails(tmp_path, "--checkpoint", str(path), needle="unexpected key 'features.2.conv.weight'")


def test_good_checkpoint_is_used_instead_of_training(tmp_path, inputs):
    path = inputs / "good.pt"
    torch.save(tiny_model().state_dict(), path)
    train_flags = [f for i, f in enumerate(TINY) if "--qat-epochs" not in TINY[max(i - 1, 0) : i + 1]]
    rc, out, err = run_cli(["train", "--cache-dir", str(tmp_path / "cache"), *train_flags, "--checkpoint", str(path)])
    assert rc == 0, err
    assert f"float model loaded from {path}" in out
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing trained


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("budget", ["0", "-3", "nan"])
def test_budget_out_of_range(tmp_path, budget):
    compile_fails(tmp_path, "--budget", budget, needle="is outside [2, 8]")


def test_budget_not_a_number(tmp_path):
    rc, _, err = run_cli(["compile", "--out", str(tmp_path / "out"), *TINY, "--budget", "abc"])
    assert rc == 2 and "invalid float value: 'abc'" in err  # argparse's own usage error
    assert_left_nothing(tmp_path)


@pytest.mark.parametrize("target", ["../../x", "pynq-z2/../u250"])
def test_target_with_path_characters(tmp_path, target):
    compile_fails(tmp_path, "--target", target, needle=f"unknown target {target!r}: known targets are")


# ---------------------------------------------------------------- CSV data


def _csv(inputs, header, rows, images=True):
    from PIL import Image

    if images:
        rng = np.random.default_rng(0)
        for i in range(len(rows)):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(inputs / f"img{i}.png")
    path = inputs / "labels.csv"
    path.write_text("\n".join([header, *rows]) + ("\n" if header or rows else ""))
    return f"csv:{path}"


def test_csv_empty_file(tmp_path, inputs):
    spec = _csv(inputs, "", [], images=False)
    compile_fails(tmp_path, "--data", spec, needle="is empty (no header line)")


def test_csv_missing_group_column(tmp_path, inputs):
    spec = _csv(inputs, "image,label", [f"img{i}.png,{'ab'[i % 2]}" for i in range(12)], images=False)
    compile_fails(tmp_path, "--data", spec, needle="has no column 'group'")


def test_csv_single_group(tmp_path, inputs):
    spec = _csv(inputs, "image,label,group", [f"img{i}.png,{'ab'[i % 2]},female" for i in range(12)])
    compile_fails(tmp_path, "--data", spec, needle="only group 'female' left after filtering (12 rows): fairness needs at least two groups")


def test_csv_single_class(tmp_path, inputs):
    # labels are names, not indices, so "out of range" cannot happen; one class is the degenerate case
    spec = _csv(inputs, "image,label,group", [f"img{i}.png,benign,{'fm'[i % 2]}" for i in range(12)])
    compile_fails(tmp_path, "--data", spec, needle="only 1 class (benign) left after filtering")


def _image_csv(inputs, n=24):  # 6 rows per (group, class): every group in every split
    return _csv(inputs, "image,label,group", [f"img{i}.png,{'ab'[i % 2]},{'fm'[(i // 2) % 2]}" for i in range(n)])


def test_corrupt_image(tmp_path, inputs):
    spec = _image_csv(inputs)
    (inputs / "img5.png").write_bytes(b"\x89PNG but not really an image")
    compile_fails(tmp_path, "--data", spec, needle="img5.png cannot be read")


def test_truncated_image(tmp_path, inputs):
    spec = _image_csv(inputs)
    good = (inputs / "img3.png").read_bytes()
    (inputs / "img3.png").write_bytes(good[: len(good) // 2])
    compile_fails(tmp_path, "--data", spec, needle="img3.png cannot be read")


def test_labels_out_of_range(tmp_path, inputs):
    """ISIC2019's ground truth is one-hot: a class value of 2 (or no class set) is a label
    outside the classes, and the line that holds it is named."""
    import csv

    from test_real_data import make_isic

    root = make_isic(inputs / "isic")
    gt = root / "ISIC_2019_Training_GroundTruth.csv"
    rows = list(csv.reader(gt.open()))
    rows[3][1:] = ["2"] + ["0"] * (len(rows[3]) - 2)
    with gt.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    compile_fails(tmp_path, "--data", f"isic2019:{root}", needle="line 4 (image ")


# ---------------------------------------------------------------- the file system (simulated: tests run as root)


def _main_fails(capsys, args, needle):
    rc = main(args)
    lines = lines_of(capsys.readouterr().err)
    assert rc != 0 and len(lines) == 1, lines
    assert lines[0].startswith("fqhw: error: ") and needle in lines[0], lines[0]
    return lines[0]


def test_read_only_output_folder(tmp_path, monkeypatch, capsys):
    """As root, chmod does not stop writes, and there is no read-only mount to use: the
    permission check is told the parent is not writable."""
    import fqhw.config

    real = os.access
    monkeypatch.setattr(fqhw.config.os, "access", lambda p, mode: False if pathlib.Path(p) == tmp_path else real(p, mode))
    _main_fails(capsys, ["compile", "--out", str(tmp_path / "out"), *TINY], f"({tmp_path} is not writable): choose another --out")
    assert list(tmp_path.iterdir()) == []


def test_read_only_file_system(tmp_path, monkeypatch, capsys):
    """The permission check passes but creating the staging folder fails with EROFS."""
    real = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if ".out.partial-" in self.name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    _main_fails(capsys, ["compile", "--out", str(tmp_path / "out"), *TINY], "read-only file system writing ")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_mid_compile(tmp_path, inputs, monkeypatch, capsys):
    ckpt = inputs / "good.pt"
    torch.save(tiny_model().state_dict(), ckpt)
    real = pathlib.Path.write_text

    def write_text(self, *a, **k):
        if self.name == "network.json":  # written after the data and float model steps
            real(self, "{", encoding="utf-8")  # a partial file, as a full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    line = _main_fails(capsys, ["compile", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *TINY,
                                "--checkpoint", str(ckpt)], "no space left on the device writing ")
    assert "network.json: free some space or choose another --out" in line
    assert_left_nothing(tmp_path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_real_full_disk_in_weight_files():
    """/dev/full fails every write with ENOSPC, as a full disk does. torch.save itself then
    raises an internal RuntimeError; fqhw's weight files go through save_tensors, whose
    failure is the OSError the commands turn into one line."""
    from fqhw.flow import _disk_error
    from fqhw.outputs import save_tensors

    state = tiny_model().state_dict()
    with pytest.raises(RuntimeError):
        torch.save(state, "/dev/full")
    with pytest.raises(OSError) as e:
        save_tensors(state, pathlib.Path("/dev/full"))
    assert e.value.errno == errno.ENOSPC
    line = str(_disk_error(e.value, pathlib.Path("/tmp/out")))
    assert line == "no space left on the device writing /dev/full: free some space or choose another --cache-dir"


def test_synth_without_vivado_fails_before_any_work(tmp_path, monkeypatch):
    from fqhw.backends.finn.synth import synth_tools_missing

    if not synth_tools_missing("vivado_zynq"):
        pytest.skip("this machine has the Xilinx tools")
    line = compile_fails(tmp_path, "--synth", needle="--synth needs Vivado and Vitis HLS (")
    assert "XILINX_VIVADO" in line and "finish_build.sh" in line
    assert not (tmp_path / "cache").exists()  # refused before the data or the float model
