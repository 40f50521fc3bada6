"""The FINN cost model against finn-plus's own estimates, node by node and for a whole
specialised dataflow graph (exact equality: these are the numbers FINN's estimate reports
would show)."""
from __future__ import annotations

import numpy as np
import pytest

from fqhw.errors import FqhwError
from fqhw.hwmodels import get_cost_model, known_targets
from fqhw.hwmodels import finn_formulas as F
from fqhw.hwmodels.finn_boards import PRICED
from fqhw.network import LayerSpec

PART = "xc7z020clg400-1"

finn = pytest.importorskip("finn")
from onnx import TensorProto, helper  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.custom_op.registry import getCustomOp  # noqa: E402
from qonnx.util.basic import qonnx_make_model  # noqa: E402


def hw_node(op: str, style: str, inputs=("in0",), outputs=("out0",), **attrs):
    domain = "finn.custom_op.fpgadataflow" + (f".{style}" if style else "")
    n = helper.make_node(op, list(inputs), list(outputs), domain=domain, backend="fpgadataflow", **attrs)
    return n


def estimates(inst, part=PART):
    return (
        int(inst.get_exp_cycles()),
        inst.lut_estimation(part),
        inst.bram_estimation(part),
        inst.uram_estimation(part),
        inst.dsp_estimation(part),
    )


# ---------------------------------------------------------------- registry and boards


def test_unknown_target_lists_known_ones():
    with pytest.raises(FqhwError) as e:
        get_cost_model("pynq-z3")
    msg = str(e.value)
    assert "\n" not in msg
    for t in known_targets():
        assert t in msg
    assert set(known_targets()) >= {"pynq-z1", "pynq-z2", "ultra96", "zcu104", "u250"}


@pytest.mark.parametrize(
    "target,finn_board,platform",
    [("pynq-z1", "Pynq-Z1", "Pynq-Z1"), ("pynq-z2", "Pynq-Z2", "Pynq-Z2"), ("ultra96", "Ultra96", "Ultra96"),
     ("zcu104", "ZCU104", "ZCU104"), ("u250", "U250", "U250")],
)
def test_boards_match_finn_platforms(target, finn_board, platform):
    from finn.util.basic import part_map
    from finn.util.platforms import DEFAULT_RES_LIMITS, platforms

    cm = get_cost_model(target)
    assert cm.limits.part == part_map[finn_board]
    slr0 = platforms[platform]().compute_resources[0]  # per SLR: LUT, FF, BRAM_18K, URAM, DSP
    names = ["LUT", "FF", "BRAM_18K", "URAM", "DSP"]
    assert [cm.limits.totals[n] for n in names] == slr0
    assert [cm.limits.utilisation[n] for n in names] == list(DEFAULT_RES_LIMITS)
    assert cm.limits.clock_hz == 1e8  # FINN's default synth_clk_period_ns = 10


# ---------------------------------------------------------------- node by node


MVAU_SHAPES = [(27, 16, 1024), (144, 32, 256), (288, 64, 64), (64, 4, 1), (576, 128, 49)]


def _mvau_cases():
    rng = np.random.default_rng(0)
    cases = []
    for mw, mh, n in MVAU_SHAPES:
        folds = [(pe, simd) for pe in F.divisors(mh) for simd in F.divisors(mw)]
        for k in rng.choice(len(folds), size=6, replace=False):
            pe, simd = folds[k]
            w, a, b = (int(x) for x in rng.integers(2, 9, size=3))
            cases.append((mw, mh, n, pe, simd, w, a, b))
    return cases


