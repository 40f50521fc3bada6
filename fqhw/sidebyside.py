"""`fqhw sidebyside`: every method at one budget, on the same data and seeds, in one table.

    fqhw sidebyside --budget 4 --seeds 0,1,2

Methods (all deployable: weights AND activations quantized, first and last layer's weights
pinned at --edge-bits as in `fqhw compile`, the same QAT (epochs, learning rate, fairness
term, best epoch by validation worst-group accuracy) and threshold snapping after it):

- uniform8 / uniform4: every layer at 8 / 4 bits (Uniform 4 is over the budget's spirit
  only where the pins make it so; it is the usual reference point).
- fairgrape: FairGRAPE-style, grape importance reduced by max across groups, quantile
  allocation (fqhw.allocator.quantile, bits per weight so the budget is the same quantity).
- fairquantize: FairQuantize-style, grape reduced by subtractive (two groups: with more,
  the groups are merged into the first and second half of their order, e.g. Fitzpatrick
  I-III vs IV-VI).
- hawq: HAWQ-style, Hutchinson Hessian-trace importance reduced by mean, quantile.
- fq_qat: FairQuant's quantile allocation with QAT, gradient importance reduced by
  balanced (our choice of FairQuant's reducers: it weighs each group by its share).
- fq_baq: FairQuant-style BAQ: learned bits warm-started from fq_qat's allocation; the
  learned widths are projected onto the budget (fqhw.quant.baq.project) so that the deployed
  model meets it, then QAT.
- fqhw_qat: the CP-SAT allocation on the target (Fisher importance per group, worst group
  bounded) and QAT: what `fqhw compile` deploys.
- fqhw: the same allocation, then BAQ from it, the solver's projection, and QAT.

Activations of the quantile and uniform methods are at 8 bits (FairQuant leaves them in
float; 8 bits is the deployable equivalent); fqhw's come from the solver.

Choices are made on the validation split; the test split only reports. Every method's QAT
runs once per (fairness weight, learning rate) in fqhw.quant.qat.DEFAULT_GRID from the same
start and keeps the run, and within it the epoch, with the best validation worst-group
accuracy (--no-tune: the fixed --fairness-lambda and learning rate, epoch still chosen on
validation). BAQ itself runs at the fixed settings (its projection reads no test data); the
QAT after it is tuned like every other method's. Each (seed, method) result is a step-cache entry keyed
by its inputs, so an interrupted run resumes. The (seed, method) records are the
independent jobs of one executor (fqhw.executor), after one job per seed for its float model: `--jobs N` runs N of them at once in worker processes, `--executor
ray` as Ray tasks; every job runs at `--threads-per-job` torch threads (default 1) whatever N
is, so the table does not depend on N.

Every record keeps each test image's prediction, so that fqhw (--reference, by default
fqhw_qat: what `fqhw compile` deploys) is compared with
every other method image by image (fqhw.fairness.stats: Wilson intervals per group, the
paired difference in worst-group accuracy with a bootstrap interval over seeds and images,
the exact McNemar test on the worst group, Holm-adjusted over the methods).

Outputs (written whole or not at all): sidebyside.json (every run, the intervals and the
comparisons), sidebyside.md (mean and standard deviation over seeds, the paired table),
sidebyside.png (worst-group against mean-group accuracy).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fqhw.errors import FqhwError
from fqhw.outputs import plain


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    allocator: str  # "uniform" | "quantile" | "solver"
    bits: int | None = None  # uniform width
    importance: str | None = None  # gradient | grape | hawq | fisher
    reducer: str | None = None  # max | mean | cvar | balanced | subtractive
    baq: bool = False
    warm_start: str | None = None  # BAQ's warm start: another method's allocation


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("uniform8", "Uniform 8-bit", "uniform", bits=8),
        Method("uniform4", "Uniform 4-bit", "uniform", bits=4),
        Method("fairgrape", "FairGRAPE-style (grape + max)", "quantile", importance="grape", reducer="max"),
        Method("fairquantize", "FairQuantize-style (grape + subtractive)", "quantile", importance="grape", reducer="subtractive"),
        Method("hawq", "HAWQ-style (hawq + mean)", "quantile", importance="hawq", reducer="mean"),
        Method("fq_qat", "FairQuant quantile + QAT (gradient + balanced)", "quantile", importance="gradient", reducer="balanced"),
        Method("fq_baq", "FairQuant-style BAQ (from fq_qat)", "quantile", baq=True, warm_start="fq_qat"),
        Method("fqhw_qat", "fqhw (solver + QAT: `fqhw compile`)", "solver", importance="fisher"),
        Method("fqhw", "fqhw (solver + BAQ + projection)", "solver", importance="fisher", baq=True),
    ]
}


@dataclass
class SideBySideConfig:
    compile: "object"  # fqhw.flow.CompileConfig: target, budget, data, model and QAT settings
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    out_dir: Path = Path("fqhw-sidebyside")
    baq_epochs: int = 3
    bitrate_lambda: float = 2.0
    # the method every other one is compared with, image by image; None: fqhw_qat (what
    # `fqhw compile` deploys), else fqhw, when they run (with neither, no comparison)
    reference: str | None = None


@dataclass
class SideBySideResult:
    target: str
    budget: float
    seeds: list[int]
    methods: list[str]
    labels: dict[str, str]
    runs: list[dict] = field(default_factory=list)  # one per (seed, method)
    summary: dict[str, dict] = field(default_factory=dict)  # method -> mean / std per metric
    reference: str | None = None
    # method -> fqhw.fairness.stats.PairedComparison (reference against it) as a dict
    comparisons: dict[str, dict] = field(default_factory=dict)
    # method -> group -> Wilson interval of the accuracy pooled over seeds
    group_ci: dict[str, dict] = field(default_factory=dict)
    test_counts: dict[str, int] = field(default_factory=dict)  # test images per group
    wall_time_s: float = 0.0
    out_dir: str | None = None

    def to_dict(self) -> dict:
        return plain(asdict(self))


def _check(sc: SideBySideConfig) -> None:
    unknown = [m for m in sc.methods if m not in METHODS]
    if unknown:
        raise FqhwError(f"unknown method(s) {', '.join(unknown)}: known methods are {', '.join(METHODS)}")
    if not sc.seeds:
        raise FqhwError("--seeds is empty: pass e.g. --seeds 0,1,2")
    if not sc.methods:
        raise FqhwError(f"--methods is empty: pass some of {', '.join(METHODS)}")
    for what, values in (("seed", sc.seeds), ("method", sc.methods)):  # a repeat would count twice in the mean
        twice = sorted({str(v) for v in values if list(values).count(v) > 1})
        if twice:
            raise FqhwError(f"{what} {', '.join(twice)} is given twice: list each {what} once")
    if sc.baq_epochs < 1:
        raise FqhwError("--baq-epochs must be at least 1")
    if sc.reference is not None and sc.reference not in sc.methods:
        raise FqhwError(f"--reference {sc.reference} is not among the methods run: add it to --methods, or pick one of {', '.join(sc.methods)}")


# ------------------------------------------------------------------ one method, one seed


def _two_groups(data):
    """The data with its groups merged into two (first half of the group order, second half):
    the subtractive reducer compares an unprivileged group with a privileged one."""
    if data.num_groups == 2:
        return data
    half = (data.num_groups + 1) // 2
    names = ["+".join(data.group_names[:half]), "+".join(data.group_names[half:])]
    return dataclasses.replace(data, groups=(data.groups >= half).astype(np.int64), group_names=names)


def _allocation(cfg, method: Method, fm, splits, sens, found: dict):
    from fqhw.allocator.allocation import Allocation
    from fqhw.allocator.quantile import quantile_baseline
    from fqhw.config import pinned_edges
    from fqhw.flow import step_allocate

    if method.allocator == "uniform":
        return Allocation.uniform(fm.net, method.bits)
    if method.allocator == "solver":
        return step_allocate(cfg, fm.net, sens)
    if method.warm_start is not None:  # another method's allocation (computed here if it did not run)
        if method.warm_start not in found:
            found[method.warm_start] = _allocation(cfg, METHODS[method.warm_start], fm, splits, sens, found)
        return found[method.warm_start]
    data = _two_groups(splits.val) if method.reducer == "subtractive" else splits.val
    res = quantile_baseline(
        fm.model, fm.net, data, cfg.budget, method=method.importance, reducer=method.reducer, unit="channel",
        per_weight=True, pinned=pinned_edges(cfg, fm.net), act_bits=8, max_per_group=cfg.importance_samples, seed=cfg.seed,
    )
    return res.allocation


def _stored_allocation(rec: dict):
    from fqhw.allocator.allocation import Allocation, LayerAllocation

    return Allocation(rec["method"], [LayerAllocation(k, b, rec["act_bits"][k]) for k, b in rec["weight_bits"].items()])


def run_method(cfg, method: Method, fm, splits, sens, sc: SideBySideConfig, found: dict) -> dict:
    """Allocate, (learn bits,) fine-tune and evaluate one method; returns its record."""
    from fqhw.flow import quantize_finetune

    t0 = time.perf_counter()
    start = method_start(cfg, method, fm, splits, sens, sc, found)
    qm = quantize_finetune(cfg, _start_model(fm, start), start.allocation, splits, desc=f"QAT {method.name} seed {cfg.seed}")
    return _record(cfg, method, fm, splits, start.allocation, qm.model, qm.qat, start.baq, time.perf_counter() - t0)


def _record(cfg, method: Method, fm, splits, alloc, qmodel, qat, baq_info, seconds: float) -> dict:
    """One (seed, method) record from its fine-tuned model (`qat`: its QATResult, or that as a dict)."""
    from fqhw.fairness.metrics import group_metrics
    from fqhw.quant.qat import evaluate_groups, predict

    qat = qat if isinstance(qat, dict) else asdict(qat)
    test, pred = splits.test, predict(qmodel, splits.test)  # one pass: the metrics are the predictions'
    return {
        "method": method.name,
        "seed": cfg.seed,
        "avg_weight_bits": alloc.avg_weight_bits(fm.net),
        "weight_bits": {la.name: la.weight_bits for la in alloc.layers},
        "act_bits": {la.name: la.act_bits for la in alloc.layers},
        "test": group_metrics(test.labels, pred, test.groups, test.group_names, test.num_classes),
        # every test image's predicted class, in the split's order (the paired tests compare
        # methods image by image: the test split is the same for every seed and method)
        "test_pred": pred.astype(int).tolist(),
        "val": evaluate_groups(qmodel, splits.val),
        "qat_selected_epoch": qat.get("best_epoch"),
        "qat_selected": {"fairness_lambda": qat.get("fairness_lambda"), "lr": qat.get("lr")},
        "baq": baq_info,
        "seconds": round(seconds, 2),
    }


# ------------------------------------------------------------------ one method, one seed, tuned
#
# With tuning (--tune: one QAT per (fairness weight, learning rate) of the grid, the best on
# validation kept), a record is three kinds of job, so that the grid's QAT runs are jobs of
# their own: the method's start (its allocation; BAQ's learned float weights), each
# candidate's QAT from that start, and the choice among them with the record's evaluation.
# Each is a step-cache entry; the same functions compute them in one process at --jobs 1.


@dataclass
class Start:
    """Where a method's QAT starts: its allocation, and for a BAQ method the float weights BAQ
    learned (None: the seed's float model's own)."""

    allocation: object  # fqhw.allocator.allocation.Allocation
    float_state: dict | None
    baq: dict | None
    seconds: float


def method_start(cfg, method: Method, fm, splits, sens, sc: SideBySideConfig, found: dict) -> Start:
    """run_method's allocation and BAQ, without its QAT."""
    from fqhw.config import pinned_edges
    from fqhw.hwmodels import get_cost_model

    t0 = time.perf_counter()
    alloc = found[method.name] = _allocation(cfg, method, fm, splits, sens, found)
    if not method.baq:
        return Start(alloc, None, None, round(time.perf_counter() - t0, 2))
    from fqhw.quant.baq import check_budget_met, learn_bits

    res = learn_bits(
        fm.model, alloc, splits, fm.net, budget=cfg.budget, epochs=sc.baq_epochs, lr=cfg.qat_lr,
        fairness_lambda=cfg.fairness_lambda, bitrate_lambda=sc.bitrate_lambda, seed=cfg.seed,
        cost_model=get_cost_model(cfg.target), pinned=pinned_edges(cfg, fm.net), min_fps=cfg.min_fps,
        time_limit_s=cfg.solver_time_limit_s, progress=cfg.progress, desc=f"BAQ {method.name}",
    )
    check_budget_met(fm.net, res.allocation, cfg.budget)
    return Start(res.allocation, res.float_state, res.summary(), round(time.perf_counter() - t0, 2))


