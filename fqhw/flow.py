"""The compile flow: named steps with typed inputs and outputs.

    data -> float_model -> importance -> allocate -> quantize (+ uniform baselines)
         -> export -> build (the backend's: finn, hls4ml; none for an ASIC target)
         -> verify -> report

Each step is a plain function of the config and the previous steps' results; `compile`
runs them in order into a staging folder beside the output folder and swaps it in only when
every step has succeeded, so a failed or interrupted run leaves no partial output and keeps
the previous one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fqhw.allocator.allocation import Allocation
from fqhw.backends.base import get_backend
from fqhw.config import (
    BIT_RANGE,
    CompileConfig,
    allocation_net,
    build_model,
    is_fpga,
    model_config,
    out_folder,
    pinned_edges,
    validate,
)
from fqhw.data.dataset import DataSplits
from fqhw.data.registry import describe, load_data
from fqhw.errors import FqhwError
from fqhw.families import family
from fqhw.fairness.importance import group_sensitivity
from fqhw.fairness.sensitivity import Sensitivity
from fqhw.models.cnn import CNNConfig
from fqhw.network import NetworkSpec, network_spec
from fqhw.outputs import save_tensors, staging_folder, swap_in, write_json, write_manifest
from fqhw.stepcache import StepCache, file_digest, input_key
from fqhw.stepkeys import KEYS


# ---------------------------------------------------------------- the steps

@dataclass
class FloatModel:
    model: torch.nn.Module  # FairCNN or a registry model (CompileConfig.model)
    config: CNNConfig | dict
    net: NetworkSpec
    info: dict
    cache_hit: bool
    key: str = ""  # hash of everything the weights depend on (data, model, training, file)

def step_data(cfg: CompileConfig) -> DataSplits:
    from fqhw.data.images import require_coverage

    splits = load_data(cfg.data_spec, image_size=cfg.data.image_size, seed=cfg.seed, builtin=cfg.data)
    if cfg.data_spec != "builtin":  # the built-in set covers every group and class by construction
        require_coverage(splits, cfg.data_spec.partition(":")[0].strip().lower())
    return splits

def _data_fingerprint(spec: str) -> list:
    """Absolute paths, sizes and modification times of the files a real data spec names, so
    that a cached model is not reused after the data changed or for another folder."""
    from fqhw.data.registry import parse_spec

    _kind, location, _options = parse_spec(spec)
    out = []
    for part in str(location).split(","):
        path = Path(part).absolute()
        entries = [path] + (sorted(path.iterdir()) if path.is_dir() else [])  # a root: its CSVs and image folders
        for f in entries:
            st = f.stat() if f.exists() else None
            out.append([str(f), st.st_size if st else None, st.st_mtime_ns if st else None])
    return out

def _float_key(cfg: CompileConfig, mcfg: CNNConfig | dict) -> dict:
    data = asdict(cfg.data) if cfg.data_spec == "builtin" else {"spec": cfg.data_spec, "image_size": cfg.data.image_size,
                                                                   "files": _data_fingerprint(cfg.data_spec)}
    # weights from a file: the key (and the baselines' after it) follows the file's contents
    return KEYS["float_model"].key(cfg, data=data, model=mcfg.to_dict() if isinstance(mcfg, CNNConfig) else mcfg)

def step_float_model(cfg: CompileConfig, splits: DataSplits) -> FloatModel:
    from fqhw.models.train import cached_float_model, train_float

    mcfg = model_config(cfg, splits.train.num_classes)

    def build():
        torch.manual_seed(cfg.seed)
        return build_model(cfg, splits.train.num_classes)

    def train(model):
        return train_float(model, splits, epochs=cfg.float_epochs, lr=cfg.float_lr, batch_size=64, seed=cfg.seed, progress=cfg.progress)

    if cfg.checkpoint is not None:
        from fqhw.models.checkpoint import load_checkpoint

        model, hit = build(), False
        info = load_checkpoint(model, cfg.checkpoint)
    else:
        model, info, hit = cached_float_model(_float_key(cfg, mcfg), build, train, cfg.cache_dir)
    model.eval()
    net = allocation_net(cfg, network_spec(model, splits.train.input_shape, name=cfg.model))
    return FloatModel(model, mcfg, net, info, hit, key=input_key(_float_key(cfg, mcfg)))

def step_importance(cfg: CompileConfig, fm: FloatModel, splits: DataSplits) -> Sensitivity:
    return group_sensitivity(
        fm.model, fm.net, splits.val, bits=range(BIT_RANGE[0], BIT_RANGE[1] + 1), max_per_group=cfg.importance_samples, seed=cfg.seed
    )

def _write_sensitivity(sens: Sensitivity, folder: Path) -> None:
    sens.save(folder / "sensitivity.json")


def _load_sensitivity(folder: Path) -> Sensitivity:
    return Sensitivity.load(folder / "sensitivity.json")


def cached_importance(cfg: CompileConfig, fm: FloatModel, splits: DataSplits, cache: StepCache) -> Sensitivity:
    """The importance step through the step cache, for a sweep outside compile (the same
    entry compile stores: computed once per seed, whichever run or worker asks first)."""
    return cache.run("importance", KEYS["importance"].key(cfg, float=fm.key), lambda: step_importance(cfg, fm, splits),
                     _write_sensitivity, _load_sensitivity).value


def step_allocate(cfg: CompileConfig, net: NetworkSpec, sens: Sensitivity, utilisation: dict[str, float] | None = None) -> Allocation:
    """`utilisation`: the board's caps as fractions of its totals (default the cost model's)."""
    from fqhw.allocator.cpsat import allocate
    from fqhw.hwmodels import get_cost_model

    return allocate(
        net,
        sens,
        get_cost_model(cfg.target, **({"utilisation": utilisation} if utilisation else {})),
        budget=cfg.budget,
        pinned=pinned_edges(cfg, net),
        min_fps=cfg.min_fps,
        # with a rate to meet, the cheapest design that meets it; else the fastest that fits
        objective="resources" if cfg.min_fps else None,
        time_limit_s=cfg.solver_time_limit_s,
        seed=cfg.seed,
    )

def over_caps(totals: dict[str, float], lim) -> dict[str, tuple[float, float]]:
    """Each resource of a build's own estimates over the board's cap: (used, cap)."""
    return {r: (used, lim.cap(r)) for r, used in totals.items() if r in lim.totals and used > lim.cap(r)}


FIT_ROUNDS = 4  # FINN builds step_fit may try before it gives up
FIT_MARGIN = 0.97  # QAT moves accumulator widths a little: aim this far under the cap


def step_fit(cfg: CompileConfig, fm: FloatModel, alloc: Allocation, sens: Sensitivity, splits: DataSplits) -> Allocation:
    """The allocation re-solved until the backend's own estimates fit the board, for a
    family its cost model does not price whole (Backend.refits: for FINN, a ResNet's
    residual joins add element-wise adds, stream forks and requantizing thresholds the
    cost model has no terms for).

    Resources depend on the widths and the folding, not on trained weights, so this is
    done before QAT, on the calibrated but untrained model: build its estimates; while
    a resource exceeds its cap, lower that resource's utilisation limit in the cost model by
    the measured excess (times FIT_MARGIN) and solve again. The rounds are recorded in the
    allocation's solver record ("finn_fit")."""
    import tempfile

    from fqhw.hwmodels import get_cost_model
    from fqhw.quant.qmodel import calibrate

    fam = family(cfg.model)
    backend = _backend(cfg)
    base = get_cost_model(cfg.target)
    lim = base.limits
    util = dict(lim.utilisation)
    rounds = []
    for _ in range(FIT_ROUNDS):
        torch.manual_seed(cfg.seed)
        qmodel = fam.quant_model(fm.model, alloc, cfg.backend)
        calibrate(qmodel, splits.train.loader(64, shuffle=True, seed=cfg.seed), batches=2)
        qmodel.eval()
        fam.snap(qmodel, cfg.backend)
        with tempfile.TemporaryDirectory(prefix="fqhw-fit-") as tmp:
            path = fam.export(qmodel, splits.train.input_shape, Path(tmp) / "model.qonnx.onnx")
            build = backend.build(path, alloc, Path(tmp) / backend.name, kind=fam.kind, model=cfg.model, cost_model=base)
            totals = backend.totals(build)
        over = {r: used / cap for r, (used, cap) in over_caps(totals, lim).items()}
        rounds.append({"utilisation": dict(util), "finn_totals": {k: float(v) for k, v in totals.items()}, "over": over})
        if not over:
            alloc.solver["finn_fit"] = rounds
            return alloc
        for r, ratio in over.items():
            util[r] = util.get(r, 1.0) * FIT_MARGIN / ratio
        alloc = step_allocate(cfg, fm.net, sens, utilisation=util)
    worst = ", ".join(f"{r} {100 * v:.0f} % of the cap" for r, v in rounds[-1]["over"].items())
    raise FqhwError(f"{backend.label}'s estimates still exceed {cfg.target} after {FIT_ROUNDS} re-allocations ({worst}): lower the budget or pass --min-fps")


