"""What every real-data loader shares: reading the CSV, finding and decoding the images,
the seeded stratified split and the assembly of `DataSplits`.

The loaders (fitzpatrick, isic, csvfolder) only turn their own CSV layout into rows of
(image path, class name, group name); everything else happens here, once.

Images are centre-cropped to a square (lesions are centred; a crop keeps the aspect ratio),
resized with Pillow's antialiasing bilinear filter to image_size x image_size, converted to
RGB and stored as uint8 N x 3 x H x W, as the built-in set is. Conversions: grayscale is
copied to the three channels, an alpha channel is dropped (the colour values are kept, not
blended), a 16-bit image keeps its high byte (value // 256). Refused, each with the file and
its CSV line: a file Pillow cannot decode (empty, truncated, not an image), an image smaller
than MIN_SIDE px on a side (nothing to resize from) or of more than Pillow's
Image.MAX_IMAGE_PIXELS (its decompression-bomb limit, checked before decoding), a
floating-point image, and a name that leads outside the image folder (absolute, or `..`).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FqhwError
from .dataset import DataSplits, GroupedImages

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
MIN_SIDE = 8  # px: the smallest --data-image-size; a smaller picture is a placeholder, not a lesion
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class RealDataSplits(DataSplits):
    """DataSplits plus what the loader did (rows read, dropped and why, groups, classes)."""

    info: dict = field(default_factory=dict)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def fail(source: str, msg: str) -> None:
    raise FqhwError(one_line(f"{source}: {msg}"))


# ---------------------------------------------------------------------------- options


def check_options(source: str, image_size, seed, split, limit) -> tuple[float, float, float]:
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or not 8 <= image_size <= 128 or image_size % 4:
        fail(source, f"image_size={image_size!r} must be a multiple of 4 between 8 and 128 (e.g. 32)")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        fail(source, f"seed={seed!r} must be a non-negative integer")
    if limit is not None and (not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 3):
        fail(source, f"limit={limit!r} must be None (all rows) or an integer of at least 3")
    try:
        fr = tuple(float(v) for v in split)
    except (TypeError, ValueError):
        fr = ()
    if len(fr) != 3 or not all(math.isfinite(v) and v > 0 for v in fr) or abs(sum(fr) - 1.0) > 1e-6:
        fail(source, f"split={split!r} must be three positive fractions (train, val, test) summing to 1, e.g. (0.6, 0.2, 0.2)")
    return fr  # type: ignore[return-value]


# ---------------------------------------------------------------------------- CSV


def read_csv(path: Path, source: str, hint: str = "") -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV with a header; FqhwError if missing, unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a CSV file" if path.is_dir() else "not found"
        fail(source, f"CSV {path} {what}{'; ' + hint if hint else ''}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()} for r in reader]
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        fail(source, f"CSV {path} cannot be read ({e}); save it as UTF-8 comma-separated text")
    if not columns:
        fail(source, f"CSV {path} is empty (no header line); it needs a header and one row per image")
    if not rows:
        fail(source, f"CSV {path} has a header ({', '.join(columns)}) but no rows; it needs one row per image")
    return columns, rows


def require_columns(path: Path, source: str, columns: list[str], needed: list[str], fix: str = "") -> None:
    for col in needed:
        if col not in columns:
            fail(source, f"CSV {path} has no column {col!r} (columns found: {', '.join(columns)})"
                         f"; {fix or 'rename the column in the CSV or choose another column'}")


def pick_column(path: Path, source: str, columns: list[str], choices: list[str]) -> str:
    """The first of `choices` present (an accepted alias), else FqhwError naming them all."""
    for c in choices:
        if c in columns:
            return c
    fail(source, f"CSV {path} has no column {' or '.join(repr(c) for c in choices)} (columns found: {', '.join(columns)}); "
                 "rename the column in the CSV")
    raise AssertionError  # unreachable


# ---------------------------------------------------------------------------- images


def find_image(folder: Path, name: str, source: str, where: str) -> Path:
    """folder/name if it exists; else folder/name + .jpg/.jpeg/.png; else FqhwError."""
    if not name:
        fail(source, f"{where}: empty image name; fill it in or remove the row")
    inside = os.path.normpath(folder / name)
    if Path(name).is_absolute() or not Path(inside).is_relative_to(os.path.normpath(folder)):
        fail(source, f"{where}: image {name!r} is outside the image folder {folder}; "
                     "give names relative to that folder (no absolute path, no '..'), or pass the folder that holds them")
    base = folder / name
    if Path(name).suffix.lower() in IMAGE_EXTS and base.is_file():
        return base
    for ext in IMAGE_EXTS:
        p = folder / (name + ext)
        if p.is_file():
            return p
    if base.is_file():
        return base
    fail(source, f"{where}: image {base} not found (also tried {', '.join(IMAGE_EXTS)}); "
                 "download the images into that folder or remove the row")
    raise AssertionError  # unreachable


def _to_rgb(im, path: Path, source: str, where: str):
    """A decoded image in RGB (see the module docstring for the conversions)."""
    from PIL import Image

    if im.mode.startswith("I"):  # 16-bit ("I;16", or "I" as some Pillow versions open it)
        arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8
        im = Image.fromarray(arr.astype(np.uint8), "L")
    elif im.mode == "F":
        fail(source, f"{where}image {path} holds floating-point pixels; save it as an 8- or 16-bit image or remove its row")
    return im.convert("RGB")


def read_image(path: Path, image_size: int, source: str, where: str = "") -> np.ndarray:
    """One image as uint8 3 x S x S: centre square crop, antialiased resize, RGB.
    `where` ("CSV line N") goes into the error."""
    from PIL import Image, UnidentifiedImageError

    where = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
            if w * h > Image.MAX_IMAGE_PIXELS:  # Pillow only warns below twice its limit
                raise Image.DecompressionBombError(f"{w} x {h} = {w * h} px")
            if min(w, h) < MIN_SIDE:
                fail(source, f"{where}image {path} is {w} x {h} px, smaller than {MIN_SIDE} px on a side: "
                             "replace it with the full-size picture or remove its row")
            # JPEG: let the decoder downscale by 1/2..1/8 first (much faster for big photos)
            im.draft("RGB", (image_size * 2, image_size * 2))
            im.load()  # raises on truncated or corrupt data
            im = _to_rgb(im, path, source, where)
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:
        size = str(e) if " px" in str(e) else str(e).split(" exceeds")[0]  # Pillow's own: "Image size (N pixels)"
        fail(source, f"{where}image {path} is too large to decode safely ({size}, over the {Image.MAX_IMAGE_PIXELS} px of "
                     "Pillow's decompression-bomb guard): downscale it or remove its row")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        fail(source, f"{where}image {path} cannot be read ({e}); it is corrupt or truncated: re-download it or remove its row")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def read_images(paths: list[Path], image_size: int, source: str, rows: list[str] | None = None) -> np.ndarray:
    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, image_size, source, rows[i] if rows else "")
    return out


# ---------------------------------------------------------------------------- split


def exact_counts(n: int, fractions) -> np.ndarray:
    """Largest-remainder rounding of n * fractions (sums to n exactly)."""
    raw = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def stratified_split(strata: np.ndarray, fractions, seed: int) -> list[np.ndarray]:
    """Seeded split of range(n) into len(fractions) sorted index arrays.

    Totals follow `fractions` exactly (largest remainder); each stratum is spread evenly
    over the splits: its members, in random order, get evenly spaced keys (rank + u) / size
    with a random offset u per stratum, and the cut points fall on the keys' global order.
    """
    strata = np.asarray(strata)
    n = len(strata)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B17]))
    perm = rng.permutation(n)
    key = np.empty(n, dtype=np.float64)
    for s in np.unique(strata):
        members = perm[strata[perm] == s]
        key[members] = (np.arange(len(members)) + rng.random()) / len(members)
    order = np.lexsort((rng.random(n), key))
    bounds = np.concatenate([[0], np.cumsum(exact_counts(n, fractions))])
    return [np.sort(order[bounds[i]: bounds[i + 1]]) for i in range(len(fractions))]


# ---------------------------------------------------------------------------- assembly


def subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of size min(n, limit)."""
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x117]))
    return np.sort(rng.choice(n, size=limit, replace=False))


