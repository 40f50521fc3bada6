"""Runs that are stopped, run twice at once, or pointed at places they may not write (issue
15): kill -9 during QAT, during the FINN build and in the middle of the output swap, then
the same command again, must give the uninterrupted run's report; two compiles on one
--cache-dir must both finish, one waiting for the other's step; Ctrl-C is one line and exit
130; an --out or a cache that cannot be used is one line with the previous output intact;
`fqhw simulate` refuses a build folder with a file missing, truncated or edited.

The faults are placed exactly, not by timing: a small driver (DRIVER below) runs the `fqhw`
command in a subprocess and kills itself at the chosen point (the first QAT optimizer step,
FINN's third saved model, between swap_in's two renames). The tiny compile of conftest's
`compiled` fixture is the reference; each test works on a copy of its cache with the steps
it reruns removed."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from fqhw.cli import main

from conftest import TINY

pytestmark = pytest.mark.slow

DRIVER = r'''
import os, signal, sys, time
import fqhw.flow as flow
from fqhw.cli import main

fault = os.environ.get("FQHW_FAULT", "")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def wrap(name, before=None, during=None):
    orig = getattr(flow, name)
    def step(*args):
        if before:
            before()
        if during:
            during()
        return orig(*args)
    setattr(flow, name, step)

if fault == "kill_in_qat":  # at QAT's first optimizer step
    from torch.optim.optimizer import register_optimizer_step_post_hook
    wrap("step_quantize", during=lambda: register_optimizer_step_post_hook(lambda *a: die()))
elif fault == "kill_in_finn":  # once FINN has saved three of its models
    from qonnx.core.modelwrapper import ModelWrapper
    def arm():
        save, n = ModelWrapper.save, [0]
        def counted(self, *a, **k):
            save(self, *a, **k)
            n[0] += 1
            if n[0] == 3:
                die()
        ModelWrapper.save = counted
    wrap("step_build", during=arm)
elif fault == "kill_in_swap":  # the old output moved aside, the new one not yet in place
    import fqhw.outputs as outputs
    replace = os.replace
    def half(src, dst):
        if ".partial-" in os.fspath(src):
            die()
        return replace(src, dst)
    outputs.os.replace = half
elif fault == "slow_qat":  # QAT that takes a few seconds: runs that start together meet in it
    wrap("step_quantize", before=lambda: (print("fqhw-test: in QAT", file=sys.stderr, flush=True), time.sleep(3)))
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


def start(driver, fault, args, **kw):
    env = {**os.environ, "FQHW_FAULT": fault}
    return subprocess.Popen([sys.executable, str(driver), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def compile_args(out, cache, *extra, quiet=True):
    return ["compile", "--out", str(out), "--cache-dir", str(cache), *[a for a in TINY if quiet or a != "--quiet"], *extra]


def cache_copy(cache: pathlib.Path, dst: pathlib.Path, without=()) -> pathlib.Path:
    """A copy of a step cache without the entries of the named steps (they will be rerun)."""
    shutil.copytree(cache / "steps", dst / "steps", ignore=lambda d, names: [n for n in names if pathlib.Path(d) == cache / "steps" and n in without])
    return dst


def comparable(report: dict) -> dict:
    """A report without what differs between equal runs: paths, step times and reuse, wall times."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k != "steps_s" and not any(w in k for w in ("wall", "seconds", "cache_hit"))}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    return strip({k: v for k, v in report.items() if k not in ("config", "steps", "timings_s")})


def report_of(out: pathlib.Path) -> dict:
    return json.loads((out / "report.json").read_text())


def assert_cache_whole(cache: pathlib.Path) -> None:
    """Every entry finished (inputs.json written last), no temporary entry left."""
    entries = [p for p in (cache / "steps").glob("*/*")]
    assert entries and all((p / "inputs.json").is_file() for p in entries if not p.name.startswith(".")), entries
    assert not list((cache / "steps").glob("*/.*.tmp"))


