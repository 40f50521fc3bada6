"""Fitzpatrick17k, read from a local copy (no network).

Layout: root/fitzpatrick17k.csv with columns md5hash, label (the diagnosis) and
fitzpatrick_scale (1-6, -1 unknown; older copies call it "fitzpatrick"), and the images as
root/images/<md5hash>.jpg (or .png). Rows of unknown skin type are dropped (counted in
info["dropped_unknown_type"]). Groups: the six Fitzpatrick types FST-I..FST-VI, or light
(types 1-3) and dark (4-6).
"""
from __future__ import annotations

from pathlib import Path

from .images import RealDataSplits, build_splits, check_options, fail, find_image, pick_column, read_csv, require_columns, require_folder

CSV_NAME = "fitzpatrick17k.csv"
IMAGE_DIR = "images"
TYPE_COLUMNS = ["fitzpatrick_scale", "fitzpatrick"]
TYPE_NAMES = ["FST-I", "FST-II", "FST-III", "FST-IV", "FST-V", "FST-VI"]
GROUPINGS = ("types", "light-dark")
SOURCE = "fitzpatrick17k"


def _skin_type(text: str) -> int | None:
    """1..6, or None for unknown (-1 or empty); ValueError for anything else."""
    if text == "" or text.lower() in ("nan", "na", "none"):
        return None
    v = float(text)
    if v != int(v):
        raise ValueError(text)
    v = int(v)
    if v == -1:
        return None
    if not 1 <= v <= 6:
        raise ValueError(text)
    return v


def load_fitzpatrick17k(
    root,
    image_size: int = 32,
    groups: str = "types",
    seed: int = 0,
    split=(0.6, 0.2, 0.2),
    limit: int | None = None,
    label_column: str = "label",
) -> RealDataSplits:
    """Fitzpatrick17k from `root`; see the module docstring. label_column: the class column
    (e.g. three_partition_label or nine_partition_label where the CSV has them)."""
    fractions = check_options(SOURCE, image_size, seed, split, limit)
    if groups not in GROUPINGS:
        fail(SOURCE, f"groups={groups!r} is not known; use one of {', '.join(GROUPINGS)}")
    root = require_folder(Path(root), SOURCE, "data folder", f"pass the folder that holds {CSV_NAME} and {IMAGE_DIR}/")
    csv_path = root / CSV_NAME
    columns, rows = read_csv(csv_path, SOURCE, f"the data folder must hold {CSV_NAME} and {IMAGE_DIR}/")
    require_columns(csv_path, SOURCE, columns, ["md5hash"])
    require_columns(csv_path, SOURCE, columns, [label_column],
                    fix="rename the column in the CSV or pass label_column= one of the columns found")
    type_col = pick_column(csv_path, SOURCE, columns, TYPE_COLUMNS)
    image_dir = require_folder(root / IMAGE_DIR, SOURCE, "image folder", "put the images there as <md5hash>.jpg")

    kept, dropped = [], 0
    for i, r in enumerate(rows):
        line = i + 2  # the header is line 1
        try:
            t = _skin_type(r[type_col])
        except ValueError:
            fail(SOURCE, f"{csv_path} line {line}: {type_col}={r[type_col]!r} cannot be parsed; "
                         "use 1-6 for the skin type or -1 for unknown")
        if t is None:
            dropped += 1
            continue
        if not r[label_column]:
            fail(SOURCE, f"{csv_path} line {line}: empty {label_column}; fill in the diagnosis or remove the row")
        kept.append((line, r["md5hash"], r[label_column], t))

    if groups == "types":
        group_order = list(TYPE_NAMES)
        group_of = lambda t: TYPE_NAMES[t - 1]  # noqa: E731
    else:
        group_order = ["light", "dark"]
        group_of = lambda t: "light" if t <= 3 else "dark"  # noqa: E731

    paths = [find_image(image_dir, h, SOURCE, f"{csv_path} line {line}") for line, h, _, _ in kept]
    labels = [lab for _, _, lab, _ in kept]
    info = {
        "source": str(root),
        "rows_read": len(rows),
        "dropped_unknown_type": dropped,
        "grouping": groups,
        "type_column": type_col,
        "label_column": label_column,
    }
    return build_splits(
        source=SOURCE,
        name=f"fitzpatrick17k-{groups}",
        paths=paths,
        labels=labels,
        groups=[group_of(t) for *_, t in kept],
        class_order=sorted(set(labels)),
        group_order=group_order,
        image_size=image_size,
        seed=seed,
        fractions=fractions,
        limit=limit,
        info=info,
        rows=[f"{csv_path} line {line}" for line, *_ in kept],
        group_hint=f"{dropped} rows of unknown skin type were dropped; check the {type_col} column",
    )
