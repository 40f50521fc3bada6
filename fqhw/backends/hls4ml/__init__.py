"""The hls4ml backend: a power-of-two FairCNN's QONNX file as an hls4ml VivadoAccelerator
project for the PYNQ-Z2, and its C simulation for the bit-exact check.

    record.py   the board, the backend, the build record `Hls4mlBuild`
    graph.py    the QONNX model read for hls4ml, and every tensor's fixed-point type
    build.py    `hls4ml_build`: cleaning, configuration, conversion, type checks, g++
    csim.py     the C simulation: `hls4ml_integer_trace`, moved builds recompiled
    backend.py  the backend as the registry sees it (fqhw.backends.base)
"""
