"""hls4ml project for the PYNQ-Z2 from a power-of-two QONNX model, and its C simulation.

`hls4ml_build` takes the QONNX export of a `fqhw.quant.po2.Po2FairCNN` (the FINN scheme's
float scales and BatchNorm are not exact in hls4ml: see fqhw/quant/po2.py) and

1. cleans it the way hls4ml's ONNX front end expects: qonnx cleanup, channels-last
   (input included), Gemm -> MatMul, cleanup again (saved as `model_clean.onnx`);
2. derives every fixed-point type from the allocation and the Quant nodes (`precisions`):
   input ufixed<8, 0> rounding half to even and saturating (that type *is* the 8-bit input
   quantizer), each conv / the head accumulating exactly (fractional bits = those of input
   x weight, integer bits from the reachable range of the integer accumulator given the
   layer's weight codes, bias codes and largest input code), each ReLU output
   ufixed<a, a + log2(s_a)> RND_CONV SAT (the activation quantizer);
3. converts with `hls4ml.converters.convert_from_onnx_model`, backend `VivadoAccelerator`,
   board pynq-z2 (the Zynq PS + AXI DMA block design, AXI-stream wrapper, PYNQ driver and
   build scripts), io_stream (each conv a line-buffered stream: what fits a CNN on the
   xc7z020), ReuseFactor per layer from the allocation's folding
   (MW * MH / (PE * SIMD): as many multipliers as the FINN MVAU would have);
   Output-channel groups (units "<layer>:g<k>", fqhw.quant.channel_groups): each group is
   its own Conv2D with its own types; the groups' outputs, which share one activation
   quantizer, are joined channels-last by hls4ml Concatenate layers (two inputs each) of
   that activation type, and the stream they all read is copied by a typed Clone;
4. checks that hls4ml kept the types it was given, writes the project and compiles the C
   simulation with g++ (`compile()`); the library is built with per-layer tracing, which is
   compiled out of synthesis (`#ifndef __SYNTHESIS__`), so one build serves both.

`hls4ml_integer_trace(build, x)` runs the C simulation and returns the same keys as
`fqhw.quant.po2.po2_integer_trace` and `qonnx_integer_trace` ("input", "<layer>.act",
"head.acc"), read from the traced fixed-point values divided by their power-of-two scales
(checked to be integers), so `fqhw.backends.verify.check_bit_exact` compares all three.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from fqhw.allocator.allocation import Allocation
from fqhw.errors import FqhwError
from fqhw.onnxgraph import node_attrs
from fqhw.units import merge_group_keys, parse_unit

BOARD = "pynq-z2"
PART = "xc7z020clg400-1"  # the board's part, as hls4ml's supported_boards.json names it
BACKEND = "VivadoAccelerator"
PROJECT_NAME = "myproject"
DEFAULT_CLOCK_NS = 10.0  # PYNQ-Z2 fabric clock of 100 MHz
IO_TYPES = ("io_stream", "io_parallel")


PATH_FIELDS = ("out_dir", "project_dir", "clean_model", "library")  # saved relative to out_dir


@dataclass
class Hls4mlBuild:
    """What `hls4ml_build` produced; plain data, so a saved build (`load`) runs its C
    simulation again without hls4ml (the compiled library is loaded with ctypes).

    precisions: allocation layer -> {"input", "weight", "bias", "accum", "result", "act"
      (convs: the ReLU output type)}, plus "input" -> {"result"}: the ap_fixed types given to
      hls4ml (and checked to be the ones it kept).
    accumulator_bits: layer -> width of its accumulator (the hardware cost of exactness).
    scale_exp: "input" and per layer {"input", "weight", "act"} exponents e (scale 2^e) read
      from the Quant nodes; the C simulation's values over these are the integer codes.
    hls_layers: "<layer>" / "<layer>.act" -> the hls4ml layer computing it (per allocation
      unit: a channel group "<layer>:g<k>" has its own), "<Concat node>.concat" -> the
      Concatenate joining a layer's channel groups.
    input_tap: the traced layer holding the input codes and the border to crop, or None.
    traced: hls4ml layer -> output shape, for every layer the C simulation traces.
    reuse_factors: layer -> {"requested" (from PE / SIMD), "used" (what hls4ml accepted)}.
    """

    out_dir: str
    project_dir: str  # the hls4ml project (VivadoAccelerator, pynq-z2)
    clean_model: str  # the channels-last QONNX model hls4ml read
    qonnx_path: str
    board: str
    part: str
    backend: str
    io_type: str
    clock_ns: float
    precisions: dict[str, dict[str, str]]
    accumulator_bits: dict[str, int]
    scale_exp: dict
    hls_layers: dict[str, str]
    input_tap: dict | None
    traced: dict[str, list[int]]
    n_outputs: int
    reuse_factors: dict[str, dict[str, int]]
    strategies: dict[str, str]
    convert_s: float
    write_s: float
    compile_s: float  # g++ build of the C simulation (0 when not compiled)
    library: str | None = None  # the compiled C simulation (.so), None when not compiled
    files: list[str] = field(default_factory=list)  # project files, relative to project_dir
    _model: object = field(default=None, repr=False, compare=False)  # hls4ml ModelGraph
    _lib: object = field(default=None, repr=False, compare=False)  # ctypes handle

    @property
    def layer_names(self) -> list[str]:
        return [n for n in self.precisions if n != "input"]

    def summary(self) -> dict:
        """The build in a few numbers (what a report shows)."""
        return {
            "backend": self.backend,
            "board": self.board,
            "part": self.part,
            "io_type": self.io_type,
            "clock_ns": self.clock_ns,
            "project_dir": self.project_dir,
            "precisions": {k: dict(v) for k, v in self.precisions.items()},
            "accumulator_bits": dict(self.accumulator_bits),
            "reuse_factors": {k: dict(v) for k, v in self.reuse_factors.items()},
            "convert_s": self.convert_s,
            "write_s": self.write_s,
            "compile_s": self.compile_s,
            "compiled": self.library is not None,
        }

    def to_dict(self) -> dict:
        """Plain data (JSON): every field but the in-memory handles."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if not f.name.startswith("_")}

    def save(self, path=None) -> Path:
        """Write the build as JSON (default out_dir/hls4ml_build.json), its paths relative to
        out_dir so that the folder can be moved."""
        root = Path(self.out_dir)
        path = Path(path) if path is not None else root / "hls4ml_build.json"
        d = self.to_dict()
        for k in PATH_FIELDS:
            if d[k] is not None:
                d[k] = os.path.relpath(d[k], root)
        path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, out_dir) -> "Hls4mlBuild":
        """Read a build saved by `save` (out_dir or the JSON file itself)."""
        p = Path(out_dir)
        path = p / "hls4ml_build.json" if p.is_dir() else p
        if not path.is_file():
            raise FqhwError(f"no hls4ml build at {out_dir} (hls4ml_build.json is missing); run the hls4ml step first")
        d = json.loads(path.read_text())
        root = path.parent.resolve()
        for k in PATH_FIELDS:
            if d.get(k) is not None:
                d[k] = str((root / d[k]).resolve())
        return cls(**d)

    @property
    def model(self):
        """The compiled hls4ml ModelGraph (None for a build read back with `load`)."""
        return self._model


