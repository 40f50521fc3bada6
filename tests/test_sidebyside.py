"""`fqhw sidebyside`: every method at the same budget on the same data and seeds."""
from __future__ import annotations

import json

import pytest

from fqhw.cli import main
from fqhw.sidebyside import METHODS, _two_groups

from conftest import TINY

pytestmark = pytest.mark.slow


def test_methods_at_one_budget_and_resume(compiled, tmp_path, capsys):
    compiled_out, cache = compiled
    out = tmp_path / "sbs"
    methods = "uniform4,fairquantize,fq_qat,fq_baq,fqhw"
    args = ["sidebyside", "--out", str(out), "--cache-dir", str(cache), "--seeds", "0,1", "--methods", methods, "--baq-epochs", "1", *TINY]
    assert main(args) == 0
    res = json.loads((out / "sidebyside.json").read_text())
    assert (out / "sidebyside.png").stat().st_size > 10_000
    md = (out / "sidebyside.md").read_text()
    assert sorted((r["method"], r["seed"]) for r in res["runs"]) == sorted((m, s) for m in methods.split(",") for s in (0, 1))
    for r in res["runs"]:
        if r["method"] != "uniform4":
            assert r["avg_weight_bits"] <= 4.0 + 1e-12, r  # every method at the budget, BAQ included
        assert set(r["test"]) >= {"worst_group_acc", "mean_group_acc", "eopp1"} and set(r["val"]) >= {"worst_group_acc"}
    for m in methods.split(","):
        assert METHODS[m].label in md
        accs = [r["test"]["worst_group_acc"] for r in res["runs"] if r["method"] == m]
        assert res["summary"][m]["worst_group_acc"]["mean"] == pytest.approx(sum(accs) / len(accs))
    baq = [r for r in res["runs"] if r["method"] in ("fq_baq", "fqhw")]
    assert all(r["baq"]["projected"] == r["weight_bits"] for r in baq)
    # each BAQ run really starts from its warm start: fq_baq from FairQuant's quantile
    # allocation (fq_qat's, seed by seed), fqhw from the solver's (at seed 0 the compile's)
    for seed in (0, 1):
        run = {r["method"]: r for r in res["runs"] if r["seed"] == seed}
        assert run["fq_baq"]["baq"]["warm_start"] == run["fq_qat"]["weight_bits"]
    solver = json.loads((compiled_out / "allocation.json").read_text())
    fqhw0 = next(r for r in res["runs"] if r["method"] == "fqhw" and r["seed"] == 0)
    assert fqhw0["baq"]["warm_start"] == {la["name"]: la["weight_bits"] for la in solver["layers"]}

    # every test prediction is kept, and fqhw is compared with each other method on them
    n_test = res["runs"][0]["test"]["n"]
    assert all(len(r["test_pred"]) == n_test for r in res["runs"])
    assert res["reference"] == "fqhw" and sorted(res["comparisons"]) == ["fairquantize", "fq_baq", "fq_qat", "uniform4"]  # no fqhw_qat here
    assert sum(res["test_counts"].values()) == n_test
    fq_worst = [r["test"]["worst_group_acc"] for r in res["runs"] if r["method"] == "fqhw"]
    for m, c in res["comparisons"].items():
        assert c["worst_group_ref"] == pytest.approx(sum(fq_worst) / len(fq_worst))
        assert c["worst_group_method"] == pytest.approx(res["summary"][m]["worst_group_acc"]["mean"])
        assert c["diff_ci"][0] <= c["diff"] <= c["diff_ci"][1] and 0 <= c["p_mcnemar"] <= c["p_holm"] <= 1
    assert "Paired against" in md and set(res["group_ci"]) == set(methods.split(","))

    # a rerun reuses every (seed, method) result
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "sidebyside.json").read_text())
    assert again["runs"] == res["runs"]


def test_unknown_method_is_one_line(tmp_path, capsys):
    rc = main(["sidebyside", "--out", str(tmp_path / "x"), "--methods", "uniform8,gptq", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "unknown method(s) gptq: known methods are uniform8" in err[0]
    assert not (tmp_path / "x").exists()


def test_two_groups_merges_by_order():
    from fqhw.data.registry import load_data
    from fqhw.data.synthetic import SyntheticDermConfig

    splits = load_data("builtin", image_size=16, seed=0, builtin=SyntheticDermConfig(n_train=60, n_val=300, n_test=30, image_size=16))
    two = _two_groups(splits.val)
    assert two.num_groups == 2 and two.group_names[0].startswith("FST-I")
    half = (splits.val.num_groups + 1) // 2
    assert ((splits.val.groups >= half) == (two.groups == 1)).all()
