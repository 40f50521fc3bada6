"""Reading a power-of-two QONNX model for hls4ml: its layers, Quant nodes and integer
ranges (`qonnx_structure`), and the fixed-point type of every tensor derived from them
(`precisions`): input ufixed<8, 0>, exact accumulators, each activation quantizer as a
ufixed type rounding half to even and saturating."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
from onnx import numpy_helper

from fqhw.allocator.allocation import Allocation
from fqhw.errors import FqhwError
from fqhw.onnxgraph import node_attrs
from fqhw.units import parse_unit

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


def qonnx_structure(model: onnx.ModelProto, alloc: Allocation) -> dict:
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


def precisions(structure: dict) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
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
    in_type = ufixed(inp["bits"], inp["exp"], quant=True)
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
            "input": ufixed(st["in_bits"], st["in_exp"], quant=True),
            "weight": f"fixed<{st['w_bits']},{st['w_bits'] + st['w_exp']},RND_CONV,SAT_SYM>",
            "accum": acc,
            "result": acc,
        }
        if st["b_int"] is not None:
            p["bias"] = f"fixed<{st['bias_bits']},{st['bias_bits'] + st['in_exp'] + st['w_exp']},RND_CONV,SAT>"
        else:
            p["bias"] = acc  # hls4ml adds a zero bias of this type to the bias-free head
        if st["act_bits"] is not None:
            p["act"] = ufixed(st["act_bits"], st["act_exp"], quant=True)
        out[name] = p
        acc_bits[name] = bits
    out["input"] = {"result": in_type}
    return out, acc_bits


def ufixed(bits: int, exp: int, quant: bool) -> str:
    tail = ",RND_CONV,SAT" if quant else ""
    return f"ufixed<{bits},{bits + exp}{tail}>"


def same_type(got, want: str) -> bool:
    """An hls4ml precision object against our type string: width, integer bits and sign,
    and the rounding / saturation modes where the string names them."""
    from hls4ml.model.types import FixedPrecisionType

    if not isinstance(got, FixedPrecisionType):
        return False
    w = parse_type(want)
    if (got.width, got.integer, got.signed) != (w.width, w.integer, w.signed):
        return False
    inner = want[want.index("<") + 1 : want.rindex(">")].split(",")
    if len(inner) > 2 and str(got.rounding_mode) != str(w.rounding_mode):
        return False
    if len(inner) > 3 and str(got.saturation_mode) != str(w.saturation_mode):
        return False
    return True


def parse_type(s: str):
    from hls4ml.model.types import FixedPrecisionType

    signed = not s.startswith("u")
    inner = s[s.index("<") + 1 : s.rindex(">")].split(",")
    w, i = int(inner[0]), int(inner[1])
    rnd = inner[2] if len(inner) > 2 else None
    sat = inner[3] if len(inner) > 3 else None
    return FixedPrecisionType(w, i, signed, rnd, sat)

