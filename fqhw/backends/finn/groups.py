"""FINN build of a model with output-channel groups (fqhw.quant.channel_groups).

A grouped layer exports as G Conv -> BN -> Relu -> Quant -> MaxPool branches that read one
tensor and meet in a Concat; `fqhw.backends.finn.build.finn_build` runs GROUPS_STEPS and calls
the functions here when the allocation has channel groups, so that the dataflow graph is the one
`fqhw.hwmodels.finn` prices:

    ... -> FMPadding -> ConvolutionInputGenerator -> DuplicateStreams -+-> MVAU_0 -> pool_0 -+
                                                                       +-> MVAU_1 -> pool_1 -+-> StreamingConcat -> ...

- `streamline_groups`: FINN's streamlining plus its moves of scalar Mul/Add past forks
  and of identical Mul / Add / Transpose past Concat joins (the groups' activation scale,
  one shared quantizer, leaves the Concat as one Mul that the next layer absorbs), then
  convs lowered to MatMul and the layouts made channels-last (the Concat on the last
  axis, which is what FINN's StreamingConcat takes).
- `ShareWindows` (fqhw.backends.finn.transforms): the G Im2Col nodes of a grouped conv (same input, same geometry) become
  one, whose output forks to the G MatMuls: one padding + sliding window per layer, as the
  cost model prices it (with group 0), and FINN inserts a DuplicateStreams at the fork.
- `match_mvaus`: which MVAU is which unit, by its weights (FINN's topological sorts do not
  keep the branches in channel order; seen on finn-plus 1.6.1): each unit's weight codes
  from the QONNX file, laid out as FINN's (MW, MH) matrix, equal up to a per-channel sign
  (FINN flips channels with a negative scale) to exactly one MVAU's.
- `layer_of_nodes`: each HW node's unit: an MVAU's own window/padding (group 0's for a
  shared one), the pooling behind it; a DuplicateStreams and a StreamingConcat belong to
  group 0 / the last group of the layer whose streams they fork / join.
- `fold_joins`: DuplicateStreams (PE) and StreamingConcat (SIMD) get just enough
  parallelism not to be slower than the slowest MVAU they feed / are fed by (the cost
  model does not price them; see `fqhw.hwmodels.finn`).
"""
from __future__ import annotations

import numpy as np
import onnx

from fqhw.backends.finn.common import MVAU_TYPES, POOL_TYPES, lower_convs_channels_last, until_fixed
from fqhw.backends.finn.steps import finn_step
from fqhw.backends.finn.transforms import ShareWindows
from fqhw.errors import FqhwError
from fqhw.onnxgraph import node_attr
from fqhw.units import parse_unit

JOIN_TYPES = ("StreamingConcat", "StreamingConcat_hls")
FORK_TYPES = ("DuplicateStreams", "DuplicateStreams_hls")


def _until_fixed(model, transforms):
    return until_fixed(model, transforms, tidy=False, unsettled="FINN's streamlining of the channel groups did not settle")


@finn_step("streamline_groups")
def streamline_groups(model, cfg=None):
    """FINN's Streamline with the fork / Concat-join moves a grouped layer needs, convs
    lowered, layouts channels-last, and the groups' Im2Cols shared (`ShareWindows`)."""
    import finn.transformation.streamline.absorb as absorb
    import finn.transformation.streamline.reorder as reorder
    from finn.transformation.streamline import Streamline
    from qonnx.transformation.bipolar_to_xnor import ConvertBipolarMatMulToXnorPopcount
    from qonnx.transformation.general import RemoveUnusedTensors
    from qonnx.transformation.infer_data_layouts import InferDataLayouts

    joins = [
        Streamline(),
        reorder.MoveScalarLinearPastFork(),
        reorder.MoveLinearPastFork(),
        reorder.MoveMulPastJoinConcat(),
        reorder.MoveAddPastJoinConcat(),
    ]
    model = model.transform(absorb.AbsorbScalarBiasIntoMultiThreshold())
    model = _until_fixed(model, joins)
    if model.get_nodes_by_op_type("Conv"):
        model = lower_convs_channels_last(model, reorder.MoveTransposePastJoinConcat(), _until_fixed)
        model = model.transform(ShareWindows(), cleanup=False)
    model = model.transform(ConvertBipolarMatMulToXnorPopcount())
    model = _until_fixed(model, joins)
    model = model.transform(absorb.AbsorbScalarMulAddIntoTopK())
    model = model.transform(InferDataLayouts())
    model = model.transform(RemoveUnusedTensors())
    left = [f"{n.name} ({n.op_type})" for n in model.graph.node if n.op_type in ("Conv", "Mul", "Add") and not _is_output_tail(model, n)]
    if left:
        raise FqhwError(f"streamlining left float ops between the channel groups' layers: {', '.join(left)}")
    return model


