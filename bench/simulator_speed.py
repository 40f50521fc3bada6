"""Images/s of the fast integer simulator against qonnx's execute_onnx on one compile output.

    fqhw compile --out /tmp/simbench --quiet          # once (about a minute, cached float model)
    fqhw compile --backend hls4ml --out /tmp/simbench-hls4ml --quiet   # the same allocation, power-of-two scheme
    python bench/simulator_speed.py [--build /tmp/simbench] [--hls4ml-build /tmp/simbench-hls4ml] [--n-qonnx 64]
                                    [--out bench/results/simulator_speed.json]

Both run in this one process on the same first `--n-qonnx` test images (regenerated from
the build's config.json): qonnx as fqhw runs it (qonnx_integer_trace, precision float32: the
file as it is, one image at a time through execute_onnx), the simulator batched. The ratio
that counts is the like-for-like one: the simulator's full trace (every layer's codes, as
int64, as qonnx's trace returns them) on the same images. The simulator is also timed with
trace=False (only the head accumulator and logits: what `fqhw simulate` runs over a whole data
set), and both ways over the whole test split. Its integers are checked against qonnx's on
the shared images (bit-exact, or the benchmark fails).

With an hls4ml build of the same configuration (`--hls4ml-build`; its allocation is checked
to be the FINN build's), the "hls4ml" section times three runners of that one power-of-two
model on the same images: qonnx (float32, its model.qonnx.onnx), the simulator built from
that file (IntegerSimulator.from_qonnx, what `fqhw simulate` runs on an hls4ml build) and
hls4ml's C simulation (hls4ml_integer_trace: the compiled library, one C call per image, every
layer traced, as fqhw's cross-check runs it), and checks all three bit for bit. The C
simulation is rebuilt first if it was compiled in another folder (timed apart).

The two FINN graphs that are DAGs rather than chains have their own sections, each timed
in its own run against qonnx on the same model and images:

    fqhw compile --channel-groups 2 --out /tmp/h3-groups ...     # "groups": fork + concat
    fqhw compile --model resnet18 --channels 64,16,16,16 --data-image-size 64 --out /tmp/h3-resnet ...
    python bench/simulator_speed.py --sections groups,resnet --groups-build /tmp/h3-groups --resnet-build /tmp/h3-resnet

"groups" times qonnx_integer_trace(precision='float32') as the base section does; "resnet"
times qonnx's execute_onnx of the file as it is (float32, logits: qonnx_execute) and
qonnx_integer_trace_generic (float64, every layer's codes: what the cross-check runs),
against the simulator's full trace (IntegerSimulator.from_finn_result) on the same images,
checked bit for bit against the latter. `--resnet-build` may also be a folder holding only
model.qonnx.onnx and finn/finn_result.json (as tests/test_intsim_graphs.py builds it): the
images are then seeded random pixel codes. `--sections` without "base" keeps the base and
hls4ml figures already in `--out` and replaces only the sections it runs.

Every figure is the best of a few runs, in wall-clock seconds and also in CPU seconds of this
process (all threads): the machine may be shared, and CPU time is the steadier measure of
the work done when other processes compete for the cores. The load average before and after
is recorded with them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from fqhw.backends.intsim import DEFAULT_BATCH_SIZE, IntegerSimulator
from fqhw.backends.qonnx_export import qonnx_integer_trace
from fqhw.backends.verify import check_bit_exact
from fqhw.data.dataset import INPUT_SCALE
from fqhw.simulate import build_test_data


def _hls4ml_figures(path: Path, finn_build: Path, images: np.ndarray, n_hls4ml: int, qonnx_repeats: int, bs) -> dict:
    """qonnx, the QONNX-built simulator and the hls4ml C simulation on the power-of-two model
    of the hls4ml build at `path` (same images, same process), with their ratios."""
    from fqhw.backends.hls4ml.csim import ensure_csim_here, hls4ml_integer_trace
    from fqhw.backends.hls4ml.record import Hls4mlBuild

    a_finn = json.loads((finn_build / "allocation.json").read_text())
    a_hls = json.loads((path / "allocation.json").read_text())
    same_alloc = a_finn["layers"] == a_hls["layers"]
    build = Hls4mlBuild.load(path / "hls4ml")
    t0 = time.perf_counter()
    rebuilt = ensure_csim_here(build)
    rebuild_s = time.perf_counter() - t0
    qpath = path / "model.qonnx.onnx"
    t0 = time.perf_counter()
    sim = IntegerSimulator.from_qonnx(qpath)
    build_s = time.perf_counter() - t0
    n_q = min(len(images), 64 if n_hls4ml >= 64 else n_hls4ml)
    n_h = min(len(images), n_hls4ml)
    xq = images[:n_q].astype(np.float32) * np.float32(INPUT_SCALE)
    xh = images[:n_h].astype(np.float64) * INPUT_SCALE
    out: dict = {}

    def run_qonnx():
        out["qonnx"] = qonnx_integer_trace(qpath, xq, precision="float32")

    def run_hls4ml():
        out["hls4ml"] = hls4ml_integer_trace(build, xh)

    sim.run(images[:8], batch_size=bs)
    hls4ml_integer_trace(build, xh[:2])  # first call: loads the library and its weight files
    qonnx = _best_of(run_qonnx, qonnx_repeats)
    hls = _best_of(run_hls4ml, 2)
    same = _best_of(lambda: sim.run(images[:n_h], batch_size=bs), 5)
    all_nt = _best_of(lambda: sim.run(images, batch_size=bs, trace=False), 3)
    s = sim.run(images[:n_h], batch_size=bs)
    tr = {k: v for k, v in s.items() if k != "logits"}
    be = check_bit_exact({
        "intsim": {k: v[:n_q] for k, v in tr.items()},
        "qonnx_float32": out["qonnx"],
        "hls4ml": {k: v[:n_q] for k, v in out["hls4ml"].items()},
    })
    be_h = check_bit_exact({"intsim": tr, "hls4ml": out["hls4ml"]})
    if not (be.ok and be_h.ok):
        raise SystemExit(f"the po2 simulator, qonnx and hls4ml disagree: {be.first_mismatch or be_h.first_mismatch}")
    q_rate, h_rate = n_q / qonnx[0], n_h / hls[0]
    s_rate, a_rate = n_h / same[0], len(images) / all_nt[0]
    return {
        "build": str(path),
        "same_allocation_as_finn_build": same_alloc,
        "csim_rebuilt_for_this_folder": rebuilt,
        "csim_rebuild_s": round(rebuild_s, 1),
        "simulator_build_s": round(build_s, 3),
        "n_images_qonnx": n_q,
        "n_images_hls4ml_and_simulator": n_h,
        "qonnx_float32_images_per_s": round(q_rate, 1),
        "hls4ml_csim_images_per_s": round(h_rate, 1),
        "simulator_images_per_s_same_images": round(s_rate, 1),
        "simulator_images_per_s_all_test_images_logits_only": round(a_rate, 1),
        "ratio_simulator_vs_qonnx": round(s_rate / q_rate, 1),
        "ratio_simulator_vs_hls4ml_csim": round(s_rate / h_rate, 1),
        "ratio_simulator_all_logits_only_vs_qonnx": round(a_rate / q_rate, 1),
        "ratio_hls4ml_csim_vs_qonnx": round(h_rate / q_rate, 1),
        "cpu_time": {
            "qonnx_float32_images_per_cpu_s": round(n_q / qonnx[1], 1),
            "hls4ml_csim_images_per_cpu_s": round(n_h / hls[1], 1),
            "simulator_same_images_per_cpu_s": round(n_h / same[1], 1),
            "ratio_simulator_vs_qonnx": round((n_h / same[1]) / (n_q / qonnx[1]), 1),
            "ratio_simulator_vs_hls4ml_csim": round(hls[1] / same[1], 1),
        },
        "bit_exact_simulator_qonnx_float32_hls4ml": be.ok and be_h.ok,
        "note": "one power-of-two model (fqhw compile --backend hls4ml); qonnx: qonnx_integer_trace(precision='float32'); "
                "hls4ml: hls4ml_integer_trace (C simulation, one call per image, every layer traced); simulator: "
                "IntegerSimulator.from_qonnx, full int64 trace on the same images; best of several runs",
    }


def _graph_images(path: Path, shape, n_all: int) -> tuple[np.ndarray, str]:
    """The test split of the compile in `path`, or (no config.json) `n_all` seeded random
    pixel codes of the build's input shape."""
    if (path / "config.json").is_file():
        return build_test_data(path).images, "the build's test split"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n_all, *shape), dtype=np.uint8), "seeded random pixel codes (no config.json)"