def build_splits(
    *,
    source: str,
    name: str,
    paths: list[Path],
    labels: list[str],
    groups: list[str],
    class_order: list[str],
    group_order: list[str],
    image_size: int,
    seed: int,
    fractions: tuple[float, float, float],
    limit: int | None = None,
    assigned: list[str] | None = None,
    info: dict | None = None,
    group_hint: str = "",
    rows: list[str] | None = None,
) -> RealDataSplits:
    """Rows (path, class, group) -> RealDataSplits.

    class_order / group_order list the names in index order; names absent from the kept rows
    are dropped (and listed in info). `assigned` (one of train/val/test per row) replaces
    the random split. `rows`: where each row is ("CSV line N"), for the image errors.
    """
    info = dict(info or {})
    keep = subsample(len(paths), limit, seed)
    if limit is not None and len(keep) < len(paths):
        info["limited_to"] = int(len(keep))
    paths = [paths[i] for i in keep]
    labels = [labels[i] for i in keep]
    groups = [groups[i] for i in keep]
    rows = [rows[i] for i in keep] if rows is not None else None
    if assigned is not None:
        assigned = [assigned[i] for i in keep]

    present_g = set(groups)
    group_names = [g for g in group_order if g in present_g]
    if len(group_names) < 2:
        only = f"only group {group_names[0]!r}" if group_names else "no group"
        fail(source, f"{only} left after filtering ({len(paths)} rows): fairness needs at least two groups"
                     f"{'; ' + group_hint if group_hint else '; add rows from another group'}")
    present_c = set(labels)
    class_names = [c for c in class_order if c in present_c]
    if len(class_names) < 2:
        fail(source, f"only {len(class_names)} class ({', '.join(class_names) or 'none'}) left after filtering: "
                     "a classifier needs at least two; add rows of another class")
    missing_g = [g for g in group_order if g not in present_g]
    missing_c = [c for c in class_order if c not in present_c]
    if missing_g:
        info["groups_without_samples"] = missing_g
    if missing_c:
        info["classes_without_samples"] = missing_c

    g_idx = {g: i for i, g in enumerate(group_names)}
    c_idx = {c: i for i, c in enumerate(class_names)}
    y = np.array([c_idx[c] for c in labels], dtype=np.int64)
    g = np.array([g_idx[v] for v in groups], dtype=np.int64)

    if assigned is not None:
        parts = [np.nonzero(np.array(assigned) == s)[0] for s in SPLIT_NAMES]
        empty = [s for s, p in zip(SPLIT_NAMES, parts) if not len(p)]
        if empty:
            fail(source, f"the split column gives no rows to {', '.join(empty)}; every one of train, val, test needs rows")
        info["split"] = "from the CSV's split column"
    else:
        if len(paths) < 3:
            fail(source, f"only {len(paths)} rows left: a train/val/test split needs at least 3")
        parts = stratified_split(g * len(class_names) + y, fractions, seed)
        info["split"] = f"seeded random {'/'.join(f'{f:g}' for f in fractions)}, stratified by group x class (seed {seed})"

    images = read_images(paths, image_size, source, rows)
    info.update(n_used=len(paths), group_names=group_names, class_names=class_names, image_size=image_size)
    sets = [GroupedImages(images[p], y[p], g[p], list(group_names), list(class_names)) for p in parts]
    return RealDataSplits(train=sets[0], val=sets[1], test=sets[2], name=name, info=info)


