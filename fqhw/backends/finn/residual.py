"""FINN (finn-plus) for timm models: how far the dataflow conversion gets, and the build.

`finn_dataflow_resnet` runs a QONNX file of a `fqhw.quant.generic.QuantResNet` through
RESIDUAL_STEPS (fqhw.backends.finn.steps), the streamlining a residual network needs on
top of FINN's default:

    input_codes, qonnx_to_finn, tidy_up   as for a FairCNN (PLAIN_STEPS)
    streamline_residual     FINN's Streamline, repeated with the residual moves (scales past
                            the join adds and forks) until nothing changes; convs lowered to
                            MatMul, layouts made channels-last; the global average pool
                            becomes an integer GlobalAccPool whose 1/N joins the output scale
    convert_to_hw_residual  MVAUs, sliding windows, thresholding, pooling, elementwise adds
                            of the residual joins and stream duplication at the forks; the
                            float output scale and classifier bias stay on the host
    round_thresholds

and checks that every op left outside the HW layers is layout or that float output tail;
with an allocation it goes on with RESIDUAL_DATAFLOW_STEPS (partition, specialize, fold,
estimates). `finn_dataflow_integer_trace` runs the HW graph in Python (FINN's own
execute_node per node, float64 containers) and returns the same keys as the Brevitas and
QONNX traces for the values FINN keeps: the input codes, every MVAU / Thresholding output
that is a quantized activation, and "fc.acc".

`finn_refusal` asks FINN to convert any QONNX model (a transformer's: ANY_STEPS) and names
the op types it leaves outside HW layers, as one FqhwError line.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fqhw.backends.finn.common import (
    DEFAULT_PART,
    HOST_LAYOUT_OPS,
    HOST_TAIL_OPS,
    RESOURCE_KEYS,
    finn_env,
    is_hw,
    op_counts,
    python_exec_model,
)
from fqhw.backends.finn.folding import match_mvaus_by_codes, qonnx_weight_codes  # (registers the steps fold_and_minimize, estimates)
from fqhw.backends.finn.steps import (
    ANY_STEPS,
    RESIDUAL_DATAFLOW_STEPS,
    RESIDUAL_STEPS,
    FinnFlow,
    run_steps,
)
from fqhw.errors import FqhwError


@dataclass
class FinnResult:
    """How far FINN got: the saved model after each step, op counts, and what is not HW."""

    build_dir: str
    steps: list[dict] = field(default_factory=list)  # name, seconds, model path, op counts
    hw_model: str = ""  # the graph after convert_to_hw and threshold rounding (generic HW nodes)
    hw_op_counts: dict = field(default_factory=dict)
    non_hw: list[str] = field(default_factory=list)  # "name (op_type)" of compute ops left in software
    host_nodes: list[str] = field(default_factory=list)  # allowed: layout in front, float tail
    # with an allocation: the partitioned, specialized, folded dataflow graph and FINN's
    # analytical estimates (totals of LUT / BRAM_18K / URAM / DSP, cycles, fps)
    dataflow_model: str = ""
    folding: dict = field(default_factory=dict)  # MVAU node -> {layer, PE, SIMD}
    estimates: dict = field(default_factory=dict)

    # with an allocation: FINN's estimates per fqhw layer (its MVAU's cycles and resources,
    # PE / SIMD), as fqhw.backends.finn.common.FinnBuild.layer_estimates has them
    layer_estimates: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.non_hw

    # What a compile report reads from a build, the same as FinnBuild's (fqhw.report).
    @property
    def part(self) -> str:
        return self.estimates.get("part", "")

    @property
    def totals(self) -> dict[str, float]:
        return dict(self.estimates.get("total", {}))

    def summary(self) -> dict:
        e = self.estimates
        clock = e.get("clock_ns", float("nan"))
        return {
            "part": self.part,
            "clock_ns": clock,
            "total": {k: float(self.totals.get(k, 0.0)) for k in RESOURCE_KEYS},
            "fps": e.get("fps"),
            "max_cycles": e.get("max_cycles"),
            "max_cycles_node": e.get("max_cycles_node"),
            "latency_cycles": e.get("critical_path_cycles"),
            "latency_ns": None if e.get("critical_path_cycles") is None else e["critical_path_cycles"] * clock,
            "latency_ms": None if e.get("critical_path_cycles") is None else e["critical_path_cycles"] * clock / 1e6,
            "outside_nodes": list(self.host_nodes),
            "steps_s": {st["name"]: st["seconds"] for st in self.steps},
            "hw_op_counts": dict(self.hw_op_counts),
            "thresholds_differing": None,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["complete"] = self.complete
        return d

    def save(self) -> Path:
        """build_dir/finn_result.json, its paths relative to build_dir so that the folder
        can be moved (the compile's step cache copies it)."""
        root = Path(self.build_dir)
        d = self.to_dict()
        d["build_dir"] = "."
        for key in ("hw_model", "dataflow_model"):
            if d[key]:
                d[key] = os.path.relpath(d[key], root)
        for st in d["steps"]:
            st["model"] = os.path.relpath(st["model"], root)
        path = root / "finn_result.json"
        path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, build_dir) -> "FinnResult":
        """Read `save`'s file from build_dir, its paths resolved against build_dir."""
        root = Path(build_dir).resolve()
        d = json.loads((root / "finn_result.json").read_text())
        d.pop("complete", None)
        d["build_dir"] = str(root)
        for key in ("hw_model", "dataflow_model"):
            if d.get(key):
                d[key] = os.path.normpath(str(root / d[key]))
        for st in d["steps"]:
            st["model"] = os.path.normpath(str(root / st["model"]))
        return cls(**d)


