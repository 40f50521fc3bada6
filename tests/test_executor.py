"""fqhw.executor: a sweep's jobs in this process, in a process pool (--jobs N) or on Ray give
the same results, and the step cache stays the one store of them (a rerun after a lost job
reuses every finished (seed, method) record)."""
from __future__ import annotations

import json
import operator
import shutil

import pytest

from fqhw.cli import main
from fqhw.errors import FqhwError
from fqhw.executor import Executor, ray_available

from conftest import TINY

SWEEP = ["--seeds", "0,1", "--methods", "uniform4,fq_qat,fq_baq,fqhw_qat", "--baq-epochs", "1", "--no-tune"]


def _run(tmp, name, *extra, cache=None):
    out, cache = tmp / name / "out", cache or tmp / name / "cache"
    assert main(["sidebyside", "--out", str(out), "--cache-dir", str(cache), *SWEEP, *TINY, *extra]) == 0
    return json.loads((out / "sidebyside.json").read_text()), (out / "sidebyside.md").read_text(), cache


def _results(res: dict) -> dict:
    """Everything but the clocks (each record's seconds, the wall time) and the output folder."""
    runs = [{k: v for k, v in r.items() if k != "seconds"} for r in res["runs"]]
    return {**{k: v for k, v in res.items() if k not in ("runs", "wall_time_s", "out_dir")}, "runs": runs}


def _table(md: str) -> str:
    return "\n".join(line for line in md.splitlines() if "Wall time" not in line)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same small sweep from empty caches: one job at a time in this process, and two
    worker processes."""
    tmp = tmp_path_factory.mktemp("executor")
    return tmp, _run(tmp, "jobs1"), _run(tmp, "jobs2", "--jobs", "2")


@pytest.mark.slow
def test_jobs_2_gives_the_numbers_of_jobs_1(one_and_two):
    _tmp, (res1, md1, _), (res2, md2, _) = one_and_two
    assert sorted((r["seed"], r["method"]) for r in res2["runs"]) == sorted((s, m) for s in (0, 1) for m in SWEEP[3].split(","))
    assert [(r["seed"], r["method"]) for r in res2["runs"]] == [(r["seed"], r["method"]) for r in res1["runs"]]  # same order
    assert _results(res2) == _results(res1)  # every prediction, metric, allocation, comparison
    assert _table(md2) == _table(md1)


@pytest.mark.slow
def test_rerun_after_a_lost_job_reuses_finished_records(one_and_two):
    tmp, _, (res2, _md, cache) = one_and_two
    # a job lost before it stored seed 1's fq_baq: remove that one entry
    entries = [p for p in (cache / "steps" / "sidebyside").iterdir() if p.is_dir() and not p.name.startswith(".")]
    lost = next(p for p in entries if (r := json.loads((p / "run.json").read_text()))["seed"] == 1 and r["method"] == "fq_baq")
    shutil.rmtree(lost)
    again, _md, _ = _run(tmp, "again", "--jobs", "2", cache=cache)
    for old, new in zip(res2["runs"], again["runs"]):
        if (new["seed"], new["method"]) == (1, "fq_baq"):  # recomputed, to the same numbers
            assert {k: v for k, v in new.items() if k != "seconds"} == {k: v for k, v in old.items() if k != "seconds"}
        else:  # reused as stored (its clock too)
            assert new == old
    assert lost.is_dir()


@pytest.mark.slow
@pytest.mark.skipif(not ray_available(), reason="ray is not installed (pip install -e '.[ray]')")
def test_ray_gives_the_process_pools_table(one_and_two):
    import ray

    tmp, _, (res2, md2, _) = one_and_two
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        res, md, _ = _run(tmp, "ray", "--executor", "ray")
    finally:
        ray.shutdown()
    assert _results(res) == _results(res2)
    assert _table(md) == _table(md2)


def test_pool_keeps_job_order():
    assert Executor(jobs=2).map(operator.neg, [3, 1, 2]) == [-3, -1, -2]
    assert Executor().map(operator.neg, []) == []


@pytest.mark.parametrize("kw, needle", [
    ({"jobs": 0}, "--jobs must be at least 1"),
    ({"threads_per_job": 0}, "--threads-per-job must be at least 1"),
    ({"ray_address": "10.0.0.1:6379"}, "--ray-address needs --executor ray"),
    ({"kind": "dask"}, "unknown --executor dask"),
])
def test_bad_settings_are_refused(kw, needle):
    with pytest.raises(FqhwError, match=needle):
        Executor(**kw)


@pytest.mark.parametrize("cmd", ["sidebyside", "compare"])
@pytest.mark.parametrize("flags, needle", [
    (["--ray-address", "10.0.0.1:6379"], "--ray-address needs --executor ray"),
    (["--jobs", "0"], "--jobs must be at least 1"),
])
def test_cli_refuses_bad_executor_flags_before_any_work(tmp_path, capsys, cmd, flags, needle):
    tiny = [a for i, a in enumerate(TINY) if "--qat-epochs" not in TINY[max(i - 1, 0):i + 1]]  # compare trains no QAT
    extra = ["--targets", "bitfusion", "--budgets", "3,4"] if cmd == "compare" else []
    rc = main([cmd, "--out", str(tmp_path / "x"), "--cache-dir", str(tmp_path / "cache"), *extra, *flags, *(tiny if cmd == "compare" else TINY)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "cache").exists()


def test_compare_budgets_on_two_jobs_gives_the_same_front():
    """`fqhw compare --budgets`: one job per budget; every solve here ends OPTIMAL (no time
    limit reached), so the front is the same on one process or two."""
    from fqhw.compare import compare
    from fqhw.models.cnn import FairCNN
    from fqhw.network import network_spec

    from conftest import sensitivity

    net = network_spec(FairCNN(), (3, 32, 32), name="fqcnn")
    sens = sensitivity(net)
    one = compare(net, sens, ["bitfusion"], budgets=[1.5, 3, 4, 5], time_limit_s=10)
    two = compare(net, sens, ["bitfusion"], budgets=[1.5, 3, 4, 5], time_limit_s=10, executor=Executor(jobs=2))
    assert [p["budget"] for p in two.front] == [1.5, 3, 4, 5] and not two.front[0]["feasible"]
    assert all(p["allocation"]["solver"]["status"] == "OPTIMAL" for p in one.front[1:])
    strip = lambda p: {k: v for k, v in p.items() if k != "allocation"} | (  # noqa: E731
        {"layers": p["allocation"]["layers"]} if "allocation" in p else {})
    assert [strip(p) for p in two.front] == [strip(p) for p in one.front]