def _start_model(fm, start: Start):
    """The FloatModel a method's QAT starts from."""
    if start.float_state is None:
        return fm
    model = copy.deepcopy(fm.model)
    model.load_state_dict(start.float_state)
    return dataclasses.replace(fm, model=model.eval())


def qat_candidate(cfg, fm, start: Start, splits, lam: float, lr: float, desc: str) -> tuple[dict, object, float]:
    """One tuning candidate: QAT from the method's calibrated start at (lam, lr); its weights
    at the chosen epoch, its QATResult and its seconds."""
    from fqhw.flow import calibrated_quant_model
    from fqhw.quant.qat import finetune

    t0 = time.perf_counter()
    qmodel = calibrated_quant_model(cfg, _start_model(fm, start), start.allocation, splits)
    res = finetune(qmodel, splits, epochs=cfg.qat_epochs, lr=lr, fairness_lambda=lam, seed=cfg.seed, progress=cfg.progress,
                   desc=f"{desc} (lambda {lam:g}, lr {lr:g})")
    return qmodel.state_dict(), res, round(time.perf_counter() - t0, 2)


def tuned_record(cfg, method: Method, fm, splits, start: Start, candidates: list) -> dict:
    """The record of the best candidate (fqhw.quant.qat.better, the rule tune() keeps): its
    weights in the method's quant model, thresholds snapped, evaluated like run_method's."""
    from fqhw.families import family
    from fqhw.quant.qat import better

    t0 = time.perf_counter()
    best = None
    for state, res, _s in candidates:
        if better(res, None if best is None else best[1]):
            best = (state, res)
    qmodel = family(cfg.model).quant_model(_start_model(fm, start).model, start.allocation, cfg.backend)
    qmodel.load_state_dict(best[0])
    qmodel.eval()
    family(cfg.model).snap(qmodel, cfg.backend)
    seconds = start.seconds + sum(c[2] for c in candidates) + time.perf_counter() - t0
    return _record(cfg, method, fm, splits, start.allocation, qmodel, best[1], start.baq, seconds)