@dataclass
class LearnedBits:
    """BAQ's result as the flow uses it: the projected allocation and the weights to start
    QAT from."""

    allocation: Allocation
    float_state: dict
    summary: dict


def step_baq(cfg: CompileConfig, fm: FloatModel, alloc: Allocation, splits: DataSplits) -> LearnedBits:
    from fqhw.hwmodels import get_cost_model
    from fqhw.quant.baq import check_budget_met, learn_bits

    res = learn_bits(
        fm.model, alloc, splits, fm.net, budget=cfg.budget, epochs=cfg.baq_epochs, lr=cfg.qat_lr,
        fairness_lambda=cfg.fairness_lambda, bitrate_lambda=cfg.baq_bitrate_lambda, seed=cfg.seed,
        cost_model=get_cost_model(cfg.target), pinned=pinned_edges(cfg, fm.net), min_fps=cfg.min_fps,
        time_limit_s=cfg.solver_time_limit_s, progress=cfg.progress,
    )
    check_budget_met(fm.net, res.allocation, cfg.budget)
    return LearnedBits(res.allocation, res.float_state, res.summary())


def _write_baq(lb: LearnedBits, folder: Path) -> None:
    save_tensors(lb.float_state, folder / "float_state.pt")
    write_json(folder / "baq.json", {"allocation": lb.allocation.to_dict(), "summary": lb.summary})


