"""`fqhw sidebyside` with tuning: each method's start, each QAT candidate of the grid and the
record are jobs of the executor and step-cache entries of their own. The records equal the
one-job path's (run_method, which tunes with fqhw.quant.qat.tune), `--jobs 2` gives the
numbers of `--jobs 1`, and a rerun recomputes only a lost candidate."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import fqhw.quant.qat as qat
from fqhw.cli import main
from fqhw.cliargs import compile_config
from fqhw.flow import cached_importance
from fqhw.sidebyside import METHODS, SideBySideConfig, seed_state, run_method
from fqhw.stepcache import StepCache

from conftest import TINY

METHODS_RUN = "uniform4,fq_qat,fq_baq,fqhw_qat"  # uniform, quantile, BAQ (learned float weights), solver
SWEEP = ["--seeds", "0", "--methods", METHODS_RUN, "--baq-epochs", "1", *TINY, "--qat-epochs", "2"]


def _run(tmp, name, *extra, cache=None):
    out, cache = tmp / name / "out", cache or tmp / name / "cache"
    assert main(["sidebyside", "--out", str(out), "--cache-dir", str(cache), *SWEEP, *extra]) == 0
    return json.loads((out / "sidebyside.json").read_text()), cache


def _no_clock(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "seconds"}


def _entries(cache, step):
    root = cache / "steps" / step
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    return tmp, _run(tmp, "jobs1")


@pytest.mark.slow
def test_every_start_and_candidate_is_an_entry_of_its_own(tuned):
    _tmp, (res, cache) = tuned
    grid = len(qat.DEFAULT_GRID)
    assert len(_entries(cache, "sidebyside_start")) == 4 and len(_entries(cache, "sidebyside_qat")) == 4 * grid
    assert len(_entries(cache, "sidebyside")) == 4
    picked = {r["method"]: (r["qat_selected"]["fairness_lambda"], r["qat_selected"]["lr"]) for r in res["runs"]}
    assert all(p in qat.DEFAULT_GRID for p in picked.values())


@pytest.mark.slow
def test_the_staged_records_equal_the_one_job_tune(tuned, monkeypatch):
    """run_method tunes in one process with qat.tune (calibrate once, each candidate from
    that state); the staged path calibrates per candidate job and chooses afterwards."""
    tmp, (res, cache) = tuned
    args = _parser_args(["sidebyside", "--out", str(tmp / "x"), "--cache-dir", str(cache), *SWEEP])
    cfg = dataclasses.replace(compile_config(args), seed=0)
    sc = SideBySideConfig(compile=cfg, seeds=(0,), methods=tuple(METHODS_RUN.split(",")), baq_epochs=1)
    splits, fm, _ = seed_state(cfg)
    sens = cached_importance(cfg, fm, splits, StepCache(cfg.cache_dir))
    found: dict = {}
    staged = {r["method"]: r for r in res["runs"]}
    tuned_in_one = 0
    real_tune = qat.tune

    def counted(*a, **k):
        nonlocal tuned_in_one
        tuned_in_one += 1
        return real_tune(*a, **k)

    monkeypatch.setattr(qat, "tune", counted)
    for name in METHODS_RUN.split(","):  # warm start (fq_baq from fq_qat) through `found`, as in one process
        rec = run_method(cfg, METHODS[name], fm, splits, sens if METHODS[name].allocator == "solver" else None, sc, found)
        assert _no_clock(rec) == _no_clock(staged[name]), name
    assert tuned_in_one == 4


@pytest.mark.slow
def test_jobs_2_tunes_to_the_numbers_of_jobs_1_and_a_rerun_recomputes_only_what_was_lost(tuned, monkeypatch):
    tmp, (res1, _cache1) = tuned
    res2, cache2 = _run(tmp, "jobs2", "--jobs", "2")
    assert [_no_clock(r) for r in res2["runs"]] == [_no_clock(r) for r in res1["runs"]]
    assert res2["comparisons"] == res1["comparisons"] and res2["summary"] == res1["summary"]
    # lose fqhw_qat's record and one of its candidates: the rerun computes that candidate alone
    rec = next(p for p in _entries(cache2, "sidebyside") if json.loads((p / "run.json").read_text())["method"] == "fqhw_qat")
    shutil.rmtree(rec)
    cand = next(p for p in _entries(cache2, "sidebyside_qat") if json.loads((p / "inputs.json").read_text())["inputs"]["method"]["name"] == "fqhw_qat")
    shutil.rmtree(cand)
    runs = []
    real = qat.finetune
    monkeypatch.setattr(qat, "finetune", lambda *a, **k: runs.append(k.get("lr")) or real(*a, **k))
    again, _ = _run(tmp, "again", cache=cache2)
    assert len(runs) == 1
    assert [_no_clock(r) for r in again["runs"]] == [_no_clock(r) for r in res1["runs"]]


def _parser_args(argv):
    from fqhw.cli import build_parser

    return build_parser().parse_args(argv)
