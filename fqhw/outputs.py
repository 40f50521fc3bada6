"""Writing results: JSON-safe values and output folders that appear whole or not at all."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np


def plain(o: Any) -> Any:
    """`o` as plain JSON values: numpy scalars and arrays, paths and dataclasses converted,
    non-finite floats as null (JSON has no NaN)."""
    if is_dataclass(o) and not isinstance(o, type):
        return plain(asdict(o))
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return plain(o.tolist())
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, Path):
        return str(o)
    return o


def json_default(o: Any) -> Any:
    """`default=` hook for json.dumps: anything `plain` cannot convert becomes its str()."""
    converted = plain(o)
    return str(o) if converted is o else converted


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(plain(obj), indent=2, sort_keys=True, default=json_default) + "\n")


def save_tensors(state: dict, path: Path) -> None:
    """torch.save through an ordinary file write. torch.save writing to a full disk raises a
    RuntimeError with an internal message ("unexpected pos ..."); serialising to memory first
    lets the write fail as the OSError it is (ENOSPC, EROFS, ...), which the commands turn
    into one line naming the folder."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        with open(path, "wb") as f:
            f.write(buf.getbuffer())
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # a failed write names no file


MANIFEST = "manifest.json"
# what `fqhw simulate` and a later build read; not the hls4ml C simulation's library and
# objects, which simulate rebuilds for a moved folder, nor the report's pictures
_MANIFEST_SUFFIXES = {".json", ".onnx", ".pt", ".npy", ".npz", ".txt", ".h", ".cpp", ".sh", ".tcl"}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: the key of a step that reads a file another step wrote (fqhw.stepcache), a manifest entry."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """folder/manifest.json: the sha256 of each file of the finished output folder that a
    later command reads, so that a missing, truncated or edited file is found (check_manifest)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.is_symlink() and p.suffix in _MANIFEST_SUFFIXES and p.name != MANIFEST}
    write_json(folder / MANIFEST, {"sha256": files})


def check_manifest(folder: Path) -> bool:
    """FqhwError naming the first file of folder/manifest.json that is missing or changed
    since the compile; True when all match, False when the folder has no manifest (written
    by an older fqhw)."""
    from fqhw.errors import FqhwError
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return False
    fix = f"re-run fqhw compile (or delete {path} to use an edited folder anyway)"
    try:
        files = json.loads(path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FqhwError(f"{path} cannot be read ({type(e).__name__}): {fix}") from None
    for name, digest in files.items():
        f = Path(folder) / name
        if not f.is_file():
            raise FqhwError(f"{f} is missing from the compile output folder: {fix}")
        if file_digest(f) != digest:
            raise FqhwError(f"{f} was changed or truncated after the compile (its sha256 is not the one in {MANIFEST}): {fix}")
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def staging_folder(out_dir: Path) -> Path:
    """A new, empty staging folder beside `out_dir` for this process (.NAME.partial-PID).

    A run killed in the middle of `swap_in` (between its two renames) left no `out_dir`: that
    swap is finished first (its staging folder was complete). Then the staging folders left by
    runs that were killed (SIGKILL, power loss: nothing could clean up) are removed, as are
    the old output folders such a run may have left; those of live runs are left alone."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _finish_killed_swap(out_dir)
    for kind in ("partial", "old"):
        for p in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            if _dead_pid(p) is not None:
                shutil.rmtree(p, ignore_errors=True)
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    return work


def _dead_pid(p: Path) -> int | None:
    """The PID in a .NAME.KIND-PID folder's name when that process is gone (not this one)."""
    pid = p.name.rsplit("-", 1)[-1]
    return int(pid) if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) else None


def _finish_killed_swap(out_dir: Path) -> None:
    """No out_dir but a dead run's .NAME.old-PID: that run was killed inside swap_in. Its
    staging folder, if still there, is the finished new output (swap_in moves only finished
    ones); else the swap's second rename was done and the old folder is the output."""
    if out_dir.exists():
        return
    for old in sorted(out_dir.parent.glob(f".{out_dir.name}.old-*")):
        pid = _dead_pid(old)
        if pid is not None:
            new = out_dir.parent / f".{out_dir.name}.partial-{pid}"
            os.replace(new if new.is_dir() else old, out_dir)
            return


def swap_in(work: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished staging folder `work` (both on one file system), so
    readers see the old folder or the new one, never a half-written one."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