def _groups_figures(path: Path, n_qonnx: int, repeats: int, bs) -> dict:
    """qonnx (float32 trace) against the simulator on a --channel-groups build: the
    DuplicateStreams fork and StreamingConcat join of the grouped layers."""
    sim_t0 = time.perf_counter()
    sim = IntegerSimulator.from_build(path)
    build_s = time.perf_counter() - sim_t0
    images, source = build_test_data(path).images, "the build's test split"
    n = min(n_qonnx, len(images))
    imgs = images[:n]
    x = imgs.astype(np.float32) * np.float32(INPUT_SCALE)
    out: dict = {}

    def run_qonnx():
        out["q"] = qonnx_integer_trace(path / "model.qonnx.onnx", x, precision="float32")

    sim.run(imgs[:8], batch_size=bs)
    qonnx = _best_of(run_qonnx, repeats)
    same = _best_of(lambda: sim.run(imgs, batch_size=bs), 5)
    all_nt = _best_of(lambda: sim.run(images, batch_size=bs, trace=False), 3)
    s = sim.run(imgs, batch_size=bs)
    be = check_bit_exact({"intsim": {k: v for k, v in s.items() if k != "logits"}, "qonnx_float32": out["q"]})
    if not be.ok:
        raise SystemExit(f"groups: the simulator and qonnx (float32) disagree: {be.first_mismatch}")
    cfg = json.loads((path / "config.json").read_text())
    q_rate, s_rate, a_rate = n / qonnx[0], n / same[0], len(images) / all_nt[0]
    return {
        "build": str(path),
        "channel_groups": cfg.get("channel_groups"),
        "images": source,
        "joins": sum(nd.op_type.startswith("StreamingConcat") for nd in sim.nodes),
        "simulator_build_s": round(build_s, 3),
        "n_images_shared": n,
        "n_images_all": len(images),
        "qonnx_float32_images_per_s": round(q_rate, 1),
        "simulator_images_per_s_same_images": round(s_rate, 1),
        "simulator_images_per_s_all_test_images_logits_only": round(a_rate, 1),
        "ratio_same_images": round(s_rate / q_rate, 1),
        "ratio_all_test_images_logits_only": round(a_rate / q_rate, 1),
        "cpu_time": {
            "qonnx_float32_images_per_cpu_s": round(n / qonnx[1], 1),
            "simulator_same_images_per_cpu_s": round(n / same[1], 1),
            "ratio_same_images": round(qonnx[1] / same[1], 1),
        },
        "bit_exact_vs_qonnx_float32": be.ok,
    }