# --------------------------------------------------------------------------- QONNX reading


# ops between an activation Quant and the next layer that leave its integer codes as they are
_CODE_PRESERVING = ("MaxPool", "Flatten", "Reshape", "Transpose", "Identity")


class _Graph:
    """Indexes of one ONNX graph: initializers, producers, consumers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)

    def quant(self, node, what: str) -> dict:
        """Scale exponent, bits, signed, narrow of a Quant node; FqhwError unless its scale
        is one power of two and its zero point 0 (what hls4ml computes exactly)."""
        vals = [self.init.get(t) for t in node.input[1:4]]
        if any(v is None for v in vals):
            raise FqhwError(f"{what}: the Quant node's scale / zero point / bit width are not constants; re-export the model")
        scale, zp, bits = (np.asarray(v, dtype=np.float64).reshape(-1) for v in vals)
        if np.any(zp != 0):
            raise FqhwError(f"{what}: non-zero zero point; hls4ml needs symmetric quantizers (use fqhw.quant.po2)")
        if scale.size == 0 or np.any(scale != scale[0]) or scale[0] <= 0 or math.frexp(float(scale[0]))[0] != 0.5:
            raise FqhwError(
                f"{what}: scale {scale[:4].tolist()} is not one power of two, which hls4ml cannot compute exactly; "
                "quantize with the po2 scheme (fqhw.quant.po2.build_po2_model) for the hls4ml backend"
            )
        if bits.size != 1:
            raise FqhwError(f"{what}: the bit width is not a scalar")
        a = node_attrs(node)
        return {
            "exp": int(round(math.log2(float(scale[0])))),
            "bits": int(bits[0]),
            "signed": bool(a.get("signed", 1)),
            "narrow": bool(a.get("narrow", 0)),
            "rounding": a.get("rounding_mode", b"ROUND"),
        }

    def source_quant(self, tensor: str):
        """The Quant node a tensor comes from through ops that keep codes (pooling, layout)."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in _CODE_PRESERVING:
            node = self.producer.get(node.input[0])
        return node if node is not None and node.op_type == "Quant" else None

    def source_quants(self, tensor: str) -> list[str]:
        """The Quant nodes (names, in channel order) whose codes a tensor holds, through ops
        that keep codes and through Concat (the join of a layer's channel groups, each input
        followed back in turn); [] where some input does not come from a Quant that way."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in _CODE_PRESERVING:
            node = self.producer.get(node.input[0])
        if node is None:
            return []
        if node.op_type == "Quant":
            return [node.name]
        if node.op_type == "Concat":
            out: list[str] = []
            for t in node.input:
                part = self.source_quants(t)
                if not part:
                    return []
                out += part
            return out
        return []

    def const_quant(self, tensor: str, what: str) -> tuple[np.ndarray, dict]:
        """(integer codes, quant info) of a constant behind a Quant node."""
        q = self.producer.get(tensor)
        if q is None or q.op_type != "Quant" or q.input[0] not in self.init:
            raise FqhwError(f"{what} does not come from a Quant of a constant; export the po2 model with fqhw.backends.qonnx_export")
        info = self.quant(q, what)
        b = info["bits"]
        lo = -(2 ** (b - 1)) + int(info["narrow"]) if info["signed"] else 0
        hi = 2 ** (b - 1) - 1 if info["signed"] else 2**b - 1 - int(info["narrow"])
        codes = np.clip(np.round(self.init[q.input[0]].astype(np.float64) / 2.0 ** info["exp"]), lo, hi)
        return codes.astype(np.int64), info


def _layer_names(model: onnx.ModelProto, n_layers: int) -> list[str]:
    from fqhw.intcodes import LAYER_NAMES_KEY

    meta = {p.key: p.value for p in model.metadata_props}
    if LAYER_NAMES_KEY in meta:
        return json.loads(meta[LAYER_NAMES_KEY])
    return [f"features.{i}.conv" for i in range(n_layers - 1)] + ["head"]


def _structure(model: onnx.ModelProto, alloc: Allocation) -> dict:
    """The cleaned graph read as the po2 FairCNN: per layer its ONNX nodes, integer weight /
    bias codes and scale exponents. FqhwError if the graph is not that shape."""
    g = _Graph(model)
    nodes = list(model.graph.node)
    convs = [n for n in nodes if n.op_type == "Conv"]
    mms = [n for n in nodes if n.op_type in ("MatMul", "Gemm")]
    if len(mms) != 1:
        raise FqhwError(f"expected one MatMul (the head) in the QONNX graph, found {len(mms)}; export a FairCNN")
    names = _layer_names(model, len(convs) + 1)
    if len(names) != len(convs) + 1:
        raise FqhwError(f"the QONNX graph has {len(convs)} convs and a head, its layer names say {names}")
    alloc_names = [la.name for la in alloc.layers]
    if sorted(alloc_names) != sorted(names):
        raise FqhwError(f"the allocation's layers {alloc_names} do not match the QONNX model's {names}; use the allocation the model was built from")
    iname = model.graph.input[0].name
    in_q = [n for n in g.consumers.get(iname, []) if n.op_type == "Quant"]
    if len(in_q) != 1:
        raise FqhwError("the QONNX graph input does not feed one Quant node (the input quantizer)")
    in_info = g.quant(in_q[0], "input")
    if in_info["signed"]:
        raise FqhwError("the input quantizer must be unsigned (pixel codes)")
    layers: dict[str, dict] = {}
    # what the next layer reads: the quantized output of the layer before it, i.e. the Quant
    # nodes of all of its channel groups (concatenated), which must share one type
    cur = {"exp": in_info["exp"], "bits": in_info["bits"], "quants": [in_q[0].name]}
    outputs: list[dict] = []  # the activation Quants of the layer being read, one per unit
    forks: dict[str, dict] = {}  # node whose output several convs read -> its codes' type
    current = None

    def finish(outs: list[dict], layer: str) -> dict:
        first = outs[0]
        if any((o["exp"], o["bits"]) != (first["exp"], first["bits"]) for o in outs[1:]):
            raise FqhwError(
                f"{layer}: its channel groups' activation quantizers differ ({[(o['exp'], o['bits']) for o in outs]}); "
                "they must share one quantizer (fqhw.quant.po2 builds one QuantReLU per layer)"
            )
        return {"exp": first["exp"], "bits": first["bits"], "quants": [o["quant"] for o in outs]}

    for name, conv in zip(names[:-1], convs):
        layer = parse_unit(name)[0]
        if layer != current:  # the first unit of a layer: it reads the previous layer's output
            if outputs:
                cur = finish(outputs, current)
            current, outputs = layer, []
        if g.source_quants(conv.input[0]) != cur["quants"]:
            raise FqhwError(
                f"{name}: its input is not the previous layer's quantized output (through pooling, and a concat of its "
                "channel groups in order, only); export a FairCNN"
            )
        src = g.producer.get(conv.input[0])
        if src is not None and len(g.consumers.get(conv.input[0], [])) > 1:
            # the input of a layer in channel groups feeds each group's conv: hls4ml's
            # io_stream copies it with a Clone layer, whose type is set like any other
            forks[src.name] = {"exp": cur["exp"], "bits": cur["bits"]}
        w, winfo = g.const_quant(conv.input[1], f"{name} weight")
        bias, binfo = (None, None)
        if len(conv.input) > 2 and conv.input[2]:
            bias, binfo = g.const_quant(conv.input[2], f"{name} bias")
            if binfo["exp"] != cur["exp"] + winfo["exp"]:
                raise FqhwError(
                    f"{name}: the bias scale 2^{binfo['exp']} is not input scale x weight scale "
                    f"(2^{cur['exp'] + winfo['exp']}); quantize the bias with Int32Bias / Int16Bias"
                )
        relu = g.consumers.get(conv.output[0], [])
        if len(relu) != 1 or relu[0].op_type != "Relu":
            raise FqhwError(f"{name}: expected Conv -> Relu -> Quant (BatchNorm folded away: use fqhw.quant.po2)")
        aq = g.consumers.get(relu[0].output[0], [])
        if len(aq) != 1 or aq[0].op_type != "Quant":
            raise FqhwError(f"{name}: the Relu is not followed by a Quant node; hls4ml needs every ReLU quantized")
        ainfo = g.quant(aq[0], f"{name} activation")
        if ainfo["signed"] or ainfo["narrow"]:
            raise FqhwError(f"{name}: the activation quantizer must be unsigned and not narrow")
        # weights in the channels-last graph: (C_out, K, K, C_in) or (C_out, C_in, K, K): the
        # fan-in of output channel c is everything but axis 0
        flat = w.reshape(w.shape[0], -1)
        layers[name] = {
            "layer": layer,
            "conv": conv.name,
            "relu": relu[0].name,
            "act_quant": aq[0].name,
            "in_exp": cur["exp"],
            "in_bits": cur["bits"],
            "w_exp": winfo["exp"],
            "w_bits": winfo["bits"],
            "w_int": flat,
            "b_int": bias,
            "bias_bits": binfo["bits"] if binfo else None,
            "act_exp": ainfo["exp"],
            "act_bits": ainfo["bits"],
            "mw": int(flat.shape[1]),
            "mh": int(flat.shape[0]),
        }
        outputs.append({"exp": ainfo["exp"], "bits": ainfo["bits"], "quant": aq[0].name})
    if outputs:
        cur = finish(outputs, current)
    head = mms[0]
    if parse_unit(names[-1])[1] is not None:
        raise FqhwError("the head is split into channel groups, which this backend does not build; give the head one unit")
    if g.source_quants(head.input[0]) != cur["quants"]:
        raise FqhwError("the head's input is not the last activation's quantized output (through pooling / flatten / the concat of its groups only)")
    w, winfo = g.const_quant(head.input[1], "head weight")
    if head.op_type == "Gemm":
        if len(head.input) > 2 and head.input[2] and np.any(g.init.get(head.input[2], np.zeros(1)) != 0):
            raise FqhwError("the head has a non-zero bias: its output is not the integer accumulator; use a bias-free head")
        if node_attrs(head).get("transB", 0):
            w = w.T
    # MatMul weight is (in, out): one row per input
    layers[names[-1]] = {
        "layer": names[-1],
        "matmul": head.name,
        "in_exp": cur["exp"],
        "in_bits": cur["bits"],
        "w_exp": winfo["exp"],
        "w_bits": winfo["bits"],
        "w_int": w.T.reshape(w.shape[1], -1),
        "b_int": None,
        "bias_bits": None,
        "act_exp": None,
        "act_bits": None,
        "mw": int(w.shape[0]),
        "mh": int(w.shape[1]),
    }
    for name, st in layers.items():
        la = alloc.layer(name)
        if st["w_bits"] != la.weight_bits or (st["act_bits"] is not None and st["act_bits"] != la.act_bits):
            raise FqhwError(
                f"{name}: the QONNX model has W{st['w_bits']}/A{st['act_bits']}, the allocation W{la.weight_bits}/A{la.act_bits}; "
                "export the model built from this allocation"
            )
    # the joins of channel groups: each Concat's inputs are one layer's group outputs, so its
    # type is that layer's activation type (the unit whose Quant feeds it first)
    act_of = {st["act_quant"]: name for name, st in layers.items() if "act_quant" in st}
    concats: dict[str, str] = {}
    for n in nodes:
        if n.op_type != "Concat":
            continue
        src = g.source_quants(n.output[0])
        if not src or any(q not in act_of for q in src) or len({layers[act_of[q]]["layer"] for q in src}) != 1:
            raise FqhwError(f"Concat {n.name} does not join the channel groups of one layer; export a FairCNN")
        concats[n.name] = act_of[src[0]]
    return {"input": {"name": iname, "quant": in_q[0].name, **in_info}, "layers": layers, "names": names, "concats": concats, "forks": forks}


def _signed_bits(lo: int, hi: int) -> int:
    """Fewest bits of a two's complement integer holding every value in [lo, hi]."""
    b = 1
    while not (-(2 ** (b - 1)) <= lo and hi <= 2 ** (b - 1) - 1):
        b += 1
    return b


