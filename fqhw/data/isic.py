"""ISIC 2019 (training part), read from a local copy (no network).

Layout: root/ISIC_2019_Training_GroundTruth.csv (image and one-hot MEL, NV, BCC, AK, BKL,
DF, VASC, SCC, UNK), root/ISIC_2019_Training_Metadata.csv (image, age_approx,
anatom_site_general, lesion_id, sex) and the images root/ISIC_2019_Training_Input/<image>.jpg.
Group = sex. Rows with unknown or missing sex (or no metadata row) are dropped
(unknown_sex="drop", the default, counted in info["dropped_unknown_sex"]) or kept as a third
group "unknown" (unknown_sex="group"). Classes without samples (UNK in the training set) are
left out of class_names and listed in info["classes_without_samples"].
"""
from __future__ import annotations

from pathlib import Path

from .images import RealDataSplits, build_splits, check_options, fail, find_image, read_csv, require_columns, require_folder

GT_CSV = "ISIC_2019_Training_GroundTruth.csv"
META_CSV = "ISIC_2019_Training_Metadata.csv"
IMAGE_DIR = "ISIC_2019_Training_Input"
CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
SEXES = ["female", "male"]
UNKNOWN = {"", "unknown", "nan", "na", "none", "?"}
UNKNOWN_SEX = ("drop", "group")
SOURCE = "isic2019"


def load_isic2019(
    root,
    image_size: int = 32,
    seed: int = 0,
    split=(0.6, 0.2, 0.2),
    limit: int | None = None,
    unknown_sex: str = "drop",
) -> RealDataSplits:
    """ISIC 2019 from `root`; see the module docstring."""
    fractions = check_options(SOURCE, image_size, seed, split, limit)
    if unknown_sex not in UNKNOWN_SEX:
        fail(SOURCE, f"unknown_sex={unknown_sex!r} is not known; use one of {', '.join(UNKNOWN_SEX)}")
    root = require_folder(Path(root), SOURCE, "data folder", f"pass the folder that holds {GT_CSV}, {META_CSV} and {IMAGE_DIR}/")
    gt_path, meta_path = root / GT_CSV, root / META_CSV
    hint = f"the data folder must hold {GT_CSV}, {META_CSV} and {IMAGE_DIR}/"
    gt_cols, gt_rows = read_csv(gt_path, SOURCE, hint)
    require_columns(gt_path, SOURCE, gt_cols, ["image", *CLASSES])
    meta_cols, meta_rows = read_csv(meta_path, SOURCE, hint)
    require_columns(meta_path, SOURCE, meta_cols, ["image", "sex"])
    image_dir = require_folder(root / IMAGE_DIR, SOURCE, "image folder")

    sex_of: dict[str, str] = {}
    for i, r in enumerate(meta_rows):
        s = r["sex"].lower()
        if s in UNKNOWN:
            s = "unknown"
        elif s not in SEXES:
            fail(SOURCE, f"{meta_path} line {i + 2}: sex={r['sex']!r} cannot be parsed; use female, male or leave it empty")
        sex_of[r["image"]] = s

    kept, dropped, no_meta = [], 0, 0
    for i, r in enumerate(gt_rows):
        line = i + 2
        try:
            hot = [float(r[c]) for c in CLASSES]
        except ValueError:
            fail(SOURCE, f"{gt_path} line {line}: class columns {', '.join(r[c] for c in CLASSES)} cannot be parsed; "
                         "use one-hot 0/1 values")
        ones = [c for c, v in zip(CLASSES, hot) if v == 1.0]
        if len(ones) != 1 or any(v not in (0.0, 1.0) for v in hot):
            fail(SOURCE, f"{gt_path} line {line} (image {r['image']}): the class columns are not one-hot "
                         f"({', '.join(f'{c}={r[c]}' for c in CLASSES)}); exactly one must be 1")
        sex = sex_of.get(r["image"])
        if sex is None:
            no_meta += 1
            sex = "unknown"
        if sex == "unknown" and unknown_sex == "drop":
            dropped += 1
            continue
        kept.append((line, r["image"], ones[0], sex))

    paths = [find_image(image_dir, img, SOURCE, f"{gt_path} line {line}") for line, img, _, _ in kept]
    info = {
        "source": str(root),
        "rows_read": len(gt_rows),
        "unknown_sex": unknown_sex,
        "rows_without_metadata": no_meta,
        "dropped_unknown_sex": dropped,
        "unknown_sex_kept": sum(1 for k in kept if k[3] == "unknown"),
    }
    return build_splits(
        source=SOURCE,
        name="isic2019-sex",
        paths=paths,
        labels=[c for _, _, c, _ in kept],
        groups=[s for *_, s in kept],
        class_order=list(CLASSES),
        group_order=[*SEXES, "unknown"] if unknown_sex == "group" else list(SEXES),
        image_size=image_size,
        seed=seed,
        fractions=fractions,
        limit=limit,
        info=info,
        rows=[f"{gt_path} line {line}" for line, *_ in kept],
        group_hint=(f"{dropped} rows of unknown sex were dropped; pass unknown_sex='group' to keep them as a group"
                    if unknown_sex == "drop" else "check the sex column of the metadata"),
    )
