"""What every backend offers, and the registry that finds one by name (as timm's model
registry finds a model).

A backend is a subpackage of fqhw.backends with a module `backend.py` that defines a
`Backend` and registers it (`register_backend`); `get_backend(name)` imports those modules
the first time it is asked, so adding a backend is adding a folder. The flow, the config
checks, the CLI and the model families ask the registry and call the methods below; they
never import a backend's modules themselves, and never name one.

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
import shutil
from pathlib import Path

from fqhw.errors import FqhwError


class Backend:
    """One backend. Subclasses set the class attributes and implement what they support.

    kinds: the model kinds (fqhw.models.registry ModelEntry.family: "cnn", "resnet",
    "transformer") it builds; `trace_key`: the name of its integer trace in the bit-exact
    check (None: it adds no trace); `scheme`: the quantization scheme its builds read
    ("thresholds": per-channel float scales, BatchNorm and activations absorbed into
    thresholds, FINN's; "po2": power-of-two scales, BatchNorm folded, quantized bias,
    hls4ml's; fqhw.families maps it to a Brevitas model); `cache_layout`: a version
    of how its build folder is stored, kept in the build step's cache key (None: none)."""

    name: str = ""
    label: str = ""  # how messages name it ("FINN")
    kinds: tuple[str, ...] = ()
    trace_key: str | None = None
    scheme: str = "thresholds"
    builds: bool = True  # False: nothing is built (the flow stops at the QONNX model)
    selectable: bool = True  # offered by --backend (the no-build one follows from the target)
    order: int = 100  # where it is listed
    cache_layout: int | None = None
    ask_kinds: tuple[str, ...] = ()  # kinds it is asked about (`refusal`) before any training
    synthesizes: bool = False  # `synth` takes a build on to a bitfile (--synth)

    def supports(self, kind: str) -> bool:
        return kind in self.kinds

    def check(self, *, kind: str, model: str, target: str, synth: bool) -> None:
        """Refuse, before any training, what it cannot build: one FqhwError line naming the fix."""
        if not self.supports(kind):
            raise FqhwError(f"--backend {self.name} cannot build {model}: use --backend finn")
        if synth and not self.synthesizes:
            raise FqhwError(f"--synth: backend {self.name} has no synthesis step: drop --synth, or use --backend finn")

    def refusal(self, qonnx_path: Path, model: str, build_dir: Path):
        """For a kind in `ask_kinds`: None if it can build the QONNX model at `qonnx_path`
        (an untrained one, quantized at 8 bits), else the one-line FqhwError saying why."""
        return None

    def build(self, qonnx_path: Path, alloc, build_dir: Path, *, kind: str, model: str, cost_model):
        """Build the QONNX file at `qonnx_path` as `alloc` says into `build_dir`; returns the
        build (whatever `load` reads back and `integer_trace` runs), None when nothing is built."""
        raise NotImplementedError

    def load(self, build_dir: Path, *, kind: str):
        """A build saved in `build_dir` by `build`."""
        raise NotImplementedError

    def load_copy(self, cached: Path, dest: Path, *, kind: str):
        """A build stored in the step cache at `cached`, copied into this run's `dest`."""
        shutil.copytree(cached, dest)
        return self.load(dest, kind=kind)

    def totals(self, build) -> dict[str, float] | None:
        """The build's own resource estimates (LUT, BRAM_18K, ...), which must fit the
        board as well as the cost model's; None: it makes none."""
        return None

    def refits(self, kind: str) -> bool:
        """Whether the flow must re-solve the allocation until `totals` fit (fqhw.flow.step_fit):
        for a kind whose build holds layers the cost model does not price."""
        return False

    def integer_trace(self, build, qonnx_path: Path, x, *, kind: str) -> dict:
        """The integer codes the build computes on images x (N, C, H, W = pixel / 256), under
        the keys of the Brevitas and qonnx traces."""
        raise NotImplementedError

    def partial_trace(self, kind: str) -> bool:
        """Whether its trace holds only some of the Brevitas keys (see check_bit_exact)."""
        return False

    def check_synth_tools(self, part: str) -> None:
        """Before any work: the tools `synth` needs for the FPGA `part` are here, or one line
        naming what is missing."""
        raise FqhwError(f"--synth: backend {self.name} has no synthesis step")

    def synth(self, build_dir: Path):
        """The build at `build_dir` on to a bitfile."""
        raise FqhwError(f"--synth: backend {self.name} has no synthesis step")


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