def _resnet_figures(path: Path, n_qonnx: int, n_trace: int, repeats: int, bs) -> dict:
    """qonnx (execute_onnx float32 logits; the float64 integer trace) against the simulator
    on a ResNet's FINN build: residual adds, forks, GlobalAccPool."""
    from fqhw.backends.qonnx_generic import qonnx_execute, qonnx_integer_trace_generic

    qpath = path / "model.qonnx.onnx"
    t0 = time.perf_counter()
    sim = IntegerSimulator.from_finn_result(path / "finn", qpath)
    build_s = time.perf_counter() - t0
    shape = (sim.in_shape[3], sim.in_shape[1], sim.in_shape[2])  # the partition reads NHWC
    images, source = _graph_images(path, shape, 512)
    n = min(n_qonnx, len(images))
    nt = min(n_trace, n)
    imgs = images[:n]
    x32 = imgs.astype(np.float32) * np.float32(INPUT_SCALE)
    out: dict = {}

    def run_exec():
        out["logits"] = np.asarray(qonnx_execute(qpath, x32)).reshape(n, -1)  # one image at a time

    def run_trace():
        out["trace"] = qonnx_integer_trace_generic(qpath, imgs[:nt].astype(np.float64) * INPUT_SCALE)

    sim.run(imgs[:4], batch_size=bs)
    execute = _best_of(run_exec, repeats)
    trace = _best_of(run_trace, 1)
    same = _best_of(lambda: sim.run(imgs, batch_size=bs), 3)
    all_nt = _best_of(lambda: sim.run(images, batch_size=bs, trace=False), 3)
    s = sim.run(imgs, batch_size=bs)
    mine = {k: v[:nt] for k, v in s.items() if k != "logits"}
    be = check_bit_exact({"intsim": mine, "qonnx_float64": out["trace"]}, partial=("intsim",))
    if not be.ok:
        raise SystemExit(f"resnet: the simulator and qonnx disagree: {be.first_mismatch}")
    agree = float(np.mean(np.argmax(s["logits"], axis=1) == np.argmax(out["logits"], axis=1)))
    e_rate, t_rate = n / execute[0], nt / trace[0]
    s_rate, a_rate = n / same[0], len(images) / all_nt[0]
    return {
        "build": str(path),
        "images": source,
        "input_shape": list(shape),
        "residual_adds": sum(nd.op_type.startswith("ElementwiseAdd") for nd in sim.nodes),
        "simulator_build_s": round(build_s, 3),
        "n_images_shared": n,
        "n_images_qonnx_trace": nt,
        "n_images_all": len(images),
        "qonnx_execute_float32_images_per_s": round(e_rate, 2),
        "qonnx_integer_trace_float64_images_per_s": round(t_rate, 2),
        "simulator_images_per_s_same_images": round(s_rate, 1),
        "simulator_images_per_s_all_images_logits_only": round(a_rate, 1),
        "ratio_same_images_vs_qonnx_execute": round(s_rate / e_rate, 1),
        "ratio_same_images_vs_qonnx_integer_trace": round(s_rate / t_rate, 1),
        "ratio_all_images_logits_only_vs_qonnx_execute": round(a_rate / e_rate, 1),
        "cpu_time": {
            "qonnx_execute_float32_images_per_cpu_s": round(n / execute[1], 2),
            "qonnx_integer_trace_float64_images_per_cpu_s": round(nt / trace[1], 2),
            "simulator_same_images_per_cpu_s": round(n / same[1], 1),
            "ratio_same_images_vs_qonnx_execute": round((n / same[1]) / (n / execute[1]), 1),
        },
        "bit_exact_vs_qonnx_integer_trace": be.ok,
        "argmax_agrees_with_qonnx_execute_float32": agree,
    }


