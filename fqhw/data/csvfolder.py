"""Any data set laid out as a CSV plus an image folder.

One row per image: image_column (a file name relative to image_dir, with or without its
.jpg/.jpeg/.png extension), label_column (the class) and group_column (the demographic
group). Classes and groups are the distinct values, sorted. An optional split column
(default name "split"; values train, val or validation, test) is honoured when present;
otherwise the split is seeded, random and stratified by group x class.

A row that repeats an earlier row's image with the same label, group and split is dropped
(counted in info["duplicate_rows_dropped"]): kept, the same picture could land in train and
test. The same image with another label, group or split is refused, naming both lines.
"""
from __future__ import annotations

from pathlib import Path

from .images import RealDataSplits, build_splits, check_options, fail, find_image, read_csv, require_columns, require_folder

SOURCE = "csv"
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def load_csv_folder(
    csv_path,
    image_dir=None,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str = "group",
    split_column: str = "split",
    image_size: int = 32,
    seed: int = 0,
    split=(0.6, 0.2, 0.2),
    limit: int | None = None,
    name: str | None = None,
) -> RealDataSplits:
    """CSV + image folder (default: the CSV's own folder); see the module docstring."""
    fractions = check_options(SOURCE, image_size, seed, split, limit)
    csv_path = Path(csv_path)
    columns, rows = read_csv(csv_path, SOURCE)
    image_dir = require_folder(Path(image_dir) if image_dir is not None else csv_path.parent, SOURCE, "image folder")
    fix = "rename the column in the CSV or pass the column name (image_column=, label_column=, group_column=)"
    require_columns(csv_path, SOURCE, columns, [image_column, label_column, group_column], fix=fix)
    has_split = split_column in columns

    paths, labels, groups, assigned, lines = [], [], [], [], []
    first: dict[Path, tuple[int, tuple]] = {}  # image -> (line, what that row says of it)
    for i, r in enumerate(rows):
        where = f"{csv_path} line {i + 2}"
        for col in (label_column, group_column):
            if not r[col]:
                fail(SOURCE, f"{where}: empty {col}; fill it in or remove the row")
        if has_split:
            s = SPLIT_ALIASES.get(r[split_column].lower())
            if s is None:
                fail(SOURCE, f"{where}: {split_column}={r[split_column]!r} cannot be parsed; use train, val or test "
                             f"(or remove the {split_column} column for a random split)")
        path = find_image(image_dir, r[image_column], SOURCE, where)
        said = (r[label_column], r[group_column], s if has_split else None)
        if path in first:
            line, earlier = first[path]
            if earlier != said:
                said_as = lambda t: "/".join(v for v in t if v is not None)  # noqa: E731
                fail(SOURCE, f"{where}: image {path} is also on line {line} with another label, group or split "
                             f"({said_as(earlier)} there, {said_as(said)} here); keep one of the two rows")
            continue  # the same row again: one copy
        first[path] = (i + 2, said)
        if has_split:
            assigned.append(s)
        paths.append(path)
        lines.append(where)
        labels.append(r[label_column])
        groups.append(r[group_column])

    info = {"source": str(csv_path), "image_dir": str(image_dir), "rows_read": len(rows),
            "duplicate_rows_dropped": len(rows) - len(paths),
            "columns": {"image": image_column, "label": label_column, "group": group_column,
                        "split": split_column if has_split else None}}
    return build_splits(
        source=SOURCE,
        name=name or csv_path.stem,
        paths=paths,
        labels=labels,
        groups=groups,
        class_order=sorted(set(labels)),
        group_order=sorted(set(groups)),
        image_size=image_size,
        seed=seed,
        fractions=fractions,
        limit=limit,
        assigned=assigned if has_split else None,
        info=info,
        group_hint=f"the {group_column} column must hold at least two distinct groups",
        rows=lines,
    )