def _is_output_tail(model, node) -> bool:
    """A Mul / Add whose output reaches the graph output through Mul / Add only (the float
    output scale FINN keeps on the host)."""
    outs = {o.name for o in model.graph.output}
    while True:
        if node.output[0] in outs:
            return True
        cons = model.find_consumers(node.output[0]) or []
        if len(cons) != 1 or cons[0].op_type not in ("Mul", "Add"):
            return False
        node = cons[0]


# --------------------------------------------------------------------------- units and nodes


def _expected_weights(qonnx_path, units: list[str]) -> dict[str, np.ndarray]:
    """Each unit's integer weight codes from the QONNX file as FINN's (MW, MH) matrix: the
    convs (in file order = unit order, checked against the metadata's layer names by
    qonnx_threshold_reference) and the head MatMul / Gemm weights (rows = inputs)."""
    from fqhw.backends.qonnx_export import qonnx_threshold_reference
    from fqhw.intcodes import int_range
    from fqhw.onnxgraph import const_value, producer_of, quant_const

    ref = qonnx_threshold_reference(qonnx_path)
    out: dict[str, np.ndarray] = {}
    for name, r in ref.items():
        w = r["w_int"]
        out[name] = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1).T
    model = onnx.load(str(qonnx_path))
    heads = [u for u in units if u not in out]
    mms = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    if len(mms) != len(heads):
        raise FqhwError(f"the QONNX file has {len(mms)} MatMul/Gemm nodes for the units {heads}")
    for name, mm in zip(heads, mms):
        q = producer_of(model, mm.input[1])
        if q is None or q.op_type != "Quant":
            raise FqhwError(f"{name}: its weight does not come from a Quant node")
        s, _, bits, signed, narrow = quant_const(model, q, f"{name} weight")
        lo, hi = int_range(bits, signed, narrow)
        w = np.round(np.clip(const_value(model, q.input[0]).astype(np.float64) / s, lo, hi)).astype(np.int64)
        trans_b = mm.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in mm.attribute)
        out[name] = w.T if trans_b else w
    return out


def match_mvaus(model, qonnx_path, units: list[str]) -> dict[str, str]:
    """unit -> MVAU node name, by weights (see the module docstring). Refuses a unit that
    matches no MVAU or several."""
    expected = _expected_weights(qonnx_path, units)
    mvaus = [n for n in model.graph.node if n.op_type in MVAU_TYPES]
    if len(mvaus) != len(units):
        raise FqhwError(f"the dataflow graph has {len(mvaus)} MVAUs but the allocation has {len(units)} units ({', '.join(units)})")
    weights = {n.name: np.abs(np.asarray(model.get_initializer(n.input[1]), dtype=np.float64)) for n in mvaus}
    out: dict[str, str] = {}
    for unit in units:
        e = np.abs(expected[unit]).astype(np.float64)
        hits = [n for n, w in weights.items() if w.shape == e.shape and np.array_equal(w, e)]
        if len(hits) != 1:
            raise FqhwError(f"{unit}: its weights match {len(hits)} MVAUs of the dataflow graph ({', '.join(hits)}), not one")
        out[unit] = hits[0]
    if len(set(out.values())) != len(out):
        raise FqhwError(f"two units matched one MVAU: {out}")
    return out