def _best_of(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) over `repeats` calls."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=Path, default=Path("/tmp/simbench"))
    ap.add_argument("--n-qonnx", type=int, default=64, help="images run through qonnx (and the simulator, for the ratio)")
    ap.add_argument("--qonnx-repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help=f"simulator images per pass (default {DEFAULT_BATCH_SIZE})")
    ap.add_argument("--hls4ml-build", type=Path, default=Path("/tmp/simbench-hls4ml"),
                    help="an fqhw compile --backend hls4ml output of the same configuration (skipped when absent)")
    ap.add_argument("--n-hls4ml", type=int, default=256, help="images run through the hls4ml C simulation")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "simulator_speed.json")
    ap.add_argument("--sections", default="base,groups,resnet",
                    help="comma list of base (with hls4ml), groups, resnet; a build folder that is absent skips its section")
    ap.add_argument("--groups-build", type=Path, default=Path("/tmp/h3-groups"),
                    help="an fqhw compile --channel-groups N output folder")
    ap.add_argument("--resnet-build", type=Path, default=Path("/tmp/h3-resnet"),
                    help="an fqhw compile --model resnet18 output folder (or model.qonnx.onnx + finn/finn_result.json)")
    ap.add_argument("--n-resnet", type=int, default=16, help="images run through qonnx's execute_onnx on the ResNet")
    ap.add_argument("--n-resnet-trace", type=int, default=4, help="of those, through qonnx's float64 integer trace")
    args = ap.parse_args()
    bs = args.batch_size
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"base", "groups", "resnet"}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}")
    if "base" not in sections:
        _graph_sections_only(args, sections, bs)
        return

    load_before = os.getloadavg()
    data = build_test_data(args.build)
    n = min(args.n_qonnx, len(data))
    imgs = data.images[:n]
    x = imgs.astype(np.float32) * np.float32(INPUT_SCALE)  # exact: pixel / 256

    t0 = time.perf_counter()
    sim = IntegerSimulator.from_build(args.build)
    build_s = time.perf_counter() - t0

    q = None

    def run_qonnx():
        nonlocal q
        q = qonnx_integer_trace(args.build / "model.qonnx.onnx", x, precision="float32")

    sim.run(imgs[:8], batch_size=bs)  # warm up: first-call costs (imports, BLAS threads)
    qonnx = _best_of(run_qonnx, args.qonnx_repeats)
    same = _best_of(lambda: sim.run(imgs, batch_size=bs), 5)
    same_nt = _best_of(lambda: sim.run(imgs, batch_size=bs, trace=False), 5)
    all_nt = _best_of(lambda: sim.run(data.images, batch_size=bs, trace=False), 3)
    all_tr = _best_of(lambda: sim.run(data.images, batch_size=bs), 2)
    s = sim.run(imgs, batch_size=bs)
    be = check_bit_exact({"intsim": {k: v for k, v in s.items() if k != "logits"}, "qonnx_float32": q})
    if not be.ok:
        raise SystemExit(f"the simulator and qonnx (float32) disagree: {be.first_mismatch}")
    hls = None
    if args.hls4ml_build and (args.hls4ml_build / "hls4ml" / "hls4ml_build.json").is_file():
        hdata = build_test_data(args.hls4ml_build)
        if not np.array_equal(hdata.images, data.images):
            raise SystemExit(f"{args.hls4ml_build} was compiled on other test images than {args.build}")
        hls = _hls4ml_figures(args.hls4ml_build, args.build, data.images, args.n_hls4ml, args.qonnx_repeats, bs)
    graphs = _graph_sections(args, sections, bs)
    load_after = os.getloadavg()

    def rate(count, secs):
        return round(count / secs, 1)

    qonnx_rate, qonnx_cpu = rate(n, qonnx[0]), rate(n, qonnx[1])
    cfg = json.loads((args.build / "config.json").read_text())
    figures = {
        "build": str(args.build),
        "model": {"channels": cfg["channels"], "image_size": cfg["data"]["image_size"], "budget": cfg["budget"], "target": cfg["target"]},
        "n_images_shared": n,
        "n_images_all": len(data),
        "batch_size": bs or DEFAULT_BATCH_SIZE,
        "simulator_build_s": round(build_s, 3),
        "qonnx_float32_images_per_s": qonnx_rate,
        "simulator_images_per_s_same_images": rate(n, same[0]),
        "simulator_images_per_s_same_images_logits_only": rate(n, same_nt[0]),
        "simulator_images_per_s_all_test_images": rate(len(data), all_tr[0]),
        "simulator_images_per_s_all_test_images_logits_only": rate(len(data), all_nt[0]),
        "ratio_same_images": round(n / same[0] / (n / qonnx[0]), 1),
        "ratio_same_images_logits_only": round(n / same_nt[0] / (n / qonnx[0]), 1),
        "ratio_all_test_images": round(len(data) / all_tr[0] / (n / qonnx[0]), 1),
        "ratio_all_test_images_logits_only": round(len(data) / all_nt[0] / (n / qonnx[0]), 1),
        "cpu_time": {
            "qonnx_float32_images_per_cpu_s": qonnx_cpu,
            "simulator_same_images_per_cpu_s": rate(n, same[1]),
            "simulator_all_test_images_logits_only_per_cpu_s": rate(len(data), all_nt[1]),
            "ratio_same_images": round(qonnx[1] / same[1], 1),
        },
        "bit_exact_vs_qonnx_float32": be.ok,
        "hls4ml": hls,
        **graphs,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "note": "qonnx: qonnx_integer_trace(precision='float32'), execute_onnx one image at a time; "
                "simulator: IntegerSimulator.run (full int64 trace unless 'logits_only': trace=False); "
                "best of several runs in one process; ratios against qonnx's rate on the shared images",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    f = figures
    print(f"qonnx execute_onnx (float32), {n} images:      {qonnx_rate:8.1f} images/s")
    print(f"simulator, same images, full trace:        {f['simulator_images_per_s_same_images']:8.1f} images/s  -> {f['ratio_same_images']:.1f}x")
    print(f"simulator, same images, logits only:       {f['simulator_images_per_s_same_images_logits_only']:8.1f} images/s  -> {f['ratio_same_images_logits_only']:.1f}x")
    print(f"simulator, {len(data)} images, full trace:       {f['simulator_images_per_s_all_test_images']:8.1f} images/s  -> {f['ratio_all_test_images']:.1f}x")
    print(f"simulator, {len(data)} images, logits only:      {f['simulator_images_per_s_all_test_images_logits_only']:8.1f} images/s  -> {f['ratio_all_test_images_logits_only']:.1f}x")
    print(f"CPU time, same images: qonnx {qonnx_cpu:.1f}, simulator {f['cpu_time']['simulator_same_images_per_cpu_s']:.1f} images/cpu-s -> {f['cpu_time']['ratio_same_images']:.1f}x")
    if hls is not None:
        h = hls
        print(f"hls4ml build (power-of-two, same allocation: {h['same_allocation_as_finn_build']}):")
        print(f"  qonnx execute_onnx (float32), {h['n_images_qonnx']} images: {h['qonnx_float32_images_per_s']:8.1f} images/s")
        print(f"  hls4ml C simulation, {h['n_images_hls4ml_and_simulator']} images:      {h['hls4ml_csim_images_per_s']:8.1f} images/s")
        print(f"  simulator, same images, full trace:  {h['simulator_images_per_s_same_images']:8.1f} images/s  -> "
              f"{h['ratio_simulator_vs_qonnx']:.1f}x qonnx, {h['ratio_simulator_vs_hls4ml_csim']:.1f}x hls4ml C-sim")
        print(f"  simulator, all images, logits only:  {h['simulator_images_per_s_all_test_images_logits_only']:8.1f} images/s  -> "
              f"{h['ratio_simulator_all_logits_only_vs_qonnx']:.1f}x qonnx")
        print(f"  bit-exact simulator / qonnx / hls4ml: {h['bit_exact_simulator_qonnx_float32_hls4ml']}")
    _print_graphs(graphs)
    print(f"load average {f['machine']['load_average_1min_before_after']}; bit-exact vs qonnx float32 on {n} images: {be.ok}; wrote {args.out}")


def _graph_sections(args, sections: set[str], bs) -> dict:
    """{"groups": ..., "resnet": ...} for the sections asked for whose build folder exists."""
    out = {}
    if "groups" in sections and (args.groups_build / "finn" / "finn_build.json").is_file():
        out["groups"] = _groups_figures(args.groups_build, args.n_qonnx, args.qonnx_repeats, bs)
    if "resnet" in sections and (args.resnet_build / "finn" / "finn_result.json").is_file():
        out["resnet"] = _resnet_figures(args.resnet_build, args.n_resnet, args.n_resnet_trace, 1, bs)
    return out


def _graph_sections_only(args, sections: set[str], bs) -> None:
    """Run only the groups / resnet sections and merge them into the existing --out file,
    its other fields kept (they were measured in another run: compare ratios, not rates)."""
    load_before = os.getloadavg()
    graphs = _graph_sections(args, sections, bs)
    load_after = os.getloadavg()
    if not graphs:
        raise SystemExit("no build folder for the sections asked for: pass --groups-build / --resnet-build")
    figures = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name, sec in graphs.items():
        sec["load_average_1min_before_after"] = [round(load_before[0], 2), round(load_after[0], 2)]
        figures[name] = sec
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    _print_graphs(graphs)
    print(f"wrote {', '.join(graphs)} into {args.out}")


def _print_graphs(graphs: dict) -> None:
    g = graphs.get("groups")
    if g is not None:
        print(f"channel groups ({g['channel_groups']} per layer, {g['joins']} joins), {g['n_images_shared']} images:")
        print(f"  qonnx execute_onnx (float32 trace): {g['qonnx_float32_images_per_s']:8.1f} images/s")
        print(f"  simulator, full trace:              {g['simulator_images_per_s_same_images']:8.1f} images/s  -> {g['ratio_same_images']:.1f}x "
              f"(CPU time {g['cpu_time']['ratio_same_images']:.1f}x)")
        print(f"  simulator, {g['n_images_all']} images, logits only: {g['simulator_images_per_s_all_test_images_logits_only']:8.1f} images/s")
    r = graphs.get("resnet")
    if r is not None:
        print(f"ResNet-18 {r['input_shape']} ({r['residual_adds']} residual adds), {r['n_images_shared']} images ({r['images']}):")
        print(f"  qonnx execute_onnx (float32, logits): {r['qonnx_execute_float32_images_per_s']:8.2f} images/s")
        print(f"  qonnx integer trace (float64):        {r['qonnx_integer_trace_float64_images_per_s']:8.2f} images/s")
        print(f"  simulator, full trace:                {r['simulator_images_per_s_same_images']:8.1f} images/s  -> "
              f"{r['ratio_same_images_vs_qonnx_execute']:.1f}x execute_onnx, {r['ratio_same_images_vs_qonnx_integer_trace']:.1f}x the trace "
              f"(CPU time {r['cpu_time']['ratio_same_images_vs_qonnx_execute']:.1f}x)")
        print(f"  simulator, {r['n_images_all']} images, logits only: {r['simulator_images_per_s_all_images_logits_only']:8.1f} images/s; "
              f"bit-exact vs qonnx trace: {r['bit_exact_vs_qonnx_integer_trace']}")


if __name__ == "__main__":
    main()