# ------------------------------------------------------------------ the whole table


def run_inputs(cfg, method: Method, float_key: str, sc: SideBySideConfig) -> dict:
    """What one (seed, method) record depends on: its step-cache key, as fqhw.stepkeys
    declares it (`float_key`: the seed's float model's, FloatModel.key)."""
    from fqhw.stepkeys import SIDEBYSIDE, SIDEBYSIDE_UNIFORM

    if method.allocator == "uniform":
        return SIDEBYSIDE_UNIFORM.key(cfg, float=float_key, method=asdict(method))
    baq = {"baq_epochs": sc.baq_epochs, "bitrate_lambda": sc.bitrate_lambda} if method.baq else {}
    return SIDEBYSIDE.key(cfg, float=float_key, method=asdict(method), **baq)


# this process's recent seeds: their data, float model and importance (cells of one seed
# share them; a worker of --jobs N takes cells of every seed in turn, so it keeps a few)
_SEED_STATE: dict = {}
SEEDS_KEPT = 4


def seed_state(cfg):
    """The seed's data splits, float model (a step-cache entry after its first cell) and a
    lazily computed importance, kept for the next cell of the same seed in this process."""
    from fqhw.flow import step_data, step_float_model

    key = repr(cfg)
    if key not in _SEED_STATE:
        while len(_SEED_STATE) >= SEEDS_KEPT:
            _SEED_STATE.pop(next(iter(_SEED_STATE)))  # the oldest
        splits = step_data(cfg)
        _SEED_STATE[key] = (splits, step_float_model(cfg, splits), [])
    return _SEED_STATE[key]


