"""Step cache keys come from what each step declares it reads (fqhw.stepkeys): a step that
reads a CompileConfig field its declaration leaves out fails here.

The reads are found in the code: every `cfg.<field>` in the step's functions of fqhw.flow
(and of fqhw.sidebyside for its records), and in the functions of fqhw.flow, fqhw.config
and fqhw.sidebyside they pass the config to (followed to any depth). Passing the config to a function the reader cannot follow fails too, so that no read
can hide there."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from pathlib import Path

import pytest

import fqhw.config
import fqhw.flow
import fqhw.sidebyside
from fqhw.config import CompileConfig
from fqhw.stepcache import input_key
from fqhw.stepkeys import KEYS, NOT_KEYED, QAT, SIDEBYSIDE, SIDEBYSIDE_UNIFORM, StepKey, qat_inputs

FIELDS = {f.name for f in dataclasses.fields(CompileConfig)}


def _functions() -> dict[str, ast.FunctionDef]:
    out = {}
    for mod in (fqhw.config, fqhw.flow, fqhw.sidebyside):
        tree = ast.parse(Path(inspect.getfile(mod)).read_text())
        out.update({n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)})
    return out


def _cfg_param(fn: ast.FunctionDef, index: int | None = None, keyword: str | None = None) -> str | None:
    args = fn.args.posonlyargs + fn.args.args
    if keyword is not None:
        return keyword if any(a.arg == keyword for a in args + fn.args.kwonlyargs) else None
    if index is not None:
        return args[index].arg if index < len(args) else None
    for a in args:
        if a.arg == "cfg" or (a.annotation is not None and "CompileConfig" in ast.unparse(a.annotation)):
            return a.arg
    return None


def config_reads(name: str, funcs: dict | None = None, param: str | None = None, seen: set | None = None) -> set[str]:
    """The CompileConfig fields function `name` (of fqhw.flow or fqhw.config) reads."""
    funcs = funcs if funcs is not None else _functions()
    seen = seen if seen is not None else set()
    if (name, param) in seen:
        return set()
    seen.add((name, param))
    fn = funcs[name]
    var = param or _cfg_param(fn)
    assert var is not None, f"{name} takes no CompileConfig"
    reads = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == var:
            reads.add(node.attr)
        if isinstance(node, ast.Call):
            passed = [(i, None) for i, a in enumerate(node.args) if isinstance(a, ast.Name) and a.id == var]
            passed += [(None, k.arg) for k in node.keywords if isinstance(k.value, ast.Name) and k.value.id == var]
            if not passed or ast.unparse(node.func).startswith("KEYS["):  # a key: reads its declaration only
                continue
            callee = node.func.id if isinstance(node.func, ast.Name) else None
            assert callee in funcs, f"{name} passes the config to {ast.unparse(node.func)}, which this test cannot read"
            for i, k in passed:
                sub = _cfg_param(funcs[callee], index=i, keyword=k)
                assert sub is not None, f"{name} passes the config to {callee} as an argument it does not have"
                reads |= config_reads(callee, funcs, sub, seen)
    return reads


SWEEP_KEYS = {"sidebyside": SIDEBYSIDE}  # the records of fqhw.sidebyside (a uniform one: SIDEBYSIDE_UNIFORM, below)


@pytest.mark.parametrize("step", sorted(KEYS) + sorted(SWEEP_KEYS))
def test_each_step_reads_only_what_its_key_declares(step):
    decl = KEYS.get(step) or SWEEP_KEYS[step]
    assert decl.steps, f"{step} names no function"
    read = set().union(*(config_reads(f) for f in decl.steps))
    assert read <= FIELDS, f"{step} reads {sorted(read - FIELDS)}, which CompileConfig does not have"
    missing = read - decl.reads() - set(NOT_KEYED)
    assert not missing, f"step {step} reads CompileConfig.{sorted(missing)} but its cache key (fqhw.stepkeys.KEYS) leaves them out"


def test_declarations_name_real_fields():
    for step, decl in KEYS.items():
        assert decl.reads() <= FIELDS, step
    assert set(NOT_KEYED) <= FIELDS


def test_a_read_left_out_of_the_declaration_fails():
    """The reader finds a read the declaration lacks, directly and through a helper."""
    src = textwrap.dedent('''
        def helper(c):
            return c.qat_lr
        def step_x(cfg: CompileConfig, other):
            return cfg.budget + helper(cfg)
        def step_y(cfg, other):
            return unknown_function(cfg)
    ''')
    funcs = {n.name: n for n in ast.parse(src).body}
    assert config_reads("step_x", funcs) == {"budget", "qat_lr"}
    decl = StepKey(fields={"budget": "budget"})
    assert config_reads("step_x", funcs) - decl.reads() == {"qat_lr"}
    with pytest.raises(AssertionError, match="cannot read"):
        config_reads("step_y", funcs)


def _other(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v + 3
    if isinstance(v, str):
        return v + "x"
    if v is None:
        return 7
    return None


@pytest.mark.parametrize("step", sorted(KEYS) + sorted(SWEEP_KEYS))
def test_each_declared_field_changes_the_key(step):
    decl = KEYS.get(step) or SWEEP_KEYS[step]
    given = {g: f"<{g}>" for g in decl.given}
    base = input_key(decl.key(CompileConfig(), **given))
    for name, f in {**decl.fields, **{n: f for sub in decl.nested.values() for n, f in sub.fields.items()}}.items():
        if f == "checkpoint":
            continue  # a file: its digest is the key (test_resume)
        v = _other(getattr(CompileConfig(), f))
        if v is None:
            v = ((0.001, 0.5),) if f == "qat_grid" else None
        assert v is not None, f"no other value for {f}"
        cfg = dataclasses.replace(CompileConfig(), **{f: v})
        assert input_key(decl.key(cfg, **given)) != base, f"{step}: changing {f} leaves its key unchanged"


def test_undeclared_given_entries_are_refused():
    with pytest.raises(Exception, match="not declared"):
        KEYS["allocate"].key(CompileConfig(), importance={}, net={}, stray=1)


def test_the_default_keys_are_as_before():
    """The keys the flow wrote by hand before they were declared, for the default config and
    for the settings that change them."""
    cfg = CompileConfig()
    qat = {"epochs": cfg.qat_epochs, "lr": cfg.qat_lr, "fairness_lambda": cfg.fairness_lambda, "seed": cfg.seed}
    assert qat_inputs(cfg) == qat
    tuned = dataclasses.replace(cfg, backend="hls4ml", qat_grid=((1, 0.5),))
    assert qat_inputs(tuned) == {**qat, "scheme": "hls4ml", "grid": [[1.0, 0.5]]}
    assert KEYS["importance"].key(cfg, float="F") == {"float": "F", "samples": 256, "bits": (2, 8), "seed": 0, "method": "fisher"}
    assert KEYS["importance"].key(dataclasses.replace(cfg, channel_groups=4), float="F")["channel_groups"] == 4
    solve = {"target": "pynq-z2", "budget": 4.0, "edge_bits": 8, "min_fps": None, "time_limit_s": 30.0, "seed": 0}
    assert KEYS["allocate"].key(cfg, importance="S", net="N") == {"importance": "S", "net": "N", **solve}
    assert KEYS["fit"].key(cfg, allocation="A", float="F", importance="I", rounds=4, margin=0.97) == {
        "allocation": "A", "float": "F", "importance": "I", **solve, "rounds": 4, "margin": 0.97}
    assert KEYS["quantize"].key(cfg, float="F", allocation="A") == {"float": "F", "allocation": "A", "qat": qat}
    assert KEYS["uniform"].key(cfg, float="F", bits=8) == {"float": "F", "bits": 8, "qat": qat}
    assert KEYS["export"].key(cfg, quantize="Q", input_shape=[3, 32, 32]) == {"quantize": "Q", "input_shape": [3, 32, 32]}
    # the build step, stored under the backend's name, with the backend's layout version
    from fqhw.backends.base import get_backend

    assert get_backend("finn").cache_layout == 2 and get_backend("hls4ml").cache_layout is None
    assert KEYS["build"].key(cfg, qonnx="O", allocation="A", layout=2) == {"qonnx": "O", "allocation": "A", "target": "pynq-z2", "layout": 2}
    assert KEYS["build"].key(cfg, qonnx="O", allocation="A") == {"qonnx": "O", "allocation": "A", "target": "pynq-z2"}
    assert KEYS["float_model"].key(cfg, data="D", model="M") == {
        "data": "D", "model": "M", "epochs": 12, "lr": 3e-3, "seed": 0, "version": 1}
    assert QAT.reads() == {"qat_epochs", "qat_lr", "fairness_lambda", "seed", "backend", "qat_grid"}


def test_a_uniform_record_leaves_out_only_what_no_uniform_allocation_reads():
    """A uniform allocation reads neither the budget, the target, the importance nor the
    solver: SIDEBYSIDE_UNIFORM is SIDEBYSIDE without exactly those (and the BAQ settings,
    which no uniform method has)."""
    assert set(SIDEBYSIDE.fields) - set(SIDEBYSIDE_UNIFORM.fields) == {"budget", "target", "importance_samples", "min_fps", "time_limit_s"}
    assert set(SIDEBYSIDE_UNIFORM.fields) <= set(SIDEBYSIDE.fields) and SIDEBYSIDE_UNIFORM.nested == SIDEBYSIDE.nested


def test_the_sidebyside_keys_are_as_before():
    """The records' keys before they were declared (so that stored sweeps are reused)."""
    from dataclasses import asdict

    from fqhw.sidebyside import METHODS, SideBySideConfig, run_inputs

    cfg, sc = CompileConfig(), SideBySideConfig(compile=CompileConfig())
    qat = qat_inputs(cfg)
    assert run_inputs(cfg, METHODS["uniform4"], "F", sc) == {"float": "F", "method": asdict(METHODS["uniform4"]), "edge_bits": 8, "qat": qat, "version": 2}
    solver = {"float": "F", "method": asdict(METHODS["fqhw_qat"]), "edge_bits": 8, "qat": qat, "budget": 4.0, "target": "pynq-z2",
              "importance_samples": 256, "min_fps": None, "version": 2}
    assert run_inputs(cfg, METHODS["fqhw_qat"], "F", sc) == solver
    assert run_inputs(cfg, METHODS["fqhw"], "F", sc) == {**solver, "method": asdict(METHODS["fqhw"]), "baq_epochs": 3, "bitrate_lambda": 2.0}
    longer = dataclasses.replace(cfg, solver_time_limit_s=90.0, channel_groups=2)
    assert run_inputs(longer, METHODS["fqhw_qat"], "F", sc) == {**solver, "time_limit_s": 90.0, "channel_groups": 2}
