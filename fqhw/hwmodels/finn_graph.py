"""A FINN dataflow graph of HW nodes built straight from an allocation, for running FINN's
own transformations (SpecializeLayers, SetFolding) and estimate analyses on it without a
trained model: the units FinnCostModel.layer_units prices for every layer (padding, sliding
window, MVAU, pool window, pool; the input thresholding where the cost model has it),
chained in stream order, each with its widths and folding as FINN's attributes.

What it leaves out: a residual network's stream forks and element-wise adds (the cost model
has no terms for them; they are the same for any allocation of the same widths), the width
converters and FIFOs FINN inserts only when it generates hardware (not in its estimate
reports either). The MVAU weights are random integers of the allocated width (FINN's
SpecializeLayers reads them to choose the MVAU's backend: narrow-range weights allow the
RTL MVAU on DSP48E1 parts).

tests/test_hwmodels.py checks, node by node, that FINN's estimates of this graph equal the
cost model's.
"""
from __future__ import annotations

import numpy as np

from fqhw.network import NetworkSpec

PRICED = ("LUT", "BRAM_18K", "URAM", "DSP")


def _hw_node(op: str, inputs, outputs, **attrs):
    from onnx import helper

    return helper.make_node(op, list(inputs), list(outputs), domain="finn.custom_op.fpgadataflow", backend="fpgadataflow", **attrs)


def hw_graph(net: NetworkSpec, priced: dict, narrow: bool = True, seed: int = 0):
    """(model, units): the generic (unspecialised) FINN HW nodes of an allocation, given as
    what fqhw.allocator.cpsat.price says of it on a FINN cost model (every unit with its
    widths and folding); `units` lists each node's (LayerSpec or "input", unit dict) in graph
    order. Node names are n0, n1, ..."""
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.basic import qonnx_make_model

    pr = priced
    rng = np.random.default_rng(seed)
    nodes, inits, units = [], {}, []
    if pr["extras"]:
        units += [("input", u) for u in pr["extras"]["units"]]
    for spec in net.layers:
        units += [(spec, u) for u in pr["layers"][spec.name]["units"]]
    for t, (spec, u) in enumerate(units):
        a, op = u["attrs"], u["op_type"]
        i, o = f"t{t}", f"t{t + 1}"
        if op == "Thresholding_rtl":
            inits[f"thr{t}"] = np.sort(rng.random((a["NumChannels"], 2 ** a["out_bits"] - 1)), axis=1).astype(np.float32)
            n = _hw_node("Thresholding", (i, f"thr{t}"), (o,), NumChannels=a["NumChannels"], PE=a["PE"],
                         numSteps=2 ** a["out_bits"] - 1, inputDataType="FLOAT32", weightDataType="FLOAT32",
                         outputDataType=f"UINT{a['out_bits']}", numInputVectors=[1, a["numInputVectors"]])
        elif op == "FMPadding_rtl":
            n = _hw_node("FMPadding", (i,), (o,), ImgDim=a["ImgDim"], Padding=a["Padding"], NumChannels=a["NumChannels"],
                         SIMD=a["SIMD"], inputDataType=f"UINT{a['in_bits']}")
        elif op == "ConvolutionInputGenerator_rtl":
            n = _hw_node("ConvolutionInputGenerator", (i,), (o,), ConvKernelDim=a["ConvKernelDim"], IFMChannels=a["IFMChannels"],
                         IFMDim=a["IFMDim"], OFMDim=a["OFMDim"], SIMD=a["SIMD"], Stride=a["Stride"], Dilation=[1, 1],
                         inputDataType=f"UINT{a['in_bits']}", outputDataType=f"UINT{a['in_bits']}", depthwise=a["depthwise"],
                         parallel_window=a["parallel_window"], ram_style=a["ram_style"], is1D=0)
        elif op in ("MVAU_hls", "MVAU_rtl"):
            wb = a["weight_bits"]
            lim = 2 ** (wb - 1) - 1 if narrow else 2 ** (wb - 1)
            wts = rng.integers(-lim, 2 ** (wb - 1), size=(a["MW"], a["MH"])).astype(np.float32)
            wts[0, 0] = -lim
            inits[f"w{t}"] = wts
            ins = [i, f"w{t}"]
            if not a["noActivation"]:
                inits[f"thr{t}"] = np.zeros((a["MH"], 2 ** a["out_bits"] - 1), dtype=np.float32)
                ins.append(f"thr{t}")
            vecs = [1, spec.out_hw[0], spec.out_hw[1]] if spec.kind == "conv" else [1]
            n = _hw_node("MVAU", ins, (o,), MW=a["MW"], MH=a["MH"], PE=a["PE"], SIMD=a["SIMD"],
                         inputDataType=f"UINT{a['in_bits']}", weightDataType=f"INT{wb}",
                         outputDataType=(f"INT{a['out_bits']}" if a["noActivation"] else f"UINT{a['out_bits']}"),
                         accDataType=f"INT{a['acc_bits']}", noActivation=a["noActivation"], numInputVectors=vecs,
                         mem_mode=a["mem_mode"], ram_style=a["ram_style"], ram_style_thresholds=a["ram_style_thresholds"],
                         binaryXnorMode=0)
        elif op == "Pool_hls":
            n = _hw_node("Pool", (i,), (o,), Channels=a["Channels"], PE=a["PE"], KernelSize=a["KernelSize"], Function="MaxPool",
                         OutImgDims=a["OutImgDims"], InputDataType=f"UINT{a['in_bits']}", OutputDataType=f"UINT{a['in_bits']}",
                         BatchSize=1)
        else:  # pragma: no cover - the cost model prices no other unit
            raise AssertionError(op)
        n.name = f"n{t}"
        nodes.append(n)
    graph = helper.make_graph(
        nodes, "dataflow", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(f"t{len(units)}", TensorProto.FLOAT, [1])],
    )
    model = ModelWrapper(qonnx_make_model(graph))
    for name, val in inits.items():
        model.set_initializer(name, val)
    return model, units