def float_job(job: tuple) -> str:
    """An executor job: the seed's float model, trained once and stored, before its cells run
    (so that two cells of one seed do not wait on one training); the test split's digest."""
    sc, seed = job
    splits, _fm, _sens = seed_state(dataclasses.replace(sc.compile, seed=seed))
    return split_digest(splits.test)


class _Cell:
    """One (seed, method) cell in a worker: its config, the seed's shared state, the step
    cache, and each stage of its record through that cache."""

    def __init__(self, sc: SideBySideConfig, seed: int, name: str):
        from fqhw.stepcache import StepCache

        self.sc, self.method = sc, METHODS[name]
        self.cfg = dataclasses.replace(sc.compile, seed=seed)
        self.cache = StepCache(self.cfg.cache_dir)
        self.splits, self.fm, self._sens = seed_state(self.cfg)
        self.inputs = run_inputs(self.cfg, self.method, self.fm.key, sc)

    def importance(self):
        from fqhw.flow import cached_importance

        if not self._sens:  # when a solver method first needs it (not when its record is cached); the
            # compile's own cache entry, so workers and later runs share one computation
            self._sens.append(cached_importance(self.cfg, self.fm, self.splits, self.cache))
        return self._sens[0]

    def found(self) -> dict:
        """A warm-started method's warm start, read from that method's stored record (its
        cell ran in an earlier round); empty when that method is not in the sweep (then
        computed here)."""
        ws = self.method.warm_start
        if ws is None or ws not in self.sc.methods:
            return {}
        rec = self.cache.get("sidebyside", self.cache.key("sidebyside", run_inputs(self.cfg, METHODS[ws], self.fm.key, self.sc)), _load_record)
        return {} if rec is None else {ws: _stored_allocation(rec)}

    def sens(self):
        return self.importance() if self.method.allocator == "solver" else None

    def start(self) -> Start:
        from fqhw.outputs import save_tensors, write_json

        def write(st: Start, d: Path) -> None:
            write_json(d / "start.json", {"allocation": st.allocation.to_dict(), "baq": st.baq, "seconds": st.seconds})
            if st.float_state is not None:
                save_tensors(st.float_state, d / "float_state.pt")

        return self.cache.run("sidebyside_start", {**self.inputs, "stage": "start"},
                              lambda: method_start(self.cfg, self.method, self.fm, self.splits, self.sens(), self.sc, self.found()),
                              write, _load_start).value

    def candidate(self, k: int, start: Start) -> tuple:
        import torch

        from fqhw.outputs import save_tensors, write_json

        lam, lr = self.cfg.qat_grid[k]

        def write(c: tuple, d: Path) -> None:
            save_tensors(c[0], d / "quant_state.pt")
            write_json(d / "qat.json", {"qat": asdict(c[1]), "seconds": c[2]})

        def load(d: Path) -> tuple:
            from fqhw.quant.qat import QATResult

            got = json.loads((d / "qat.json").read_text())
            return torch.load(d / "quant_state.pt", map_location="cpu", weights_only=True), QATResult(**got["qat"]), got["seconds"]

        desc = f"QAT {self.method.name} seed {self.cfg.seed}"
        return self.cache.run("sidebyside_qat", {**self.inputs, "stage": "qat", "candidate": [float(lam), float(lr)]},
                              lambda: qat_candidate(self.cfg, self.fm, start, self.splits, lam, lr, desc), write, load).value

    def record(self, lines: bool = False) -> dict:
        if lines:
            print(f"fqhw: seed {self.cfg.seed}: {self.method.label} ...", file=sys.stderr, flush=True)

        def compute() -> dict:
            if not self.cfg.qat_grid:
                return run_method(self.cfg, self.method, self.fm, self.splits, self.sens(), self.sc, self.found())
            start = self.start()
            cands = [self.candidate(k, start) for k in range(len(self.cfg.qat_grid))]
            return tuned_record(self.cfg, self.method, self.fm, self.splits, start, cands)

        return self.cache.run("sidebyside", self.inputs, compute,
                              lambda rec, folder: (folder / "run.json").write_text(json.dumps(plain(rec), indent=1, sort_keys=True)),
                              _load_record).value

    def stored(self) -> bool:
        return self.cache.has("sidebyside", self.cache.key("sidebyside", self.inputs))


