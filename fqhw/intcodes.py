"""Integer codes: what every part that checks integers (quant, export, the backends, the
simulator) shares. One tolerance for "this float is an integer", the code ranges of a
quantizer, and the names export writes into a QONNX file for the backends to read. Numpy
only: nothing here imports torch, brevitas or onnx."""
from __future__ import annotations

import numpy as np

INT_TOL = 1e-3  # a float that should be an integer must be this close to it

CODES_SUFFIX = "_codes"  # float64 copy of a QONNX graph: the integer-code output of a split Quant
LAYER_NAMES_KEY = "fqhw_layer_names"  # metadata: JSON list of the layer names, in order
COMPUTE_LAYERS_KEY = "fqhw_compute_layers"  # metadata: JSON {Conv/Gemm/MatMul node name: layer name}


def int_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """(lowest, highest) code of a `bits`-wide quantizer."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow)


def to_int(value: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, what: str) -> np.ndarray:
    """value / scale + zero point as int64; AssertionError unless within INT_TOL of integers."""
    pre = value.astype(np.float64) / scale.astype(np.float64) + zero_point.astype(np.float64)
    rounded = np.round(pre)
    err = float(np.abs(pre - rounded).max()) if pre.size else 0.0
    if err > INT_TOL:
        raise AssertionError(f"{what}: Quant output / scale is {err:.3g} away from an integer")
    return rounded.astype(np.int64)
