"""The fast integer simulator against FINN's and qonnx's execution of the same build."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fqhw.backends.finn.common import FinnBuild
from fqhw.backends.finn.execute import finn_integer_trace
from fqhw.backends.intsim import IntegerSimulator
from fqhw.backends.intsim.dataflow import node_fn
from fqhw.backends.intsim.kernels import ThresholdTable, carrier, im2col, int_thresholds, threshold_reference, window_reduce
from fqhw.backends.qonnx_export import qonnx_integer_trace
from fqhw.backends.verify import check_bit_exact
from fqhw.data.dataset import INPUT_SCALE
from fqhw.simulate import simulate, build_test_data


# ---------------------------------------------------------------- the fast paths against plain loops


def _count_reached(acc, thr, act_val):
    """The definition, by brute force: act_val + #{t in thr[c] : acc[..., c] >= t}."""
    return act_val + (acc[..., None] >= thr).sum(axis=-1)


def _jittered_thresholds(rng, ch, n_thr, lo, hi, dup_frac=0.1):
    """Thresholds as FINN's are: a per-channel arithmetic run ceil'd (gaps differ by 1), some
    channels' runs partly outside [lo, hi], some values repeated, some +-inf."""
    t = np.empty((ch, n_thr), dtype=np.float64)
    for c in range(ch):
        step = rng.uniform(0.3, max(0.31, 2.5 * (hi - lo) / n_thr))
        start = rng.uniform(lo - 0.3 * (hi - lo), hi - 0.5 * (hi - lo))
        t[c] = start + step * np.arange(n_thr)
    dup = rng.random(t.shape) < dup_frac
    dup[:, 0] = False
    for c, i in zip(*np.nonzero(dup)):  # a repeated value: the previous threshold again
        t[c, i] = t[c, i - 1]
    t[rng.random(t.shape) < 0.01] = np.inf
    t[rng.random(t.shape) < 0.01] = -np.inf
    return t


def _accumulators(rng, thr_int, lo, hi, rows, ch):
    """Random accumulators in [lo, hi], with every threshold, its neighbours and both ends."""
    acc = rng.integers(lo, hi + 1, size=(rows, ch), dtype=np.int64)
    edge = np.concatenate([thr_int, thr_int - 1, thr_int + 1], axis=1).T  # (3T, ch)
    edge = np.clip(edge, lo, hi)
    ends = np.array([[lo] * ch, [hi] * ch], dtype=np.int64)
    return np.concatenate([acc, edge, ends], axis=0)


@pytest.mark.parametrize(
    "seed, ch, n_thr, lo, hi, act_val",
    [
        (0, 1, 1, -5, 5, 0),
        (1, 3, 3, 0, 1000, 0),
        (2, 16, 255, -212_909, 285_684, 0),  # like the first layer of the benchmark model
        (3, 64, 255, -2_476, 10_588, 0),
        (4, 300, 15, -40, 40, -8),  # many channels, signed codes, gaps of 1 (k = 0)
        (5, 32, 255, -(2**23), 2**23, 3),
        (6, 8, 63, -(2**40), 2**40, 0),  # float64 accumulators
    ],
)
def test_threshold_table_equals_per_channel_binary_search(seed, ch, n_thr, lo, hi, act_val):
    rng = np.random.default_rng(seed)
    thr = int_thresholds(_jittered_thresholds(rng, ch, n_thr, lo, hi), ch, "test")
    acc = _accumulators(rng, thr, lo, hi, 2000, ch)
    dt = carrier(max(abs(lo), abs(hi)))
    ref = threshold_reference(acc, thr, act_val)
    np.testing.assert_array_equal(ref, _count_reached(acc, thr, act_val))
    table = ThresholdTable(thr, act_val, lo, hi, dt, np.float32)
    assert table.mode == "bucket"
    got = table.apply(acc.astype(dt))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.astype(np.int64), ref)
    # per-channel intervals (as an MVAU has), and writing into a given array
    clo = np.minimum(acc.min(axis=0), rng.integers(lo, hi + 1, ch))
    chi = np.maximum(acc.max(axis=0), clo)
    out = np.empty(acc.shape, dtype=np.float32)
    ThresholdTable(thr, act_val, clo, chi, dt, np.float32).apply(acc.astype(dt), out=out)
    np.testing.assert_array_equal(out.astype(np.int64), ref)