def _load_start(d: Path) -> Start:
    import torch

    from fqhw.allocator.allocation import Allocation

    got = json.loads((d / "start.json").read_text())
    state = torch.load(d / "float_state.pt", map_location="cpu", weights_only=True) if (d / "float_state.pt").is_file() else None
    return Start(Allocation.from_dict(got["allocation"]), state, got["baq"], got["seconds"])


def start_job(job: tuple) -> bool:
    """An executor job (tuning): a cell's start stored, unless its record is. True: it is needed."""
    sc, seed, name = job
    cell = _Cell(sc, seed, name)
    if cell.stored():
        return False
    cell.start()
    return True


def qat_job(job: tuple) -> None:
    """An executor job (tuning): one candidate's QAT of a cell, stored."""
    sc, seed, name, k = job
    cell = _Cell(sc, seed, name)
    cell.candidate(k, cell.start())


def cell_job(job: tuple) -> dict:
    """An executor job: one (seed, method) record, from the step cache or computed and
    stored there (with tuning, from its stored start and candidates)."""
    sc, seed, name, lines = job
    return _Cell(sc, seed, name).record(lines)


def _load_record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def run_order(methods) -> list[str]:
    return sorted(methods, key=lambda m: METHODS[m].warm_start is not None)  # warm starts last, after what they read


