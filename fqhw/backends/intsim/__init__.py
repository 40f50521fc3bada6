"""The fast integer simulator of a deployed model (see simulator.py for how it is exact):

    simulator.py  `IntegerSimulator`: from a FINN build, a ResNet's FINN result or a
                  power-of-two QONNX file (an hls4ml build); run on a whole data set
    dataflow.py   a FINN dataflow graph's HW nodes as numpy functions
    po2.py        a power-of-two QONNX graph's nodes as numpy functions
    kernels.py    exact carriers, integer thresholds, im2col, window reductions
"""
from fqhw.backends.intsim.simulator import DEFAULT_BATCH_SIZE, IntegerSimulator

__all__ = ["DEFAULT_BATCH_SIZE", "IntegerSimulator"]