def layer_of_nodes(model, mvau_of_layer: dict[str, str]) -> dict[str, str]:
    """HW node -> unit: each MVAU's window / padding (up through a DuplicateStreams, which
    belongs to group 0 with the shared window) and its pooling behind it; a StreamingConcat
    to the last group of the layer it joins; anything else to the unit of the nearest MVAU
    upstream (the first unit when none)."""
    unit_of_mvau = {v: k for k, v in mvau_of_layer.items()}
    layer_of: dict[str, str] = {}
    for node in model.graph.node:
        if node.name not in unit_of_mvau:
            continue
        unit = unit_of_mvau[node.name]
        layer_of[node.name] = unit
        p = model.find_producer(node.input[0])
        while p is not None and (p.op_type.startswith(("FMPadding", "ConvolutionInputGenerator")) or p.op_type in FORK_TYPES):
            owner = unit
            if p.op_type in FORK_TYPES or p.name in layer_of:  # shared: group 0's
                layer, _ = parse_unit(unit)
                owner = min((u for u in mvau_of_layer if parse_unit(u)[0] == layer), key=lambda u: parse_unit(u)[1] or 0)
            layer_of[p.name] = owner
            p = model.find_producer(p.input[0])
        cons = model.find_consumers(node.output[0]) or []
        while len(cons) == 1 and (cons[0].op_type in POOL_TYPES or (cons[0].op_type.startswith("ConvolutionInputGenerator") and node_attr(cons[0], "depthwise") == 1)):
            layer_of[cons[0].name] = unit
            cons = model.find_consumers(cons[0].output[0]) or []
    first = next(iter(mvau_of_layer))
    for node in model.graph.node:  # graph order is topological: upstream nodes come first
        if node.name in layer_of:
            continue
        if node.op_type in JOIN_TYPES:
            owners = [layer_of.get(model.find_producer(t).name) for t in node.input if model.find_producer(t) is not None]
            layer_of[node.name] = max((o for o in owners if o), key=lambda u: parse_unit(u)[1] or 0, default=first)
            continue
        p = model.find_producer(node.input[0]) if node.input else None
        layer_of[node.name] = layer_of.get(p.name, first) if p is not None else first
    return layer_of


def _smallest_fold(total: int, per_step_cycles, target: int) -> int:
    """The smallest divisor d of `total` with per_step_cycles(d) <= target, else total."""
    for d in range(1, total + 1):
        if total % d == 0 and per_step_cycles(d) <= target:
            return d
    return total


def fold_joins(model, mvau_of_layer: dict[str, str]) -> dict[str, dict]:
    """PE of each DuplicateStreams and SIMD of each StreamingConcat: the smallest that keeps
    the node from slowing the pipeline. A fork must keep up with the fastest MVAU it feeds
    (its branches advance together); a join may take as long as the slowest MVAU feeding
    it. Returns {node: {attr: value}}."""
    from qonnx.custom_op.registry import getCustomOp

    cycles = {n: int(getCustomOp(model.get_node_from_name(n)).get_exp_cycles()) for n in mvau_of_layer.values()}
    mvaus = set(mvau_of_layer.values())
    folding: dict[str, dict] = {}

    def reach(start, forward: bool) -> list[str]:
        """The MVAUs reachable from `start` (forward or backward) without passing another MVAU."""
        found, todo, seen = [], [start], set()
        while todo:
            n = todo.pop()
            nxt = (model.find_consumers(n.output[0]) or []) if forward else [model.find_producer(t) for t in n.input]
            for m in nxt:
                if m is None or m.name in seen:
                    continue
                seen.add(m.name)
                if m.name in mvaus:
                    found.append(m.name)
                else:
                    todo.append(m)
        return found

    for node in model.graph.node:
        if node.op_type in FORK_TYPES:
            inst = getCustomOp(node)
            c = int(inst.get_nodeattr("NumChannels"))
            pixels = int(np.prod(inst.get_nodeattr("numInputVectors")))
            target = min(cycles[m] for m in reach(node, True))
            pe = _smallest_fold(c, lambda d: pixels * c // d, target)
            inst.set_nodeattr("PE", pe)
            folding[node.name] = {"PE": pe}
        elif node.op_type in JOIN_TYPES:
            inst = getCustomOp(node)
            chans = [int(c) for c in inst.get_nodeattr("ChannelsPerStream")]
            pixels = int(np.prod(inst.get_nodeattr("numInputVectors")))
            target = max(cycles[m] for m in reach(node, False))
            g = int(np.gcd.reduce(chans))
            simd = _smallest_fold(g, lambda d: pixels * sum(chans) // d, target)
            inst.set_nodeattr("SIMD", simd)
            folding[node.name] = {"SIMD": simd}
    return folding


def group_units(units: list[str]) -> bool:
    """Whether any of the allocation's units is a channel group ("<layer>:g<k>")."""
    return any(parse_unit(u)[1] is not None for u in units)