def _precisions(structure: dict) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
    """The ap_fixed types of every layer, and each layer's accumulator width in bits.

    Why these: every value is an integer code times a power of two, so a type holds it
    exactly when its binary point sits at the scale (fractional bits = -exponent) and it has
    bits enough for the range. The accumulator's fractional bits are those of input x
    weight; its range, per output channel, lies within [min(0, b) + in_max * sum(w < 0),
    max(0, b) + in_max * sum(w > 0)] (every partial sum too, bias first or last), in_max
    the largest input code (2^a_in - 1). The activation types round half to even and
    saturate, as the Quant nodes do (RND_CONV, SAT).
    """
    inp = structure["input"]
    out: dict[str, dict[str, str]] = {}
    acc_bits: dict[str, int] = {}
    in_type = _ufixed(inp["bits"], inp["exp"], quant=True)
    for name, st in structure["layers"].items():
        in_max = 2 ** st["in_bits"] - 1
        w = st["w_int"]
        lo = in_max * np.minimum(w, 0).sum(axis=1)
        hi = in_max * np.maximum(w, 0).sum(axis=1)
        if st["b_int"] is not None:
            lo = lo + np.minimum(st["b_int"], 0)
            hi = hi + np.maximum(st["b_int"], 0)
        bits = _signed_bits(int(lo.min()), int(hi.max()))
        frac = -(st["in_exp"] + st["w_exp"])
        acc = f"fixed<{bits},{bits - frac}>"
        p = {
            "input": _ufixed(st["in_bits"], st["in_exp"], quant=True),
            "weight": f"fixed<{st['w_bits']},{st['w_bits'] + st['w_exp']},RND_CONV,SAT_SYM>",
            "accum": acc,
            "result": acc,
        }
        if st["b_int"] is not None:
            p["bias"] = f"fixed<{st['bias_bits']},{st['bias_bits'] + st['in_exp'] + st['w_exp']},RND_CONV,SAT>"
        else:
            p["bias"] = acc  # hls4ml adds a zero bias of this type to the bias-free head
        if st["act_bits"] is not None:
            p["act"] = _ufixed(st["act_bits"], st["act_exp"], quant=True)
        out[name] = p
        acc_bits[name] = bits
    out["input"] = {"result": in_type}
    return out, acc_bits