@pytest.mark.parametrize("noact", [0, 1])
@pytest.mark.parametrize("mw,mh,n,pe,simd,w,a,b", _mvau_cases())
def test_mvau_matches_finn(mw, mh, n, pe, simd, w, a, b, noact):
    acc = F.acc_bits_worst_case(mw, w, a, False, last_node=bool(noact))
    attrs = dict(
        MW=mw, MH=mh, PE=pe, SIMD=simd, inputDataType=f"UINT{a}", weightDataType=f"INT{w}",
        outputDataType=f"INT{acc}" if noact else f"UINT{b}", accDataType=f"INT{acc}", noActivation=noact,
        numInputVectors=[1, n],
    )
    out = None if noact else b
    for ram_style in ("auto", "distributed", "block", "ultra"):
        for thr_style in ("auto", "distributed"):
            inst = getCustomOp(hw_node("MVAU_hls", "hls", ram_style=ram_style, ram_style_thresholds=thr_style, **attrs))
            mine = (
                F.mvau_cycles(mw, mh, pe, simd, n),
                F.mvau_hls_lut(mw, mh, pe, simd, w, a, False, acc, out, ram_style=ram_style, ram_style_thresholds=thr_style),
                F.mvau_bram(mw, mh, pe, simd, w, ram_style=ram_style),
                F.mvau_uram(mw, mh, pe, simd, w, ram_style=ram_style),
                F.mvau_hls_dsp(pe, simd, w, a),
            )
            assert mine == estimates(inst), (ram_style, thr_style)
    rtl = getCustomOp(hw_node("MVAU_rtl", "rtl", **attrs))
    for part in (PART, "xczu7ev-ffvc1156-2-e"):
        mine = (F.mvau_cycles(mw, mh, pe, simd, n), 0, F.mvau_bram(mw, mh, pe, simd, w), 0, F.mvau_rtl_dsp(pe, simd, F.dsp_block(part)))
        assert mine == estimates(rtl, part)


def test_accumulator_width_matches_finn_datatype_bound():
    from qonnx.core.datatype import DataType

    for mw, w, a, signed in [(27, 8, 8, False), (288, 2, 3, False), (64, 5, 7, True), (1, 2, 2, False), (4096, 8, 8, True)]:
        mh = 2
        in_dt = f"INT{a}" if signed else f"UINT{a}"
        node = hw_node("MVAU", "", inputs=("in0", "w0"), MW=mw, MH=mh, PE=1, SIMD=1, inputDataType=in_dt,
                       weightDataType=f"INT{w}", outputDataType="INT32", noActivation=1)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("in0", TensorProto.FLOAT, [1, mw])],
            [helper.make_tensor_value_info("out0", TensorProto.FLOAT, [1, mh])],
            value_info=[helper.make_tensor_value_info("w0", TensorProto.FLOAT, [mw, mh])],
        )
        model = ModelWrapper(qonnx_make_model(graph))
        model.set_initializer("w0", np.ones((mw, mh), dtype=np.float32))
        inst = getCustomOp(model.graph.node[0])
        adt = inst.minimize_accumulator_width(model, datatype_only=True)
        assert adt.bitwidth() == F.acc_bits_worst_case(mw, w, a, signed, last_node=True)
        assert DataType[inst.get_nodeattr("accDataType")].bitwidth() % 8 == 0


SWG_CASES = [
    # (IFM h, w, C, K, stride, depthwise)
    (34, 34, 3, 3, 1, 0), (18, 18, 16, 3, 1, 0), (10, 10, 32, 3, 1, 0), (32, 32, 16, 2, 2, 1),
    (16, 16, 32, 2, 2, 1), (8, 8, 64, 8, 8, 1), (7, 7, 8, 1, 1, 0), (15, 15, 4, 3, 2, 0), (1, 40, 8, 3, 1, 0),
    (40, 1, 8, 3, 1, 1), (200, 200, 128, 5, 1, 0),
]