def test_threshold_table_with_duplicates_unreachable_and_accumulators_on_thresholds():
    thr = np.array([
        [-7, -7, -7, 0, 0, 3, 3, 3, 3, 9],       # repeated values, and values at both ends
        [-100, -50, 1, 2, 3, 4, 5, 6, 7, 200],  # outside the interval on both sides
        [-(2**62)] * 5 + [2**62] * 5,            # +-inf: always / never reached
        [4] * 10,                                # one value ten times
    ], dtype=np.int64)
    acc = np.repeat(np.arange(-9, 11, dtype=np.int64)[:, None], 4, axis=1)
    for act_val in (0, -4, 2):
        ref = _count_reached(acc, thr, act_val)
        np.testing.assert_array_equal(threshold_reference(acc, thr, act_val), ref)
        table = ThresholdTable(thr, act_val, -9, 10, np.float32, np.float32)
        assert table.mode == "bucket"
        np.testing.assert_array_equal(table.apply(acc.astype(np.float32)).astype(np.int64), ref)


def test_threshold_table_falls_back_where_buckets_would_not_pay_or_not_be_exact():
    rng = np.random.default_rng(7)
    # one gap of 1 in a span of 10^7: the buckets would number 10^7 per channel
    thr = np.sort(np.concatenate([[0, 1], rng.integers(-(10**7), 10**7, 30)]))[None, :].repeat(4, 0)
    acc = _accumulators(rng, thr, -(10**7), 10**7, 500, 4)
    table = ThresholdTable(thr, 0, -(10**7), 10**7, np.float32, np.float32)
    assert table.mode == "reference"
    np.testing.assert_array_equal(table.apply(acc.astype(np.float32)).astype(np.int64), _count_reached(acc, thr, 0))
    # accumulators beyond float64's exact integers: int64 and the binary search
    big = 2**60
    thr = np.sort(rng.integers(-big, big, (3, 20)), axis=1)
    acc = _accumulators(rng, thr, -big, big, 500, 3)
    table = ThresholdTable(thr, 1, -big, big, np.int64, np.float32)
    assert table.mode == "reference"
    np.testing.assert_array_equal(table.apply(acc).astype(np.int64), _count_reached(acc, thr, 1))
    # float32 accumulators whose bucket arithmetic needs more than 24 bits: float64
    thr = np.sort(rng.integers(2**23, 2**24 - 1, (2, 40)), axis=1)
    table = ThresholdTable(thr, 0, -(2**24) + 1, 2**24 - 1, np.float32, np.float32)
    assert table.mode == "bucket" and table.dtype is np.float64
    acc = _accumulators(rng, thr, -(2**24) + 1, 2**24 - 1, 500, 2)
    np.testing.assert_array_equal(table.apply(acc.astype(np.float32)).astype(np.int64), _count_reached(acc, thr, 0))


def test_carrier_holds_its_integers_exactly():
    assert carrier(2**24 - 1) is np.float32 and carrier(2**24) is np.float64
    assert carrier(2**53 - 1) is np.float64 and carrier(2**53) is np.int64
    v = np.array([2**24 - 1, -(2**24) + 1], dtype=np.int64)
    assert np.array_equal(v.astype(np.float32).astype(np.int64), v)


def _im2col_loop(x, k, s, d):
    n, h, w, c = x.shape
    oh = (h - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (w - d[1] * (k[1] - 1) - 1) // s[1] + 1
    out = np.empty((n, oh, ow, k[0] * k[1] * c), dtype=x.dtype)
    for oy in range(oh):
        for ox in range(ow):
            cols = [x[:, oy * s[0] + ky * d[0], ox * s[1] + kx * d[1], :] for ky in range(k[0]) for kx in range(k[1])]
            out[:, oy, ox, :] = np.concatenate(cols, axis=-1)
    return out


@pytest.mark.parametrize("k, s, d, hw", [((3, 3), (1, 1), (1, 1), (7, 9)), ((2, 2), (2, 2), (1, 1), (8, 8)),
                                         ((3, 2), (2, 1), (2, 1), (9, 6)), ((1, 1), (1, 1), (1, 1), (4, 4)),
                                         ((5, 5), (1, 1), (1, 1), (5, 5)), ((3, 3), (3, 3), (2, 2), (11, 12))])
def test_im2col_and_fused_pools_equal_plain_loops(k, s, d, hw):
    rng = np.random.default_rng(sum(k) + sum(s))
    x = rng.integers(-50, 256, size=(3, *hw, 5)).astype(np.float32)
    cols = im2col(x, k, s, d)
    np.testing.assert_array_equal(cols, _im2col_loop(x, k, s, d))
    win = cols.reshape(*cols.shape[:3], k[0] * k[1], 5)
    np.testing.assert_array_equal(window_reduce(x, k, s, d, "MaxPool", np.float32), win.max(axis=3))
    np.testing.assert_array_equal(window_reduce(x, k, s, d, "AccPool", np.float64), win.sum(axis=3, dtype=np.float64))
    # a strided (non-contiguous) input gives the same columns
    xs = np.concatenate([x, x], axis=-1)[..., ::2]
    np.testing.assert_array_equal(im2col(xs, k, s, d), _im2col_loop(xs, k, s, d))


def _one_mvau(w, thr=None, act_val=0):
    """A dataflow graph holding one MVAU_hls node (qonnx ModelWrapper) and that node."""
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper

    mw, mh = w.shape
    inputs = ["x", "w"] + ([] if thr is None else ["t"])
    node = helper.make_node(
        "MVAU_hls", inputs, ["y"], domain="finn.custom_op.fpgadataflow.hls", name="MVAU_hls_0",
        backend="fpgadataflow", MW=mw, MH=mh, SIMD=1, PE=1, ActVal=act_val, noActivation=int(thr is None),
        binaryXnorMode=0, inputDataType="INT32", weightDataType="INT32", outputDataType="INT32", numInputVectors=[1],
    )
    graph = helper.make_graph(
        [node], "one_mvau",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, mw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, mh])],
    )
    m = ModelWrapper(helper.make_model(graph))
    m.set_initializer("w", w.astype(np.float64))
    if thr is not None:
        m.set_initializer("t", thr.astype(np.float64))
    return m, m.graph.node[0]