def require_coverage(splits: DataSplits, source: str) -> None:
    """Every class in the train split (a class the model never sees cannot be learnt) and
    every group in every split (its accuracy, importance and fine-tuning need rows): else one
    line saying which. The compile asks this of a real data set; the loaders do not, so that
    a small set can still be loaded and looked at."""
    fix = "add rows of it, or assign the rows in a split column"
    train = splits.train
    for c, name in enumerate(train.class_names):
        if not (train.labels == c).any():
            n = sum(int((getattr(splits, s).labels == c).sum()) for s in SPLIT_NAMES)
            fail(source, f"class {name!r} has no rows in the train split ({n} in val/test): the model would never learn it; "
                         f"{fix}, or remove its rows")
    for s in SPLIT_NAMES:
        part = getattr(splits, s)
        for k, name in enumerate(part.group_names):
            if not (part.groups == k).any():
                n = sum(int((getattr(splits, t).groups == k).sum()) for t in SPLIT_NAMES)
                fail(source, f"group {name!r} has no rows in the {s} split ({n} rows in all): its accuracy and fairness terms "
                             f"need rows in train, val and test; {fix}")


def require_folder(path: Path, source: str, what: str, fix: str = "") -> Path:
    path = Path(path)
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "not found"
        fail(source, f"{what} {path} {state}; {fix or 'check the path'}")
    return path