def estimates(model, part: str, clock_ns: float) -> dict:
    """FINN's estimate analyses of a specialised graph: per node cycles and resources
    (exp_cycles_per_layer, res_estimation), their totals, and dataflow_performance's
    bottleneck and critical path; fps = clock / bottleneck cycles."""
    from finn.analysis.fpgadataflow.dataflow_performance import dataflow_performance
    from finn.analysis.fpgadataflow.exp_cycles_per_layer import exp_cycles_per_layer
    from finn.analysis.fpgadataflow.res_estimation import res_estimation
    from finn.transformation.fpgadataflow.annotate_cycles import AnnotateCycles

    cycles = {k: int(v) for k, v in model.analysis(exp_cycles_per_layer).items()}
    res = model.analysis(lambda m: res_estimation(m, fpgapart=part))
    totals = {r: int(np.ceil(sum(float(v.get(r, 0)) for v in res.values()))) for r in PRICED}
    perf = model.transform(AnnotateCycles()).analysis(dataflow_performance)
    max_cycles = int(perf["max_cycles"])
    return {
        "cycles": cycles,
        "resources": res,
        "totals": totals,
        "max_cycles": max_cycles,
        "max_cycles_node": perf["max_cycles_node_name"],
        "critical_path_cycles": int(perf["critical_path_cycles"]),
        "fps": (1e9 / clock_ns) / max_cycles,
    }


def mvau_folding(model, units) -> dict[str, tuple[int, int]]:
    """Per layer, the (PE, SIMD) of its MVAU as it stands in `model` (e.g. after FINN's
    SetFolding), read from the graph `hw_graph` built (`units` as it returned them)."""
    from qonnx.custom_op.registry import getCustomOp

    fold = {}
    for node, (spec, u) in zip(model.graph.node, units):
        if u["role"] == "mvau":
            inst = getCustomOp(node)
            fold[spec.name] = (int(inst.get_nodeattr("PE")), int(inst.get_nodeattr("SIMD")))
    return fold
