"""A backend is a plugin: one registered Backend, and the compile flow builds with it, caches
its build under its name, checks its integers and reports it, with no line of fqhw.flow,
fqhw.families or fqhw.config naming it.

The backend here "builds" by copying the QONNX file into its folder and traces the copy with
qonnx's executor: a real, second execution of the file that the bit-exact check compares
with Brevitas and with qonnx on the staged model."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import fqhw.backends.base as base
from fqhw.backends.base import Backend, backend_names, get_backend, register_backend
from fqhw.data.synthetic import SyntheticDermConfig
from fqhw.errors import FqhwError
from fqhw.flow import CompileConfig, compile, validate



@dataclass
class CopiedModel:
    path: Path
    part: str = "copy"

    def summary(self) -> dict:
        return {"file": self.path.name, "bytes": self.path.stat().st_size}


class CopyBackend(Backend):
    name = "qonnxcopy"
    label = "qonnx copy"
    kinds = ("cnn",)
    trace_key = "qonnxcopy"

    def __init__(self):
        self.built = 0

    def build(self, qonnx_path, alloc, build_dir, *, kind, model, cost_model):
        self.built += 1
        build_dir.mkdir(parents=True)
        dest = Path(shutil.copy2(qonnx_path, build_dir / "copied.onnx"))
        (build_dir / "record.json").write_text(json.dumps({"layers": [la.name for la in alloc.layers]}))
        return CopiedModel(dest)

    def load(self, build_dir, *, kind):
        return CopiedModel(build_dir / "copied.onnx")

    def integer_trace(self, build, qonnx_path, x, *, kind):
        from fqhw.backends.qonnx_export import qonnx_integer_trace

        return qonnx_integer_trace(build.path, x)


@pytest.fixture
def plugin(monkeypatch):
    base._discover()
    b = CopyBackend()
    monkeypatch.setitem(base._REGISTRY, b.name, b)  # removed again after the test
    register_backend(b)
    return b


def test_the_flow_names_no_backend():
    """No string naming a --backend in the flow, the families or the config checks (the
    config's default backend aside)."""
    import inspect

    import fqhw.config
    import fqhw.families
    import fqhw.flow

    for where, text in (("fqhw/flow.py", inspect.getsource(fqhw.flow)), ("fqhw/families.py", inspect.getsource(fqhw.families)),
                        ("fqhw.config.validate", inspect.getsource(fqhw.config.validate))):
        for name in backend_names():
            assert f'"{name}"' not in text and f"'{name}'" not in text, f"{where} names the backend {name!r}"


def test_a_registered_backend_builds_caches_verifies_and_reports(plugin, tmp_path):
    assert "qonnxcopy" in backend_names() and get_backend("qonnxcopy") is plugin
    cfg = CompileConfig(
        out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, float_epochs=1, qat_epochs=1, verify_images=4,
        data=SyntheticDermConfig(n_train=160, n_val=80, n_test=80, image_size=16), channels=(4, 8), backend="qonnxcopy",
    )
    r = compile(cfg).report
    assert plugin.built == 1
    assert r["bit_exact"]["ok"] and r["bit_exact"]["backends"] == ["brevitas", "qonnx", "qonnxcopy"]
    assert r["hardware"]["finn"] is None and r["hardware"]["qonnxcopy"]["file"] == "copied.onnx"
    assert r["hardware"]["part"] == "copy"
    assert "qonnxcopy" in r["timings_s"] and not r["steps"]["qonnxcopy"]["reused"]
    assert (tmp_path / "out" / "qonnxcopy" / "record.json").is_file()
    # a second compile reuses the stored build (the step keyed under the backend's name)
    r2 = compile(cfg).report
    assert plugin.built == 1 and r2["steps"]["qonnxcopy"]["reused"] and r2["bit_exact"]["ok"]
    assert r2["steps"]["qonnxcopy"]["key"] == r["steps"]["qonnxcopy"]["key"]
    assert (tmp_path / "out" / "qonnxcopy" / "copied.onnx").read_bytes() == (tmp_path / "out" / "model.qonnx.onnx").read_bytes()


def test_a_kind_the_backend_does_not_build_is_refused_in_one_line(plugin, tmp_path):
    cfg = CompileConfig(model="resnet18", backend="qonnxcopy", out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False,
                        data=SyntheticDermConfig(n_train=40, n_val=20, n_test=20, image_size=64))
    with pytest.raises(FqhwError) as e:
        validate(cfg)
    assert str(e.value) == "--backend qonnxcopy cannot build resnet18: use --backend finn"
    with pytest.raises(FqhwError) as e:
        validate(CompileConfig(backend="qonnxcopy", synth=True, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False))
    assert "--synth: backend qonnxcopy has no synthesis step" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
