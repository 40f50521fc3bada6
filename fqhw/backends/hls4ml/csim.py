"""The C simulation of an hls4ml project: run on images (`hls4ml_run`), the integer codes
of every traced layer (`hls4ml_integer_trace`, the keys of `fqhw.quant.po2.po2_integer_trace`),
and a build moved to another folder recompiled to read its own weights (`ensure_csim_here`)."""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import numpy as np

from fqhw.backends.hls4ml.record import PROJECT_NAME, Hls4mlBuild
from fqhw.errors import FqhwError
from fqhw.units import merge_group_keys

def _to_codes(values: np.ndarray, exp: int, what: str) -> np.ndarray:
    """Fixed-point values (read as float64) over their power-of-two scale: exact integers."""
    q = np.asarray(values, dtype=np.float64) / 2.0**exp
    r = np.round(q)
    if not np.array_equal(q, r):
        raise AssertionError(f"hls4ml {what}: values are not integers times 2^{exp}")
    return r.astype(np.int64)


def _nhwc_to_nchw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))


def _library(build: Hls4mlBuild):
    if build._lib is None:
        if build.library is None or not Path(build.library).is_file():
            raise FqhwError(f"the hls4ml build in {build.out_dir} has no compiled C simulation; run hls4ml_build(..., compile=True)")
        build._lib = ctypes.cdll.LoadLibrary(build.library)
    return build._lib


class _TraceEntry(ctypes.Structure):
    # what the hls4ml bridge's collect_trace_output fills: layer name, pointer to its values
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.c_void_p)]


def hls4ml_run(build: Hls4mlBuild, x) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run the compiled C simulation on `x` (N, C, H, W floats = pixel/256), one image per C
    call, in double precision (exact for every type here: none is wider than 53 bits);
    return (outputs (N, n_outputs), {traced hls4ml layer: (N, *shape) values}).

    Calls the library's own entry points (`<project>_double` and the trace functions hls4ml's
    bridge exports) directly: hls4ml's `ModelGraph.trace()` would recompile the project
    first, and a saved build has no ModelGraph."""
    import torch

    lib = _library(build)
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 4:
        raise FqhwError(f"expected images (N, C, H, W), got shape {x.shape}")
    xh = np.ascontiguousarray(np.transpose(x.astype(np.float64), (0, 2, 3, 1)))  # channels-last
    top = getattr(lib, f"{PROJECT_NAME}_double")
    top.restype = None
    top.argtypes = [np.ctypeslib.ndpointer(ctypes.c_double, flags="C_CONTIGUOUS")] * 2
    collect = lib.collect_trace_output
    collect.argtypes, collect.restype = [ctypes.POINTER(_TraceEntry)], None
    alloc = lib.allocate_trace_storage
    alloc.argtypes, alloc.restype = [ctypes.c_size_t], None
    free = lib.free_trace_storage
    free.argtypes, free.restype = [], None
    entries = (_TraceEntry * len(build.traced))()
    sizes = {k: int(np.prod(v)) for k, v in build.traced.items()}
    outputs = np.zeros((len(xh), build.n_outputs), np.float64)
    per_layer: dict[str, list[np.ndarray]] = {k: [] for k in build.traced}
    cwd = os.getcwd()
    os.chdir(Path(build.project_dir) / "firmware")  # as hls4ml does: weights may be read from here
    try:
        alloc(ctypes.sizeof(ctypes.c_double))
        try:
            for i in range(len(xh)):
                y = np.zeros(build.n_outputs, dtype=np.float64)
                top(np.ascontiguousarray(xh[i]), y)
                outputs[i] = y
                collect(entries)
                for e in entries:
                    if e.name is None:
                        raise FqhwError(f"the C simulation in {build.project_dir} traced fewer layers than expected; rebuild it")
                    name = e.name.decode()
                    vals = np.ctypeslib.as_array(ctypes.cast(e.data, ctypes.POINTER(ctypes.c_double)), shape=(sizes[name],))
                    per_layer[name].append(vals.reshape(build.traced[name]).copy())
        finally:
            free()
    finally:
        os.chdir(cwd)
    return outputs, {k: np.stack(v) for k, v in per_layer.items() if v}


def hls4ml_integer_trace(build: Hls4mlBuild, x) -> dict[str, np.ndarray]:
    """Integer codes of the hls4ml C simulation on `x` (N, C, H, W floats = pixel/256), int64,
    NCHW, keyed like `fqhw.quant.po2.po2_integer_trace` and `qonnx_integer_trace`: "input"
    (the input as the C simulation converted it; absent for io_parallel, where no layer
    holds it), "<layer>.act" (each ReLU's output, before pooling), "head.acc" (the head's
    output over its scale 2^(e_act + e_w): the integer accumulator)."""
    outputs, tr = hls4ml_run(build, x)
    names = build.layer_names
    head = names[-1]
    where = build.hls_layers
    out: dict[str, np.ndarray] = {}
    tap = build.input_tap
    if tap is not None:
        if tap["layer"] not in tr:
            raise FqhwError(f"the C simulation did not trace {tap['layer']} (the input codes)")
        a = tr[tap["layer"]]
        t, b, l, r = tap["crop"]
        a = a[:, t : a.shape[1] - b, l : a.shape[2] - r, :]
        out["input"] = _nhwc_to_nchw(_to_codes(a, build.scale_exp["input"], "input"))
    for name in names[:-1]:
        key = f"{name}.act"
        if where[key] not in tr:
            raise FqhwError(f"the C simulation did not trace {where[key]} ({key})")
        out[key] = _nhwc_to_nchw(_to_codes(tr[where[key]], build.scale_exp[name]["act"], key))
    sc = build.scale_exp[head]
    out["head.acc"] = _to_codes(outputs, sc["input"] + sc["weight"], "head output")
    # channel groups: "<layer>:g<k>.act" concatenated into "<layer>.act"
    return merge_group_keys(out)


def hls4ml_predict_codes(build: Hls4mlBuild, x) -> np.ndarray:
    """The C simulation's integer output codes (N, classes): the head accumulator."""
    return hls4ml_integer_trace(build, x)["head.acc"]


