"""The hls4ml backend as the registry sees it (fqhw.backends.base): the default CNN in the
power-of-two scheme (fqhw.quant.po2), an hls4ml project for the PYNQ-Z2."""
from __future__ import annotations

import shutil
from pathlib import Path

from fqhw.backends.base import Backend, register_backend
from fqhw.errors import FqhwError


class Hls4mlBackend(Backend):
    name = "hls4ml"
    label = "hls4ml"
    kinds = ("cnn",)
    trace_key = "hls4ml"
    scheme = "po2"
    order = 1

    def check(self, *, kind: str, model: str, target: str, synth: bool) -> None:
        if kind != "cnn" or model != "fqcnn":  # its 1x1 layers (cnv's FC blocks) map as Dense
            raise FqhwError(f"--backend hls4ml builds the default CNN only, not {model}: use --backend finn")
        if target != "pynq-z2":
            raise FqhwError(f"--backend hls4ml builds for the PYNQ-Z2 (hls4ml's VivadoAccelerator board), not {target}: use --target pynq-z2")
        if synth:
            raise FqhwError("--synth runs FINN's remaining steps: it needs --backend finn (an hls4ml project is synthesised with its own build script)")

    def build(self, qonnx_path: Path, alloc, build_dir: Path, *, kind: str, model: str, cost_model):
        from fqhw.backends.hls4ml.build import hls4ml_build

        return hls4ml_build(qonnx_path, alloc, build_dir)

    def load(self, build_dir: Path, *, kind: str):
        from fqhw.backends.hls4ml.record import Hls4mlBuild

        return Hls4mlBuild.load(build_dir)

    def load_copy(self, cached: Path, dest: Path, *, kind: str):
        """A stored project copied into `dest`, its C simulation rebuilt to read this
        folder's weights: the library holds the absolute weights path of the folder it was
        compiled in, which is gone (see fqhw.backends.hls4ml.csim.ensure_csim_here)."""
        from fqhw.backends.hls4ml.csim import ensure_csim_here

        shutil.copytree(cached, dest)
        build = self.load(dest, kind=kind)
        ensure_csim_here(build)
        return build

    def integer_trace(self, build, qonnx_path: Path, x, *, kind: str) -> dict:
        from fqhw.backends.hls4ml.csim import hls4ml_integer_trace

        return hls4ml_integer_trace(build, x)


register_backend(Hls4mlBackend())
