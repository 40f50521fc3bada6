"""The fast integer simulator on FINN graphs that are DAGs, not chains: the default CNN with
output-channel groups (a DuplicateStreams fork to one MVAU + pool per group, a
StreamingConcat join) and a ResNet-18 (residual ElementwiseAdds, forks, GlobalAccPool),
each bit for bit against FINN's Python execution and qonnx, and through `simulate`.

Built small and directly, not by `fqhw compile` (CI has 2 cores): the grouped CNN as
tests/test_channel_groups.py builds it (8 x 8 images), the ResNet-18 as
tests/test_models_timm.py does (all 20 convs and 8 blocks, narrow, 64 x 64 images). The
ResNet's FINN build is most of this file's time (about a minute); one module fixture each.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.backends.intsim import IntegerSimulator
from fqhw.backends.verify import check_bit_exact
from fqhw.data.dataset import INPUT_SCALE, GroupedImages
from fqhw.errors import FqhwError
from fqhw.simulate import locate_build, simulate
from test_models_timm import _randomise_bn  # the same non-trivial BatchNorm statistics


def _pixels(n: int, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _data(images: np.ndarray, num_classes: int, seed: int) -> GroupedImages:
    """Random labels and two groups: `simulate` needs them, the bit-exact check does not."""
    rng = np.random.default_rng(seed)
    n = len(images)
    return GroupedImages(images, rng.integers(0, num_classes, n).astype(np.int64), rng.integers(0, 2, n).astype(np.int64),
                         ["light", "dark"], [f"c{i}" for i in range(num_classes)])


def _no_logits(out: dict) -> dict:
    return {k: v for k, v in out.items() if k != "logits"}


# --------------------------------------------------------------------------- channel groups


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A FairCNN (8 x 8 inputs, channels 4, 8) with features.1.conv in two groups of 4
    output channels at 3 and 6 weight bits, through QONNX and FINN (estimate-only)."""
    from fqhw.backends.finn.build import finn_build
    from fqhw.backends.qonnx_export import export_qonnx
    from fqhw.models.cnn import CNNConfig, FairCNN
    from fqhw.quant.qmodel import build_quant_model, calibrate
    from fqhw.quant.snap import snap_thresholds

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = CNNConfig(image_size=8, channels=(4, 8), num_classes=3)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    fm = FairCNN(cfg).eval()
    with torch.no_grad():  # non-trivial BatchNorm, some channels with a negative scale
        for bn in (b.bn for b in fm.features):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    units = [("features.0.conv", 8, 4, 2, 9), ("features.1.conv:g0", 3, 4, 2, 4), ("features.1.conv:g1", 6, 4, 2, 4), ("head", 4, None, 3, 4)]
    alloc = Allocation("pynq-z2", [LayerAllocation(*u) for u in units])
    qm = build_quant_model(fm, alloc)
    calib = torch.from_numpy(_pixels(32, shape, seed=1)).float() * INPUT_SCALE
    calibrate(qm, [(calib[i : i + 8],) for i in range(0, 32, 8)], batches=4)
    qm.eval()
    snap_thresholds(qm)
    root = tmp_path_factory.mktemp("grouped")
    path = export_qonnx(qm, shape, root / "model.qonnx.onnx")
    build = finn_build(path, alloc, root / "finn")
    return dict(root=root, path=path, build=build, shape=shape, num_classes=cfg.num_classes)


def test_grouped_build_simulator_equals_finn_and_qonnx(grouped):
    from fqhw.backends.finn.execute import finn_integer_trace
    from fqhw.backends.qonnx_export import qonnx_integer_trace

    sim = IntegerSimulator.from_build(grouped["root"])
    ops = [n.op_type for n in sim.nodes]
    assert any(op.startswith("StreamingConcat") for op in ops)
    assert not any(op.startswith("DuplicateStreams") for op in ops)  # the fork is an alias, no copy
    concat = next(n for n in sim.nodes if n.op_type.startswith("StreamingConcat"))
    assert len(concat.inputs) == 2
    # both groups' MVAUs read the one shared window
    im2col = {n.inputs for n in sim.nodes if n.op_type.startswith("MVAU") and n.out_shape == (4, 4, 4)}
    assert len(im2col) == 1

    imgs = _pixels(24, grouped["shape"], seed=2)
    x = imgs.astype(np.float64) * INPUT_SCALE
    out = sim.run(imgs, batch_size=7)  # batches that do not divide the images
    traces = {
        "intsim": _no_logits(out),
        "finn": finn_integer_trace(grouped["build"], x),
        "qonnx": qonnx_integer_trace(grouped["path"], x),
    }
    assert set(traces["intsim"]) == {"input", "features.0.conv.act", "features.1.conv.act", "head.acc"}  # groups merged
    assert traces["intsim"]["features.1.conv.act"].shape == (24, 8, 4, 4)
    result = check_bit_exact(traces)
    assert result.ok, result.first_mismatch
    acts = traces["intsim"]["features.1.conv.act"]
    assert acts[:, :4].max() > 0 and acts[:, 4:].max() > 0  # both groups carry signal
    # logits only: the same head accumulator
    short = sim.run(imgs, trace=False)
    assert set(short) == {"head.acc", "logits"} and np.array_equal(short["head.acc"], out["head.acc"])