def compiled_weights_dir(build: Hls4mlBuild) -> str | None:
    """The weights folder the compiled C simulation reads, or None if it cannot be found.

    Why this matters: hls4ml's build_lib.sh compiles the project's absolute
    `<project>/firmware/weights` path into the library (-D WEIGHTS_DIR), and the C simulation
    reads its weights from there on its first call; when that file is missing it calls
    exit(1), ending the Python process that loaded it. A build compiled in one folder and
    then moved (the flow writes into a partial folder and renames it) still reads, or fails
    to read, the old one. The path is a NUL-terminated string literal in the library."""
    import re

    if build.library is None or not Path(build.library).is_file():
        return None
    blob = Path(build.library).read_bytes()
    found = re.findall(rb"([^\x00]{1,4096}/firmware/weights)\x00", blob)
    return found[-1].decode(errors="replace") if len(set(found)) == 1 else None


def ensure_csim_here(build: Hls4mlBuild) -> bool:
    """Make the build's C simulation read the weights of its own folder: rebuild it with the
    project's build_lib.sh (g++, as hls4ml compiles it) when the library reads another
    folder. Returns True when it was rebuilt. FqhwError (never a process exit) when the
    library or the weight files are missing or the rebuild fails.

    Call before the library is first loaded in this process: the dynamic loader keeps a
    library it has loaded under the same path, so a rebuild would not be seen."""
    import subprocess

    if build.library is None:
        raise FqhwError(f"the hls4ml build in {build.out_dir} has no compiled C simulation; re-run fqhw compile --backend hls4ml")
    project = Path(build.project_dir)
    here = (project / "firmware" / "weights").resolve()
    txt = sorted(here.glob("*.txt")) if here.is_dir() else []
    if not txt:
        raise FqhwError(f"{here} holds no weight files (*.txt), which the hls4ml C simulation reads; re-run fqhw compile --backend hls4ml")
    lib = Path(build.library)
    if lib.is_file() and compiled_weights_dir(build) == str(here):
        return False
    if build._lib is not None:
        raise FqhwError(f"the hls4ml C simulation of {build.out_dir} is already loaded from another folder; run again in a new process")
    script = project / "build_lib.sh"
    if not script.is_file():
        raise FqhwError(f"{script} is missing: the C simulation cannot be rebuilt for this folder; re-run fqhw compile --backend hls4ml")
    if shutil.which("g++") is None:
        raise FqhwError("g++ is not on PATH; the hls4ml C simulation of a moved build is rebuilt with it: install g++")
    proc = subprocess.run(["bash", str(script)], cwd=project, capture_output=True, text=True)
    if proc.returncode != 0 or not lib.is_file():
        tail = (proc.stderr or proc.stdout)[-300:].strip().replace("\n", " | ")
        raise FqhwError(f"g++ could not rebuild the hls4ml C simulation in {project} ({tail}); check the project or re-run fqhw compile --backend hls4ml")
    if compiled_weights_dir(build) != str(here):
        raise FqhwError(f"the rebuilt C simulation in {project} does not read {here}; re-run fqhw compile --backend hls4ml")
    return True

