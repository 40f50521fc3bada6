"""Finishing a FINN build where the Xilinx tools are.

finn_build stops at FINN's estimates because everything after them (HLS / RTL code
generation, FIFO sizing, IP stitching, synthesis, bitfile) needs Xilinx tools. The build
folder carries what FINN needs to take over on a machine that has them: FINN's own build
configuration and folding configuration, the folded dataflow model the remaining steps
start from, a run script and a README (`write_synth_inputs`). `finn_synth` runs that
script's command here, when the tools are here.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from fqhw.backends.finn.common import is_hw
from fqhw.errors import FqhwError

SYNTH_CONFIG = "dataflow_build_config.json"  # FINN's DataflowBuildConfig, as JSON
FOLDING_CONFIG = "folding_config.json"  # FINN's folding configuration (ApplyConfig format)
SYNTH_MODEL = "dataflow_model.onnx"  # the folded, specialized HW graph: where FINN resumes
SYNTH_SCRIPT = "finish_build.sh"
SYNTH_README = "FINISH_BUILD.md"
SYNTH_OUTPUT = "vivado_build"  # FINN's output_dir, relative to the build folder
SYNTH_TMP = SYNTH_OUTPUT + "/finn_tmp"  # FINN_BUILD_DIR of the remaining steps
SUPPORTED_VIVADO = "2022.2 or 2024.2"  # the Xilinx tool versions finn-plus 1.6.1 names
# The node attributes FINN's step_apply_folding_config writes back to
# report/applied_folding_config.json (FINN keeps the list inside that step function), so
# that the folding file holds everything FINN itself would call folding.
FOLDING_ATTRS = (
    "PE", "SIMD", "EmbFold", "SeqFold", "parallel_window", "ram_style", "ram_style_thresholds",
    "ram_style_mask", "depth", "impl_style", "resType", "mac_resource", "mem_mode",
    "runtime_writeable_weights", "depth_trigger_uram", "depth_trigger_bram",
)
# FINN's default steps from this one on finish the build; the ones before it are what
# finn_build ran. Applying folding_config.json again leaves the folded model as it is,
# and keeps the file the one place to change the folding by hand.
FIRST_SYNTH_STEP = "step_apply_folding_config"


def resolve_board(part: str, board: str | None, cost_model) -> str | None:
    """FINN's board name for a bitfile: the one given, else the cost model's board, else
    fqhw's board with this part (the PYNQ-Z2 for the xc7z020, which the PYNQ-Z1 shares);
    None for a part no known board has (then only the stitched IP can be built)."""
    from finn.util.basic import part_map

    from fqhw.hwmodels.finn_boards import BOARDS

    if board is not None:
        if board not in part_map:
            raise FqhwError(f"unknown FINN board {board!r}: FINN knows {', '.join(sorted(part_map))}")
        if part_map[board] != part:
            raise FqhwError(f"FINN board {board} has part {part_map[board]}, not {part}")
        return board
    b = getattr(getattr(cost_model, "board", None), "finn_board", None)
    if b is not None and part_map.get(b) == part:
        return b
    names = [x.finn_board for x in BOARDS.values() if x.part == part and part_map.get(x.finn_board) == part]
    if "Pynq-Z2" in names:
        return "Pynq-Z2"
    return names[0] if names else None


def synth_command(finn: str = "finn", skip_dep_update: bool = False) -> list[str]:
    """The command, run in the build folder, that finishes the build with FINN's own CLI
    (finn-plus's `finn build`): FINN's remaining steps on dataflow_model.onnx, configured by
    dataflow_build_config.json. --batch: no setup wizard. skip_dep_update: do not let FINN
    fetch or update its HLS libraries (it does by default, which needs the network)."""
    argv = [finn, "build", "--batch"]
    if skip_dep_update:
        argv.append("--skip-dep-update")
    return argv + ["--build-path", SYNTH_TMP, SYNTH_CONFIG, SYNTH_MODEL]


def write_synth_inputs(build_dir, model, part: str, clock_ns: float, board: str | None) -> dict[str, Path]:
    """Write, next to build_dir/dataflow_model.onnx (the folded `model`), FINN's folding
    configuration (FINN's own extract_model_config_to_json over FOLDING_ATTRS), FINN's build
    configuration (checked by loading it with DataflowBuildConfig.construct_from, as `finn
    build` does), the run script and a README. All paths in them are relative, so that the
    folder can be copied to another machine. Returns {"config", "folding", "script",
    "readme"} paths."""
    from finn.builder.build_dataflow_config import DataflowBuildConfig, default_build_dataflow_steps
    from finn.util.basic import alveo_part_map
    from finn.util.config import extract_model_config_to_json

    build_dir = Path(build_dir)
    if not (build_dir / SYNTH_MODEL).exists():
        raise FqhwError(f"{build_dir / SYNTH_MODEL} does not exist: save the dataflow model first")
    folding_path = build_dir / FOLDING_CONFIG
    extract_model_config_to_json(model, folding_path, FOLDING_ATTRS)
    steps = list(default_build_dataflow_steps[default_build_dataflow_steps.index(FIRST_SYNTH_STEP) :])
    cfg: dict = {
        "output_dir": SYNTH_OUTPUT,
        "synth_clk_period_ns": float(clock_ns),
        "fpga_part": part,
        "folding_config_file": FOLDING_CONFIG,
        "steps": steps,
        "save_intermediate_models": True,
    }
    if board is not None:
        shell = "vitis_alveo" if board in alveo_part_map else "vivado_zynq"
        cfg.update(board=board, shell_flow_type=shell)
        cfg["generate_outputs"] = ["estimate_reports", "stitched_ip", "bitfile", "pynq_driver", "deployment_package"]
    else:  # no board: no shell to put the accelerator into; out-of-context synthesis instead
        cfg["generate_outputs"] = ["estimate_reports", "stitched_ip", "out_of_context_synth"]
    config_path = build_dir / SYNTH_CONFIG
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")
    DataflowBuildConfig.construct_from(config_path)  # FINN's loader: field names and files

    script = build_dir / SYNTH_SCRIPT
    script.write_text(
        "#!/usr/bin/env bash\n"
        "# Finish this FINN build: FINN's steps after the estimates (HLS/RTL code generation,\n"
        f"# FIFO sizing, IP stitching, synthesis, bitfile). Needs Vivado and Vitis HLS {SUPPORTED_VIVADO}\n"
        "# (source Vivado's settings64.sh first) and finn-plus 1.6.1 (pip install finn-plus==1.6.1).\n"
        "# FINN=/path/to/finn picks another finn command; FINN fetches its HLS libraries on the\n"
        "# first run (add --skip-dep-update once they are there).\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f'exec "${{FINN:-finn}}" {shlex.join(synth_command()[1:])} "$@"\n'
    )
    script.chmod(0o755)
    readme = build_dir / SYNTH_README
    readme.write_text(_synth_readme(model, cfg, steps))
    return {"config": config_path, "folding": folding_path, "script": script, "readme": readme}


def _synth_readme(model, cfg: dict, steps: list[str]) -> str:
    from qonnx.custom_op.registry import getCustomOp

    out = SYNTH_OUTPUT
    board = cfg.get("board")
    if board:
        target = f"board {board} ({cfg['fpga_part']}, shell flow {cfg['shell_flow_type']})"
        products = [
            f"- `{out}/bitfile/finn-accel.bit` and `.hwh` (`.xclbin` on Alveo): the bitfile",
            f"- `{out}/driver/`, `{out}/deploy/`: FINN's PYNQ driver and the deployment package",
            f"- `{out}/report/post_synth_resources.json`, `post_route_timing.rpt`: Vivado's numbers",
        ]
    else:
        target = f"part {cfg['fpga_part']} (no known board: stitched IP and out-of-context synthesis only)"
        products = [f"- `{out}/stitched_ip/`, `{out}/report/ooc_synth_and_timing.json`"]
    lines = [
        "# Finishing this FINN build",
        "",
        "fqhw ran FINN's steps up to its estimate reports in Python (no Xilinx tools); `fqhw compile`",
        "checks this folded dataflow graph bit for bit against Brevitas and QONNX (bitexact.json",
        "in the compile output). What is left needs",
        f"Vivado and Vitis HLS {SUPPORTED_VIVADO} (finn-plus 1.6.1 reads XILINX_VIVADO, XILINX_HLS and",
        "PATH: source Vivado's `settings64.sh`). On such a machine, in this folder:",
        "",
        f"    bash {SYNTH_SCRIPT}",
        "",
        "which runs FINN's own command line here:",
        "",
        f"    {shlex.join(synth_command())}",
        "",
        "or, with fqhw installed, `fqhw.backends.finn.synth.finn_synth('.')`, which first checks for",
        "the tools and names what is missing.",
        "",
        f"Target: {target}, clock {cfg['synth_clk_period_ns']:g} ns.",
        "",
        "## What is here",
        "",
        f"- `{SYNTH_MODEL}`: the folded, specialized HW graph; FINN's remaining steps start from it",
        f"- `{SYNTH_CONFIG}`: FINN's build configuration (`DataflowBuildConfig`); its steps are",
        f"  FINN's default ones from `{steps[0]}` on:",
        *[f"  - {st}" for st in steps],
        f"- `{FOLDING_CONFIG}`: FINN's folding configuration (PE/SIMD from fqhw's allocation);",
        "  edit it to change the folding (FINN applies it first), though fqhw's estimates then no",
        "  longer describe the build",
        "- `report/`: FINN's estimate reports for this folding, `threshold_check.json`",
        "",
        f"## What comes out (in `{out}/`)",
        "",
        *products,
        "",
        "## Folding",
        "",
        "| node | op | folding |",
        "| --- | --- | --- |",
    ]
    for node in model.graph.node:
        if not is_hw(node):
            continue
        inst = getCustomOp(node)
        types = inst.get_nodeattr_types()
        fold = ", ".join(f"{a}={inst.get_nodeattr(a)}" for a in ("PE", "SIMD") if a in types)
        lines.append(f"| {node.name} | {node.op_type} | {fold or '-'} |")
    return "\n".join(lines) + "\n"


@dataclass
class FinnSynth:
    """What FINN's remaining steps produced (`finn_synth`); paths absolute, None where FINN
    did not make the product (e.g. no bitfile for a part without a board)."""

    build_dir: str
    output_dir: str
    log: str
    seconds: float
    bitfile: str | None
    deploy_dir: str | None
    resources: dict = field(default_factory=dict)  # FINN's post_synth_resources.json


def _synth_dir(path) -> Path:
    """The FINN build folder: `path` itself, or the finn/ folder of a compile output."""
    path = Path(path).resolve()
    if not (path / SYNTH_CONFIG).exists() and (path / "finn" / "finn_build.json").exists():
        return path / "finn"
    return path


def _finn_executable() -> str | None:
    """finn-plus's `finn` command: next to this Python (a virtual environment), else on PATH."""
    import shutil
    import sys

    here = Path(sys.executable).parent / "finn"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("finn")


def synth_tools_missing(shell_flow_type: str | None = "vivado_zynq", env=None) -> list[str]:
    """What FINN's remaining steps need and this machine lacks, one phrase each ([] when
    nothing is missing). Read as finn-plus reads it: XILINX_VIVADO (it parses the tool
    version from that path), the tools on PATH or in FINN_TOOL_DIR_OVERRIDE (vivado;
    vitis_hls, or vitis-run after 2024.2), XILINX_VITIS and v++ for Alveo, a C++ compiler
    for its XSI simulator module, and the finn command itself."""
    import re
    import shutil

    env = os.environ if env is None else env
    override = env.get("FINN_TOOL_DIR_OVERRIDE")

    def tool(name: str) -> str | None:  # finn.util.basic.resolve_xilinx_tool's rule
        if override:
            p = Path(override) / name
            return str(p) if p.is_file() and os.access(p, os.X_OK) else None
        return shutil.which(name, path=env.get("PATH", ""))

    missing = []
    root = env.get("XILINX_VIVADO")
    vivado = tool("vivado")
    where = f"in FINN_TOOL_DIR_OVERRIDE={override}" if override else "on PATH"
    if not vivado and not root:
        hint = ""
        if env.get("FINN_XILINX_PATH"):
            hint = (
                f" (FINN_XILINX_PATH={env['FINN_XILINX_PATH']} is upstream FINN's docker setting, "
                "finn-plus does not read it: source Vivado's settings64.sh from there)"
            )
        missing.append(f"vivado not {where} and XILINX_VIVADO unset{hint}")
    elif not root:
        missing.append(f"vivado is {where} ({vivado}) but XILINX_VIVADO is unset")
    elif not vivado:
        missing.append(f"XILINX_VIVADO={root} but vivado is not {where}")
    version = None
    if root:
        m = re.search(r"\b(20\d{2})\.(1|2)\b", root)
        if m:
            version = (int(m.group(1)), int(m.group(2)))
        else:
            missing.append(f"XILINX_VIVADO={root} names no version such as 2022.2 (finn-plus reads it from that path)")
    hls = ["vitis-run"] if version is not None and version > (2024, 2) else ["vitis_hls"]
    if version is None:
        hls = ["vitis_hls", "vitis-run"]
    if not any(tool(h) for h in hls):
        missing.append(f"{' or '.join(hls)} (Vitis HLS) not {where}")
    if shell_flow_type == "vitis_alveo":
        if not env.get("XILINX_VITIS"):
            missing.append("XILINX_VITIS unset (Alveo builds use Vitis)")
        if not tool("v++"):
            missing.append(f"v++ not {where}")
    if not (shutil.which("g++", path=env.get("PATH", "")) or shutil.which("clang++", path=env.get("PATH", ""))):
        missing.append("no C++ compiler (g++ or clang++) for FINN's XSI simulator")
    if _finn_executable() is None:
        missing.append("the finn command of finn-plus is missing (pip install finn-plus==1.6.1)")
    return missing


def check_synth_tools(build_dir=None, shell_flow_type: str | None = "vivado_zynq", env=None) -> None:
    """Raise FqhwError, one line, naming what `finn_synth` needs and this machine lacks and
    how to get it (or where to run the build instead); return quietly when all is there."""
    missing = synth_tools_missing(shell_flow_type, env)
    if not missing:
        return
    vitis = " and Vitis" if shell_flow_type == "vitis_alveo" else ""
    where = f"`bash {SYNTH_SCRIPT}` in {build_dir}" if build_dir is not None else f"`bash {SYNTH_SCRIPT}` in the build folder"
    raise FqhwError(
        f"--synth needs Vivado and Vitis HLS{vitis} ({'; '.join(missing)}): install Vivado {SUPPORTED_VIVADO} "
        f"with Vitis HLS and source its settings64.sh (it sets XILINX_VIVADO, XILINX_HLS and PATH), "
        f"or run {where} on a machine that has them"
    )


def finn_synth(build_dir, *, skip_dep_update: bool = False, timeout_s: float | None = None, finn_command: str | None = None) -> FinnSynth:
    """Finish a FINN build made by `finn_build`: run FINN's remaining steps (HLS/RTL code
    generation, FIFO sizing, IP stitching, synthesis, bitfile, driver, deployment package)
    with finn-plus's own `finn build`, as the folder's finish_build.sh does.

    build_dir: the FINN build folder, or a compile output folder holding it as finn/.
    Before anything is written, checks the folder has what FINN needs and the machine has
    the Xilinx tools (`check_synth_tools`); either missing is a one-line FqhwError and the
    folder is left as it was. FINN writes into build_dir/vivado_build/ (its log:
    vivado_build/finn_synth.log). skip_dep_update: pass --skip-dep-update to FINN (no
    fetching of its HLS libraries). timeout_s: stop FINN (its whole process group) after
    this long. finn_command: the finn executable (default: next to this Python, else PATH).
    """
    import signal
    import subprocess

    build_dir = _synth_dir(build_dir)
    lacking = [n for n in (SYNTH_CONFIG, FOLDING_CONFIG, SYNTH_MODEL) if not (build_dir / n).is_file()]
    if lacking:
        raise FqhwError(
            f"{build_dir} is not a FINN build folder fqhw can finish: it lacks {', '.join(lacking)} "
            "(run `fqhw compile` again; builds made before fqhw wrote FINN's configurations lack them)"
        )
    cfg = json.loads((build_dir / SYNTH_CONFIG).read_text())
    shell = cfg.get("shell_flow_type")
    check_synth_tools(build_dir, shell)
    finn = finn_command or _finn_executable()
    out = build_dir / SYNTH_OUTPUT
    out.mkdir(parents=True, exist_ok=True)
    log = out / "finn_synth.log"
    argv = synth_command(finn, skip_dep_update=skip_dep_update)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        # a session of its own, so that a timeout stops FINN and the Vivado runs it started
        proc = subprocess.Popen(argv, cwd=build_dir, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise FqhwError(f"FINN did not finish the build in {out} within {timeout_s:g} s: see {log}") from None
    seconds = round(time.perf_counter() - t0, 1)
    # `finn build` exits 0 even when a step failed: FINN's own verdict is in its report
    meta = out / "report" / "metadata_builder.json"
    status = json.loads(meta.read_text()).get("status") if meta.exists() else None
    if rc != 0 or status != "ok":
        raise FqhwError(
            f"FINN could not finish the build in {out} (exit code {rc}, FINN status {status}): "
            f"see {log} and {out / 'build_dataflow.log'}"
        )
    bitfile = None
    if "bitfile" in cfg.get("generate_outputs", []):
        found = sorted((out / "bitfile").glob("finn-accel*.bit")) + sorted((out / "bitfile").glob("finn-accel*.xclbin"))
        if not found:
            raise FqhwError(f"FINN reported success but wrote no bitfile to {out / 'bitfile'}: see {log}")
        bitfile = str(found[0])
    deploy = out / "deploy"
    res_path = out / "report" / "post_synth_resources.json"
    resources = json.loads(res_path.read_text()) if res_path.exists() else {}
    return FinnSynth(
        build_dir=str(build_dir),
        output_dir=str(out),
        log=str(log),
        seconds=seconds,
        bitfile=bitfile,
        deploy_dir=str(deploy) if deploy.is_dir() else None,
        resources=resources,
    )