def _load_baq(folder: Path) -> LearnedBits:
    d = json.loads((folder / "baq.json").read_text())
    state = torch.load(folder / "float_state.pt", map_location="cpu", weights_only=True)
    return LearnedBits(Allocation.from_dict(d["allocation"]), state, d["summary"])


@dataclass
class QuantModel:
    model: torch.nn.Module
    allocation: Allocation
    qat: dict
    test_metrics: dict

def calibrated_quant_model(cfg: CompileConfig, fm: FloatModel, alloc: Allocation, splits: DataSplits) -> torch.nn.Module:
    """The backend scheme's Brevitas model of `alloc` on fm's weights, its activation ranges
    calibrated on 8 training batches: where every QAT run (and tuning candidate) starts."""
    from fqhw.quant.qmodel import calibrate

    torch.manual_seed(cfg.seed)
    qmodel = family(cfg.model).quant_model(fm.model, alloc, cfg.backend)
    calibrate(qmodel, splits.train.loader(64, shuffle=True, seed=cfg.seed), batches=8)
    return qmodel


def quantize_finetune(cfg: CompileConfig, fm: FloatModel, alloc: Allocation, splits: DataSplits, desc: str) -> QuantModel:
    from fqhw.quant.qat import evaluate_groups, finetune, tune

    qmodel = calibrated_quant_model(cfg, fm, alloc, splits)
    if cfg.qat_grid:
        res = tune(qmodel, splits, cfg.qat_epochs, grid=tuple(cfg.qat_grid), seed=cfg.seed, progress=cfg.progress, desc=desc)
    else:
        res = finetune(
            qmodel, splits, epochs=cfg.qat_epochs, lr=cfg.qat_lr, fairness_lambda=cfg.fairness_lambda, seed=cfg.seed, progress=cfg.progress, desc=desc
        )
    snap = family(cfg.model).snap(qmodel, cfg.backend)  # code boundaries off float rounding error
    return QuantModel(qmodel, alloc, {**asdict(res), "threshold_snap": snap}, evaluate_groups(qmodel, splits.test))

