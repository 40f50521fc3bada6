"""`fqhw sidebyside --jobs 2` against `--jobs 1`: wall time and equality, in one run.

    python bench/sidebyside_jobs.py [--sweep small|default] [--jobs 2] [--rounds 1] [--out FILE]

Runs the same sweep as a fresh `fqhw sidebyside` command (two seeds, four methods, the
default CNN; `small`: a smaller built-in set and two epochs, about 30 s at --jobs 1, where
each worker's few seconds of start-up weigh most; `default`: the built-in set and the
epochs at their defaults, about 5 minutes at --jobs 1, closer to a real sweep), each from an empty step cache, first with
`--jobs 1` (one process) and then with `--jobs N` (N spawned worker processes), both at the
default `--threads-per-job 1`; with --rounds R it alternates the order R times and takes each
one's median. Writes the wall times, the CPU seconds and the cores kept busy, their ratio (jobs N over jobs 1), whether the two
sidebyside.json files agree in everything but their clocks, the machine's cores and its load
average before and after (another job on the machine slows the parallel run most).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["--seeds", "0,1", "--methods", "uniform4,fq_qat,fq_baq,fqhw_qat", "--baq-epochs", "1", "--no-tune", "--quiet"]
SWEEPS = {
    "small": [*COMMON, "--data-n-train", "1500", "--data-n-val", "600", "--data-n-test", "600", "--data-image-size", "24",
              "--epochs", "2", "--qat-epochs", "2"],
    "default": COMMON,
}


def cpu_s() -> float:
    """CPU seconds (user + system) of every child process reaped so far, the pool's workers
    included (each is reaped by its parent, and that parent by us)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(jobs: int, root: Path, sweep: list[str]) -> tuple[float, float, dict]:
    out, cache = root / "out", root / "cache"
    t0, c0 = time.perf_counter(), cpu_s()
    subprocess.run([sys.executable, "-m", "fqhw.cli", "sidebyside", "--out", str(out), "--cache-dir", str(cache), "--jobs", str(jobs), *sweep],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, cpu_s() - c0, json.loads((out / "sidebyside.json").read_text())


def results(res: dict) -> dict:
    """Everything but the clocks and the output folder."""
    runs = [{k: v for k, v in r.items() if k != "seconds"} for r in res["runs"]]
    return {**{k: v for k, v in res.items() if k not in ("runs", "wall_time_s", "out_dir")}, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", choices=sorted(SWEEPS), default="small")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sidebyside_jobs.json")
    args = ap.parse_args()

    load_before = os.getloadavg()
    times: dict[int, list[float]] = {1: [], args.jobs: []}
    cpu: dict[int, list[float]] = {1: [], args.jobs: []}
    record_s: dict[int, list[float]] = {1: [], args.jobs: []}
    got: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for jobs in ((1, args.jobs) if r % 2 == 0 else (args.jobs, 1)):
                wall, used, res = run(jobs, Path(tmp) / f"r{r}-j{jobs}", SWEEPS[args.sweep])
                times[jobs].append(round(wall, 2))
                cpu[jobs].append(round(used, 2))
                record_s[jobs].append(round(sum(x["seconds"] for x in res["runs"]), 2))
                got.setdefault(jobs, res)
                print(f"round {r}: --jobs {jobs}: {wall:.1f} s wall, {used:.1f} s CPU ({used / wall:.2f} cores busy)", flush=True)
                same = results(res) == results(got[jobs])
                if not same:
                    raise SystemExit(f"--jobs {jobs} gave other results in round {r} than in round 0")
    identical = results(got[1]) == results(got[args.jobs])
    one, many = statistics.median(times[1]), statistics.median(times[args.jobs])
    figures = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "sweep_name": args.sweep,
        "sweep": ["sidebyside", *SWEEPS[args.sweep]],
        "threads_per_job": 1,
        "jobs": args.jobs,
        "wall_s": {"jobs_1": times[1], f"jobs_{args.jobs}": times[args.jobs]},
        "ratio": round(many / one, 3),
        # CPU seconds of the whole command (workers included) and cores it kept busy on average:
        # jobs N can only approach 1/N of the wall time when N cores are free for it
        "cpu_s": {"jobs_1": cpu[1], f"jobs_{args.jobs}": cpu[args.jobs]},
        "cores_busy": {"jobs_1": [round(c / w, 2) for c, w in zip(cpu[1], times[1])],
                       f"jobs_{args.jobs}": [round(c / w, 2) for c, w in zip(cpu[args.jobs], times[args.jobs])]},
        # the records' own clocks (allocate + fine-tune + evaluate, summed): longer under --jobs N
        # when the jobs did not each have a core of their own
        "records_s": {"jobs_1": record_s[1], f"jobs_{args.jobs}": record_s[args.jobs]},
        "identical": identical,
        "records": len(got[1]["runs"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"--jobs {args.jobs} / --jobs 1 = {many:.1f} s / {one:.1f} s = {many / one:.2f}x; identical results: {identical}")
    print(f"wrote {args.out}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
