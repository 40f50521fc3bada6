"""Float weights from a local file (`--checkpoint PATH`) instead of training.

The file is read with torch.load(..., weights_only=True) and nothing else: a pickle that
would run code when loaded is refused. Every way the file can be wrong (missing, truncated,
not a weights-only file, another model's weights, NaN/Inf values) is one FqhwError line.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from fqhw.errors import FqhwError
from fqhw.stepcache import file_digest

_SAVE_HINT = "save it with torch.save(model.state_dict(), ...)"


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's run on for several lines)."""
    text = "" if isinstance(e, (KeyError, IndexError)) else str(e).strip()  # their message is a bare key
    if not text and isinstance(e, (KeyError, IndexError, EOFError)):
        return "unrecognised or empty file"
    first = text.splitlines()[0].strip() if text else type(e).__name__
    return first.split(". ")[0].rstrip(".")[:160]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(int(s)) for s in t.shape) + ")"


def check_checkpoint_path(path) -> Path:
    """The checkpoint's path if it is a readable file, else FqhwError (before any work)."""
    path = Path(path)
    if not path.exists():
        raise FqhwError(f"checkpoint {path} not found: pass the path of a file saved with torch.save(model.state_dict(), ...)")
    if not path.is_file():
        raise FqhwError(f"checkpoint {path} is not a file: pass the path of a file saved with torch.save(model.state_dict(), ...)")
    return path


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The state_dict in `path` (a plain state_dict or {"state_dict": ...}), loaded weights-only."""
    path = check_checkpoint_path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise FqhwError(f"checkpoint {path} is not a weights-only file (it would run code when loaded): {_SAVE_HINT}") from None
        raise FqhwError(f"checkpoint {path} cannot be read (truncated or not a torch.save file: {_first_line(e)}): {_SAVE_HINT}") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise FqhwError(f"checkpoint {path} cannot be read (truncated or not a torch.save file: {_first_line(e)}): {_SAVE_HINT}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        what = "an empty dict" if isinstance(obj, dict) and not obj else f"a {type(obj).__name__}"
        if isinstance(obj, dict) and obj:
            what = "a dict whose values are not all tensors"
        raise FqhwError(f"checkpoint {path} holds {what}, not a state_dict: {_SAVE_HINT}")
    return obj


def load_checkpoint(model: nn.Module, path) -> dict:
    """Load `path` into `model` (strictly: same keys, same shapes, finite values); returns
    what FloatModel.info records about where the weights came from."""
    path = Path(path)
    state = read_state_dict(path)
    expected = model.state_dict()
    fix = "it was saved from a different model (check --channels, --data and the class count)"
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FqhwError(f"checkpoint {path} does not fit the model: missing key {missing[0]!r}{more}; {fix}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise FqhwError(
            f"checkpoint {path} does not fit the model: unexpected key {unexpected[0]!r}{more} (a layer the model does not have; "
            f"fqhw compiles Conv-BN-ReLU-MaxPool blocks and a linear head); {fix}"
        )
    for k, want in expected.items():
        got = state[k]
        if tuple(got.shape) != tuple(want.shape):
            raise FqhwError(
                f"checkpoint {path} does not fit the model: {k!r} has shape {_shape(got)} in the checkpoint but {_shape(want)} in the model; {fix}"
            )
    for k, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise FqhwError(f"checkpoint {path}: tensor {k!r} holds NaN or Inf values; retrain or re-export the model")
    model.load_state_dict(state, strict=True)
    model.eval()
    return {"source": "checkpoint", "checkpoint": str(path.absolute()), "sha256": file_digest(path)}