def split_digest(split) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in (split.labels, split.groups, split.images):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def side_by_side(sc: SideBySideConfig, executor=None) -> SideBySideResult:
    """Every (seed, method) record as an executor job (fqhw.executor: `--jobs`, `--executor
    ray`), after one job per seed that trains its float model, then the summary, the
    statistics and the outputs."""
    from fqhw.executor import Executor
    from fqhw.flow import step_data, validate

    _check(sc)
    validate(dataclasses.replace(sc.compile, out_dir=sc.out_dir), markers=("sidebyside.json",))
    ex = executor or Executor()
    t0 = time.perf_counter()
    base = sc.compile
    res = SideBySideResult(base.target, base.budget, list(sc.seeds), list(sc.methods), {m: METHODS[m].label for m in sc.methods})
    # several jobs at once: no progress bars (they would interleave), one line per method
    job_sc = dataclasses.replace(sc, compile=dataclasses.replace(base, progress=False, verbose=False)) if ex.parallel else sc
    order = run_order(sc.methods)
    # round 2: every (seed, method) record; round 3: those warm-started from a round-2 record
    rounds = [[m for m in order if METHODS[m].warm_start not in sc.methods], [m for m in order if METHODS[m].warm_start in sc.methods]]
    # with tuning (and a cache to pass them through), each round's starts and QAT candidates
    # are jobs before its records
    staged = bool(base.qat_grid) and base.cache_dir is not None
    got = {}
    try:
        with ex.session() as run:
            digests = run.map(float_job, [(job_sc, seed) for seed in sc.seeds])  # round 1: every seed's float model
            for names in rounds:
                cells = [(seed, m) for seed in sc.seeds for m in names]
                if staged:
                    needed = [c for c, todo in zip(cells, run.map(start_job, [(job_sc, *c) for c in cells])) if todo]
                    run.map(qat_job, [(job_sc, *c, k) for c in needed for k in range(len(base.qat_grid))])
                for cell, rec in zip(cells, run.map(cell_job, [(job_sc, seed, m, base.progress) for seed, m in cells])):
                    got[cell] = rec
    finally:
        _SEED_STATE.clear()  # in this process (--jobs 1): the last seed's data and model
    res.runs = [got[(seed, m)] for seed in sc.seeds for m in order]  # the order a one-process run lists them in
    from fqhw.sidebysidereport import add_statistics, summarize, write_outputs

    res.summary = summarize(res.runs, list(sc.methods))
    reference = sc.reference or next((m for m in ("fqhw_qat", "fqhw") if m in sc.methods), None)
    if len(set(digests)) == 1:  # the paired statistics need one test split for every seed
        add_statistics(res, step_data(dataclasses.replace(base, seed=sc.seeds[-1])).test, reference)
    elif base.progress:
        print("fqhw: the test split differs between seeds (the data set splits by seed): no paired statistics", file=sys.stderr)
    res.wall_time_s = round(time.perf_counter() - t0, 1)
    write_outputs(res, sc.out_dir)
    return res


