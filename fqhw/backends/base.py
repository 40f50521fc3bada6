"""What every backend offers, and the registry that finds one by name (as timm's model
registry finds a model).

A backend is a subpackage of fqhw.backends with a module `backend.py` that defines a
`Backend` and registers it (`register_backend`); `get_backend(name)` imports those modules
the first time it is asked, so adding a backend is adding a folder. The flow and the
model families ask the registry; they never import a backend's modules themselves.

    finn    FINN (finn-plus) dataflow build: the default CNN (with or without channel
            groups) and timm ResNets (fqhw.backends.finn)
    hls4ml  hls4ml VivadoAccelerator project, its C simulation: the default CNN in the
            power-of-two scheme (fqhw.backends.hls4ml)
    asic    no build: an ASIC target is priced by its cost model, and the bit-exact check
            compares Brevitas with qonnx only (fqhw.backends.asic)
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from fqhw.errors import FqhwError


class Backend:
    """One backend. Subclasses set the class attributes and implement what they support.

    kinds: the model kinds (fqhw.models.registry ModelEntry.family: "cnn", "resnet",
    "transformer") it builds; `trace_key`: the name of its integer trace in the bit-exact
    check (None: it adds no trace)."""

    name: str = ""
    kinds: tuple[str, ...] = ()
    trace_key: str | None = None
    builds: bool = True  # False: nothing is built (the flow stops at the QONNX model)
    selectable: bool = True  # offered by --backend (the no-build one follows from the target)
    order: int = 100  # where it is listed

    def supports(self, kind: str) -> bool:
        return kind in self.kinds

    def build(self, qonnx_path: Path, alloc, build_dir: Path, *, kind: str, model: str, cost_model):
        """Build the QONNX file at `qonnx_path` as `alloc` says into `build_dir`; returns the
        build (whatever `load` reads back and `integer_trace` runs), None when nothing is built."""
        raise NotImplementedError

    def load(self, build_dir: Path, *, kind: str):
        """A build saved in `build_dir` by `build`."""
        raise NotImplementedError

    def integer_trace(self, build, qonnx_path: Path, x, *, kind: str) -> dict:
        """The integer codes the build computes on images x (N, C, H, W = pixel / 256), under
        the keys of the Brevitas and qonnx traces."""
        raise NotImplementedError

    def partial_trace(self, kind: str) -> bool:
        """Whether its trace holds only some of the Brevitas keys (see check_bit_exact)."""
        return False


_REGISTRY: dict[str, Backend] = {}
_DISCOVERED = [False]


def register_backend(backend: Backend) -> Backend:
    """Add a backend under its name (each name once)."""
    if not backend.name:
        raise ValueError("a backend needs a name")
    if backend.name in _REGISTRY and type(_REGISTRY[backend.name]) is not type(backend):
        raise ValueError(f"backend {backend.name!r} is registered twice")
    _REGISTRY[backend.name] = backend
    return backend


def _discover() -> None:
    """Import fqhw.backends.<package>.backend for every subpackage that has one."""
    if _DISCOVERED[0]:
        return
    import fqhw.backends as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.ispkg and (Path(pkg.__path__[0]) / info.name / "backend.py").is_file():
            importlib.import_module(f"fqhw.backends.{info.name}.backend")
    _DISCOVERED[0] = True


def backend_names(selectable: bool = True) -> list[str]:
    """The registered backends' names in listing order (only those --backend offers, unless
    `selectable` is False)."""
    _discover()
    found = sorted(_REGISTRY.values(), key=lambda b: (b.order, b.name))
    return [b.name for b in found if b.selectable or not selectable]


def get_backend(name: str) -> Backend:
    """The backend registered as `name`; an unknown name: one line naming the known ones."""
    _discover()
    if name not in _REGISTRY:
        raise FqhwError(f"unknown backend {name!r}: known backends are {', '.join(backend_names())}")
    return _REGISTRY[name]