# ---------------------------------------------------------------- kill -9, then the same command


@pytest.mark.parametrize("fault, rerun", [("kill_in_qat", ("quantize", "export", "finn")), ("kill_in_finn", ("finn",))])
def test_killed_step_resumes_to_the_same_report(compiled, driver, tmp_path, fault, rerun):
    ref_out, ref_cache = compiled
    cache = cache_copy(ref_cache, tmp_path / "cache", without=rerun)
    out = tmp_path / "out"
    proc = start(driver, fault, compile_args(out, cache))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert not out.exists() and list(tmp_path.glob(".out.partial-*"))  # killed with its staging folder
    for step in rerun:
        assert not list((cache / "steps" / step).glob("[!.]*")), step  # the killed step stored nothing

    assert main(compile_args(out, cache)) == 0
    rep = report_of(out)
    assert comparable(rep) == comparable(report_of(ref_out))
    assert {s for s, st in rep["steps"].items() if not st["reused"]} == {"data", "verify", *rerun}
    assert not list(tmp_path.glob(".out.*"))  # the dead run's staging folder was removed
    assert_cache_whole(cache)


def test_kill_in_the_middle_of_the_output_swap(compiled, driver, tmp_path):
    """Killed between swap_in's two renames: no output folder at all for a moment, the old
    one and the finished new one hidden beside it. The next run finishes that swap first
    (never sweeping a finished output away), then writes the same report."""
    ref_out, ref_cache = compiled
    cache = cache_copy(ref_cache, tmp_path / "cache")
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    (out / "marker-of-the-old-output").write_text("old")
    proc = start(driver, "kill_in_swap", compile_args(out, cache))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert not out.exists()
    assert list(tmp_path.glob(".out.old-*")) and list(tmp_path.glob(".out.partial-*"))

    from fqhw.outputs import staging_folder

    shutil.rmtree(staging_folder(out))  # what the next run does first
    assert (out / "report.json").is_file() and not (out / "marker-of-the-old-output").exists()  # the killed run's new output
    assert comparable(report_of(out)) == comparable(report_of(ref_out))
    assert main(compile_args(out, cache)) == 0
    assert comparable(report_of(out)) == comparable(report_of(ref_out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]


# ---------------------------------------------------------------- two runs on one cache


def test_two_compiles_at_once_on_one_cache(compiled, driver, tmp_path):
    """Two runs of the same settings and one of other settings, started together: all
    finish; the same QAT step is computed once, the second run waiting for the first and
    reusing its entry; every output is whole and the cache holds only finished entries."""
    ref_out, ref_cache = compiled
    cache = cache_copy(ref_cache, tmp_path / "cache", without=("quantize", "export", "finn"))
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    procs = [start(driver, "slow_qat", compile_args(outs[0], cache)), start(driver, "slow_qat", compile_args(outs[1], cache)),
             start(driver, "slow_qat", compile_args(outs[2], cache, "--budget", "5"))]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    reps = [report_of(o) for o in outs]
    assert comparable(reps[0]) == comparable(reps[1]) == comparable(report_of(ref_out))
    computed = [not r["steps"]["quantize"]["reused"] for r in reps[:2]]
    assert sorted(computed) == [False, True], computed  # exactly one of the two ran QAT
    waiter = errs[computed.index(False)]
    assert "waiting for another fqhw run that is computing step quantize" in waiter, waiter
    assert waiter.count("fqhw-test: in QAT") == 0  # it never entered QAT: it reused the entry
    assert reps[2]["allocation"]["avg_weight_bits"] > 4.0 and reps[2]["bit_exact"]["ok"]
    for o in outs:
        assert (o / "manifest.json").is_file()
    assert_cache_whole(cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "cache"]


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_after_the_solver_is_one_line_and_exit_130(compiled, driver, tmp_path):
    """The solver runs first (a new budget), then Ctrl-C in QAT. CP-SAT used to leave SIGINT
    at its default action after a solve: the process died silently, its staging folder left."""
    _, ref_cache = compiled
    cache = cache_copy(ref_cache, tmp_path / "cache")
    out = tmp_path / "out"
    proc = start(driver, "slow_qat", compile_args(out, cache, "--budget", "4.5", "--fairness-lambda", "0.7", quiet=False))
    for line in proc.stderr:
        if "fqhw-test: in QAT" in line:
            break
    else:
        pytest.fail("the run ended before QAT")
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    lines = [ln for ln in rest.splitlines() if ln.strip()]
    assert proc.returncode == 130 and lines == ["fqhw: interrupted; no output was written"], (proc.returncode, rest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert_cache_whole(cache)


# ---------------------------------------------------------------- where it may not write


def _fails(capsys, args, *needles) -> str:
    rc = main(args)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc != 0 and len(lines) == 1, lines
    assert lines[0].startswith("fqhw: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _tree(folder: pathlib.Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("my notes")
    _fails(capsys, compile_args(tmp_path / "out", tmp_path / "cache"), "exists and is not a folder: choose another --out")
    assert (tmp_path / "out").read_text() == "my notes" and not (tmp_path / "cache").exists()


def test_out_is_a_symlink_to_a_folder_of_other_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (tmp_path / "out").symlink_to(mine, target_is_directory=True)
    _fails(capsys, compile_args(tmp_path / "out", tmp_path / "cache"), "is not empty and is not an fqhw output")
    assert _tree(mine) == {"thesis.tex": b"years of work"} and (tmp_path / "out").is_symlink()


def test_out_is_a_symlink_to_an_earlier_output(compiled, tmp_path):
    """The link is followed: the output it points to is replaced (beside it, on its file
    system), and the link stays a link."""
    ref_out, ref_cache = compiled
    target = tmp_path / "scratch" / "run"
    shutil.copytree(ref_out, target)
    (target / "stale").write_text("from before")
    (tmp_path / "out").symlink_to(target, target_is_directory=True)
    assert main(compile_args(tmp_path / "out", cache_copy(ref_cache, tmp_path / "cache"))) == 0
    assert (tmp_path / "out").is_symlink() and (tmp_path / "out").resolve() == target
    assert (target / "report.json").is_file() and not (target / "stale").exists()
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["run"]


def test_read_only_out_keeps_the_previous_output(compiled, tmp_path, monkeypatch, capsys):
    """Tests run as root, for whom chmod does not stop writes: the check is told the folder
    is not writable."""
    import fqhw.config

    ref_out, _ = compiled
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    before = _tree(out)
    real = os.access
    monkeypatch.setattr(fqhw.config.os, "access", lambda p, mode: False if pathlib.Path(p) == out else real(p, mode))
    _fails(capsys, compile_args(out, tmp_path / "cache"), f"output folder {out} cannot be written (no write permission)")
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_only_cache_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import fqhw.stepcache

    cache = tmp_path / "cache"
    cache.mkdir()
    real = os.access
    monkeypatch.setattr(fqhw.stepcache.os, "access", lambda p, mode: False if pathlib.Path(p) == cache else real(p, mode))
    _fails(capsys, compile_args(tmp_path / "out", cache), f"cache folder {cache} cannot be written", "--cache-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"] and not any(cache.iterdir())


def test_cache_on_a_read_only_file_system(compiled, tmp_path, monkeypatch, capsys):
    """The check passes, then the file system refuses (EROFS) the first step entry: one line
    naming --cache-dir, the previous output intact."""
    import tempfile

    import fqhw.stepcache

    ref_out, ref_cache = compiled
    cache = cache_copy(ref_cache, tmp_path / "cache", without=("quantize",))
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    before = _tree(out)

    real = tempfile.mkdtemp

    def mkdtemp(*a, dir=None, **k):
        if dir is not None and pathlib.Path(dir).is_relative_to(cache):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(fqhw.stepcache.tempfile, "mkdtemp", mkdtemp)
    _fails(capsys, compile_args(out, cache), "read-only file system writing ", "/steps/quantize: choose another --cache-dir")
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]


def test_disk_fills_while_storing_a_step(compiled, tmp_path, monkeypatch, capsys):
    ref_out, ref_cache = compiled
    cache = cache_copy(ref_cache, tmp_path / "cache", without=("quantize",))
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    before = _tree(out)
    real = pathlib.Path.write_text

    def write_text(self, *a, **k):
        if self.name == "inputs.json" and "quantize" in self.parts:  # the entry's last file
            real(self, "{", encoding="utf-8")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    _fails(capsys, compile_args(out, cache), "no space left on the device writing ", "free some space or choose another --cache-dir")
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]
    assert not list((cache / "steps" / "quantize").iterdir())  # no entry, not even a temporary one


# ---------------------------------------------------------------- simulate a damaged build


def _edit_a_weight(path: pathlib.Path) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 2 and numpy_helper.to_array(i).size > 20)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 1 if w.flat[0] < np.max(w) else -1
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, path)


