"""The one seam every sweep runs its independent jobs through.

    ex = Executor.from_args(args)           # --jobs N, --executor local|ray, --ray-address ADDR
    results = ex.map(fn, [job1, job2, ...])  # in job order, whatever order they finish in

- `local` (the default): `--jobs 1` runs each job in this process, one after another;
  `--jobs N` runs them in N worker processes (spawned, not forked: torch and its thread
  pools do not survive a fork).
- `ray`: each job is a Ray task (`--ray-address ADDR` joins a running cluster, without it a
  local Ray starts on this machine's cores); `pip install -e '.[ray]'`.

Every job runs at the same torch thread count, `--threads-per-job` (default 1), whatever
the number of jobs: float reductions on the CPU may sum in another order at another thread
count, so fixing it is what makes `--jobs 2` give the numbers `--jobs 1` gives. N jobs at T
threads keep N * T cores busy: choose N * T at most the machine's cores.

A job's results are step-cache entries (fqhw.stepcache): a job stores what it computed before
returning, and a rerun after a lost worker, a killed run or a failed job finds every
finished entry and computes only the rest. The executor holds no results of its own.
`fn` and its jobs must be picklable (a module-level function, plain data).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fqhw.errors import FqhwError

KINDS = ("local", "ray")


@dataclass(frozen=True)
class Executor:
    kind: str = "local"
    jobs: int = 1
    threads_per_job: int = 1
    ray_address: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FqhwError(f"unknown --executor {self.kind}: choose one of {', '.join(KINDS)}")
        if self.jobs < 1:
            raise FqhwError("--jobs must be at least 1")
        if self.threads_per_job < 1:
            raise FqhwError("--threads-per-job must be at least 1")
        if self.ray_address is not None and self.kind != "ray":
            raise FqhwError("--ray-address needs --executor ray")

    @classmethod
    def from_args(cls, args) -> "Executor":
        return cls(kind=getattr(args, "executor", "local"), jobs=getattr(args, "jobs", 1),
                   threads_per_job=getattr(args, "threads_per_job", 1), ray_address=getattr(args, "ray_address", None))

    @property
    def parallel(self) -> bool:
        """Whether jobs run outside this process (progress bars of several jobs would interleave)."""
        return self.kind == "ray" or self.jobs > 1

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list:
        """fn(job) for every job, in the order of `jobs`. The first job that raises stops the
        sweep with its exception (the jobs that finished have stored their entries)."""
        with self.session() as run:
            return run.map(fn, jobs)

    @contextlib.contextmanager
    def session(self):
        """A runner whose `map` may be called several times (rounds of a sweep that depend on
        the one before) on the same workers: one pool, or one Ray connection."""
        if self.kind == "ray":
            with _ray_session(self) as run:
                yield run
        elif self.jobs == 1:
            with torch_threads(self.threads_per_job):
                yield _InProcess()
        else:
            with _pool_session(self) as run:
                yield run


class _InProcess:
    @staticmethod
    def map(fn, jobs):
        return [fn(j) for j in jobs]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n inside, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quiet_state() -> tuple:
    """The parent's warning filters and torch.utils.cpp_extension's log level (fqhw.cli quiets
    both): a worker starts with the same, so it says no more than a one-process run."""
    import logging
    import warnings

    return list(warnings.filters), logging.getLogger("torch.utils.cpp_extension").level


def _init_worker(threads: int, quiet: tuple = ([], 0)) -> None:
    import logging
    import warnings

    warnings.filters[:] = quiet[0]
    logging.getLogger("torch.utils.cpp_extension").setLevel(quiet[1])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(threads)


def _run_job(fn, job, threads: int):
    import torch

    torch.set_num_threads(threads)
    return fn(job)


def _ray_job(fn, job, threads: int, quiet: tuple):
    _init_worker(threads, quiet)  # a Ray worker may serve several tasks: set each time
    return fn(job)


class _Pool:
    def __init__(self, pool, threads: int):
        self.pool, self.threads = pool, threads

    def map(self, fn, jobs):
        futures = [self.pool.submit(_run_job, fn, j, self.threads) for j in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


@contextlib.contextmanager
def _pool_session(ex: Executor):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    # the children inherit the environment: their thread pools start at threads_per_job
    saved = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({v: str(ex.threads_per_job) for v in saved})
    try:
        with ProcessPoolExecutor(max_workers=ex.jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(ex.threads_per_job, _quiet_state())) as pool:
            yield _Pool(pool, ex.threads_per_job)
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


class _Ray:
    def __init__(self, ray, ex: Executor):
        self.ray, self.threads = ray, ex.threads_per_job
        # a task whose worker dies is retried (max_retries); what it had stored is reused
        self.task = ray.remote(num_cpus=ex.threads_per_job, max_retries=2)(_ray_job)
        self.quiet = _quiet_state()

    def map(self, fn, jobs):
        return self.ray.get([self.task.remote(fn, j, self.threads, self.quiet) for j in jobs])


@contextlib.contextmanager
def _ray_session(ex: Executor):
    try:
        import ray
    except ImportError:
        raise FqhwError("--executor ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from None
    started = False
    if not ray.is_initialized():
        kw = {"address": ex.ray_address} if ex.ray_address else {"num_cpus": ex.jobs * ex.threads_per_job, "include_dashboard": False}
        ray.init(**kw)
        started = True
    try:
        yield _Ray(ray, ex)
    finally:
        if started:
            ray.shutdown()


def note(msg: str) -> None:
    print(f"fqhw: {msg}", file=sys.stderr, flush=True)
