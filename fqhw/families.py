"""What the compile flow does differently per model family.

The steps of fqhw.flow are the same for every model of the registry (fqhw.models.registry);
what differs is which Brevitas model quantizes it (per the backend's quantization scheme),
how the activation code boundaries are moved off float rounding error, which exporter
writes the QONNX file, and which functions read the Brevitas and qonnx integer codes:

    fqcnn        QuantFairCNN (FINN's scheme) or the power-of-two model (hls4ml's);
                 FINN's builder steps (fqhw.backends.finn) or an hls4ml project
    resnet       QuantResNet with shared join quantizers; FINN's conversion with the
                 residual streamlining (fqhw.backends.finn.residual), every add a HW layer
    transformer  QuantTransformer (linear layers quantized, attention float); QONNX export
                 and qonnx execution; FINN is asked and its refusal reported (no build)

`family(name)` gives the Family of a registry name; the flow calls its methods only. What
a backend builds, loads and traces, and which kinds it supports, the backend registry says
(fqhw.backends.base); a Family names no backend, only the two schemes ("thresholds", "po2").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fqhw.backends.base import get_backend
from fqhw.errors import FqhwError


@dataclass(frozen=True)
class Family:
    """The family-specific parts of the flow for one registry model."""

    model: str  # registry name, e.g. "resnet18"
    kind: str  # "cnn" | "resnet" | "transformer" (fqhw.models.registry.ModelEntry.family)

    # ------------------------------------------------------------------ checks

    def check(self, image_size: int) -> None:
        """Refuse, before any training, what this family cannot build (the backend's own
        refusals: Backend.check)."""
        if self.kind == "resnet" and image_size < 64:
            raise FqhwError(
                f"{self.model} needs images of at least 64 px for its QONNX export and FINN build (got {image_size}): "
                "pass --data-image-size 64 (built-in data) or more"
            )

    def build_refusal(self, backend: str, float_model: nn.Module, input_shape, net) -> FqhwError | None:
        """Ask the backend, before any training, whether it can build this model (for a kind
        in its `ask_kinds`): the untrained model quantized at 8 bits, exported, and handed
        over. None if it can; else its one-line error, and what to do instead."""
        import tempfile

        from fqhw.allocator.allocation import Allocation

        b = get_backend(backend)
        if self.kind not in b.ask_kinds:
            return None
        qmodel = self.quant_model(float_model, Allocation.uniform(net, 8), backend).eval()
        with tempfile.TemporaryDirectory(prefix=f"fqhw-ask-{backend}-") as tmp:
            path = self.export(qmodel, input_shape, Path(tmp) / "model.qonnx.onnx")
            err = b.refusal(path, self.model, Path(tmp) / backend)
        if err is None:
            return None
        return FqhwError(f"{err}: compile {self.model} for an ASIC target (e.g. --target bitfusion) to get its allocation, QONNX model and bit-exact check")

    # ------------------------------------------------------------------ quantization

    def quant_model(self, float_model: nn.Module, alloc, backend: str) -> nn.Module:
        """The Brevitas model of the backend's quantization scheme (not yet calibrated)."""
        if self.kind == "cnn":
            if get_backend(backend).scheme == "po2":
                from fqhw.quant.po2 import build_po2_model

                return build_po2_model(float_model, alloc)
            from fqhw.quant.qmodel import build_quant_model

            return build_quant_model(float_model, alloc)
        from fqhw.quant.generic import quantize_model

        return quantize_model(float_model, alloc)

    def snap(self, qmodel: nn.Module, backend: str) -> dict | None:
        """Move every activation code boundary away from float rounding error, so that every
        backend's evaluation gives the same integers (FINN's thresholds are float32). The
        hls4ml scheme's power-of-two boundaries are exact already, and a transformer's
        quantizers are not thresholds in any backend here."""
        if self.kind == "cnn" and get_backend(backend).scheme == "thresholds":
            from fqhw.quant.snap import snap_thresholds

            return snap_thresholds(qmodel)
        if self.kind == "resnet":
            from fqhw.quant.resnet_snap import snap_resnet_thresholds

            return snap_resnet_thresholds(qmodel)
        return None

    def export(self, qmodel: nn.Module, input_shape, path: Path) -> Path:
        if self.kind == "cnn":
            from fqhw.backends.qonnx_export import export_qonnx

            return export_qonnx(qmodel, input_shape, path)
        if self.kind == "resnet":
            from fqhw.backends.qonnx_generic import export_generic_qonnx

            return Path(export_generic_qonnx(qmodel, input_shape, path))
        from fqhw.backends.qonnx_generic import export_transformer_qonnx

        return Path(export_transformer_qonnx(qmodel, input_shape, path))

    # ------------------------------------------------------------------ integer traces

    def traces(self, qmodel: nn.Module, qonnx_path: Path, build, x: torch.Tensor, backend: str) -> dict[str, dict[str, np.ndarray]]:
        """The integer codes of every backend present on images `x` (N, C, H, W = pixel/256),
        under one set of keys: Brevitas (float64 twin), qonnx (float64 execution of the
        file) and the build (FINN's Python execution of its dataflow graph, or hls4ml's C
        simulation; none for an ASIC target)."""
        if self.kind == "cnn":
            from fqhw.backends.qonnx_export import qonnx_integer_trace

            if get_backend(backend).scheme == "po2":
                from fqhw.quant.po2 import po2_integer_trace

                out = {"brevitas": po2_integer_trace(qmodel, x), "qonnx": qonnx_integer_trace(qonnx_path, x)}
            else:
                from fqhw.quant.qmodel import integer_trace

                out = {"brevitas": integer_trace(qmodel, x), "qonnx": qonnx_integer_trace(qonnx_path, x)}
        else:
            from fqhw.backends.qonnx_generic import qonnx_integer_trace_generic, qonnx_integer_trace_transformer
            from fqhw.quant.generic import integer_trace

            qonnx_trace = qonnx_integer_trace_transformer if self.kind == "transformer" else qonnx_integer_trace_generic
            out = {"brevitas": integer_trace(qmodel, x), "qonnx": qonnx_trace(qonnx_path, x)}
        if build is not None:  # none for an ASIC target; a transformer has none (FINN refuses it)
            b = get_backend(backend)
            out[b.trace_key] = b.integer_trace(build, qonnx_path, x, kind=self.kind)
        return out


def family(model: str) -> Family:
    """The Family of a registry model name (an unknown name: the registry's one-line error)."""
    from fqhw.models.registry import model_entry

    return Family(model, model_entry(model).family)