# ------------------------------------------------------------------ command line


def add_sidebyside_parser(subparsers) -> None:
    from fqhw.cliargs import add_common, add_executor_args, edge_bits, parse_tuple

    p = subparsers.add_parser("sidebyside", help="every method (uniform, FairGRAPE, FairQuantize, HAWQ, FairQuant QAT/BAQ, fqhw) at one budget over seeds")
    p.add_argument("--target", default=None, help="hardware target for fqhw's allocation and the projections (default pynq-z2)")
    p.add_argument("--budget", type=float, default=None, help="average weight bits, parameter-weighted (default 4)")
    p.add_argument("--seeds", type=parse_tuple(int), default=(0, 1, 2), help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--methods", type=parse_tuple(str), default=tuple(METHODS), help=f"comma-separated, from {','.join(METHODS)} (default all)")
    p.add_argument("--out", type=Path, default=Path("fqhw-sidebyside"), help="output folder (default fqhw-sidebyside)")
    p.add_argument("--qat-epochs", type=int, default=None, help="fine-tuning epochs for every method")
    p.add_argument("--baq-epochs", type=int, default=3, help="BAQ epochs (default 3)")
    p.add_argument("--fairness-lambda", type=float, default=None, help="weight of max-min group loss in QAT and BAQ")
    p.add_argument("--edge-bits", default=None, type=edge_bits, metavar="BITS|none", help="pin first/last layer weight bits, or 'none' (default 8)")
    p.add_argument("--reference", default=None, help="the method every other is compared with, image by image (default fqhw_qat, what fqhw compile deploys; else fqhw)")
    p.add_argument("--no-tune", dest="tune", action="store_false",
                   help="QAT at the fixed fairness weight and learning rate, not chosen on validation among qat.DEFAULT_GRID")
    add_common(p)
    add_executor_args(p)
    p.set_defaults(func=cmd_sidebyside, tune=True)


def cmd_sidebyside(args) -> int:
    from fqhw.cliargs import compile_config
    from fqhw.executor import Executor

    ex = Executor.from_args(args)
    cfg = compile_config(args)
    sc = SideBySideConfig(compile=cfg, seeds=tuple(args.seeds), methods=tuple(args.methods), out_dir=args.out, baq_epochs=args.baq_epochs,
                          reference=args.reference)
    res = side_by_side(sc, ex)
    from fqhw.sidebysidereport import markdown

    print(markdown(res), end="")
    print(f"wrote {res.out_dir}")
    return 0