@pytest.mark.parametrize("damage", ["missing", "truncated", "weight", "weight_and_no_qonnx", "config"])
def test_simulate_refuses_a_damaged_build(compiled, tmp_path, capsys, damage):
    """An edited dataflow graph with model.qonnx.onnx gone used to pass the cross-check (the
    simulator and FINN's execution read the same graph): a silent wrong accuracy."""
    ref_out, _ = compiled
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    graph = out / "finn" / "dataflow_model.onnx"
    if damage == "missing":
        graph.unlink()
        needle = f"{graph} is missing from the compile output folder"
    elif damage == "truncated":
        graph.write_bytes(graph.read_bytes()[:2000])
        needle = f"{graph} was changed or truncated after the compile"
    elif damage == "config":
        (out / "config.json").write_text("{")
        needle = "config.json "
    else:
        _edit_a_weight(graph)
        if damage == "weight_and_no_qonnx":
            (out / "model.qonnx.onnx").unlink()
        needle = f"{graph} was changed or truncated after the compile"
    line = _fails(capsys, ["simulate", str(out)], needle, "re-run fqhw compile")
    assert "Traceback" not in line
    assert capsys.readouterr().out == ""  # no accuracy printed


def test_simulate_without_manifest_still_refuses_unreadable_files(compiled, tmp_path, capsys):
    """A folder of an older fqhw (no manifest.json): a missing or truncated file is one line."""
    ref_out, _ = compiled
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    (out / "manifest.json").unlink()
    (out / "finn" / "finn_build.json").write_text('{"trunc')
    _fails(capsys, ["simulate", str(out)], f"the build in {out} cannot be read", "re-run fqhw compile")
    shutil.copy(ref_out / "finn" / "finn_build.json", out / "finn" / "finn_build.json")
    (out / "finn" / "dataflow_model.onnx").unlink()
    _fails(capsys, ["simulate", str(out)], f"the build in {out} cannot be read", "not found")


def test_simulate_refuses_data_of_other_classes(compiled, tmp_path, capsys):
    """Data with as many classes as the build but other names: the outputs would be read as
    the wrong classes."""
    import numpy as np
    from PIL import Image

    ref_out, _ = compiled
    build_classes = sorted(json.loads((ref_out / "data.json").read_text())["train"]["per_class"])
    names = [f"other{k}" for k in range(len(build_classes))]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12 * len(names)):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"i{i}.png")
        rows.append(f"i{i}.png,{names[i % len(names)]},{'fm'[(i // len(names)) % 2]}")
    (tmp_path / "x.csv").write_text("\n".join(["image,label,group", *rows]) + "\n")
    _fails(capsys, ["simulate", str(ref_out), "--data", f"csv:{tmp_path / 'x.csv'}"],
           "the data's classes (other0", f"are not the ones the build was compiled for ({', '.join(build_classes)}")
