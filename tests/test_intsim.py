"""The fast integer simulator against FINN's and qonnx's execution of the same build."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fqhw.backends.finn_build import FinnBuild, finn_integer_trace
from fqhw.backends.intsim import IntegerSimulator
from fqhw.backends.qonnx_export import qonnx_integer_trace
from fqhw.backends.verify import check_bit_exact
from fqhw.data.dataset import INPUT_SCALE
from fqhw.simulate import simulate, build_test_data


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