def _ufixed(bits: int, exp: int, quant: bool) -> str:
    tail = ",RND_CONV,SAT" if quant else ""
    return f"ufixed<{bits},{bits + exp}{tail}>"


def _same_type(got, want: str) -> bool:
    """An hls4ml precision object against our type string: width, integer bits and sign,
    and the rounding / saturation modes where the string names them."""
    from hls4ml.model.types import FixedPrecisionType

    if not isinstance(got, FixedPrecisionType):
        return False
    w = _parse(want)
    if (got.width, got.integer, got.signed) != (w.width, w.integer, w.signed):
        return False
    inner = want[want.index("<") + 1 : want.rindex(">")].split(",")
    if len(inner) > 2 and str(got.rounding_mode) != str(w.rounding_mode):
        return False
    if len(inner) > 3 and str(got.saturation_mode) != str(w.saturation_mode):
        return False
    return True


def _parse(s: str):
    from hls4ml.model.types import FixedPrecisionType

    signed = not s.startswith("u")
    inner = s[s.index("<") + 1 : s.rindex(">")].split(",")
    w, i = int(inner[0]), int(inner[1])
    rnd = inner[2] if len(inner) > 2 else None
    sat = inner[3] if len(inner) > 3 else None
    return FixedPrecisionType(w, i, signed, rnd, sat)


