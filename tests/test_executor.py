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


def test_cli_refuses_ray_address_without_ray(tmp_path, capsys):
    rc = main(["sidebyside", "--out", str(tmp_path / "x"), "--ray-address", "10.0.0.1:6379", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--ray-address needs --executor ray" in err[0]
    assert not (tmp_path / "x").exists()
