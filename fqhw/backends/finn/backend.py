"""The FINN backend as the registry sees it (fqhw.backends.base): the default CNN through
`finn_build`, a ResNet through `finn_dataflow_resnet`; a transformer is asked and refused
before any training (fqhw.families)."""
from __future__ import annotations

from pathlib import Path

from fqhw.backends.base import Backend, register_backend
from fqhw.errors import FqhwError


class FinnBackend(Backend):
    name = "finn"
    label = "FINN"
    kinds = ("cnn", "resnet", "transformer")  # a transformer: FINN's refusal, in one line
    ask_kinds = ("transformer",)
    trace_key = "finn"
    order = 0
    cache_layout = 2
    synthesizes = True

    def build(self, qonnx_path: Path, alloc, build_dir: Path, *, kind: str, model: str, cost_model):
        """FinnBuild for the default CNN, FinnResult for a ResNet (every op a HW layer)."""
        if kind == "cnn":
            from fqhw.backends.finn.build import finn_build

            return finn_build(qonnx_path, alloc, build_dir, part=cost_model.limits.part, cost_model=cost_model)
        if kind == "resnet":
            from fqhw.backends.finn.residual import finn_dataflow_resnet, require_all_hw

            return require_all_hw(finn_dataflow_resnet(qonnx_path, build_dir, alloc=alloc, part=cost_model.limits.part), model)
        raise FqhwError(f"FINN cannot build {model}")  # the family refuses it first

    def load(self, build_dir: Path, *, kind: str):
        if kind == "cnn":
            from fqhw.backends.finn.common import FinnBuild

            return FinnBuild.load(build_dir)
        from fqhw.backends.finn.residual import FinnResult

        return FinnResult.load(build_dir)

    def integer_trace(self, build, qonnx_path: Path, x, *, kind: str) -> dict:
        if kind == "cnn":
            from fqhw.backends.finn.execute import finn_integer_trace

            return finn_integer_trace(build, x)
        from fqhw.backends.finn.residual import finn_dataflow_integer_trace

        # the folded, specialized partition: what the accelerator is built from
        return finn_dataflow_integer_trace(build, qonnx_path, x, graph="dataflow")

    def totals(self, build) -> dict[str, float]:
        return build.totals

    def refits(self, kind: str) -> bool:
        # a ResNet's residual joins add element-wise adds, stream forks and requantizing
        # thresholds that the FINN cost model has no terms for
        return kind == "resnet"

    def partial_trace(self, kind: str) -> bool:
        # FINN's ResNet graph adds the two operands of each join without materialising them
        return kind == "resnet"

    def refusal(self, qonnx_path: Path, model: str, build_dir: Path):
        """None if FINN maps every compute op of the QONNX model onto HW layers, else the
        one-line FqhwError naming what it leaves in software."""
        from fqhw.backends.finn.residual import finn_refusal

        return finn_refusal(qonnx_path, model, build_dir)

    def check_synth_tools(self, part: str) -> None:
        """Before any work: the Xilinx tools `synth` needs are here, or one line naming what
        is missing. FINN's shell for the part: Alveo cards build through Vitis, Zynq boards
        through Vivado."""
        from finn.util.basic import alveo_part_map

        from fqhw.backends.finn.synth import check_synth_tools

        check_synth_tools(shell_flow_type="vitis_alveo" if part in alveo_part_map.values() else "vivado_zynq")

    def synth(self, build_dir: Path):
        """FINN's remaining steps to a bitfile (`finn_synth`)."""
        from fqhw.backends.finn.synth import finn_synth

        return finn_synth(build_dir)


register_backend(FinnBackend())
