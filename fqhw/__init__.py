"""fqhw: hardware-aware co-design compiler for fair quantized medical image classifiers."""

__version__ = "0.1.0"
