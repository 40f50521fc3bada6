"""Writing results: JSON-safe values and output folders that appear whole or not at all."""
from __future__ import annotations

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
