"""hls4ml project for the PYNQ-Z2 from a power-of-two QONNX model (its C simulation:
fqhw.backends.hls4ml.csim; its types: fqhw.backends.hls4ml.graph).

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
import io
import shutil
import time
import warnings
from pathlib import Path

import onnx

from fqhw.allocator.allocation import Allocation
from fqhw.backends.hls4ml.graph import precisions, qonnx_structure, same_type, ufixed
from fqhw.backends.hls4ml.record import BACKEND, BOARD, DEFAULT_CLOCK_NS, IO_TYPES, PART, PROJECT_NAME, Hls4mlBuild
from fqhw.errors import FqhwError
from fqhw.onnxgraph import node_attrs


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
        names[f"clone_{producer}"] = {"Precision": {"result": ufixed(t["bits"], t["exp"], quant=True)}}
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
        if got is None or not same_type(got, want):
            bad.append(f"{layer_name}.{var}: hls4ml has {got}, needs {want}")

    inp = hm.get_input_variables()[0].type.precision
    if not same_type(inp, prec["input"]["result"]):
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
    structure = qonnx_structure(model, alloc)
    prec, acc_bits = precisions(structure)
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