def _write_quant(qm: QuantModel, folder: Path) -> None:
    save_tensors(qm.model.state_dict(), folder / "quant_model.pt")
    write_json(folder / "quant.json", {"allocation": qm.allocation.to_dict(), "qat": qm.qat, "test_metrics": qm.test_metrics})


def _load_quant(cfg: CompileConfig, fm: FloatModel) -> Callable[[Path], QuantModel]:
    def load(folder: Path) -> QuantModel:
        d = json.loads((folder / "quant.json").read_text())
        alloc = Allocation.from_dict(d["allocation"])
        qmodel = family(cfg.model).quant_model(fm.model, alloc, cfg.backend)
        qmodel.load_state_dict(torch.load(folder / "quant_model.pt", map_location="cpu", weights_only=True))
        qmodel.eval()
        return QuantModel(qmodel, alloc, d["qat"], d["test_metrics"])

    return load


def step_quantize(cfg: CompileConfig, fm: FloatModel, alloc: Allocation, splits: DataSplits) -> QuantModel:
    return quantize_finetune(cfg, fm, alloc, splits, desc="QAT compiled")

def step_baselines(cfg: CompileConfig, fm: FloatModel, splits: DataSplits, cache: StepCache | None = None) -> dict[str, dict]:
    """Test metrics of the float model and of Uniform 8-bit / 4-bit QAT at the same settings.

    Each is its own cache entry: they depend only on the float model and the QAT settings,
    not on the target or the budget.
    """
    from fqhw.quant.qat import evaluate_groups

    cache = cache or StepCache(None)
    out = {"float": evaluate_groups(fm.model, splits.test)}
    for bits in (8, 4):
        got = cache.run(
            f"uniform{bits}",
            _baseline_inputs(cfg, fm, bits),
            lambda: quantize_finetune(cfg, fm, Allocation.uniform(fm.net, bits), splits, desc=f"QAT uniform {bits}-bit").test_metrics,
            lambda metrics, folder: write_json(folder / "test_metrics.json", metrics),
            _read_metrics,
        )
        out[f"uniform{bits}"] = got.value
    return out

def _baseline_inputs(cfg: CompileConfig, fm: FloatModel, bits: int) -> dict:
    return KEYS["uniform"].key(cfg, float=fm.key, bits=bits)


def _read_metrics(folder: Path) -> dict:
    return json.loads((folder / "test_metrics.json").read_text())


def step_export(cfg: CompileConfig, qm: QuantModel, splits: DataSplits, work: Path) -> Path:
    return family(cfg.model).export(qm.model, splits.train.input_shape, work / "model.qonnx.onnx")

def step_build(cfg: CompileConfig, qonnx_path: Path, alloc: Allocation, work: Path):
    """The backend's build of the QONNX model (fqhw.backends.base.Backend.build) in work/<backend>."""
    from fqhw.hwmodels import get_cost_model

    backend = _backend(cfg)
    return backend.build(qonnx_path, alloc, work / backend.name, kind=family(cfg.model).kind, model=cfg.model,
                         cost_model=get_cost_model(cfg.target))


def step_verify(cfg: CompileConfig, qm: QuantModel, qonnx_path: Path, build, splits: DataSplits):
    """`build`: the backend's build (a FinnBuild, a FinnResult for a ResNet, an Hls4mlBuild
    with --backend hls4ml; None for an ASIC target: Brevitas against qonnx only)."""
    from fqhw.backends.verify import check_bit_exact

    n = min(cfg.verify_images, len(splits.test))
    x, _, _ = splits.test.subset(np.arange(n)).tensors()
    kind = family(cfg.model).kind
    traces = family(cfg.model).traces(qm.model, qonnx_path, build, x, cfg.backend)
    backend = _backend(cfg)
    return check_bit_exact(traces, partial=(backend.trace_key,) if build is not None and backend.partial_trace(kind) else ())