def _classify(model) -> tuple[list[str], list[str]]:
    """(non-HW compute nodes, allowed host nodes) of a converted graph: layout ops in front
    of the first HW node and float Mul/Add behind the last are host work."""
    non_hw, host = [], []
    outputs = {o.name for o in model.graph.output}
    tail: set[str] = set()
    # walk back from the graph outputs through float Mul / Add / layout ops
    frontier = [model.find_producer(o) for o in outputs]
    while frontier:
        n = frontier.pop()
        if n is None or is_hw(n) or n.name in tail:
            continue
        if n.op_type in HOST_TAIL_OPS + HOST_LAYOUT_OPS:
            tail.add(n.name)
            frontier += [model.find_producer(i) for i in n.input if model.get_initializer(i) is None]
    gin = {i.name for i in model.graph.input}
    for n in model.graph.node:
        if is_hw(n):
            continue
        front = n.op_type in HOST_LAYOUT_OPS and all(i in gin or model.get_initializer(i) is not None for i in n.input)
        if n.name in tail or front:
            host.append(f"{n.name} ({n.op_type})")
        else:
            non_hw.append(f"{n.name} ({n.op_type})")
    return non_hw, host


def finn_dataflow_resnet(qonnx_path, build_dir, alloc=None, part: str | None = None, clock_ns: float = 10.0) -> FinnResult:
    """Run FINN's conversion of a QuantResNet QONNX file up to HW layers; returns a
    FinnResult (every step's model saved in build_dir). Raises nothing when ops stay
    non-HW: `FinnResult.non_hw` names them (see `require_all_hw`).

    With an Allocation `alloc` and every compute op in HW, it goes on as FINN's estimate
    flow does: one dataflow partition (host Transpose in front, the float output scale and
    bias behind), SpecializeLayers for `part` (default xc7z020), the MVAUs folded with the
    allocation's PE / SIMD, bit widths minimized, and FINN's analytical estimates
    (`FinnResult.estimates`)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    part = part or DEFAULT_PART
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    res = FinnResult(build_dir=str(build_dir))
    counter = [0]

    def record(name, model, t0):
        counter[0] += 1
        path = build_dir / f"{counter[0]:02d}_{name}.onnx"
        model.save(str(path))
        res.steps.append({"name": name, "seconds": round(time.perf_counter() - t0, 3), "model": str(path), "ops": op_counts(model)})
        return str(path)

    cfg = FinnFlow(build_dir, part=part, clock_ns=clock_ns, alloc=alloc, qonnx_path=Path(qonnx_path))
    with finn_env(build_dir):
        model = run_steps(ModelWrapper(str(qonnx_path)), RESIDUAL_STEPS, cfg, record)
        res.hw_model = res.steps[-1]["model"]
        res.hw_op_counts = op_counts(model)
        res.non_hw, res.host_nodes = _classify(model)
        if alloc is not None and not res.non_hw:
            run_steps(model, RESIDUAL_DATAFLOW_STEPS, cfg, record)
            res.dataflow_model = res.steps[-1]["model"]
            res.folding = cfg.products["folding"]
            cycles, node_res, totals, perf = cfg.products["estimates"]
            parent = cfg.products["parent"]
            getCustomOp(parent.get_nodes_by_op_type("StreamingDataflowPartition")[0]).set_nodeattr("model", res.dataflow_model)
            parent.save(str(build_dir / "dataflow_parent.onnx"))
            res.estimates = {
                "part": part,
                "clock_ns": clock_ns,
                "total": {k: float(v) for k, v in totals.items()},
                "max_cycles": int(perf["max_cycles"]),
                "max_cycles_node": str(perf["max_cycles_node_name"]),
                "critical_path_cycles": int(perf["critical_path_cycles"]),
                "fps": float(perf["estimated_throughput_fps"]),
            }
            for node, f in res.folding.items():
                r = node_res.get(node, {})
                res.layer_estimates[f["layer"]] = {
                    "mvau": node, "pe": f["PE"], "simd": f["SIMD"], "cycles": int(cycles.get(node, 0)),
                    **{k: float(r.get(k, 0)) for k in RESOURCE_KEYS},
                }
    res.save()
    return res


def require_all_hw(res: FinnResult, what: str = "the model") -> FinnResult:
    """`res` if every compute op became a HW layer, else one FqhwError line naming the rest."""
    if res.non_hw:
        kinds = Counter(s.split(" (")[1].rstrip(")") for s in res.non_hw)
        ops = ", ".join(f"{k} x{v}" for k, v in kinds.most_common())
        raise FqhwError(f"FINN could not map {what} onto HW layers: {ops} left in software ({', '.join(res.non_hw[:5])}{', ...' if len(res.non_hw) > 5 else ''})")
    return res


# --------------------------------------------------------------------------- execution


def hw_keys(model, mvau_layer: dict) -> dict[str, str]:
    """HW node name -> trace key: an MVAU's output is "<layer>.act" (thresholded) or
    "<layer>.acc"; the Thresholding after a residual ElementwiseAdd is "<block>.out", one
    that feeds such an add (an identity shortcut's requantization) "<block>.shortcut",
    the block named by the add's main-branch MVAU (a layer of the block that is not its
    downsample)."""
    from qonnx.custom_op.registry import getCustomOp

    keys = {}
    for node in model.graph.node:
        if node.name in mvau_layer:
            layer = mvau_layer[node.name][0]
            no_act = int(getCustomOp(node).get_nodeattr("noActivation")) == 1
            keys[node.name] = f"{layer}.acc" if no_act else f"{layer}.act"
    for add in model.graph.node:
        if not add.op_type.startswith("ElementwiseAdd"):
            continue
        prods = [model.find_producer(i) for i in add.input]
        mains = [mvau_layer[p.name][0] for p in prods if p is not None and p.name in mvau_layer and ".downsample." not in mvau_layer[p.name][0]]
        if len(mains) != 1:
            raise FqhwError(f"FINN node {add.name}: cannot tell the residual branch of this add")
        block = mains[0].rsplit(".", 1)[0]
        for p in prods:
            if p is not None and p.op_type.startswith("Thresholding"):
                keys[p.name] = f"{block}.shortcut"
        for c in model.find_consumers(add.output[0]) or []:
            if c.op_type.startswith("Thresholding"):
                keys[c.name] = f"{block}.out"
    return keys


def finn_dataflow_integer_trace(res: FinnResult | str, qonnx_path, x, graph: str = "hw") -> "OrderedDict[str, np.ndarray]":
    """Run FINN's HW graph (after convert_to_hw) in Python on `x` (N, C, H, W floats =
    pixel/256), one image at a time: the host Transpose in front in numpy, every HW node
    with its own execute_node on float64 tensors (exact for integers below 2^53; FINN's
    MVAU multiplies in its inputs' dtype, and float32 stops being exact past 2^24), the
    float tail skipped. Returns int64 NCHW codes under the keys of
    `fqhw.quant.generic.integer_trace` ("input", "<layer>.act", "<block>.shortcut",
    "<block>.out", "fc.acc"); MVAUs are identified by their weight codes (from the QONNX
    file), so no name has to survive FINN's renaming.

    graph="hw" runs `FinnResult.hw_model` (generic HW nodes, before partitioning);
    graph="dataflow" the specialized, folded, bit-width-minimized partition
    (`FinnResult.dataflow_model`, each _hls / _rtl node through its generic Python
    execute_node, its input the NHWC codes the host Transpose would give it)."""
    import torch
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    from fqhw.intcodes import INT_TOL
    from fqhw.data.dataset import INPUT_SCALE

    if graph not in ("hw", "dataflow"):
        raise ValueError(f"graph must be 'hw' or 'dataflow', not {graph!r}")
    if isinstance(res, FinnResult):
        path = res.hw_model if graph == "hw" else res.dataflow_model
        if not path:
            raise FqhwError("no dataflow graph: run finn_dataflow_resnet with an allocation")
    else:
        path = str(res)
    model = ModelWrapper(path)
    if graph == "dataflow":
        model = python_exec_model(model)
    mvau_layer = match_mvaus_by_codes(model, qonnx_weight_codes(qonnx_path))
    keys = hw_keys(model, mvau_layer)
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    codes_f = x.astype(np.float64) / INPUT_SCALE
    codes = np.round(codes_f)
    if np.abs(codes_f - codes).max(initial=0.0) > INT_TOL or codes.min(initial=0) < 0 or codes.max(initial=0) > 255:
        raise FqhwError("FINN's input is the uint8 pixel codes: x must be pixel / 256")
    gin = model.graph.input[0].name
    per_key: dict[str, list[np.ndarray]] = {"input": [codes[i : i + 1].astype(np.int64) for i in range(len(codes))]}
    for i in range(codes.shape[0]):
        ctx = model.make_empty_exec_context()  # FINN's execute_node writes into allocated outputs
        a = codes[i : i + 1].astype(np.float64)
        want = tuple(model.get_tensor_shape(gin))
        if a.shape != want and a.transpose(0, 2, 3, 1).shape == want:
            a = a.transpose(0, 2, 3, 1)  # the partition reads NHWC: the host Transpose's output
        ctx[gin] = a
        for node in model.graph.node:
            if is_hw(node):
                for t in node.input:
                    v = ctx.get(t)
                    if isinstance(v, np.ndarray) and v.dtype != np.float64 and model.get_initializer(t) is None:
                        ctx[t] = v.astype(np.float64)
                getCustomOp(node).execute_node(ctx, model.graph)
            elif node.op_type == "Transpose" and node.input[0] in ctx:
                perm = [a.ints for a in node.attribute if a.name == "perm"][0]
                ctx[node.output[0]] = np.transpose(ctx[node.input[0]], list(perm))
            # the float tail (output scale, bias) is host arithmetic: not an integer value
        for node_name, key in keys.items():
            node = next(n for n in model.graph.node if n.name == node_name)
            v = ctx[node.output[0]]
            r = np.round(v)
            if np.abs(v - r).max(initial=0.0) > INT_TOL:
                raise AssertionError(f"FINN node {node_name} ({key}): output is not integer")
            r = r.astype(np.int64)
            if key.endswith(".acc"):
                r = r.reshape(1, -1) * mvau_layer[node_name][1].reshape(1, -1)
            elif r.ndim == 4:
                r = r.transpose(0, 3, 1, 2)  # NHWC -> NCHW
            per_key.setdefault(key, []).append(r)
    return OrderedDict((k, np.concatenate(v, axis=0)) for k, v in per_key.items())


# --------------------------------------------------------------------------- any model: what FINN refuses


def finn_convert_any(qonnx_path, build_dir) -> tuple[FinnResult, str | None]:
    """Ask FINN to convert any QONNX model (fqhw's 8-bit input quantizer in front): the
    steps of `finn_dataflow_resnet` (its streamlining holds all of FINN's default rewrites,
    bounded to a fixed number of rounds), and every HW conversion FINN has. Returns the result and, if a step
    raised, "step: first line of the error" (the result then describes the last graph that
    was reached)."""
    from qonnx.core.modelwrapper import ModelWrapper

    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    res = FinnResult(build_dir=str(build_dir))
    failed = None

    def record(name, model, t0):
        path = build_dir / f"{len(res.steps) + 1:02d}_{name}.onnx"
        model.save(str(path))
        res.steps.append({"name": name, "seconds": round(time.perf_counter() - t0, 3), "model": str(path), "ops": op_counts(model)})

    cfg = FinnFlow(build_dir, qonnx_path=Path(qonnx_path))
    with finn_env(build_dir):
        model = ModelWrapper(str(qonnx_path))
        for name in ANY_STEPS:
            try:
                model = run_steps(model, [name], cfg, record)
            except Exception as e:  # noqa: BLE001 - FINN's refusal is the result here
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                failed = f"{name}: {type(e).__name__}: {first}"
                break
    res.hw_model = res.steps[-1]["model"] if res.steps else ""
    res.hw_op_counts = op_counts(model)
    res.non_hw, res.host_nodes = _classify(model)
    return res, failed


def refusal_error(res: FinnResult, failed: str | None, model_name: str) -> FqhwError | None:
    """The one-line FqhwError for a `finn_convert_any` result (None if all is HW): the op
    types left outside HW layers with their counts, most frequent first."""
    if not res.non_hw and failed is None:
        return None
    kinds = Counter(s.rsplit(" (", 1)[1].rstrip(")") for s in res.non_hw)
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    where = f" (FINN stopped in {failed.split(':')[0]}: {failed.split(':')[1].strip()})" if failed else ""
    return FqhwError(
        f"FINN cannot build {model_name}: unsupported ops {ops or 'none identified'}{where}; "
        "QONNX export and the ASIC cost models still work"
    )


def finn_refusal(qonnx_path, model_name: str, build_dir) -> FqhwError | None:
    """None if FINN maps every compute op of the QONNX model onto HW layers; otherwise the
    one-line FqhwError that says which op types it leaves in software (with counts), e.g.
    "FINN cannot build deit_tiny_patch16_224: unsupported ops MatMul x13, Mul x15, ...;
    QONNX export and the ASIC cost models still work". The error is returned, not raised:
    the caller decides whether a model FINN cannot build stops its run."""
    res, failed = finn_convert_any(qonnx_path, build_dir)
    return refusal_error(res, failed, model_name)
