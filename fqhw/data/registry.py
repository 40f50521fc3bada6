"""One entry point for every data set: `load_data(spec, image_size, seed)`.

Specs:
  builtin                       the synthetic dermatology set (fqhw.data.synthetic)
  fitzpatrick17k:PATH           Fitzpatrick17k folder (fitzpatrick17k.csv + images/)
  isic2019:PATH                 ISIC 2019 folder (ground truth + metadata CSVs + images)
  csv:PATH_TO_CSV[,IMAGE_DIR]   any CSV + image folder (default: the CSV's folder)

A real-data spec may end in loader options, each as ;key=value, e.g.
  fitzpatrick17k:/data/f17k;groups=light-dark;limit=2000
  isic2019:/data/isic;unknown_sex=group;split=0.7/0.15/0.15
  csv:/data/x.csv,/data/img;group_column=site
"""
from __future__ import annotations

import inspect
from pathlib import Path

from ..errors import FqhwError
from .csvfolder import load_csv_folder
from .dataset import DataSplits
from .fitzpatrick import load_fitzpatrick17k
from .isic import load_isic2019
from .synthetic import SyntheticDermConfig, generate
from .synthetic import describe as _describe_counts

KINDS = {
    "builtin": None,
    "fitzpatrick17k": load_fitzpatrick17k,
    "isic2019": load_isic2019,
    "csv": load_csv_folder,
}
_FIXED = {"root", "csv_path", "image_dir", "image_size", "seed"}


def _value(text: str):
    t = text.strip()
    if t.lower() == "none":
        return None
    if "/" in t and all(_is_number(p) for p in t.split("/")):
        return tuple(float(p) for p in t.split("/"))
    try:
        return int(t)
    except ValueError:
        pass
    return float(t) if _is_number(t) else t


def _is_number(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """(kind, location, options) of a spec; FqhwError for an unknown kind or bad option."""
    known = "builtin, fitzpatrick17k:PATH, isic2019:PATH, csv:PATH_TO_CSV[,IMAGE_DIR]"
    if not isinstance(spec, str) or not spec.strip():
        raise FqhwError(f"data spec {spec!r} is empty; use one of {known}")
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise FqhwError(f"data spec {spec!r}: unknown kind {kind!r}; known kinds: {known}")
    if kind == "builtin":
        if rest.strip():
            raise FqhwError(f"data spec {spec!r}: builtin takes no path; set its knobs with the --data-* flags")
        return kind, "", {}
    location, *opts = rest.split(";")
    if not location.strip():
        raise FqhwError(f"data spec {spec!r}: no path after '{kind}:'; e.g. {kind}:/path/to/data")
    allowed = sorted(set(inspect.signature(KINDS[kind]).parameters) - _FIXED)
    options = {}
    for o in opts:
        if not o.strip():
            continue
        key, eq, val = o.partition("=")
        key = key.strip()
        if not eq or key not in allowed:
            raise FqhwError(f"data spec {spec!r}: option {o.strip()!r} is not key=value with a known key; "
                            f"{kind} accepts {', '.join(allowed)}")
        options[key] = _value(val)
    return kind, location.strip(), options


def load_data(spec: str = "builtin", image_size: int = 32, seed: int = 0, builtin: SyntheticDermConfig | None = None,
              **options) -> DataSplits:
    """The splits a spec names (see the module docstring). `builtin`: the synthetic set's
    full configuration (default SyntheticDermConfig(seed=seed, image_size=image_size));
    `options` are passed to the loader and override the spec's ;key=value options."""
    kind, location, spec_options = parse_spec(spec)
    if kind == "builtin":
        return generate(builtin or SyntheticDermConfig(seed=seed, image_size=image_size))
    allowed = set(inspect.signature(KINDS[kind]).parameters) - _FIXED
    bad = sorted(set(options) - allowed)
    if bad:
        raise FqhwError(f"data {kind}: unknown option(s) {', '.join(bad)}; {kind} accepts {', '.join(sorted(allowed))}")
    opts = {**spec_options, **options}
    if kind == "csv":
        csv_path, image_dir = location, None
        if not Path(location).is_file() and "," in location:
            csv_path, _, image_dir = location.partition(",")
            image_dir = image_dir.strip() or None
        return load_csv_folder(csv_path.strip(), image_dir, image_size=image_size, seed=seed, **opts)
    return KINDS[kind](location, image_size=image_size, seed=seed, **opts)


def describe(splits: DataSplits) -> dict:
    """Counts per split, group and class, plus what a real-data loader did (drops, split)."""
    out = _describe_counts(splits)
    info = getattr(splits, "info", None)
    if info:
        out["loader"] = info
    return out
