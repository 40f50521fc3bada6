"""Output-channel groups in the power-of-two scheme and the hls4ml backend: one quantized
conv per group at its own width, joined by one shared activation quantizer; QONNX with one
Quant node per group; an hls4ml project where each group's conv has its own types, joined by
a Concatenate; its C simulation bit-exact with Brevitas and qonnx."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fqhw.backends.hls4ml.build import hls4ml_build
from fqhw.backends.hls4ml.csim import hls4ml_integer_trace
from fqhw.backends.hls4ml.graph import parse_type
from fqhw.backends.qonnx_export import export_qonnx, qonnx_integer_trace
from fqhw.backends.verify import check_bit_exact
from fqhw.errors import FqhwError
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.quant.po2 import build_po2_model, po2_integer_trace, scales, split_po2_model
from fqhw.quant.qmodel import calibrate
from test_channel_groups import _alloc, _images  # the same 8 x 8 inputs and allocations

CFG = CNNConfig(image_size=8, channels=(4, 8), num_classes=3)
SHAPE = (CFG.in_channels, CFG.image_size, CFG.image_size)
# features.1.conv (36 -> 8) in two groups of 4 channels at 3 and 6 weight bits, one
# activation width; features.0.conv and the head whole
UNITS = [
    ("features.0.conv", 8, 4, 2, 9),
    ("features.1.conv:g0", 3, 4, 2, 4),
    ("features.1.conv:g1", 6, 4, 2, 4),
    ("head", 4, None, 3, 4),
]
N_VERIFY = 16


def _float_model() -> FairCNN:
    torch.manual_seed(0)
    fm = FairCNN(CFG).eval()
    with torch.no_grad():  # a non-trivial BatchNorm to fold, some channels with negative gamma
        for bn in (b.bn for b in fm.features):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return fm


def _calibrate(qm):
    calib = _images(32, seed=1)
    calibrate(qm, [(calib[i : i + 8],) for i in range(0, 32, 8)], batches=4)
    return qm.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    fm = _float_model()
    alloc = _alloc(UNITS)
    qm = _calibrate(build_po2_model(fm, alloc))
    root = tmp_path_factory.mktemp("po2_groups")
    path = export_qonnx(qm, SHAPE, root / "model.onnx")
    build = hls4ml_build(path, alloc, root / "hls4ml")
    x = _images(N_VERIFY, seed=2)
    traces = {
        "brevitas": po2_integer_trace(qm, x),
        "qonnx": qonnx_integer_trace(path, x),
        "hls4ml": hls4ml_integer_trace(build, x),
    }
    return dict(fm=fm, qm=qm, alloc=alloc, path=path, build=build, x=x, traces=traces, root=root)


def test_grouped_layer_is_one_po2_conv_per_group_with_its_slice(built):
    qm, fm = built["qm"], built["fm"]
    assert list(qm.layers) == [u[0] for u in UNITS]
    g0, g1 = qm.layers["features.1.conv:g0"], qm.layers["features.1.conv:g1"]
    assert int(g0.compute.quant_weight().bit_width) == 3 and int(g1.compute.quant_weight().bit_width) == 6
    assert g0.act is g1.act and g0.group == g1.group == "features.1.conv"  # one shared quantizer
    # each group holds its slice of the BN-folded float conv (weights and bias)
    whole = build_po2_model(fm, _alloc([("features.0.conv", 8, 4, 2, 9), ("features.1.conv", 6, 4, 2, 4), ("head", 4, None, 3, 4)]))
    fresh = build_po2_model(fm, built["alloc"]).layers  # `built`'s was calibrated
    for k, sl in enumerate((slice(0, 4), slice(4, 8))):
        unit = fresh[f"features.1.conv:g{k}"].compute
        assert torch.equal(unit.weight, whole.features[1].conv.weight[sl])
        assert torch.equal(unit.bias, whole.features[1].conv.bias[sl])
    sc = scales(qm)  # each group its own power-of-two weight scale, one activation scale
    assert sc["features.1.conv:g0"]["act"] == sc["features.1.conv:g1"]["act"]


def test_qonnx_has_one_weight_quant_per_group_with_its_scalar_width(built):
    model = onnx.load(str(built["path"]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3  # features.0 and one per group of features.1
    widths = []
    for conv in convs:
        q = producer[conv.input[1]]
        assert q.op_type == "Quant"
        bits = inits[q.input[3]]
        assert bits.size == 1
        widths.append(int(bits.reshape(-1)[0]))
    assert widths == [8, 3, 6]
    assert [n.op_type for n in model.graph.node].count("Concat") == 1


def test_hls4ml_bit_exact_with_brevitas_and_qonnx_at_mixed_group_widths(built):
    traces = built["traces"]
    for name, tr in traces.items():  # the unsplit layer's keys and shapes
        assert set(tr) == {"input", "features.0.conv.act", "features.1.conv.act", "head.acc"}, name
        assert tr["features.1.conv.act"].shape == (N_VERIFY, 8, 4, 4), name
        assert tr["head.acc"].shape == (N_VERIFY, 3), name
    acts = traces["brevitas"]["features.1.conv.act"]
    assert acts[:, :4].max() > 0 and acts[:, 4:].max() > 0  # both groups carry signal
    assert len(np.unique(traces["brevitas"]["head.acc"])) > 5
    result = check_bit_exact(traces)
    assert result.ok, result.first_mismatch


def test_hls4ml_config_gives_each_group_its_allocated_precision(built):
    build, alloc = built["build"], built["alloc"]
    hm = build.model
    layers = {ly.name: ly for ly in hm.get_layers()}
    for la in alloc.layers:
        want = parse_type(build.precisions[la.name]["weight"])
        assert want.width == la.weight_bits, la.name
        ly = layers[build.hls_layers[la.name]]
        got = ly.types["weight_t"].precision
        assert (got.width, got.signed) == (la.weight_bits, True), la.name  # what hls4ml kept
        assert int(ly.get_attr("reuse_factor")) == build.reuse_factors[la.name]["used"]
    g0, g1 = (layers[build.hls_layers[f"features.1.conv:g{k}"]] for k in (0, 1))
    assert g0.name != g1.name and g0.class_name == g1.class_name == "Conv2D"
    assert g0.types["accum_t"].precision.width < g1.types["accum_t"].precision.width  # 3-bit group accumulates narrower
    # one Concatenate joins the groups, in the groups' shared activation type
    cats = [ly for ly in hm.get_layers() if ly.class_name == "Concatenate"]
    assert len(cats) == 1
    act = parse_type(build.precisions["features.1.conv:g0"]["act"])
    got = cats[0].get_output_variable().type.precision
    assert (got.width, got.integer, got.signed) == (act.width, act.integer, act.signed)
    # channels-last (H, W, C) after FairCNN's last, global pool: the groups' channels joined
    assert list(cats[0].get_output_variable().shape) == [1, 1, 8]


def test_equal_widths_compute_the_unsplit_model(built):
    """Split at the layer's own widths, with each group's weight exponent the layer's, the
    grouped model (Brevitas and its hls4ml C simulation) computes what the unsplit one does."""
    fm, x = built["fm"], built["x"]
    whole_alloc = _alloc([("features.0.conv", 8, 4, 2, 9), ("features.1.conv", 5, 4, 2, 4), ("head", 4, None, 3, 4)])
    whole = _calibrate(build_po2_model(fm, whole_alloc))
    with torch.no_grad():  # both halves reach the layer's max |w|: one power-of-two exponent
        w = whole.features[1].conv.weight
        m = float(w.abs().max())
        w[0, 0, 0, 0], w[4, 0, 0, 0] = m, -m
    split_alloc = _alloc([("features.0.conv", 8, 4, 2, 9), ("features.1.conv:g0", 5, 4, 2, 4), ("features.1.conv:g1", 5, 4, 2, 4), ("head", 4, None, 3, 4)])
    split = split_po2_model(whole, fm, split_alloc).eval()
    s_whole, s_split = scales(whole), scales(split)
    assert s_split["features.1.conv:g0"] == s_split["features.1.conv:g1"] == s_whole["features.1.conv"]
    ref = po2_integer_trace(whole, x)
    got = po2_integer_trace(split, x)
    assert set(got) == set(ref)
    for key in ref:
        assert np.array_equal(got[key], ref[key]), key
    path = export_qonnx(split, SHAPE, built["root"] / "split.onnx")
    build = hls4ml_build(path, split_alloc, built["root"] / "split_hls4ml")
    hls = hls4ml_integer_trace(build, x)
    for key in ref:
        assert np.array_equal(hls[key], ref[key]), key


def test_grouped_head_and_unequal_group_activations_are_refused(built):
    fm = built["fm"]
    head_groups = [(f"head:g{k}", 4, None, 1, 1) for k in range(3)]
    with pytest.raises(FqhwError, match="does not split the head"):
        build_po2_model(fm, _alloc([("features.0.conv", 8, 4, 1, 1), ("features.1.conv", 4, 4, 1, 1), *head_groups]))
    with pytest.raises(FqhwError, match="share one activation width"):
        build_po2_model(fm, _alloc([("features.0.conv", 8, 4, 1, 1), ("features.1.conv:g0", 4, 3, 1, 1), ("features.1.conv:g1", 4, 5, 1, 1), ("head", 4, None, 1, 1)]))
    # the project is built from the allocation the model was exported from, group by group
    other = _alloc([("features.0.conv", 8, 4, 2, 9), ("features.1.conv:g0", 6, 4, 2, 4), ("features.1.conv:g1", 3, 4, 2, 4), ("head", 4, None, 3, 4)])
    with pytest.raises(FqhwError, match="W3/A4"):
        hls4ml_build(built["path"], other, built["root"] / "mismatch", compile=False)
