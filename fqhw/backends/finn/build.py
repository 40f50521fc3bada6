"""FINN (finn-plus) dataflow build of a QONNX model, estimate-only, without Xilinx tools.

`finn_build` runs FINN's estimate-only builder flow as a list of named steps
(fqhw.backends.finn.steps: PLAIN_STEPS, or GROUPS_STEPS for an allocation with channel
groups), each a function `step(model, cfg) -> model`:

    input_codes               fqhw: the accelerator's input is the uint8 pixel codes
    qonnx_to_finn             cleanup + ConvertQONNXtoFINN
    tidy_up                   shapes, constant folding, names, datatypes
    streamline                scales / BN / ReLU into thresholds, convs lowered to MatMul
                              (streamline_groups: with the fork / Concat-join moves)
    convert_to_hw             HW layers (MVAU, sliding window, padding, pooling, ...)
    minimize_bit_width_initial
    create_dataflow_partition the HW layers become one StreamingDataflowPartition
    specialize_layers         HLS / RTL variants for the part
    apply_folding             PE / SIMD from the Allocation; sliding windows etc. folded as
                              the FINN cost model's layer_units() says
    minimize_bit_width
    check_dataflow            no Shuffle, no non-HW node inside the partition (a check:
                              no model saved)
    estimates                 res_estimation, exp_cycles_per_layer, dataflow_performance

and then threshold_check (fqhw: FINN's integer thresholds vs float64 ones from the QONNX
file, fqhw.backends.finn.execute). Every step saves its model as build_dir/<nn>_<name>.onnx;
the estimate reports (in the file names and layout FINN's builder uses, plus fqhw's
per-layer view) go to build_dir/report/.

`finn_integer_trace` (fqhw.backends.finn.execute) runs the folded dataflow graph in Python,
one image at a time, and returns the integers the hardware computes.

The rest of FINN's flow (HLS / RTL code generation, IP stitching, synthesis, bitfile) needs
Vivado. `finn_build` therefore also leaves in build_dir what FINN needs to finish there
(fqhw.backends.finn.synth): FINN's build configuration (dataflow_build_config.json, a
DataflowBuildConfig), its folding configuration (folding_config.json), the folded
dataflow_model.onnx the remaining steps start from, finish_build.sh and FINISH_BUILD.md.
`finn_synth` runs those steps through finn-plus's own `finn build` where the Xilinx tools
are installed, and otherwise stops, before writing anything, with a one-line error naming
what is missing.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import onnx

from fqhw.allocator.allocation import Allocation
from fqhw.backends.finn.common import DEFAULT_PART, FinnBuild, FinnStep, RESOURCE_KEYS, finn_env
from fqhw.backends.finn.execute import threshold_check
from fqhw.backends.finn.folding import node_units  # (registers the steps apply_folding, estimates)
from fqhw.backends.finn.groups import group_units
from fqhw.backends.finn.steps import FinnFlow, GROUPS_STEPS, PLAIN_STEPS, run_steps
from fqhw.backends.finn.synth import resolve_board, write_synth_inputs
from fqhw.errors import FqhwError


def finn_build(
    qonnx_path,
    alloc: Allocation,
    build_dir,
    part: str = DEFAULT_PART,
    clock_ns: float = 10.0,
    cost_model=None,
    board: str | None = None,
) -> FinnBuild:
    """Estimate-only FINN dataflow build of the QONNX file at `qonnx_path` folded as `alloc` says.

    cost_model: the FinnCostModel whose `layer_units` folds the units around each MVAU
    (default: the one of a board with this part). After the estimates, `threshold_check`
    compares FINN's integer thresholds with float64 ones from the QONNX file; its result is
    in `FinnBuild.threshold_check` and build_dir/report/threshold_check.json (a record: the
    build does not fail on it).

    The folder also gets what FINN needs to finish the build where Vivado is installed
    (`write_synth_inputs`: FINN's build and folding configurations, a README and a run
    script next to dataflow_model.onnx); `finn_synth` runs it. board: FINN's board name for
    the bitfile (e.g. "Pynq-Z2"); default: the cost model's board, else the board with
    this part."""
    from qonnx.core.modelwrapper import ModelWrapper

    board = resolve_board(part, board, cost_model)
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    qonnx_path = Path(qonnx_path).resolve()
    if not qonnx_path.exists():
        raise FqhwError(f"QONNX file {qonnx_path} does not exist: run export_qonnx first")
    layer_names = [la.name for la in alloc.layers]
    meta = {p.key: p.value for p in onnx.load(str(qonnx_path), load_external_data=False).metadata_props}
    if "fqhw_layer_names" in meta and json.loads(meta["fqhw_layer_names"]) != layer_names:
        raise FqhwError(
            f"the allocation's layers {layer_names} are not the exported model's "
            f"{json.loads(meta['fqhw_layer_names'])}"
        )
    steps: list[FinnStep] = []
    counter = [0]

    def record(name, model, t0):
        counter[0] += 1
        path = build_dir / f"{counter[0]:02d}_{name}.onnx"
        model.save(str(path))
        steps.append(FinnStep(name, round(time.perf_counter() - t0, 4), str(path)))

    cfg = FinnFlow(build_dir, part=part, clock_ns=clock_ns, alloc=alloc, qonnx_path=qonnx_path, cost_model=cost_model, layer_names=layer_names)
    with finn_env(build_dir):
        model = run_steps(ModelWrapper(str(qonnx_path)), GROUPS_STEPS if group_units(layer_names) else PLAIN_STEPS, cfg, record)
        parent, outside = cfg.products["parent"], cfg.products["outside"]
        folding, groups_mvaus = cfg.products["folding"], cfg.products["groups_mvaus"]
        cycles, res, totals, perf = cfg.products["estimates"]
        parent_path = build_dir / "dataflow_parent.onnx"
        dataflow_path = build_dir / "dataflow_model.onnx"
        model.save(str(dataflow_path))
        t0 = time.perf_counter()
        thr_check = threshold_check(qonnx_path, model, node_units(model, layer_names, groups_mvaus)[1])
        steps.append(FinnStep("threshold_check", round(time.perf_counter() - t0, 4), str(dataflow_path)))
        # the parent graph, pointing at the final dataflow graph
        from qonnx.custom_op.registry import getCustomOp

        sdp = parent.get_nodes_by_op_type("StreamingDataflowPartition")[0]
        getCustomOp(sdp).set_nodeattr("model", str(dataflow_path))
        parent.save(str(parent_path))
        synth = write_synth_inputs(build_dir, model, part=part, clock_ns=clock_ns, board=board)

    layer_of, mvau_of_layer = node_units(model, layer_names, groups_mvaus)
    node_est: dict[str, dict] = {}
    for node in model.graph.node:
        r = res.get(node.name, {})
        e = {"op_type": node.op_type, "layer": layer_of.get(node.name), "cycles": int(cycles.get(node.name, 0))}
        for k in RESOURCE_KEYS:
            e[k] = float(r.get(k, 0))
        for k, v in r.items():
            if k not in e:
                e[k] = v
        e.update({f"fold_{k}": v for k, v in folding.get(node.name, {}).items()})
        node_est[node.name] = e
    layer_est: dict[str, dict] = {}
    for ln in layer_names:
        nodes = [n for n, l in layer_of.items() if l == ln]
        d = {
            "nodes": nodes,
            "mvau": mvau_of_layer[ln],
            "mvau_cycles": node_est[mvau_of_layer[ln]]["cycles"],
            "cycles": max(node_est[n]["cycles"] for n in nodes),
            "pe": int(folding[mvau_of_layer[ln]]["PE"]),
            "simd": int(folding[mvau_of_layer[ln]]["SIMD"]),
        }
        for k in RESOURCE_KEYS:
            d[k] = float(sum(node_est[n][k] for n in nodes))
        layer_est[ln] = d
    tot = {k: float(totals.get(k, 0.0)) for k in RESOURCE_KEYS}
    tot.update({k: float(v) for k, v in totals.items() if k not in tot})
    build = FinnBuild(
        build_dir=str(build_dir),
        qonnx_path=str(qonnx_path),
        part=part,
        clock_ns=float(clock_ns),
        dataflow_model=str(dataflow_path),
        parent_model=str(parent_path),
        steps=steps,
        node_estimates=node_est,
        layer_estimates=layer_est,
        layer_of_node=layer_of,
        mvau_of_layer=mvau_of_layer,
        totals=tot,
        max_cycles=int(perf["max_cycles"]),
        max_cycles_node=str(perf["max_cycles_node_name"]),
        critical_path_cycles=int(perf["critical_path_cycles"]),
        fps=float(perf["estimated_throughput_fps"]),
        latency_ns=float(perf["estimated_latency_ns"]),
        outside_nodes=outside,
        folding=folding,
        threshold_check=thr_check,
        board=board,
        synth_config=str(synth["config"]),
        folding_config=str(synth["folding"]),
    )
    report = build_dir / "report"
    (report / "threshold_check.json").write_text(json.dumps(thr_check, indent=2, sort_keys=True) + "\n")
    (report / "estimate_fqhw_layers.json").write_text(json.dumps(layer_est, indent=2, sort_keys=True) + "\n")
    (report / "finn_steps.json").write_text(
        json.dumps([asdict(s) for s in steps], indent=2) + "\n"
    )
    build.save()
    return build
