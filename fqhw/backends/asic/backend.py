"""The no-build backend (fqhw.backends.base) of an ASIC target: its cost model prices the
allocation, there is nothing to build, and the bit-exact check compares Brevitas with
qonnx only. The flow takes it for a target that is not an FPGA board."""
from __future__ import annotations

from pathlib import Path

from fqhw.backends.base import Backend, register_backend


class AsicBackend(Backend):
    name = "asic"
    kinds = ("cnn", "resnet", "transformer")
    trace_key = None
    builds = False
    selectable = False
    order = 2

    def build(self, qonnx_path: Path, alloc, build_dir: Path, *, kind: str, model: str, cost_model):
        return None

    def load(self, build_dir: Path, *, kind: str):
        return None

    def integer_trace(self, build, qonnx_path: Path, x, *, kind: str) -> dict:
        return {}


register_backend(AsicBackend())
