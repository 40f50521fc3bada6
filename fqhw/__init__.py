"""fqhw: hardware-aware co-design compiler for fair quantized medical image classifiers."""

__version__ = "0.1.0"


def compile(target: str = "pynq-z2", budget: float = 4.0, out_dir="fqhw-out", **options):  # noqa: A001
    """Python API of `fqhw compile`: returns a CompileResult whose .report is report.json.

    options are CompileConfig fields (e.g. qat_epochs=2, data=SyntheticDermConfig(seed=1)).
    """
    from pathlib import Path

    from fqhw.config import CompileConfig
    from fqhw.flow import compile as run

    return run(CompileConfig(target=target, budget=budget, out_dir=Path(out_dir), **options))