def check_fits(cfg: CompileConfig, build) -> None:
    """The backend's own estimates (Backend.totals), not only the cost model's, must fit the board."""
    from fqhw.hwmodels import get_cost_model

    backend = _backend(cfg)
    totals = backend.totals(build)
    if totals is None:
        return
    over = [f"{r} {used:g} > {cap:g}" for r, (used, cap) in over_caps(totals, get_cost_model(cfg.target).limits).items()]
    if over:
        raise FqhwError(f"{backend.label}'s estimates do not fit {cfg.target} ({'; '.join(over)}): lower --min-fps or the budget")

# ---------------------------------------------------------------- step cache io


def _allocation_content(alloc: Allocation) -> dict:
    """The allocation as the steps after it see it: widths and folding, not solver timings."""
    return {"input_bits": alloc.input_bits, "layers": [asdict(la) for la in alloc.layers]}


def _write_allocation(alloc: Allocation, folder: Path) -> None:
    write_json(folder / "allocation.json", alloc.to_dict())


def _load_allocation(folder: Path) -> Allocation:
    return Allocation.load(folder / "allocation.json")


def _backend(cfg: CompileConfig):
    """The backend that builds for the target (fqhw.backends.base): --backend on an FPGA
    board, the no-build one on an ASIC target."""
    return get_backend(cfg.backend if is_fpga(cfg) else "asic")


def _progress(cfg: CompileConfig, done: int, name: str, reused: bool) -> None:
    if cfg.progress:
        backend = _backend(cfg)
        fit = backend.refits(family(cfg.model).kind)
        total = len(STEPS) + cfg.synth + (cfg.baq_epochs > 0) + fit - (not backend.builds)
        print(f"fqhw: [{done + 1}/{total}] {name} ...{' reused' if reused else ''}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the runner

STEPS = ["data", "float_model", "importance", "allocate", "baselines", "quantize", "export", "build", "verify"]

def _describe(result) -> str:
    """A one-line summary of a step's result for --verbose."""
    if isinstance(result, Allocation):
        layers = ", ".join(f"{la.name} W{la.weight_bits}/A{la.act_bits or '-'} PE{la.pe} SIMD{la.simd}" for la in result.layers)
        return f"{result.solver.get('status')} in {result.solver.get('wall_time_s', 0):.2f} s; {layers}"
    if isinstance(result, FloatModel):
        return f"{'from checkpoint' if result.info.get('source') == 'checkpoint' else 'cached' if result.cache_hit else 'trained'}; {len(result.net.layers)} compute layers, {result.net.total_params} weights"
    if isinstance(result, DataSplits):
        return f"{len(result.train)} train / {len(result.val)} val / {len(result.test)} test images"
    if hasattr(result, "summary") and callable(result.summary):
        out = result.summary()
        return out if isinstance(out, str) else json.dumps(out, default=str)[:300]
    return type(result).__name__

_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    getattr(errno, "EDQUOT", errno.ENOSPC): "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}

def _disk_error(e: BaseException, out_dir: Path) -> FqhwError | None:
    """A one-line FqhwError for a write the file system refused (full disk, read-only,
    no permission), naming the path; None for any other error."""
    if not isinstance(e, OSError) or e.errno not in _DISK_ERRORS:
        return None
    where = e.filename or out_dir
    target = Path(e.filename).absolute() if e.filename else out_dir
    # the output folder, or the staging folders beside it (.NAME.partial-PID, .NAME.old-PID)
    ours = any(q == out_dir or (q.parent == out_dir.parent and q.name.startswith(f".{out_dir.name}.")) for q in [target, *target.parents])
    flag = "--out" if ours else "--cache-dir"
    fix = "free some space or choose another " if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) else "choose another "
    return FqhwError(f"{_DISK_ERRORS[e.errno]} writing {where}: {fix}{flag}")

@dataclass
class CompileResult:
    out_dir: Path
    report: dict
    timings: dict[str, float]

