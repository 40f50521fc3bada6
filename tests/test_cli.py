"""The `fqhw` command end to end on tiny inputs, and its answers to bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fqhw.cli import main

from conftest import TINY

def run_cli(args, cwd=None):
    """Run the real console entry point in a subprocess: exit code, stdout, stderr."""
    proc = subprocess.run([sys.executable, "-m", "fqhw.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def test_compile_writes_every_step(compiled):
    out, _ = compiled
    for name in ["config.json", "data.json", "network.json", "sensitivity.json", "allocation.json", "quant_model.pt",
                 "model.qonnx.onnx", "bitexact.json", "report.json", "report.md", "finn/dataflow_model.onnx",
                 "finn/report/estimate_layer_resources.json"]:
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["bit_exact"]["ok"] is True
    assert report["bit_exact"]["n_images"] == 32
    assert {"brevitas", "qonnx", "finn"} <= set(report["bit_exact"]["backends"])
    assert report["allocation"]["avg_weight_bits"] <= 4.0
    assert report["allocation"]["solver"]["status"] in ("OPTIMAL", "FEASIBLE")
    assert set(report["accuracy"]) == {"float", "uniform8", "uniform4", "compiled"}
    for m in report["accuracy"].values():
        assert 0.0 <= m["worst_group_acc"] <= m["mean_group_acc"] <= 1.0
    caps = report["hardware"]["predicted"]["caps"]
    for res, used in report["hardware"]["finn"]["total"].items():
        if res in caps:
            assert used <= caps[res], res
    # no staging folders left beside the output
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_second_compile_reuses_the_float_model(compiled, tmp_path):
    out, cache = compiled
    before = sorted(p.name for p in cache.iterdir())
    first = {name: (out / name).read_bytes() for name in ("allocation.json", "model.qonnx.onnx", "sensitivity.json")}
    assert main(["compile", "--out", str(out), "--cache-dir", str(cache), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["float_model"]["cache_hit"] is True
    assert sorted(p.name for p in cache.iterdir()) == before
    # the same seed and inputs: the same allocation and a byte-identical QONNX file
    for name, data in first.items():
        assert (out / name).read_bytes() == data, name


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--target", "pynq-z9"], "known targets are"),
        (["--target", "../etc"], "known targets are"),
        (["--budget", "1.5"], "outside [2, 8]"),
        (["--budget", "100"], "outside [2, 8]"),
        (["--budget", "2"], "infeasible on pynq-z2: the pinned layers need"),  # first/last pinned at 8 bits
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    rc, _, err = run_cli(["compile", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *TINY, *args])
    assert rc != 0
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("fqhw: error: ") and needle in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc, _, err = run_cli(["compile", "--out", str(blocker / "out"), *TINY])
    assert rc != 0
    lines = error_lines(err)
    assert len(lines) == 1 and "cannot be written" in lines[0]
    assert blocker.read_text() == "not a folder"


def test_failed_compile_keeps_previous_output(compiled, tmp_path):
    out, cache = compiled
    before = (out / "report.json").read_bytes()
    rc, _, err = run_cli(["compile", "--out", str(out), "--cache-dir", str(cache), *TINY, "--budget", "2"])
    assert rc != 0
    assert (out / "report.json").read_bytes() == before


def test_data_command_prints_counts():
    rc, out, _ = run_cli(["data", "--data-n-train", "60", "--data-n-val", "30", "--data-n-test", "30", "--data-image-size", "16"])
    assert rc == 0
    counts = json.loads(out)
    assert counts["train"]["n"] == 60 and sum(counts["train"]["per_group"].values()) == 60
    assert len(counts["test"]["per_group"]) == 6


def test_compile_on_a_csv_image_folder(tmp_path):
    """--data csv:...: the same flow on a CSV + image folder with its own groups and classes."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    rows = ["image,label,group"]
    for i in range(90):
        label, group = ["benign", "malignant", "other"][i % 3], ["female", "male"][(i // 3) % 2]
        pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png,{label},{group}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    rc = main(["compile", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *TINY,
               "--data", f"csv:{tmp_path / 'labels.csv'}", "--verify-images", "8"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["groups"] == ["female", "male"]
    assert report["data"]["classes"] == ["benign", "malignant", "other"]
    assert report["bit_exact"]["ok"] and report["bit_exact"]["n_images"] == 8
    assert json.loads((out / "network.json").read_text())["num_classes"] == 3


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    rc, _, err = run_cli(["compile", "--out", str(mine), *TINY])
    assert rc != 0
    lines = error_lines(err)
    assert len(lines) == 1 and "is not an fqhw output" in lines[0]
    rc, _, err = run_cli(["compile", "--out", ".", *TINY], cwd=mine)
    assert rc != 0 and "holds the current folder" in error_lines(err)[0]
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_bad_edge_bits_is_a_usage_error(tmp_path):
    rc, _, err = run_cli(["compile", "--out", str(tmp_path / "out"), "--edge-bits", "x"])
    assert rc == 2 and "expected a bit width (2..8) or 'none'" in err and "Traceback" not in err