@pytest.mark.parametrize(
    "wmax, mw, xlo, xhi, gemm",
    [
        (127, 27, 0, 255, np.float32),
        (2**20, 16, 0, 1, np.float32),        # column sums up to 2^24 - 16: still float32
        (2**20, 16, -1, 1, np.float32),
        (2**21, 16, 0, 1, np.float64),        # column sums up to 2^25: float64
        (2**30, 64, -128, 127, np.float64),
        (2**50, 16, 0, 255, np.int64),        # beyond 2^53: int64
    ],
)
@pytest.mark.parametrize("with_thresholds", [False, True])
def test_mvau_is_exact_in_the_type_it_picks(wmax, mw, xlo, xhi, gemm, with_thresholds):
    rng = np.random.default_rng(mw + xhi)
    mh = 6
    w = rng.integers(-wmax + 1, wmax, size=(mw, mh), dtype=np.int64)
    w[:, 0] = wmax - 1  # one column at the largest sum
    x = rng.integers(xlo, xhi + 1, size=(300, mw), dtype=np.int64)
    x[0], x[1] = xhi, xlo
    acc = x @ w  # exact: |every partial sum| < 2^63
    thr = None
    if with_thresholds:
        lo, hi = int(acc.min()), int(acc.max())
        thr = np.sort(rng.integers(lo, hi + 1, size=(mh, 7)), axis=1).astype(np.float64)
        thr[:, 3] = thr[:, 2]  # a repeated threshold
    m, node = _one_mvau(w, thr, act_val=-2 if with_thresholds else 0)
    fn, key, iv, dt = node_fn(m, node, {}, (xlo, xhi), carrier(max(abs(xlo), abs(xhi))))
    expect = acc if thr is None else threshold_reference(acc, int_thresholds(thr, mh, "t"), -2)
    got = fn(x.astype(carrier(max(abs(xlo), abs(xhi)))))
    assert got.dtype == (gemm if thr is None else np.float32)
    assert dt is got.dtype.type
    np.testing.assert_array_equal(got.astype(np.int64), expect)
    assert iv[0] <= expect.min() and expect.max() <= iv[1]


@pytest.fixture(scope="module")
def test_data(compiled):
    out, _ = compiled
    return build_test_data(out)


def test_simulator_matches_finn_and_qonnx_on_all_test_images(compiled, test_data):
    out, _ = compiled
    sim = IntegerSimulator.from_build(out)
    # small batches: the batching must not change a single integer
    res = sim.run(test_data.images, batch_size=37)
    x = test_data.images.astype(np.float64) * INPUT_SCALE
    traces = {
        "intsim": {k: v for k, v in res.items() if k != "logits"},
        "finn": finn_integer_trace(FinnBuild.load(out / "finn"), x),
        "qonnx": qonnx_integer_trace(out / "model.qonnx.onnx", x),
    }
    for k, v in traces["intsim"].items():
        assert v.dtype == np.int64, k
    assert set(traces["intsim"]) == set(traces["finn"]) and "head.acc" in traces["intsim"]
    r = check_bit_exact(traces)
    assert r.ok, r.first_mismatch
    assert r.n_images == len(test_data)
    np.testing.assert_array_equal(traces["intsim"]["input"], test_data.images.astype(np.int64))
    assert res["logits"].shape == (len(test_data), test_data.num_classes)
    # trace=False: only the head accumulator and the logits, the same numbers
    lean = sim.run(test_data.images, batch_size=1000, trace=False)
    assert set(lean) == {"head.acc", "logits"}
    for k, v in lean.items():
        np.testing.assert_array_equal(v, res[k])