@pytest.mark.parametrize("h,w,c,k,s,dw", SWG_CASES)
def test_sliding_window_matches_finn(h, w, c, k, s, dw):
    one_d = h == 1 or w == 1
    kdim = [k, k] if not one_d else ([1, k] if h == 1 else [k, 1])
    sdim = [s, s] if not one_d else ([1, s] if h == 1 else [s, 1])
    odim = [(h - kdim[0]) // sdim[0] + 1, (w - kdim[1]) // sdim[1] + 1]
    n = 0
    for simd in F.divisors(c):
        for pw in (0, 1):
            if pw and not dw and simd != c:
                continue  # FINN asserts SIMD == C for a parallel non-depthwise window
            for bits in (2, 5, 8):
                for ram_style in ("distributed", "block", "auto", "ultra"):
                    inst = getCustomOp(hw_node(
                        "ConvolutionInputGenerator_rtl", "rtl", ConvKernelDim=kdim, IFMChannels=c, IFMDim=[h, w], OFMDim=odim,
                        SIMD=simd, Stride=sdim, Dilation=[1, 1], inputDataType=f"UINT{bits}", outputDataType=f"UINT{bits}",
                        depthwise=dw, parallel_window=pw, ram_style=ram_style, is1D=int(one_d),
                    ))
                    swg = F.SWG(c, (h, w), tuple(odim), tuple(kdim), tuple(sdim), simd, bits, bool(dw), bool(pw), ram_style=ram_style)
                    assert (swg.cycles(), swg.lut(), swg.bram(), swg.uram(), 0) == estimates(inst), (simd, pw, bits, ram_style)
                    n += 1
    assert n > 0


def test_padding_and_pool_match_finn():
    for h, w, c, p in [(32, 32, 3, 1), (16, 16, 16, 1), (8, 8, 32, 2), (5, 7, 12, 1)]:
        for simd in F.divisors(c):
            inst = getCustomOp(hw_node("FMPadding_rtl", "rtl", ImgDim=[h, w], Padding=[p] * 4, NumChannels=c, SIMD=simd, inputDataType="UINT4"))
            assert (F.fmpadding_cycles((h, w), (p,) * 4, c, simd), 0, 0, 0, 0) == estimates(inst)
    for c, k, od in [(16, 2, 16), (32, 2, 8), (64, 8, 1), (10, 3, 5)]:
        for pe in F.divisors(c):
            inst = getCustomOp(hw_node("Pool_hls", "hls", Channels=c, PE=pe, KernelSize=[k, k], Function="MaxPool",
                                       OutImgDims=[od, od], InputDataType="UINT3", OutputDataType="UINT3"))
            assert (F.pool_cycles(c, pe, (k, k), (od, od)), 0, 0, 0, 0) == estimates(inst)


@pytest.mark.parametrize("c", [1, 3, 16, 100])
def test_thresholding_rtl_matches_finn(c):
    for pe in F.divisors(c):
        for tbits, tdt in ((32, "FLOAT32"), (9, "INT9"), (20, "INT20")):
            for ob in (1, 2, 4, 8):
                inst = getCustomOp(hw_node(
                    "Thresholding_rtl", "rtl", NumChannels=c, PE=pe, numSteps=2**ob - 1,
                    inputDataType="FLOAT32" if tdt == "FLOAT32" else "INT20", weightDataType=tdt, outputDataType=f"UINT{ob}",
                    numInputVectors=[1, 32, 32],
                ))
                mem = F.thresholding_rtl_memory(c, pe, tbits, ob)
                mine = (F.thresholding_cycles(c, pe, 1024), mem.get("LUTRAM", 0), mem.get("BRAM", 0), mem.get("URAM", 0), 0)
                assert mine == estimates(inst)


# ---------------------------------------------------------------- a whole specialised graph


def _generic_graph(net, alloc, cost, narrow=True):
    """The generic (unspecialised) FINN HW nodes for `alloc`, with the folding the cost
    model priced, chained in stream order: what SpecializeLayers sees."""
    from fqhw.allocator.cpsat import price
    from fqhw.hwmodels.finn_graph import hw_graph

    pr = price(net, alloc, cost)
    model, units = hw_graph(net, pr, narrow=narrow)
    return model, [u for _, u in units], pr


@pytest.fixture(scope="module")
def faircnn():
    from fqhw.models.cnn import FairCNN
    from fqhw.network import network_spec

    return network_spec(FairCNN(), (3, 32, 32), name="fqcnn")


def _mixed_alloc(net, head_bits):
    from fqhw.allocator.allocation import Allocation, LayerAllocation

    return Allocation(
        "pynq-z2",
        [
            LayerAllocation("features.0.conv", 8, 5, pe=4, simd=9),
            LayerAllocation("features.1.conv", 3, 4, pe=2, simd=48),
            LayerAllocation("features.2.conv", 5, 6, pe=8, simd=32),
            LayerAllocation("head", head_bits, None, pe=2, simd=16),
        ],
    )


@pytest.mark.parametrize(
    "head_bits,narrow,head_op,input_mode",
    [(6, True, "MVAU_rtl", "absorbed"), (3, True, "MVAU_hls", "thresholding"), (6, False, "MVAU_hls", "absorbed")],
)
def test_whole_graph_matches_finn_specialised(faircnn, head_bits, narrow, head_op, input_mode):
    """Build the generic HW graph of an allocation, let FINN's SpecializeLayers choose each
    node's backend for the PYNQ-Z2 part, run FINN's estimate analyses, and compare with
    the cost model node by node and in total."""
    from finn.analysis.fpgadataflow.dataflow_performance import dataflow_performance
    from finn.analysis.fpgadataflow.exp_cycles_per_layer import exp_cycles_per_layer
    from finn.analysis.fpgadataflow.res_estimation import res_estimation
    from finn.transformation.fpgadataflow.annotate_cycles import AnnotateCycles
    from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers

    cost = get_cost_model("pynq-z2", narrow_weights=narrow, input_mode=input_mode)
    model, expect, pr = _generic_graph(faircnn, _mixed_alloc(faircnn, head_bits), cost, narrow=narrow)
    assert (expect[0]["op_type"] == "Thresholding_rtl") == (input_mode == "thresholding")
    model = model.transform(SpecializeLayers(PART))
    ops = [n.op_type for n in model.graph.node]
    assert ops == [u["op_type"] for u in expect]
    assert ops[-1] == head_op
    cycles = model.analysis(exp_cycles_per_layer)
    res = model.analysis(lambda m: res_estimation(m, PART))
    totals = {r: 0 for r in PRICED}
    for node, u in zip(model.graph.node, expect):
        assert cycles[node.name] == u["cycles"], node.name
        for r in PRICED:
            assert res[node.name][r] == u[r], (node.name, r)
            totals[r] += res[node.name][r]
    for r in PRICED:
        assert pr["total"][r] == totals[r]
    perf = model.transform(AnnotateCycles()).analysis(dataflow_performance)
    assert perf["max_cycles"] == pr["total"]["cycles"]
    assert perf["critical_path_cycles"] == pr["total"]["latency_cycles"]


# ---------------------------------------------------------------- folding rules


def test_folding_options_and_window_folding(faircnn):
    cost = get_cost_model("pynq-z2")
    conv1 = faircnn.layer("features.1.conv")
    opts = cost.folding_options(conv1)
    assert len(opts) == len(F.divisors(32)) * len(F.divisors(144))
    assert all(conv1.mh % pe == 0 and conv1.mw % simd == 0 for pe, simd in opts)
    c_in, c_out = conv1.in_channels, conv1.mh
    for pe, simd in opts:
        units = cost.layer_cost(conv1, 4, 4, 4, pe, simd).units
        by_role = {u["role"]: u for u in units}
        assert list(by_role) == ["padding", "window", "mvau", "pool_window", "pool"]
        target = by_role["mvau"]["cycles"]
        s_win = by_role["window"]["attrs"]["SIMD"]
        pe_pool = by_role["pool"]["attrs"]["PE"]
        # window and padding share a SIMD | C_in, a multiple of the MVAU's where one exists
        assert by_role["padding"]["attrs"]["SIMD"] == s_win and c_in % s_win == 0
        multiples = [d for d in F.divisors(c_in) if d % simd == 0]
        assert s_win in multiples or s_win == c_in
        # the pool and its window share a PE | C_out that is a multiple of the MVAU's PE
        assert by_role["pool_window"]["attrs"]["SIMD"] == pe_pool and pe_pool % pe == 0 and c_out % pe_pool == 0
        # the least parallel choice that keeps up with the MVAU
        win_slow = max(by_role["padding"]["cycles"], by_role["window"]["cycles"])
        if win_slow <= target:
            for d in multiples:
                if d < s_win:
                    assert max(F.fmpadding_cycles(conv1.in_hw, (1,) * 4, c_in, d),
                               F.SWG(c_in, (18, 18), (16, 16), (3, 3), (1, 1), d, 4).cycles()) > target
        else:
            assert s_win == c_in
        if max(by_role["pool"]["cycles"], by_role["pool_window"]["cycles"]) > target:
            assert pe_pool == c_out


def test_unbuildable_hls_width_is_refused():
    cost = get_cost_model("pynq-z2")
    big = LayerSpec("big", "linear", mw=4096, mh=64, out_pixels=1, in_channels=4096)
    assert cost.buildable(big, 8, 8, 8, 1, 1)
    assert not cost.buildable(big, 8, 8, 8, 64, 4096)  # weight stream 64*4096*8 bits > 8191


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folding_matches_the_finn_backend(faircnn, seed):
    """fqhw's FINN backend folds the units around each MVAU itself: its folding (and so
    FINN's estimates of the graph it builds) must be the one this model priced."""
    fb = pytest.importorskip("fqhw.backends.finn.folding")
    from finn.analysis.fpgadataflow.exp_cycles_per_layer import exp_cycles_per_layer
    from finn.analysis.fpgadataflow.res_estimation import res_estimation
    from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers

    from fqhw.allocator.allocation import Allocation, LayerAllocation

    rng = np.random.default_rng(seed)
    cost = get_cost_model("pynq-z2")
    layers, a_in = [], 8
    for spec in faircnn.layers:
        w = int(rng.integers(2, 9))
        a = int(rng.integers(2, 9)) if spec.has_output_act else None
        opts = [f for f in cost.folding_options(spec) if cost.buildable(spec, w, a_in, a, *f)]
        pe, simd = opts[int(rng.integers(len(opts)))]
        layers.append(LayerAllocation(spec.name, w, a, pe, simd))
        a_in = a
    alloc = Allocation("pynq-z2", layers)
    model, expect, pr = _generic_graph(faircnn, alloc, cost)
    model = model.transform(SpecializeLayers(PART))
    # scramble the folding the graph was built with: the backend must derive it again
    for node in model.graph.node:
        inst = getCustomOp(node)
        for attr in ("SIMD", "PE"):
            if attr in inst.get_nodeattr_types() and node.op_type not in ("MVAU_hls", "MVAU_rtl"):
                inst.set_nodeattr(attr, 1)
    model, folding = fb.fold_layers(model, alloc, [s.name for s in faircnn.layers])
    cycles = model.analysis(exp_cycles_per_layer)
    res = model.analysis(lambda m: res_estimation(m, PART))
    for node, u in zip(model.graph.node, expect):
        inst = getCustomOp(node)
        for attr in ("SIMD", "PE", "parallel_window"):
            if attr in u["attrs"] and attr in inst.get_nodeattr_types():
                assert inst.get_nodeattr(attr) == u["attrs"][attr], (node.name, u["role"], attr)
        assert cycles[node.name] == u["cycles"]
        assert all(res[node.name][r] == u[r] for r in PRICED)
