"""`fqhw compile --model`: the registry's models through the whole flow, an ASIC target
(no accelerator to build: Brevitas against qonnx), channel groups, and what is refused
before any training.

Sizes are cut for CPU time, never the topology: the ResNet-18 keeps its 20 convs, 8 blocks
and 3 downsample convs at channels (64, 16, 16, 16) and 64 px (its smallest exportable
input); DeiT has depth 1 and width 32.
"""
from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from fqhw.data.synthetic import SyntheticDermConfig
from fqhw.errors import FqhwError
from fqhw.flow import CompileConfig, compile, validate

DEIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def _cfg(tmp_path, **kw) -> CompileConfig:
    size = kw.pop("image_size", 16)
    base = dict(
        out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, float_epochs=1, qat_epochs=1, verify_images=4,
        data=SyntheticDermConfig(n_train=160, n_val=80, n_test=80, image_size=size),
    )
    return CompileConfig(**{**base, **kw})


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "fqhw.cli", *args], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(model="resnet18", image_size=32), "at least 64 px"),
        (dict(model="resnet18", image_size=64, backend="hls4ml"), "--backend hls4ml builds the default CNN only"),
        (dict(model="resnet18", image_size=64, channel_groups=2), "--channel-groups builds the default CNN only, not resnet18"),
        (dict(channel_groups=0), "--channel-groups 0 must be at least 1"),
        (dict(model="deit_tiny_patch16_224", image_size=32, channels=(8, 8), target="bitfusion"), "--channels sets"),
        (dict(model="vgg16"), "unknown model 'vgg16': known models are fqcnn, cnv, resnet18"),
        (dict(model_kwargs={"depth": 3}), "fqcnn: .*depth"),
    ],
)
def test_refused_before_any_work(tmp_path, kw, match):
    with pytest.raises(FqhwError, match=match):
        validate(_cfg(tmp_path, **kw))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_transformer_on_an_fpga_target_asks_finn_first(tmp_path):
    """FINN is asked on the untrained model before any training; its refusal names the ops
    and the way out, on one line, with a non-zero exit and nothing written."""
    out = tmp_path / "out"
    rc, stdout, stderr = _cli(
        "compile", "--model", "deit_tiny_patch16_224", *[f"--model-arg={k}={v}" for k, v in DEIT.items()],
        "--data-image-size", "32", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet",
    )
    lines = [ln for ln in stderr.splitlines() if ln.startswith("fqhw: error:")]
    assert rc != 0 and len(lines) == 1, stderr[-2000:]
    assert "FINN cannot build deit_tiny_patch16_224: unsupported ops " in lines[0] and "MatMul x" in lines[0]
    assert lines[0].endswith("to get its allocation, QONNX model and bit-exact check")
    assert not out.exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------- ASIC targets


def test_transformer_compiles_for_an_asic_target_bit_exact(tmp_path):
    # (the patch embedding and head hold most of this tiny DeiT's weights: not pinned at 8 bits)
    res = compile(_cfg(tmp_path, model="deit_tiny_patch16_224", model_kwargs=DEIT, image_size=32, target="bitfusion", edge_bits=None))
    r = res.report
    assert r["hardware"]["finn"] is None and "hls4ml" not in r["hardware"] and r["hardware"]["predicted"]
    be = r["bit_exact"]
    assert be["ok"] and be["backends"] == ["brevitas", "qonnx"]
    assert "blocks.0.mlp.fc1.out" in be["keys"] and len(be["keys"]) >= 6
    assert not (res.out_dir / "finn").exists() and (res.out_dir / "model.qonnx.onnx").exists()
    assert json.loads((res.out_dir / "network.json").read_text())["name"] == "deit_tiny_patch16_224"
    assert "cost model only" in (res.out_dir / "report.md").read_text()
    assert set(r["steps"]) == {"data", "float_model", "importance", "allocate", "baselines", "quantize", "export", "verify"}


# ----------------------------------------------------------------------------- channel groups