def test_simulate_accuracy_equals_the_reports_compiled_model(compiled, test_data):
    """The report's "compiled" accuracy is the float32 Brevitas model on the same test split.
    Its activation codes equal the integer ones (the compile's bit-exact check; the
    quantizer boundaries are snapped away from float rounding), so its logits are the head
    accumulator times the same scales up to float32 rounding: a prediction may only differ
    where the two largest logits are that close. Such near-ties bound the allowed
    difference (none occur here in practice, and then the accuracies must be equal)."""
    out, _ = compiled
    res = simulate(out, test_data, cross_check=16)
    assert res.bitexact is not None and res.bitexact.ok, res.bitexact.first_mismatch
    assert res.cross_check_backends == ["intsim", "finn", "qonnx"]
    report = json.loads((out / "report.json").read_text())
    ref = report["accuracy"]["compiled"]
    logits = IntegerSimulator.from_build(out).run(test_data.images)["logits"]
    top2 = np.sort(logits, axis=1)[:, -2:]
    near_ties = int((top2[:, 1] - top2[:, 0] <= 1e-5 * np.abs(top2).max(axis=1)).sum())
    n = len(test_data)
    assert res.metrics["n"] == ref["n"] == n
    assert abs(res.metrics["overall_acc"] - ref["overall_acc"]) * n <= near_ties + 1e-9
    if near_ties == 0:
        assert res.metrics["overall_acc"] == ref["overall_acc"]
        assert res.metrics["group_acc"] == ref["group_acc"]
        assert res.metrics["worst_group_acc"] == ref["worst_group_acc"]


def test_changed_weight_in_dataflow_graph_fails_cross_check(compiled, test_data, tmp_path):
    from qonnx.core.modelwrapper import ModelWrapper

    out, _ = compiled
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "manifest.json").unlink()  # else simulate refuses the edited folder before the cross-check (test_hostile)
    build = FinnBuild.load(copy / "finn")
    df = ModelWrapper(build.dataflow_model)
    head = next(n for n in df.graph.node if n.name == build.mvau_of_layer["head"])
    w = df.get_initializer(head.input[1]).copy()
    # one weight of the head, on the input that is largest over the checked images
    sim = IntegerSimulator.from_build(copy)
    acts = [k for k in sim.run(test_data.images[:16]) if k.endswith(".act")]
    last = sim.run(test_data.images[:16])[acts[-1]]
    i = int(last.max(axis=(2, 3)).sum(axis=0).argmax()) if last.shape[1] == w.shape[0] else 0
    w[i, 0] += 1
    df.set_initializer(head.input[1], w)
    df.save(build.dataflow_model)

    res = simulate(copy, test_data, cross_check=16)
    assert not res.bitexact.ok
    assert res.bitexact.first_mismatching_key == "head.acc"
    # the simulator reads the graph, not the Brevitas model: it agrees with FINN's execution
    assert res.bitexact.mismatches["head.acc"]["intsim vs finn"] == 0
    assert res.bitexact.mismatches["head.acc"]["intsim vs qonnx"] > 0


# ---------------------------------------------------------------- the power-of-two QONNX route


def test_po2_rescale_rounds_half_to_even_exactly_in_every_carrier():
    """Quant of an accumulator to a coarser power-of-two grid: the float path (rint of
    acc * 2^-d), the int64 path and the Python-integer bound agree with exact rational
    rounding half to even, ties included, and clip to the code range (ReLU folded in)."""
    from fractions import Fraction

    from fqhw.backends.intsim.po2 import _Dyadic, _requant_fn, _shift_round, _shift_round_int64

    def exact(v, d):
        f = Fraction(v, 1) / Fraction(2) ** d if d > 0 else Fraction(v * 2 ** (-d))
        return round(f)  # Python's round of a Fraction: half to even

    rng = np.random.default_rng(0)
    for d in (-2, 0, 1, 3, 8):
        vals = np.concatenate([rng.integers(-5000, 5000, 400), np.arange(-40, 41)])
        if d > 0:  # every tie k + 1/2 near zero
            vals = np.concatenate([vals, (2 * np.arange(-20, 21) + 1) << (d - 1)])
        ref = np.array([exact(int(v), d) for v in vals])
        np.testing.assert_array_equal([_shift_round(int(v), d) for v in vals], ref)
        np.testing.assert_array_equal(_shift_round_int64(vals.astype(np.int64), d), ref)
        for kind in (np.float32, np.float64, np.int64):
            x = _Dyadic("t", -8, (int(vals.min()), int(vals.max())), kind, (len(vals),), "flat", relu=True)
            fn, iv, dt = _requant_fn(x, {"exp": -8 + d, "lo": -7, "hi": 6}, "test")
            got = fn(vals.astype(kind)).astype(np.int64)
            np.testing.assert_array_equal(got, np.clip(ref, 0, 6), err_msg=f"d={d} {kind}")
            assert iv[0] <= got.min() and got.max() <= iv[1]
