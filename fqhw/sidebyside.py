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

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fqhw.errors import FqhwError
from fqhw.outputs import plain, staging_folder, swap_in


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
    from fqhw.config import pinned_edges
    from fqhw.flow import quantize_finetune
    from fqhw.hwmodels import get_cost_model
    from fqhw.quant.qat import evaluate_groups, predict

    t0 = time.perf_counter()
    alloc = _allocation(cfg, method, fm, splits, sens, found)
    found[method.name] = alloc
    baq_info = None
    start = fm
    if method.baq:
        from fqhw.quant.baq import check_budget_met, learn_bits

        res = learn_bits(
            fm.model, alloc, splits, fm.net, budget=cfg.budget, epochs=sc.baq_epochs, lr=cfg.qat_lr,
            fairness_lambda=cfg.fairness_lambda, bitrate_lambda=sc.bitrate_lambda, seed=cfg.seed,
            cost_model=get_cost_model(cfg.target), pinned=pinned_edges(cfg, fm.net), min_fps=cfg.min_fps,
            time_limit_s=cfg.solver_time_limit_s, progress=cfg.progress, desc=f"BAQ {method.name}",
        )
        check_budget_met(fm.net, res.allocation, cfg.budget)
        baq_info = res.summary()
        alloc = res.allocation
        start = dataclasses.replace(fm, model=res.float_model(fm.model))
    qm = quantize_finetune(cfg, start, alloc, splits, desc=f"QAT {method.name} seed {cfg.seed}")
    test_pred = predict(qm.model, splits.test)
    return {
        "method": method.name,
        "seed": cfg.seed,
        "avg_weight_bits": alloc.avg_weight_bits(fm.net),
        "weight_bits": {la.name: la.weight_bits for la in alloc.layers},
        "act_bits": {la.name: la.act_bits for la in alloc.layers},
        "test": qm.test_metrics,
        # every test image's predicted class, in the split's order (the paired tests compare
        # methods image by image: the test split is the same for every seed and method)
        "test_pred": test_pred.astype(int).tolist(),
        "val": evaluate_groups(qm.model, splits.val),
        "qat_selected_epoch": qm.qat.get("best_epoch"),
        "qat_selected": {"fairness_lambda": qm.qat.get("fairness_lambda"), "lr": qm.qat.get("lr")},
        "baq": baq_info,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ------------------------------------------------------------------ the whole table


METRICS = ("overall_acc", "mean_group_acc", "worst_group_acc", "gap_mean_worst", "balanced_acc", "eopp1", "eodd")


def summarize(runs: list[dict], methods: list[str]) -> dict[str, dict]:
    out = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        entry = {"n": len(rs), "avg_weight_bits": {"mean": float(np.mean([r["avg_weight_bits"] for r in rs]))}}
        for k in METRICS:
            v = np.array([r["test"].get(k) for r in rs if r["test"].get(k) is not None], dtype=float)
            entry[k] = {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        out[m] = entry
    return out


def run_inputs(cfg, method: Method, fm, sc: SideBySideConfig) -> dict:
    """What one (seed, method) record depends on: its step-cache key."""
    from fqhw.stepkeys import qat_inputs

    return {
        "float": fm.key, "method": asdict(method), "edge_bits": cfg.edge_bits, "qat": qat_inputs(cfg),
        # a uniform allocation reads neither the budget nor the target: one entry serves every budget
        **({} if method.allocator == "uniform" else {
            "budget": cfg.budget, "target": cfg.target, "importance_samples": cfg.importance_samples, "min_fps": cfg.min_fps,
        }),
        **({"baq_epochs": sc.baq_epochs, "bitrate_lambda": sc.bitrate_lambda} if method.baq else {}),
        "version": 2,  # 2: the record keeps every test prediction
    }


# this process's recent seeds: their data, float model and importance (cells of one seed
# share them; a worker of --jobs N takes cells of every seed in turn, so it keeps a few)
_SEED_STATE: dict = {}
SEEDS_KEPT = 4


def _seed_state(cfg):
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
    splits, _fm, _sens = _seed_state(dataclasses.replace(sc.compile, seed=seed))
    return split_digest(splits.test)


def cell_job(job: tuple) -> dict:
    """An executor job: one (seed, method) record, from the step cache or computed and
    stored there. A warm-started method reads its warm start's allocation from that
    method's stored record (its cell runs in a later round), or computes it when that method
    is not in the sweep."""
    from fqhw.flow import cached_importance
    from fqhw.stepcache import StepCache

    sc, seed, name, lines = job
    cfg = dataclasses.replace(sc.compile, seed=seed)
    cache = StepCache(cfg.cache_dir)
    splits, fm, sens = _seed_state(cfg)
    method = METHODS[name]

    def importance():
        if not sens:  # when a solver method first needs it (not when its record is cached); the
            # compile's own cache entry, so workers and later runs share one computation
            sens.append(cached_importance(cfg, fm, splits, cache))
        return sens[0]

    found: dict = {}
    ws = method.warm_start
    if ws is not None and ws in sc.methods:
        rec = cache.get("sidebyside", cache.key("sidebyside", run_inputs(cfg, METHODS[ws], fm, sc)), _load_record)
        if rec is not None:
            found[ws] = _stored_allocation(rec)
    if lines:
        print(f"fqhw: seed {seed}: {method.label} ...", file=sys.stderr, flush=True)
    return cache.run(
        "sidebyside", run_inputs(cfg, method, fm, sc),
        lambda: run_method(cfg, method, fm, splits, importance() if method.allocator == "solver" else None, sc, found),
        lambda rec, folder: (folder / "run.json").write_text(json.dumps(plain(rec), indent=1, sort_keys=True)),
        _load_record,
    ).value


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
    got = {}
    try:
        with ex.session() as run:
            digests = run.map(float_job, [(job_sc, seed) for seed in sc.seeds])  # round 1: every seed's float model
            for names in rounds:
                cells = [(seed, m) for seed in sc.seeds for m in names]
                for cell, rec in zip(cells, run.map(cell_job, [(job_sc, seed, m, base.progress) for seed, m in cells])):
                    got[cell] = rec
    finally:
        _SEED_STATE.clear()  # in this process (--jobs 1): the last seed's data and model
    res.runs = [got[(seed, m)] for seed in sc.seeds for m in order]  # the order a one-process run lists them in
    res.summary = summarize(res.runs, list(sc.methods))
    reference = sc.reference or next((m for m in ("fqhw_qat", "fqhw") if m in sc.methods), None)
    if len(set(digests)) == 1:  # the paired statistics need one test split for every seed
        add_statistics(res, step_data(dataclasses.replace(base, seed=sc.seeds[-1])).test, reference)
    elif base.progress:
        print("fqhw: the test split differs between seeds (the data set splits by seed): no paired statistics", file=sys.stderr)
    res.wall_time_s = round(time.perf_counter() - t0, 1)
    write_outputs(res, sc.out_dir)
    return res


def add_statistics(res: SideBySideResult, test, reference: str | None) -> None:
    """Wilson intervals per group and method, and the paired comparison of `reference`
    with every other method on the same test images (fqhw.fairness.stats)."""
    from fqhw.fairness.stats import compare_paired, group_intervals, holm

    preds = {m: {r["seed"]: np.asarray(r["test_pred"]) for r in res.runs if r["method"] == m} for m in res.methods}
    for m, by_seed in preds.items():
        if by_seed:
            seeds = sorted(by_seed)
            res.group_ci[m] = group_intervals(np.tile(test.labels, len(seeds)), np.concatenate([by_seed[s] for s in seeds]),
                                              np.tile(test.groups, len(seeds)), test.group_names)
    res.test_counts = {g: int((test.groups == i).sum()) for i, g in enumerate(test.group_names)}
    res.reference = reference
    if reference is None or len(preds[reference]) == 0:
        return
    comps = [compare_paired(test.labels, test.groups, test.group_names, preds[reference], preds[m], reference, m)
             for m in res.methods if m != reference]
    holm(comps)
    res.comparisons = {c.method: c.to_dict() for c in comps}


# ------------------------------------------------------------------ outputs


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(res: SideBySideResult) -> str:
    lines = [
        f"# Side by side at {res.budget:g} bits per weight on {res.target}",
        "",
        f"Seeds {', '.join(map(str, res.seeds))}; test split; mean ± standard deviation over seeds (%); "
        f"weights and activations quantized. Wall time {res.wall_time_s:.0f} s.",
        "",
        "| method | avg bits | overall | mean group | worst group | gap | balanced | EOpp1 | EOdd |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in res.methods:
        s = res.summary[m]

        def ms(k):
            v = s[k]
            return "-" if v["mean"] is None else f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"

        lines.append(f"| {res.labels[m]} | {s['avg_weight_bits']['mean']:.2f} | {ms('overall_acc')} | {ms('mean_group_acc')} | "
                     f"{ms('worst_group_acc')} | {ms('gap_mean_worst')} | {ms('balanced_acc')} | {ms('eopp1')} | {ms('eodd')} |")
    lines += ["", "Per seed (worst group / mean group, %):", "", "| method | " + " | ".join(f"seed {s}" for s in res.seeds) + " |",
              "| --- |" + " --- |" * len(res.seeds)]
    for m in res.methods:
        cells = []
        for s in res.seeds:
            r = next((r for r in res.runs if r["method"] == m and r["seed"] == s), None)
            cells.append("-" if r is None else f"{_pct(r['test']['worst_group_acc'])} / {_pct(r['test']['mean_group_acc'])}")
        lines.append(f"| {res.labels[m]} | " + " | ".join(cells) + " |")
    if res.comparisons:
        ref = res.labels[res.reference]
        lines += [
            "", f"Paired against {ref}, on the same test images and seeds (test images per group: "
            + ", ".join(f"{g} {n}" for g, n in res.test_counts.items()) + "). Worst group: each seed's lowest group "
            "accuracy, averaged over seeds; difference = reference minus method, points, with a 95 % bootstrap interval "
            "over seeds and images; exact McNemar test on the group worst for the two together, (seed, image) pairs "
            "that only the reference / only the method classifies right; p (Holm): adjusted over the methods compared.",
            "", "| method | worst group [95 % CI] | difference [95 % CI] | group | only ref right / only method right | p | p (Holm) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m, c in res.comparisons.items():
            lines.append(
                f"| {res.labels[m]} | {_pct(c['worst_group_method'])} [{_pct(c['worst_group_method_ci'][0])}, {_pct(c['worst_group_method_ci'][1])}] "
                f"| {100 * c['diff']:+.1f} [{100 * c['diff_ci'][0]:+.1f}, {100 * c['diff_ci'][1]:+.1f}] | {c['group']} "
                f"| {c['ref_only_right']} / {c['method_only_right']} | {c['p_mcnemar']:.2g} | {c['p_holm']:.2g} |"
            )
        first = next(iter(res.comparisons.values()))
        lines.append(f"| {ref} (reference) | {_pct(first['worst_group_ref'])} [{_pct(first['worst_group_ref_ci'][0])}, "
                     f"{_pct(first['worst_group_ref_ci'][1])}] | | | | | |")
    return "\n".join(lines) + "\n"


def plot_png(res: SideBySideResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for m in res.methods:
        s = res.summary[m]
        x, y = s["mean_group_acc"], s["worst_group_acc"]
        ax.errorbar(100 * x["mean"], 100 * y["mean"], xerr=100 * x["std"], yerr=100 * y["std"], fmt="o", capsize=3,
                    label=f"{res.labels[m]} ({s['avg_weight_bits']['mean']:.2f} b)")
    ax.set_xlabel("mean group accuracy (%)")
    ax.set_ylabel("worst group accuracy (%)")
    ax.set_title(f"{res.budget:g} bits per weight, {res.target}, seeds {', '.join(map(str, res.seeds))}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(res: SideBySideResult, out_dir: Path) -> Path:
    out = Path(out_dir).absolute()
    work = staging_folder(out)
    try:
        res.out_dir = str(out)
        (work / "sidebyside.json").write_text(json.dumps(res.to_dict(), indent=2, sort_keys=True) + "\n")
        (work / "sidebyside.md").write_text(markdown(res))
        plot_png(res, work / "sidebyside.png")
        swap_in(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


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
    print(markdown(res), end="")
    print(f"wrote {res.out_dir}")
    return 0