def test_simulate_grouped_build_cross_checks_finn_and_qonnx(grouped):
    imgs = _pixels(40, grouped["shape"], seed=3)
    res = simulate(grouped["root"], _data(imgs, grouped["num_classes"], 0), cross_check=8)
    assert res.cross_check_backends == ["intsim", "finn", "qonnx"]
    assert res.bitexact.ok and res.bitexact.n_images == 8, res.bitexact.first_mismatch
    assert res.n_images == 40 and res.predictions.shape == (40,)


# --------------------------------------------------------------------------- ResNet-18

RESNET_SIZE = 64


def _resnet_allocation(net) -> Allocation:
    """Widths 2..8 cycling over the layers (a downsample conv at its block's join width),
    PE 2 / SIMD 3 where they divide: the mixed allocation of tests/test_models_timm.py."""
    layers = []
    for i, s in enumerate(net.layers):
        a = 2 + (5 * i + 1) % 7 if s.has_output_act else None
        layers.append(LayerAllocation(s.name, 2 + (3 * i) % 7, a, pe=2 if s.mh % 2 == 0 else 1, simd=3 if s.mw % 3 == 0 else 1))
    by_name = {la.name: la for la in layers}
    for join in net.joins:
        for other in join[1:]:
            if ".downsample." in other:
                by_name[other].act_bits = by_name[join[0]].act_bits
    return Allocation("pynq-z2", layers)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A narrow ResNet-18 (channels 64, 16, 16, 16; 64 x 64 inputs) at a mixed allocation,
    exported and built by FINN as a compile output folder lays it out (model.qonnx.onnx
    beside finn/finn_result.json)."""
    from fqhw.backends.finn.residual import finn_dataflow_resnet, require_all_hw
    from fqhw.models import registry
    from fqhw.network import network_spec
    from fqhw.backends.qonnx_generic import export_generic_qonnx
    from fqhw.quant.generic import quantize_model
    from fqhw.quant.resnet_snap import snap_resnet_thresholds
    from fqhw.quant.qmodel import calibrate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = (3, RESNET_SIZE, RESNET_SIZE)
    fm = registry.create("resnet18", 4, RESNET_SIZE, channels=(64, 16, 16, 16))
    _randomise_bn(fm)
    net = network_spec(fm, shape, name="resnet18")
    alloc = _resnet_allocation(net)
    qm = quantize_model(fm, alloc)
    calib = torch.from_numpy(_pixels(16, shape, seed=1)).float() * INPUT_SCALE
    calibrate(qm, [(calib[i : i + 8],) for i in range(0, 16, 8)], batches=2)
    qm.eval()
    snap_resnet_thresholds(qm)
    root = tmp_path_factory.mktemp("resnet18")
    path = export_generic_qonnx(qm, shape, root / "model.qonnx.onnx")
    res = require_all_hw(finn_dataflow_resnet(path, root / "finn", alloc=alloc), "resnet18")
    return dict(root=root, path=path, res=res, shape=shape, num_classes=4)


def test_resnet_simulator_equals_finn_and_qonnx(resnet):
    from fqhw.backends.finn.residual import finn_dataflow_integer_trace
    from fqhw.backends.qonnx_generic import qonnx_execute, qonnx_integer_trace_generic

    sim = IntegerSimulator.from_build(resnet["root"])  # finds finn/finn_result.json
    ops = [n.op_type.split("_")[0] for n in sim.nodes]
    assert ops.count("ElementwiseAdd") == 8 and ops.count("MVAU") == 21 and "GlobalAccPool" in ops
    adds = [n for n in sim.nodes if n.op_type.startswith("ElementwiseAdd")]
    assert all(len(n.inputs) == 2 for n in adds)

    imgs = _pixels(3, resnet["shape"], seed=2)  # FINN's Python execution: seconds per image
    x = imgs.astype(np.float64) * INPUT_SCALE
    out = sim.run(imgs, batch_size=2)
    traces = {
        "intsim": _no_logits(out),
        "finn": finn_dataflow_integer_trace(resnet["res"], resnet["path"], x, graph="dataflow"),
        "qonnx": qonnx_integer_trace_generic(resnet["path"], x),
    }
    # the simulator names what FINN computes: every block's output and shortcut, fc.acc
    assert set(traces["intsim"]) == set(traces["finn"])
    assert sum(k.endswith(".out") for k in traces["intsim"]) == 8 and "fc.acc" in traces["intsim"]
    result = check_bit_exact(traces, partial=("finn", "intsim"))
    assert result.ok, result.first_mismatch
    assert traces["intsim"]["fc.acc"].shape == (3, 4) and np.abs(traces["intsim"]["fc.acc"]).max() > 0
    # the logits: the integer accumulator through the host's float scale and bias, which
    # applies them in another order than qonnx's float32 graph (close, not bit-equal)
    ref = qonnx_execute(resnet["path"], x.astype(np.float32)).reshape(3, -1)
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_simulate_resnet_folder(resnet):
    folder = locate_build(resnet["root"])
    assert folder.finn_kind == "result" and folder.qonnx_path is not None
    imgs = _pixels(12, resnet["shape"], seed=4)
    res = simulate(resnet["root"] / "finn", _data(imgs, resnet["num_classes"], 1), cross_check=1)
    assert res.cross_check_backends == ["intsim", "finn", "qonnx"]
    assert res.bitexact.ok, res.bitexact.first_mismatch
    assert res.n_images == 12 and res.simulator_source == "finn"


# --------------------------------------------------------------------------- joins, order


def _join_graph():
    """x -> DuplicateStreams -> (ElementwiseAdd with an integer constant, and the copy) ->
    StreamingConcat, its nodes stored in reverse (not topological) order."""
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper

    hls = "finn.custom_op.fpgadataflow.hls"
    dup = helper.make_node("DuplicateStreams_hls", ["x"], ["d0", "d1"], domain=hls, name="dup", backend="fpgadataflow",
                           NumChannels=3, PE=1, NumOutputStreams=2, inputDataType="INT8", numInputVectors=[1, 2, 2])
    add = helper.make_node("ElementwiseAdd_hls", ["d0", "c"], ["a"], domain=hls, name="add", backend="fpgadataflow",
                           lhs_shape=[1, 2, 2, 3], rhs_shape=[3], out_shape=[1, 2, 2, 3],
                           lhs_dtype="INT8", rhs_dtype="INT8", out_dtype="INT9")
    cat = helper.make_node("StreamingConcat_hls", ["d1", "a"], ["y"], domain=hls, name="cat", backend="fpgadataflow",
                           SIMD=1, ChannelsPerStream=[3, 3], inputDataTypes=["INT8", "INT9"], numInputVectors=[1, 2, 2])
    graph = helper.make_graph(
        [cat, add, dup], "joins",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 6])],
    )
    m = ModelWrapper(helper.make_model(graph))
    m.set_initializer("c", np.array([-100.0, 0.0, 27.0]))
    return m


def test_joins_and_topological_order_on_a_small_graph():
    from fqhw.backends.intsim.dataflow import join_fn, topological

    m = _join_graph()
    assert [n.name for n in topological(m)] == ["dup", "add", "cat"]
    add, cat = m.get_node_from_name("add"), m.get_node_from_name("cat")
    x = np.random.default_rng(0).integers(-128, 128, size=(5, 2, 2, 3)).astype(np.float32)
    fn, iv, dt = join_fn(m, add, [(-128, 127)], [np.float32])
    s = fn(x)
    assert iv == (-228, 154) and dt is np.float32
    np.testing.assert_array_equal(s, x + np.array([-100, 0, 27], dtype=np.float32))
    fn, iv, dt = join_fn(m, cat, [(-128, 127), iv], [np.float32, dt])
    np.testing.assert_array_equal(fn(x, s), np.concatenate([x, s], axis=-1))
    assert iv == (-228, 154)
    with pytest.raises(FqhwError, match="ChannelsPerStream says 3"):
        fn(x[..., :2], s)
    # a sum past float32's exact integers is carried as float64, and stays exact
    fn, iv, dt = join_fn(m, add, [(0, 2**24)], [np.float64])
    assert dt is np.float64
    big = np.full((1, 2, 2, 3), 2**24, dtype=np.float64)
    assert fn(big)[0, 0, 0, 2] == 2**24 + 27


# --------------------------------------------------------------------------- refusals


def test_unsupported_join_is_refused_by_name(resnet):
    """A node the simulator has no integer semantics for is one FqhwError naming it."""
    from qonnx.core.modelwrapper import ModelWrapper

    df = ModelWrapper(resnet["res"].dataflow_model)
    add = next(n for n in df.graph.node if n.op_type.startswith("ElementwiseAdd"))
    add.op_type = add.op_type.replace("ElementwiseAdd", "ElementwiseMul")
    parent = ModelWrapper(str(resnet["root"] / "finn" / "dataflow_parent.onnx"))
    with pytest.raises(FqhwError, match=r"ElementwiseMul_hls.*does not support") as e:
        IntegerSimulator.from_models(df, parent, {})
    assert "\n" not in str(e.value)


def test_folder_without_an_accelerator_build_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "deit_tiny_patch16_224", "target": "bitfusion"}))
    with pytest.raises(FqhwError, match="holds no FINN or hls4ml build .*deit_tiny_patch16_224.*bitfusion") as e:
        locate_build(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FqhwError, match="not a compile output folder"):
        locate_build(tmp_path)
