"""Resumable runs: each step's output is keyed by its inputs; a rerun reuses finished steps,
a changed input reruns only what depends on it, and a killed run leaves nothing half-written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fqhw.cli import main
from fqhw.stepcache import StepCache

from conftest import TINY

pytestmark = pytest.mark.slow


def _compile(out: Path, cache: Path, *extra: str) -> dict:
    assert main(["compile", "--out", str(out), "--cache-dir", str(cache), *TINY, *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _reused(report: dict) -> dict[str, bool]:
    return {name: st["reused"] for name, st in report["steps"].items()}


def test_rerun_reuses_every_finished_step(compiled, tmp_path):
    out0, cache = compiled
    rep = _compile(tmp_path / "again", cache)
    assert _reused(rep) == {
        "data": False, "float_model": True, "importance": True, "allocate": True, "baselines": True,
        "quantize": True, "export": True, "finn": True, "verify": False,  # the check always runs
    }
    # reused outputs are the same outputs, and the build they make is still bit-exact
    for name in ("allocation.json", "model.qonnx.onnx", "sensitivity.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out0 / name).read_bytes(), name
    first = json.loads((out0 / "report.json").read_text())
    assert rep["accuracy"] == first["accuracy"] and rep["bit_exact"]["ok"] is True
    assert "| quantize |" in (tmp_path / "again" / "report.md").read_text()


def test_changed_input_reruns_only_its_dependents(compiled, tmp_path):
    _, cache = compiled
    rep = _compile(tmp_path / "b5", cache, "--budget", "5")
    r = _reused(rep)
    assert r["float_model"] and r["importance"] and r["baselines"]  # the budget does not reach them
    assert not r["allocate"] and not r["export"] and not r["finn"]
    assert rep["allocation"]["avg_weight_bits"] > 4.0

    rep = _compile(tmp_path / "q2", cache, "--qat-epochs", "2")
    r = _reused(rep)
    assert r["float_model"] and r["importance"] and r["allocate"]  # QAT settings do not reach them
    assert not r["baselines"] and not r["quantize"]


def test_killed_run_leaves_no_partial_output_and_resumes(compiled, tmp_path):
    _, cache = compiled
    out = tmp_path / "killed"
    args = ["compile", "--out", str(out), "--cache-dir", str(cache), *[a for a in TINY if a != "--quiet"], "--fairness-lambda", "0.7"]
    proc = subprocess.Popen([sys.executable, "-m", "fqhw.cli", *args], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the step lines come before each step starts
            if "] quantize" in line:
                break
        else:
            pytest.fail("the run ended before its quantize step")
        proc.send_signal(signal.SIGKILL)  # no handler can run: what is on disk is what stays
    finally:
        proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".killed.partial-*"))  # SIGKILL left its staging folder ...

    rep = _compile(out, cache, "--fairness-lambda", "0.7")
    r = _reused(rep)
    assert r["baselines"] and r["allocate"]  # finished before the kill: not redone
    assert not r["quantize"]
    assert not list(tmp_path.glob(".killed.*"))  # ... which the next run removed
    assert not list((cache / "steps").glob("*/.*.tmp"))


def test_entry_is_whole_or_absent(tmp_path):
    cache = StepCache(tmp_path)

    def half_then_interrupt(value, folder):
        (folder / "a.txt").write_text(value)
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing the entry

    with pytest.raises(KeyboardInterrupt):
        cache.run("s", {"x": 1}, lambda: "v", half_then_interrupt, lambda f: (f / "a.txt").read_text())
    assert cache.get("s", cache.key("s", {"x": 1}), lambda f: (f / "a.txt").read_text()) is None
    assert not any((tmp_path / "steps" / "s").iterdir())

    def write(value, folder):
        (folder / "a.txt").write_text(value)

    got = cache.run("s", {"x": 1}, lambda: "v", write, lambda f: (f / "a.txt").read_text())
    assert (got.value, got.hit) == ("v", False)
    again = cache.run("s", {"x": 1}, lambda: pytest.fail("recomputed"), write, lambda f: (f / "a.txt").read_text())
    assert (again.value, again.hit) == ("v", True)
    assert cache.run("s", {"x": 2}, lambda: "w", write, lambda f: (f / "a.txt").read_text()).hit is False


def test_writer_killed_mid_entry_is_never_read(tmp_path):
    """A process SIGKILLed while filling an entry leaves only its temporary folder, which no
    reader trusts and the next writer removes."""
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from fqhw.stepcache import StepCache

        def write(value, folder):
            (folder / "a.txt").write_text(value)
            print("writing", flush=True)
            time.sleep(60)

        StepCache({str(tmp_path)!r}).run("s", {{"x": 1}}, lambda: "v", write, lambda f: None)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    folder = tmp_path / "steps" / "s"
    assert [p.name.endswith(".tmp") for p in folder.iterdir()] == [True]
    cache = StepCache(tmp_path)
    key = cache.key("s", {"x": 1})
    assert not cache.has("s", key) and cache.get("s", key, lambda f: (f / "a.txt").read_text()) is None
    got = cache.run("s", {"x": 1}, lambda: "fresh", lambda v, f: (f / "a.txt").write_text(v), lambda f: (f / "a.txt").read_text())
    assert got.value == "fresh" and [p.name for p in folder.iterdir()] == [key]


def test_unreadable_entry_is_recomputed(tmp_path):
    cache = StepCache(tmp_path)
    write = lambda v, f: (f / "v.json").write_text(json.dumps(v))  # noqa: E731
    load = lambda f: json.loads((f / "v.json").read_text())  # noqa: E731
    cache.run("s", {}, lambda: {"a": 1}, write, load)
    (cache.entry("s", cache.key("s", {})) / "v.json").write_text("{trunc")
    got = cache.run("s", {}, lambda: {"a": 2}, write, load)
    assert (got.value, got.hit) == ({"a": 2}, False)
    assert cache.run("s", {}, lambda: time.sleep(99), write, load).value == {"a": 2}


def test_writes_only_to_the_output_and_cache_folders(compiled, tmp_path):
    """Everything a compile writes (FINN's build files, the browser for the screenshot,
    temporary files) lands in --out or --cache-dir: HOME and TMPDIR are left as they were."""
    _, cache = compiled
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_CONFIG_HOME": str(home / ".config")}
    env.pop("MPLCONFIGDIR", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fqhw.cli", "compile", "--out", str(out), "--cache-dir", str(cache), *TINY, "--budget", "4.5"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.json").is_file()
    from fqhw.report.screenshot import find_chromium

    if find_chromium() is not None:  # the browser ran in that environment too
        assert (out / "report.png").is_file(), proc.stderr
    left = sorted(str(p.relative_to(tmp_path)) for d in (home, tmp) for p in d.rglob("*"))
    assert left == [], left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "out", "tmp"]
