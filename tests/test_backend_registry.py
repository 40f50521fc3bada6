"""The backend registry (fqhw.backends.base): every backend folder registers itself by name,
an unknown name is one line, and every model kind x backend combination either passes the
flow's validation or is refused in one line before any work."""
from __future__ import annotations

from pathlib import Path

import pytest

import fqhw.backends as backends_pkg
from fqhw.backends.base import Backend, backend_names, get_backend
from fqhw.data.synthetic import SyntheticDermConfig
from fqhw.errors import FqhwError
from fqhw.flow import CompileConfig, validate
from fqhw.models.registry import model_entry

# one registry model per kind, at sizes validation accepts; a transformer on an FPGA target
# is asked of FINN (an export: test_compile_models), so the kinds run on the ASIC target too
MODELS = {  # name, image size, constructor arguments, budget (a tiny DeiT's pinned edges need 6 bits)
    "cnn": ("fqcnn", 16, {}, 4.0),
    "resnet": ("resnet18", 64, {}, 4.0),
    "transformer": ("deit_tiny_patch16_224", 32, {"depth": 1, "embed_dim": 32, "num_heads": 2}, 8.0),
}
BUILDS = {("cnn", "finn"), ("cnn", "hls4ml"), ("resnet", "finn"), ("transformer", "finn")}  # transformer: FINN's refusal


def test_each_backend_folder_registers_itself():
    folders = sorted(p.name for p in Path(backends_pkg.__path__[0]).iterdir() if (p / "backend.py").is_file())
    assert folders == ["asic", "finn", "hls4ml"]
    assert backend_names() == ["finn", "hls4ml"]  # what --backend offers, in that order
    assert backend_names(selectable=False) == ["finn", "hls4ml", "asic"]
    for name in backend_names(selectable=False):
        b = get_backend(name)
        assert isinstance(b, Backend) and b.name == name and type(b).__module__ == f"fqhw.backends.{name}.backend"
    assert not get_backend("asic").builds and get_backend("asic").trace_key is None
    assert {get_backend(n).trace_key for n in backend_names()} == {"finn", "hls4ml"}


def test_unknown_backend_is_one_line():
    with pytest.raises(FqhwError) as e:
        get_backend("vta")
    assert str(e.value) == "unknown backend 'vta': known backends are finn, hls4ml"


def test_the_kinds_each_backend_supports():
    assert {(k, n) for k in MODELS for n in backend_names() if get_backend(n).supports(k)} == BUILDS
    assert all(get_backend("asic").supports(k) for k in MODELS)
    for kind, (model, *_) in MODELS.items():
        assert model_entry(model).family == kind


@pytest.mark.parametrize("backend", ["finn", "hls4ml", "asic"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_kind_and_backend_passes_validation_or_is_refused_in_one_line(tmp_path, kind, backend):
    model, size, kwargs, budget = MODELS[kind]
    target = "bitfusion" if kind == "transformer" else "pynq-z2"
    cfg = CompileConfig(
        model=model, model_kwargs=kwargs, backend=backend, target=target, budget=budget, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
        progress=False, data=SyntheticDermConfig(n_train=40, n_val=20, n_test=20, image_size=size),
    )
    if backend == "asic":  # chosen by an ASIC target, never by --backend
        with pytest.raises(FqhwError, match="unknown backend 'asic': known backends are finn, hls4ml"):
            validate(cfg)
    elif (kind, backend) in BUILDS:
        validate(cfg)
    else:
        with pytest.raises(FqhwError) as e:
            validate(cfg)
        assert "\n" not in str(e.value) and f"--backend {backend} builds the default CNN only, not {model}" in str(e.value)
    assert not (tmp_path / "out").exists()