def compile(cfg: CompileConfig) -> CompileResult | None:  # noqa: A001 - the verb users expect
    """Run the whole flow; returns the report (the same object as report.json)."""
    from fqhw.allocator.cpsat import price
    from fqhw.backends.verify import require_bit_exact
    from fqhw.hwmodels import get_cost_model
    from fqhw.report.report import build_report, write_report

    from fqhw.models import distributed as dist

    dist.init_from_env()
    if not dist.is_main():  # under torchrun: the other ranks train with rank 0 and write nothing
        cfg = dataclasses.replace(cfg, progress=False, verbose=False)
    validate(cfg)
    out_dir = out_folder(cfg.out_dir)
    try:
        work = staging_folder(out_dir) if dist.is_main() else Path(tempfile.mkdtemp(prefix="fqhw-rank"))
    except OSError as e:
        err = _disk_error(e, out_dir)
        if err is None:
            raise
        raise err from e
    timings: dict[str, float] = {}
    steps: dict[str, dict] = {}
    cache = StepCache(cfg.cache_dir)

    def run(name: str, fn: Callable, *args, inputs: Any = None, write=None, load=None, stored: bool = False, ranks: str = "here"):
        """Run one step, or reuse its stored output when `inputs` are given and were seen.
        `stored`: a step that keeps its own cache entries (float_model, baselines) has them.
        `ranks` (under torchrun): "here": whichever rank calls runs it alone (the data on
        every rank; the steps after quantize, which only rank 0 reaches); "main": rank 0 runs
        it and the others get its result; "all": every rank runs it together (the training
        steps, under DDP), rank 0's view of the cache decides and rank 0 alone writes it."""
        if ranks == "main" and dist.is_distributed():
            return dist.run_on_main(run, name, fn, *args, inputs=inputs, write=write, load=load, stored=stored)
        t0 = time.perf_counter()
        key = result = None
        if inputs is not None:
            key = cache.key(name, inputs)
        # another run on the same cache computing this entry: wait for it, then reuse it
        with cache.lock(name, key) if key is not None and dist.is_main() else contextlib.nullcontext():
            if key is not None:
                result = cache.get(name, key, load)
            reused = result is not None
            if ranks == "all" and dist.from_main(reused) != reused:
                raise FqhwError(f"rank {dist.rank()} and rank 0 disagree on reusing step {name}: give every rank the same --cache-dir")
            _progress(cfg, len(timings), name, reused or stored)
            if not reused:
                result = fn(*args)
                if key is not None and dist.is_main():
                    cache.put(name, key, inputs, lambda folder: write(result, folder))
        timings[name] = round(time.perf_counter() - t0, 3)
        steps[name] = {"seconds": timings[name], "reused": reused, "key": key}
        if cfg.verbose:
            print(f"fqhw:     {name} {'reused' if reused else 'done'} in {timings[name]:.2f} s: {_describe(result)}", file=sys.stderr, flush=True)
        return result

    try:
        write_json(work / "config.json", cfg.to_dict())
        splits = run("data", step_data, cfg)
        write_json(work / "data.json", describe(splits))
        mcfg = model_config(cfg, splits.train.num_classes)
        stored = cfg.checkpoint is None and cache.has("float_model", cache.key("float_model", _float_key(cfg, mcfg)))
        fm = run("float_model", step_float_model, cfg, splits, stored=stored, ranks="all")
        steps["float_model"].update(reused=fm.cache_hit, key=fm.key)
        write_json(work / "network.json", fm.net.to_dict())
        sens = run(
            "importance", step_importance, cfg, fm, splits, ranks="main",
            inputs=KEYS["importance"].key(cfg, float=fm.key),
            write=_write_sensitivity, load=_load_sensitivity,
        )
        sens.save(work / "sensitivity.json")
        alloc = run(
            "allocate", step_allocate, cfg, fm.net, sens, ranks="main",
            inputs=KEYS["allocate"].key(cfg, importance=sens.to_dict(), net=fm.net.to_dict()),
            write=_write_allocation, load=_load_allocation,
        )
        backend = _backend(cfg)
        if backend.refits(family(cfg.model).kind):  # the build's own estimates, not only the cost model's
            alloc = run(
                "fit", step_fit, cfg, fm, alloc, sens, splits, ranks="main",
                inputs=KEYS["fit"].key(cfg, allocation=_allocation_content(alloc), float=fm.key, importance=steps["importance"]["key"],
                                       rounds=FIT_ROUNDS, margin=FIT_MARGIN),
                write=_write_allocation, load=_load_allocation,
            )
        alloc.save(work / "allocation.json")
        if alloc.solver.get("status") != "OPTIMAL" and cfg.progress:
            from fqhw.report.cells import solver_line

            print(f"fqhw: note: {solver_line(alloc.solver)} (raise --time-limit to search longer)", file=sys.stderr, flush=True)
        start, baq = fm, None
        if cfg.baq_epochs > 0:  # learned widths from the solver's, projected back by the solver
            baq = run(
                "baq", step_baq, cfg, fm, alloc, splits, ranks="main",
                inputs=KEYS["baq"].key(cfg, float=fm.key, allocation=_allocation_content(alloc)),
                write=_write_baq, load=_load_baq,
            )
            alloc = baq.allocation
            alloc.save(work / "allocation.json")
            model = copy.deepcopy(fm.model)
            model.load_state_dict(baq.float_state)
            start = dataclasses.replace(fm, model=model.eval(), key=steps["baq"]["key"] or fm.key)
        stored = all(cache.has(f"uniform{b}", cache.key(f"uniform{b}", _baseline_inputs(cfg, fm, b))) for b in (8, 4))
        baselines = run("baselines", step_baselines, cfg, fm, splits, cache, stored=stored, ranks="all")
        steps["baselines"]["reused"] = stored
        qm = run(
            "quantize", step_quantize, cfg, start, alloc, splits,
            inputs=KEYS["quantize"].key(cfg, float=start.key, allocation=_allocation_content(alloc)),
            write=_write_quant, load=_load_quant(cfg, start), ranks="all",
        )
        if not dist.is_main():  # the training is done; the rest is rank 0's
            shutil.rmtree(work, ignore_errors=True)
            return None
        save_tensors(qm.model.state_dict(), work / "quant_model.pt")
        qonnx_path = run(
            "export", step_export, cfg, qm, splits, work,
            inputs=KEYS["export"].key(cfg, quantize=steps["quantize"]["key"], input_shape=list(splits.train.input_shape)),
            write=lambda path, d: shutil.copy2(path, d / path.name),
            load=lambda d: Path(shutil.copy2(d / "model.qonnx.onnx", work / "model.qonnx.onnx")),
        )
        build = None
        if backend.builds:  # not for an ASIC target: priced by its cost model, nothing is built
            layout = {} if backend.cache_layout is None else {"layout": backend.cache_layout}
            build = run(
                backend.name, step_build, cfg, qonnx_path, alloc, work,
                inputs=KEYS["build"].key(cfg, qonnx=file_digest(qonnx_path), allocation=_allocation_content(alloc), **layout),
                write=lambda _build, d: shutil.copytree(work / backend.name, d / backend.name),
                load=lambda d: backend.load_copy(d / backend.name, work / backend.name, kind=family(cfg.model).kind),
            )
            check_fits(cfg, build)
        # Always run: the check is the point of the build, and it costs seconds.
        bitexact = run("verify", step_verify, cfg, qm, qonnx_path, build, splits)
        write_json(work / "bitexact.json", bitexact.to_dict())
        require_bit_exact(bitexact)
        if cfg.synth:
            synth = run("synth", backend.synth, work / backend.name)
            write_json(work / "synth.json", synth)
        predicted = price(fm.net, alloc, get_cost_model(cfg.target))
        report = build_report(
            cfg=cfg, splits=splits, fm=fm, sens=sens, alloc=alloc, baselines=baselines, qm=qm,
            build=build, backend=backend.name, predicted=predicted, bitexact=bitexact, timings=timings, steps=steps, baq=None if baq is None else baq.summary,
        )
        write_report(report, work)
        write_manifest(work)  # last: what fqhw simulate checks the folder against
        swap_in(work, out_dir)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        err = _disk_error(e, out_dir)
        if err is not None:
            raise err from e
        raise
    return CompileResult(out_dir, report, timings)
