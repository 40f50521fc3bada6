"""Output-channel groups: one quantized layer per group, through QONNX and FINN, bit-exact,
and built as the FINN cost model priced it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.backends.finn.build import finn_build
from fqhw.backends.finn.common import MVAU_TYPES
from fqhw.backends.finn.execute import finn_integer_trace
from fqhw.backends.qonnx_export import export_qonnx, qonnx_integer_trace
from fqhw.backends.verify import check_bit_exact
from fqhw.errors import FqhwError
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.quant.channel_groups import GroupedQuantFairCNN, split_quant_model
from fqhw.quant.qmodel import build_quant_model, calibrate, integer_trace
from fqhw.quant.snap import snap_thresholds
from fqhw.units import merge_group_keys

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


def _alloc(units) -> Allocation:
    return Allocation("pynq-z2", [LayerAllocation(*u) for u in units])


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), generator=g).float() / 256


def _float_model() -> FairCNN:
    torch.manual_seed(0)
    fm = FairCNN(CFG).eval()
    with torch.no_grad():  # non-trivial BatchNorm, some channels with negative gamma
        for bn in (b.bn for b in fm.features):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return fm


def _calibrated(fm, alloc):
    qm = build_quant_model(fm, alloc)
    calib = _images(32, seed=1)
    calibrate(qm, [(calib[i : i + 8],) for i in range(0, 32, 8)], batches=4)
    return qm.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    fm = _float_model()
    alloc = _alloc(UNITS)
    qm = _calibrated(fm, alloc)
    snap = snap_thresholds(qm)
    root = tmp_path_factory.mktemp("groups")
    path = export_qonnx(qm, SHAPE, root / "model.onnx")
    build = finn_build(path, alloc, root / "finn")
    x = _images(4, seed=2)
    traces = {
        "brevitas": integer_trace(qm, x),
        "qonnx": qonnx_integer_trace(path, x),
        "finn": finn_integer_trace(build, x),
    }
    return dict(fm=fm, qm=qm, alloc=alloc, snap=snap, path=path, build=build, x=x, traces=traces)


def test_grouped_layer_is_one_quant_layer_per_group(built):
    qm, fm = built["qm"], built["fm"]
    assert isinstance(qm, GroupedQuantFairCNN)
    assert list(qm.layers) == [u[0] for u in UNITS]
    g0, g1 = qm.layers["features.1.conv:g0"], qm.layers["features.1.conv:g1"]
    assert int(g0.compute.quant_weight().bit_width) == 3 and int(g1.compute.quant_weight().bit_width) == 6
    assert g0.act is g1.act and int(g0.act.act_quant.bit_width()) == 4  # one shared quantizer
    assert g0.group == g1.group == "features.1.conv"
    # each group holds its slice of the float layer's output channels and BatchNorm (a fresh
    # model: `built`'s was snapped, which moves weights onto their grid and BN slightly)
    fresh_model = build_quant_model(fm, built["alloc"])
    fresh = fresh_model.layers
    fconv, fbn = fm.features[1].conv, fm.features[1].bn
    for k, sl in enumerate((slice(0, 4), slice(4, 8))):
        unit = fresh[f"features.1.conv:g{k}"]
        assert torch.equal(unit.compute.weight, fconv.weight[sl])
        bn = fresh_model.get_submodule(unit.block).bn
        assert torch.equal(bn.running_mean, fbn.running_mean[sl]) and torch.equal(bn.weight, fbn.weight[sl])
    assert built["snap"]["min_margin"] >= built["snap"]["margin"]


def test_brevitas_qonnx_finn_bit_exact_at_different_widths(built):
    traces = built["traces"]
    for name, tr in traces.items():  # the unsplit layer's keys and shapes
        assert set(tr) == {"input", "features.0.conv.act", "features.1.conv.act", "head.acc"}, name
        assert tr["features.1.conv.act"].shape == (4, 8, 4, 4), name
        assert tr["head.acc"].shape == (4, 3), name
    acts = traces["brevitas"]["features.1.conv.act"]
    assert acts[:, :4].max() > 0 and acts[:, 4:].max() > 0  # both groups carry signal
    result = check_bit_exact(traces)
    assert result.ok, result.first_mismatch
    assert built["build"].threshold_check["ok"], built["build"].threshold_check


def test_splitting_at_equal_widths_changes_nothing():
    torch.set_num_threads(1)
    fm = _float_model()
    whole = _calibrated(fm, _alloc([("features.0.conv", 5, 4, 1, 1), ("features.1.conv", 5, 3, 1, 1), ("head", 5, None, 1, 1)]))
    split = split_quant_model(
        whole,
        fm,
        _alloc(
            [
                ("features.0.conv:g0", 5, 4, 1, 1),
                ("features.0.conv:g1", 5, 4, 1, 1),
                ("features.1.conv:g0", 5, 3, 1, 1),
                ("features.1.conv:g1", 5, 3, 1, 1),
                ("head", 5, None, 1, 1),
            ]
        ),
    ).eval()
    x = _images(8, seed=3)
    with torch.no_grad():
        assert torch.equal(whole(x), split(x))
    a, b = integer_trace(whole, x), integer_trace(split, x)
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["features.1.conv.act"].max() > 0
    # different widths do change the codes: the check above can fail
    other = split_quant_model(whole, fm, _alloc([("features.0.conv", 5, 4, 1, 1), ("features.1.conv:g0", 2, 3, 1, 1), ("features.1.conv:g1", 5, 3, 1, 1), ("head", 5, None, 1, 1)]))
    assert not np.array_equal(integer_trace(other, x)["features.1.conv.act"], a["features.1.conv.act"])


def test_qonnx_has_one_quant_node_per_group_with_its_width(built):
    model = onnx.load(str(built["path"]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    widths = []
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        q = producer[conv.input[1]]
        assert q.op_type == "Quant"
        bw = inits[q.input[3]]
        assert bw.size == 1  # a scalar bit width per Quant node
        widths.append(int(bw.reshape(-1)[0]))
    assert widths == [8, 3, 6]
    concat = [n for n in model.graph.node if n.op_type == "Concat"]
    assert len(concat) == 1 and len(concat[0].input) == 2


def test_finn_graph_all_hw_one_mvau_per_unit_folded_as_allocated(built):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    b = built["build"]
    df = ModelWrapper(b.dataflow_model)
    assert all(n.domain.startswith("finn.custom_op.fpgadataflow") for n in df.graph.node)
    ops = [n.op_type for n in df.graph.node]
    assert sum(op in MVAU_TYPES for op in ops) == len(UNITS)
    # one padding per conv layer (the groups share their window), one fork, one join
    assert sum(op.startswith("FMPadding") for op in ops) == 2
    assert sum(op.startswith("DuplicateStreams") for op in ops) == 1
    assert sum(op.startswith("StreamingConcat") for op in ops) == 1
    for name, w, _, pe, simd in UNITS:
        inst = getCustomOp(df.get_node_from_name(b.mvau_of_layer[name]))
        assert (inst.get_nodeattr("PE"), inst.get_nodeattr("SIMD")) == (pe, simd), name
        assert inst.get_nodeattr("MH") == {"features.0.conv": 4, "head": 3}.get(name, 4), name


def test_finn_build_is_what_the_cost_model_priced(built):
    from fqhw.allocator.cpsat import price
    from fqhw.hwmodels import get_cost_model
    from fqhw.network import network_spec, split_channel_groups

    net = split_channel_groups(network_spec(FairCNN(CFG), SHAPE), {"features.1.conv": 2})
    assert [s.name for s in net.layers] == [u[0] for u in UNITS]
    pr = price(net, built["alloc"], get_cost_model("pynq-z2"))
    b = built["build"]
    for name, *_ in UNITS:
        p, f = pr["layers"][name], b.layer_estimates[name]
        assert p["cycles"] == f["cycles"], name
        assert p["BRAM_18K"] == f["BRAM_18K"] and p["DSP"] == f["DSP"], name
        # the model prices worst-case accumulator types: never below FINN, a few LUTs above
        assert 0 <= p["LUT"] - f["LUT"] <= 0.02 * max(f["LUT"], 100), (name, p["LUT"], f["LUT"])
    assert pr["total"]["cycles"] == b.max_cycles
    # what the model does not price: the fork and the join, which FINN prices at zero
    unpriced = [n for n, e in b.node_estimates.items() if e["op_type"].startswith(("DuplicateStreams", "StreamingConcat"))]
    assert len(unpriced) == 2
    assert all(b.node_estimates[n][r] == 0 for n in unpriced for r in ("LUT", "BRAM_18K", "DSP"))
    assert all(b.node_estimates[n]["cycles"] <= b.max_cycles for n in unpriced)


def test_merge_group_keys_orders_by_group_and_refuses_gaps():
    a, b = np.zeros((1, 2, 1, 1), np.int64), np.ones((1, 3, 1, 1), np.int64)
    out = merge_group_keys({"input": a, "l:g1.act": b, "l:g0.act": a})
    assert list(out) == ["input", "l.act"] and out["l.act"][0, :, 0, 0].tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(FqhwError):
        merge_group_keys({"l:g0.act": a, "l:g2.act": b})


def test_groups_must_share_one_activation_width():
    with pytest.raises(FqhwError, match="one activation width"):
        build_quant_model(_float_model(), _alloc([("features.0.conv", 4, 4, 1, 1), ("features.1.conv:g0", 4, 3, 1, 1), ("features.1.conv:g1", 4, 5, 1, 1), ("head", 4, None, 1, 1)]))