def test_compile_in_channel_groups_is_bit_exact_through_hls4ml(tmp_path):
    res = compile(_cfg(tmp_path, channels=(4, 8), channel_groups=2, budget=5, backend="hls4ml"))
    r = res.report
    assert [la["name"] for la in r["allocation"]["layers"]] == ["features.0.conv", "features.1.conv:g0", "features.1.conv:g1", "head"]
    assert r["bit_exact"]["ok"] and r["bit_exact"]["backends"] == ["brevitas", "qonnx", "hls4ml"]
    assert "features.1.conv.act" in r["bit_exact"]["keys"]
    by = {la["name"]: la["weight_bits"] for la in r["allocation"]["layers"]}
    precisions = r["hardware"]["hls4ml"]["precisions"]
    for unit in ("features.1.conv:g0", "features.1.conv:g1"):  # each group's conv at its own width
        got = [p for name, p in precisions.items() if unit.replace(":", "_") in name or unit in name]
        assert got and any(f"<{by[unit]}," in str(v) or f"<{by[unit]}>" in str(v) for v in got[0].values()), (unit, precisions)


def test_compile_in_channel_groups_is_bit_exact_through_finn(tmp_path):
    cfg = _cfg(tmp_path, channels=(4, 8), channel_groups=2, budget=5)
    res = compile(cfg)
    r = res.report
    names = [la["name"] for la in r["allocation"]["layers"]]
    # the first conv (it reads the pixels) and the head stay whole
    assert names == ["features.0.conv", "features.1.conv:g0", "features.1.conv:g1", "head"]
    by = {la["name"]: la for la in r["allocation"]["layers"]}
    assert by["features.0.conv"]["weight_bits"] == 8 == by["head"]["weight_bits"]  # --edge-bits
    assert by["features.1.conv:g0"]["act_bits"] == by["features.1.conv:g1"]["act_bits"]  # one activation per layer
    assert r["bit_exact"]["ok"] and r["bit_exact"]["backends"] == ["brevitas", "qonnx", "finn"]
    assert "features.1.conv.act" in r["bit_exact"]["keys"]  # the groups' codes under the layer's key
    model = onnx.load(str(res.out_dir / "model.qonnx.onnx"))
    assert sum(n.op_type == "Concat" for n in model.graph.node) == 1
    assert set(r["hardware"]["finn"]["total"]) >= {"LUT", "BRAM_18K"}
    assert all(la["finn"]["mvau"] for la in r["allocation"]["layers"])


# ----------------------------------------------------------------------------- ResNet-18 through FINN


@pytest.mark.slow
def test_resnet18_compiles_through_finn_all_hw_and_bit_exact(tmp_path):
    from fqhw.hwmodels import get_cost_model

    # (21 layers, joins and the board: CP-SAT needs more than the default 30 s on a busy 2-core machine)
    cfg = _cfg(tmp_path, model="resnet18", channels=(64, 16, 16, 16), image_size=64, verify_images=2, solver_time_limit_s=180,
               data=SyntheticDermConfig(n_train=128, n_val=64, n_test=64, image_size=64))
    res = compile(cfg)
    r = res.report
    hw = r["hardware"]["finn"]
    ops = hw["hw_op_counts"]
    assert ops["MVAU"] == 21 and ops["ElementwiseAdd"] == 8 and ops["DuplicateStreams"] == 8
    be = r["bit_exact"]
    assert be["ok"] and be["backends"] == ["brevitas", "qonnx", "finn"]
    assert {"layer1.0.out", "layer4.1.out", "fc.acc"} <= set(be["keys"])
    # FINN's own estimates fit the board (the fit step re-solved until they did)
    lim = get_cost_model("pynq-z2").limits
    assert all(used <= lim.cap(k) for k, used in hw["total"].items() if k in lim.totals)
    rounds = r["allocation"]["solver"]["finn_fit"]
    assert rounds and not rounds[-1]["over"]
    # every residual join at one activation width
    acts = {la["name"]: la["act_bits"] for la in r["allocation"]["layers"]}
    net = json.loads((res.out_dir / "network.json").read_text())
    assert net["name"] == "resnet18" and net["joins"]
    for join in net["joins"]:
        assert len({acts[n] for n in join}) == 1, join
    assert all(la["finn"] and la["finn"]["cycles"] > 0 for la in r["allocation"]["layers"])