# --------------------------------------------------------------------------- build


def clean_for_hls4ml(qonnx_path, out_path) -> Path:
    """The QONNX model as hls4ml's ONNX front end reads it: qonnx cleanup, channels-last
    (input included: hls4ml's layers are channels-last), Gemm -> MatMul, cleanup again.
    The layer-name metadata is carried over."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import (
        AbsorbChanFirstIntoMatMul,
        ConvertToChannelsLastAndClean,
        RemoveConsecutiveChanFirstAndChanLastTrafos,
    )
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model

    src = onnx.load(str(qonnx_path))
    meta = [(p.key, p.value) for p in src.metadata_props]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cleanup_model(ModelWrapper(src))
        m = m.transform(ConvertToChannelsLastAndClean(make_input_channels_last=True))
        if _concat_past_transposes(m):  # channel groups: join them channels-last
            m = m.transform(RemoveConsecutiveChanFirstAndChanLastTrafos())
            m = m.transform(AbsorbChanFirstIntoMatMul())
            m = m.transform(InferShapes())
        _binary_concats(m)
        m = m.transform(GemmToMatMul())
        m = cleanup_model(m)
    model = m.model
    del model.metadata_props[:]
    for k, v in meta:
        model.metadata_props.add(key=k, value=v)
    out_path = Path(out_path)
    out_path.write_bytes(model.SerializeToString(deterministic=True))
    return out_path


_TO_CHANNELS_FIRST = [0, 3, 1, 2]  # NHWC -> NCHW, the Transpose qonnx leaves in front of a Concat


def _concat_past_transposes(m) -> bool:
    """Move the NHWC -> NCHW Transposes qonnx leaves on every input of a Concat (the join of a
    layer's channel groups: Concat is not one of qonnx's channels-last ops) to its output,
    the Concat's axis mapped to channels-last (C: 1 -> 3). Returns whether anything changed.

    Why: hls4ml then joins the groups along the channels of one stream (its concatenate3d
    on the last axis: each pixel's channels packed side by side) instead of through
    transposed tensors, and the Transpose after the join cancels against the next conv's
    NCHW -> NHWC one or is absorbed into the head's weights like an ungrouped layer's.
    The arithmetic is unchanged: concat(T(a), T(b), axis) = T(concat(a, b, perm[axis]))."""
    from onnx import helper

    graph = m.graph
    changed = False
    for node in list(graph.node):
        if node.op_type != "Concat":
            continue
        producers = [m.find_producer(t) for t in node.input]
        if not producers or any(
            p is None or p.op_type != "Transpose" or list(node_attrs(p).get("perm", [])) != _TO_CHANNELS_FIRST or len(m.find_consumers(p.output[0])) != 1
            for p in producers
        ):
            continue
        axis = int(node_attrs(node).get("axis", 0)) % 4
        inner = m.make_new_valueinfo_name()
        for p in producers:
            graph.node.remove(p)
        node.input[:] = [p.input[0] for p in producers]
        for a in node.attribute:
            if a.name == "axis":
                a.i = _TO_CHANNELS_FIRST[axis]
        out = node.output[0]
        node.output[0] = inner
        shapes = [m.get_tensor_shape(p.input[0]) for p in producers]
        joined = list(shapes[0])
        joined[_TO_CHANNELS_FIRST[axis]] = sum(sh[_TO_CHANNELS_FIRST[axis]] for sh in shapes)
        m.set_tensor_shape(inner, joined)
        graph.node.insert(list(graph.node).index(node) + 1, helper.make_node("Transpose", [inner], [out], perm=_TO_CHANNELS_FIRST, name=f"{node.name}_to_nchw"))
        changed = True
    return changed


def _binary_concats(m) -> None:
    """Rewrite every Concat of more than two inputs as a chain of two-input Concats (same
    axis, same result): hls4ml 1.3.0's ONNX front end refuses to merge more than two
    tensors, and a layer in G > 2 channel groups is joined by one G-input Concat."""
    from onnx import helper

    graph = m.graph
    for node in list(graph.node):
        if node.op_type != "Concat" or len(node.input) <= 2:
            continue
        axis = int(node_attrs(node).get("axis", 0))
        ins, out, idx = list(node.input), node.output[0], list(graph.node).index(node)
        graph.node.remove(node)
        acc = ins[0]
        for j, t in enumerate(ins[1:], start=1):
            res = out if j == len(ins) - 1 else m.make_new_valueinfo_name()
            graph.node.insert(idx, helper.make_node("Concat", [acc, t], [res], axis=axis, name=node.name if j == len(ins) - 1 else f"{node.name}_part{j}"))
            idx += 1
            acc = res
    # the new intermediate tensors get their shapes from the cleanup that follows


def reuse_factor(la, mw: int, mh: int) -> int:
    """hls4ml's ReuseFactor for the allocation's FINN folding: MW * MH / (PE * SIMD) cycles per
    output pixel, i.e. the same number of multipliers (PE * SIMD) as the FINN MVAU."""
    pe, simd = max(1, int(la.pe)), max(1, int(la.simd))
    if mh % pe or mw % simd:
        raise FqhwError(f"layer {la.name}: PE {pe} must divide {mh} outputs and SIMD {simd} must divide {mw} inputs; fix the allocation's folding")
    return (mw // simd) * (mh // pe)


def _hls_config(structure: dict, prec: dict, alloc: Allocation) -> tuple[dict, dict, dict]:
    """hls4ml config (granularity 'name') with our types, reuse factors and tracing;
    also the reuse factor and strategy per layer."""
    layers = structure["layers"]
    cfg = {
        "Model": {
            # every layer not named below inherits its input's type ('auto')
            "Precision": {"default": "auto"},
            "ReuseFactor": 1,
            "Strategy": "Latency",
            "BramFactor": 1_000_000_000,
            "Trace": True,
        },
        "LayerName": {},
        # the padding hls4ml puts in front of each io_stream conv: traced, because the first
        # one holds the input codes as the C simulation received them
        "LayerType": {"ZeroPadding2D": {"Trace": True}},
    }
    names = cfg["LayerName"]
    names[structure["input"]["name"]] = {"Precision": {"result": prec["input"]["result"]}, "Trace": True}
    names[structure["input"]["quant"]] = {"Precision": {"result": prec["input"]["result"]}, "Trace": True}
    rfs, strategies = {}, {}
    for name, st in layers.items():
        p = prec[name]
        rf = reuse_factor(alloc.layer(name), st["mw"], st["mh"])
        strategy = "Latency" if rf == 1 else "Resource"
        rfs[name], strategies[name] = rf, strategy
        node = st.get("conv") or st.get("matmul")
        names[node] = {
            "Precision": {"weight": p["weight"], "bias": p["bias"], "accum": p["accum"], "result": p["result"]},
            "ReuseFactor": rf,
            "Strategy": strategy,
            "Trace": True,
        }
        if "relu" in st:
            # 'auto': hls4ml merges the Quant after the ReLU into it (MergeLinearActivation),
            # so the ReLU's output type becomes the activation quantizer's: checked after
            names[st["relu"]] = {"Precision": {"result": "auto"}, "Trace": True}
            names[st["act_quant"]] = {"Precision": {"result": p["act"]}, "Trace": True}
    for producer, t in structure.get("forks", {}).items():
        # hls4ml names the copy of a stream read by several layers "clone_<producer>"; left
        # at the model's 'auto', the Clone's type is never inferred (hls4ml 1.3.0 sets only
        # its first output's) and the optimizer flow loops forever
        names[f"clone_{producer}"] = {"Precision": {"result": _ufixed(t["bits"], t["exp"], quant=True)}}
    for concat, unit in structure.get("concats", {}).items():
        # the join of a layer's channel groups holds their codes as they are: its type is
        # the groups' (shared) activation type, set rather than left to hls4ml's inference
        names[concat] = {"Precision": {"result": prec[unit]["act"]}, "Trace": True}
    return cfg, rfs, strategies


def _find_layers(hm, structure: dict) -> dict[str, str]:
    """Which hls4ml layer computes each layer, found by class and order: per conv its Conv2D
    and the activation layer right after it (the ReLU, with the Quant merged in: "<layer>.act"),
    the head's Dense. FqhwError if hls4ml mapped the graph some other way."""
    layers = list(hm.get_layers())
    names = structure["names"]
    convs = [ly for ly in layers if ly.class_name in ("Conv2D",)]
    dense = [ly for ly in layers if ly.class_name == "Dense"]
    if len(convs) != len(names) - 1 or len(dense) != 1:
        raise FqhwError(
            f"hls4ml made {len(convs)} Conv2D and {len(dense)} Dense layers of a model with {len(names) - 1} convs and a head; "
            "this hls4ml version maps the model differently"
        )
    # hls4ml 1.3.0 names a conv "Conv2D_<ONNX node name>"
    by_name = {ly.name.removeprefix("Conv2D_"): ly for ly in convs}
    if all(structure["layers"][n]["conv"] in by_name for n in names[:-1]):
        # hls4ml keeps the ONNX node names: the channel groups of a layer, which read the
        # same input, are then matched to their own convs whatever order hls4ml lists them in
        convs = [by_name[structure["layers"][n]["conv"]] for n in names[:-1]]
    out: dict[str, str] = {}
    for name, conv in zip(names[:-1], convs):
        out[name] = conv.name
        nxt = [ly for ly in layers if conv.outputs[0] in ly.inputs]
        if len(nxt) != 1 or nxt[0].class_name not in ("Activation", "ReLU"):
            raise FqhwError(f"{name}: hls4ml's {conv.name} is not followed by one activation layer")
        out[f"{name}.act"] = nxt[0].name
    out[names[-1]] = dense[0].name
    for concat in structure.get("concats", {}):
        found = [ly for ly in layers if ly.name == concat and ly.class_name == "Concatenate"]
        if len(found) != 1:
            raise FqhwError(f"hls4ml has no Concatenate layer {concat} (the join of channel groups); this hls4ml version maps the model differently")
        out[f"{concat}.concat"] = concat
    return out


def _check_types(hm, structure: dict, prec: dict, where: dict[str, str]) -> None:
    """hls4ml must have kept every type we set (its optimizers may re-infer some): the C
    simulation is exact only with them."""
    by_name = {ly.name: ly for ly in hm.get_layers()}
    bad = []

    def check(layer_name, var, want):
        ly = by_name[layer_name]
        t = ly.types.get(var) if var != "output" else None
        got = ly.get_output_variable().type.precision if var == "output" else (t.precision if t is not None else None)
        if got is None or not _same_type(got, want):
            bad.append(f"{layer_name}.{var}: hls4ml has {got}, needs {want}")

    inp = hm.get_input_variables()[0].type.precision
    if not _same_type(inp, prec["input"]["result"]):
        bad.append(f"input: hls4ml has {inp}, needs {prec['input']['result']}")
    for name in structure["layers"]:
        p = prec[name]
        check(where[name], "weight_t", p["weight"])
        check(where[name], "bias_t", p["bias"])
        check(where[name], "accum_t", p["accum"])
        check(where[name], "output", p["result"])
        if f"{name}.act" in where:
            check(where[f"{name}.act"], "output", p["act"])
    for concat, unit in structure.get("concats", {}).items():
        check(where[f"{concat}.concat"], "output", prec[unit]["act"])
    if bad:
        raise FqhwError("hls4ml changed fixed-point types the bit-exact build depends on: " + "; ".join(bad))


def hls4ml_build(
    qonnx_path,
    alloc: Allocation,
    out_dir,
    io_type: str = "io_stream",
    board: str = BOARD,
    clock_ns: float = DEFAULT_CLOCK_NS,
    compile: bool = True,  # noqa: A002 - hls4ml's own word for building the C simulation
) -> Hls4mlBuild:
    """Write the hls4ml project of the po2 QONNX model at `qonnx_path` into `out_dir`/project
    and (by default) compile its C simulation. See the module docstring for the steps.

    Raises FqhwError for a model hls4ml cannot compute exactly (non-power-of-two scales,
    BatchNorm, an unquantized ReLU or bias), an allocation that does not match it, or a
    missing g++ / hls4ml.
    """
    if io_type not in IO_TYPES:
        raise FqhwError(f"io_type {io_type!r} is not one of {', '.join(IO_TYPES)}")
    try:
        import hls4ml
    except ImportError as e:  # pragma: no cover - pinned dependency
        raise FqhwError(f"hls4ml is not installed ({e}); pip install 'hls4ml==1.3.0'") from e
    if compile and shutil.which("g++") is None:
        raise FqhwError("g++ is not on PATH; the hls4ml C simulation is compiled with it: install g++ (e.g. apt-get install g++)")
    qonnx_path = Path(qonnx_path)
    if not qonnx_path.is_file():
        raise FqhwError(f"QONNX file {qonnx_path} does not exist; run the export step first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    project = out / "project"
    if project.exists():
        shutil.rmtree(project)
    clean = clean_for_hls4ml(qonnx_path, out / "model_clean.onnx")
    model = onnx.load(str(clean))
    structure = _structure(model, alloc)
    prec, acc_bits = _precisions(structure)
    cfg, rfs, strategies = _hls_config(structure, prec, alloc)
    from qonnx.core.modelwrapper import ModelWrapper

    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hm = hls4ml.converters.convert_from_onnx_model(
                ModelWrapper(model),
                output_dir=str(project),
                project_name=PROJECT_NAME,
                backend=BACKEND,
                board=board,
                io_type=io_type,
                clock_period=clock_ns,
                hls_config=cfg,
            )
    except FqhwError:
        raise
    except Exception as e:
        raise FqhwError(f"hls4ml could not convert {clean.name}: {type(e).__name__}: {e}") from e
    convert_s = time.perf_counter() - t0
    where = _find_layers(hm, structure)
    input_tap = _input_layer(hm)
    _check_types(hm, structure, prec, where)
    used_rf = {}
    for name in structure["layers"]:
        used_rf[name] = {"requested": rfs[name], "used": int(hm.graph[where[name]].get_attr("reuse_factor", rfs[name]))}
    # per-layer tracing in the C simulation (the writer puts it under #ifndef __SYNTHESIS__,
    # so the synthesised design is the same); hls4ml reads this flag from the top-level
    # config, not from hls_config
    hm.config.trace_output = True
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        hm.write()
    write_s = time.perf_counter() - t0
    compile_s = 0.0
    if compile:
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                hm._compile()  # write() ran above; compile() would write the project again
        except Exception as e:
            tail = log.getvalue()[-2000:]
            raise FqhwError(f"g++ could not build the hls4ml C simulation in {project}: {e}\n{tail}") from e
        compile_s = time.perf_counter() - t0
    library = None
    if compile:
        libs = sorted((project / "firmware").glob(f"{PROJECT_NAME}-*.so"))
        if len(libs) != 1:
            raise FqhwError(f"expected one compiled C simulation in {project / 'firmware'}, found {len(libs)}")
        library = str(libs[0].resolve())
    traced = {
        ly.name: [int(d) for d in ly.get_output_variable().shape]
        for ly in hm.get_layers()
        if ly.get_attr("function_cpp", None) and ly.get_attr("trace", False)
    }
    files = sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file() and "ap_types" not in p.parts and "nnet_utils" not in p.parts)
    (out / "hls4ml_convert.log").write_text(log.getvalue())
    build = Hls4mlBuild(
        out_dir=str(out.resolve()),
        project_dir=str(project.resolve()),
        clean_model=str(clean.resolve()),
        qonnx_path=str(qonnx_path.resolve()),
        board=board,
        part=hm.config.get_config_value("Part") or PART,
        backend=BACKEND,
        io_type=io_type,
        clock_ns=float(clock_ns),
        precisions=prec,
        accumulator_bits=acc_bits,
        scale_exp=_scale_exp(structure),
        hls_layers=where,
        input_tap=input_tap,
        traced=traced,
        n_outputs=int(hm.get_output_variables()[0].size()),
        library=library,
        reuse_factors=used_rf,
        strategies=strategies,
        convert_s=convert_s,
        write_s=write_s,
        compile_s=compile_s,
        files=files,
        _model=hm,
        _lib=hm._top_function_lib if compile else None,
    )
    build.save()
    return build


def _input_layer(hm) -> dict | None:
    """Where the C simulation holds the input codes: the input Quant's linear activation if
    hls4ml kept it, else the zero padding in front of the first io_stream conv (its interior
    is the input as the C simulation converted it), else None (io_parallel: the input type
    is the quantizer itself, so hls4ml drops the Quant as a no-op and pads inside the conv)."""
    layers = list(hm.get_layers())
    for ly in layers[1:]:
        if ly.class_name == "Activation" and ly.get_attr("activation") == "linear":
            return {"layer": ly.name, "crop": [0, 0, 0, 0]}
        if ly.class_name == "ZeroPadding2D":
            crop = [int(ly.get_attr(k, 0)) for k in ("pad_top", "pad_bottom", "pad_left", "pad_right")]
            return {"layer": ly.name, "crop": crop}
        if ly.class_name not in ("Input", "Reshape", "Transpose", "Clone"):  # Clone: a grouped first conv
            break
    return None


def _scale_exp(structure: dict) -> dict:
    out = {"input": structure["input"]["exp"]}
    for name, st in structure["layers"].items():
        out[name] = {"input": st["in_exp"], "weight": st["w_exp"], "act": st["act_exp"]}
    return out


# --------------------------------------------------------------------------- C simulation


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


# --------------------------------------------------------------------------- moved builds


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
