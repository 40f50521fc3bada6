"""Finished step outputs, keyed by the step's inputs, so that a rerun resumes.

A step's key is a hash of everything its output depends on: its own settings and the keys
(or contents) of the steps it reads. Changing one input therefore changes the keys of that
step and of every step downstream of it, and of no other; a rerun with the same inputs finds
every finished step and skips it.

An entry is a folder, cache_dir/steps/<step>/<key>/, filled in a temporary sibling folder
and renamed into place only once complete (a rename within one file system is atomic). A run
killed at any moment (Ctrl-C, SIGKILL, a full disk) therefore leaves either a whole entry or
none: never one that a later run would trust half-written. An entry that cannot be read
(e.g. written by an older fqhw whose classes changed) is recomputed and replaced.

Several runs may share one cache folder at once: each step's entry is looked up, computed
and stored under a file lock (cache_dir/locks/STEP-KEY.lock, the `filelock` package), so a
second run that needs the same entry waits for the first (saying so on stderr) and then
reuses it; runs that need different entries do not wait for each other. The operating
system drops the lock of a killed process, so a `kill -9` never leaves a run waiting.
"""
from __future__ import annotations

import hashlib
import json
import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from fqhw.errors import FqhwError
from fqhw.outputs import file_digest, pid_alive  # file_digest: also the keys of steps that read files (flow, checkpoints)

T = TypeVar("T")

# Bumped when an entry's layout or a step's meaning changes, so old entries are never read.
CACHE_VERSION = 1
_DONE = "inputs.json"  # written last into an entry: it records what the key was made of


def input_key(inputs: Any) -> str:
    """Stable hash of a JSON-serialisable description of a step's inputs (key order free)."""
    try:
        text = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    except TypeError as e:
        raise FqhwError(f"cache key must be JSON-serialisable: {e}") from e
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class Cached(Generic[T]):
    value: T
    key: str
    hit: bool


class StepCache:
    """cache_dir/steps/<step>/<key>/ entries; `root=None` turns caching off (every step runs)."""

    def __init__(self, root: Path | str | None):
        self.root = None if root is None else Path(root) / "steps"

    def entry(self, step: str, key: str) -> Path:
        if self.root is None:
            raise ValueError("the step cache is off")
        return self.root / step / key

    @contextlib.contextmanager
    def lock(self, step: str, key: str):
        """Held while the entry (step, key) is looked up, computed and stored (see the module
        docstring); a no-op when the cache is off."""
        if self.root is None:
            yield
            return
        from filelock import FileLock, Timeout

        folder = self.root.parent / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / f"{step}-{key}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"fqhw: waiting for another fqhw run that is computing step {step} in {self.root.parent} ...",
                  file=sys.stderr, flush=True)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def has(self, step: str, key: str) -> bool:
        """Whether a whole entry is stored (it may still fail to load: `get` says)."""
        return self.root is not None and (self.entry(step, key) / _DONE).is_file()

    def get(self, step: str, key: str, load: Callable[[Path], T]) -> T | None:
        """The stored value, or None when absent, incomplete or unreadable."""
        if self.root is None:
            return None
        if not self.has(step, key):
            return None
        try:
            return load(self.entry(step, key))
        except Exception:  # stale or damaged: recompute (put replaces it)
            return None

    def put(self, step: str, key: str, inputs: Any, write: Callable[[Path], None]) -> Path | None:
        """Fill a new entry with `write(folder)` and move it into place whole."""
        if self.root is None:
            return None
        final = self.entry(step, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        _sweep_dead(final.parent)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}.{os.getpid()}.", suffix=".tmp"))
        try:
            write(tmp)
            (tmp / _DONE).write_text(json.dumps({"key": key, **_wrapped(step, inputs)}, indent=1, sort_keys=True, default=str) + "\n")
            if final.exists():  # damaged, or another run finished it first: keep one whole entry
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    @staticmethod
    def key(step: str, inputs: Any) -> str:
        return input_key(_wrapped(step, inputs))

    def run(
        self,
        step: str,
        inputs: Any,
        compute: Callable[[], T],
        write: Callable[[T, Path], None],
        load: Callable[[Path], T],
    ) -> Cached[T]:
        """The step's value for these inputs: from the cache, or computed and stored."""
        from fqhw.models import distributed as dist

        key = self.key(step, inputs)
        with self.lock(step, key) if dist.is_main() else contextlib.nullcontext():  # rank 0 locks for all
            value = self.get(step, key, load)
            # Under torchrun every rank runs the step together (training under DDP): rank 0's
            # view of the cache decides for all, only rank 0 writes, and the others wait for it.
            if dist.from_main(value is not None):
                if value is None:
                    raise FqhwError(f"rank {dist.rank()} cannot read {self.entry(step, key)}, which rank 0 reused: give every rank the same --cache-dir")
                return Cached(value, key, True)
            value = compute()
            if dist.is_main():
                self.put(step, key, inputs, lambda folder: write(value, folder))
            dist.barrier()
        return Cached(value, key, False)


def check_cache_writable(root) -> None:
    """FqhwError, before any work, when the cache folder (or the folder it would be made in)
    cannot be written: every step stores its entry, and its lock, there."""
    root = Path(root).absolute()
    check_folder_writable(root, root, "cache folder", "--cache-dir")


def check_folder_writable(path: Path, start: Path, what: str, flag: str) -> None:
    """FqhwError naming `path` unless `start`, or the nearest folder above it that exists, is a
    folder this process may write (`flag`: the option that names another place)."""
    p = start
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise FqhwError(f"{what} {path} cannot be written ({p} is a file, not a folder): choose another {flag}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise FqhwError(f"{what} {path} cannot be written ({p} is not writable): choose another {flag}")


def _sweep_dead(folder: Path) -> None:
    """Remove the temporary entries of writers that were killed mid-write (.KEY.PID.*.tmp)."""

    for p in folder.glob(".*.tmp"):
        parts = p.name.split(".")
        if len(parts) >= 4 and parts[2].isdigit() and int(parts[2]) != os.getpid() and not pid_alive(int(parts[2])):
            shutil.rmtree(p, ignore_errors=True)


def _wrapped(step: str, inputs: Any) -> dict:
    return {"step": step, "cache_version": CACHE_VERSION, "inputs": inputs}
