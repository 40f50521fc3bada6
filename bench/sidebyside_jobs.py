"""`fqhw sidebyside --jobs 2` against `--jobs 1`: wall time and equality, in one run.

    python bench/sidebyside_jobs.py [--jobs 2] [--rounds 1] [--out bench/results/sidebyside_jobs.json]

Runs the same small sweep (two seeds, four methods, the default CNN on a smaller built-in
set) as a fresh `fqhw sidebyside` command, each from an empty step cache, first with
`--jobs 1` (one process) and then with `--jobs N` (N spawned worker processes), both at the
default `--threads-per-job 1`; with --rounds R it alternates the order R times and takes each
one's median. Writes the wall times, their ratio (jobs N over jobs 1), whether the two
sidebyside.json files agree in everything but their clocks, the machine's cores and its load
average before and after (another job on the machine slows the parallel run most).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = [
    "--seeds", "0,1", "--methods", "uniform4,fq_qat,fq_baq,fqhw_qat", "--baq-epochs", "1", "--no-tune",
    "--data-n-train", "1500", "--data-n-val", "600", "--data-n-test", "600", "--data-image-size", "24",
    "--epochs", "2", "--qat-epochs", "2", "--quiet",
]


def run(jobs: int, root: Path) -> tuple[float, dict]:
    out, cache = root / "out", root / "cache"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fqhw.cli", "sidebyside", "--out", str(out), "--cache-dir", str(cache), "--jobs", str(jobs), *SWEEP],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, json.loads((out / "sidebyside.json").read_text())


def results(res: dict) -> dict:
    """Everything but the clocks and the output folder."""
    runs = [{k: v for k, v in r.items() if k != "seconds"} for r in res["runs"]]
    return {**{k: v for k, v in res.items() if k not in ("runs", "wall_time_s", "out_dir")}, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sidebyside_jobs.json")
    args = ap.parse_args()

    load_before = os.getloadavg()
    times: dict[int, list[float]] = {1: [], args.jobs: []}
    got: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for jobs in ((1, args.jobs) if r % 2 == 0 else (args.jobs, 1)):
                wall, res = run(jobs, Path(tmp) / f"r{r}-j{jobs}")
                times[jobs].append(round(wall, 2))
                got.setdefault(jobs, res)
                print(f"round {r}: --jobs {jobs}: {wall:.1f} s", flush=True)
                same = results(res) == results(got[jobs])
                if not same:
                    raise SystemExit(f"--jobs {jobs} gave other results in round {r} than in round 0")
    identical = results(got[1]) == results(got[args.jobs])
    one, many = statistics.median(times[1]), statistics.median(times[args.jobs])
    figures = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "sweep": ["sidebyside", *SWEEP],
        "threads_per_job": 1,
        "jobs": args.jobs,
        "wall_s": {"jobs_1": times[1], f"jobs_{args.jobs}": times[args.jobs]},
        "ratio": round(many / one, 3),
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
