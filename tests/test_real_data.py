"""Real-data loaders on tiny fixture trees laid out like Fitzpatrick17k, ISIC 2019 and a CSV folder."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from fqhw.data.csvfolder import load_csv_folder
from fqhw.data.fitzpatrick import load_fitzpatrick17k
from fqhw.data.images import stratified_split
from fqhw.data.isic import CLASSES, load_isic2019
from fqhw.data.registry import describe, load_data
from fqhw.errors import FqhwError


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _image(path, i, size=(40, 30)):
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


# Fitzpatrick17k: 24 rows; types cycle -1,1..6 (so 3 or 4 rows per type, 4 unknown) on
# 3 diagnoses; every third image is a PNG, the rest JPEG.
F_LABELS = ["psoriasis", "acne", "melanoma"]


def _fitz_rows(n=24):
    return [(f"h{i:03d}", F_LABELS[i % 3], [-1, 1, 2, 3, 4, 5, 6][i % 7]) for i in range(n)]


def make_fitz(root, rows=None, type_column="fitzpatrick_scale", extra=()):
    rows = _fitz_rows() if rows is None else rows
    (root / "images").mkdir(parents=True)
    _write_csv(root / "fitzpatrick17k.csv", ["md5hash", "label", type_column, *[e[0] for e in extra]],
               [[h, lab, t, *[e[1] for e in extra]] for h, lab, t in rows])
    for i, (h, _, _) in enumerate(rows):
        _image(root / "images" / (h + (".png" if i % 3 == 0 else ".jpg")), i)
    return root


def make_isic(root, n=20):
    """n rows: classes cycle over the first 5 ISIC classes; sex female/male/''/unknown/
    female...; the last image has no metadata row."""
    (root / "ISIC_2019_Training_Input").mkdir(parents=True)
    sexes = ["female", "male", "female", "male", "", "female", "male", "unknown"]
    gt, meta = [], []
    for i in range(n):
        name = f"ISIC_{i:07d}"
        hot = [0.0] * len(CLASSES)
        hot[i % 5] = 1.0
        gt.append([name, *hot])
        if i < n - 1:
            meta.append([name, 45.0, "torso", f"L{i}", sexes[i % len(sexes)]])
        _image(root / "ISIC_2019_Training_Input" / f"{name}.jpg", i, size=(50, 40))
    _write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *CLASSES], gt)
    _write_csv(root / "ISIC_2019_Training_Metadata.csv", ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], meta)
    return root


def _all(s):
    return [s.train, s.val, s.test]


def _n(s):
    return sum(len(d) for d in _all(s))


# ---------------------------------------------------------------- Fitzpatrick17k


def test_fitzpatrick_types_counts_classes_and_images(tmp_path):
    s = load_fitzpatrick17k(make_fitz(tmp_path / "f"), image_size=16)
    unknown = sum(1 for *_, t in _fitz_rows() if t == -1)
    assert unknown == 4 and _n(s) == 20 and s.info["dropped_unknown_type"] == 4
    assert (len(s.train), len(s.val), len(s.test)) == (12, 4, 4)
    for d in _all(s):
        assert d.group_names == ["FST-I", "FST-II", "FST-III", "FST-IV", "FST-V", "FST-VI"]
        assert d.class_names == sorted(F_LABELS)
        assert d.images.dtype == np.uint8 and d.images.shape[1:] == (3, 16, 16)
        assert d.labels.dtype == np.int64 and d.groups.dtype == np.int64
    groups = np.concatenate([d.groups for d in _all(s)])
    assert np.bincount(groups).tolist() == [4, 4, 3, 3, 3, 3]
    assert "loader" in describe(s) and describe(s)["train"]["n"] == 12


def test_fitzpatrick_light_dark_and_alias_column_and_label_column(tmp_path):
    root = make_fitz(tmp_path / "f", type_column="fitzpatrick", extra=[("three_partition_label", "non-neoplastic")])
    s = load_fitzpatrick17k(root, image_size=8, groups="light-dark")
    assert s.train.group_names == ["light", "dark"] and s.info["type_column"] == "fitzpatrick"
    groups = np.concatenate([d.groups for d in _all(s)])
    assert np.bincount(groups).tolist() == [11, 9]  # types 1-3: 4+4+3, types 4-6: 3+3+3
    with pytest.raises(FqhwError, match="only 1 class"):
        load_fitzpatrick17k(root, image_size=8, label_column="three_partition_label")


def test_image_content_is_a_centre_crop_resized(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    # left third red, middle third green, right third blue: the centre crop is all green
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, :20, 0] = arr[:, 20:40, 1] = arr[:, 40:, 2] = 255
    rows = []
    for i in range(6):
        Image.fromarray(arr).save(root / f"im{i}.png")
        rows.append([f"im{i}", "a" if i % 2 else "b", "g1" if i < 3 else "g2"])
    _write_csv(root / "d.csv", ["image", "label", "group"], rows)
    s = load_csv_folder(root / "d.csv", image_size=8)
    img = s.train.images[0]
    assert img.shape == (3, 8, 8) and img[1].min() == 255 and img[0].max() == 0 and img[2].max() == 0


def test_split_is_deterministic_and_seed_dependent(tmp_path):
    root = make_fitz(tmp_path / "f", rows=_fitz_rows(30))
    a, b, c = (load_fitzpatrick17k(root, image_size=8, seed=k) for k in (5, 5, 6))
    for x, y in zip(_all(a), _all(b)):
        assert np.array_equal(x.images, y.images) and np.array_equal(x.labels, y.labels) and np.array_equal(x.groups, y.groups)
    assert not all(np.array_equal(x.images, y.images) for x, y in zip(_all(a), _all(c)))


def test_stratified_split_exact_totals_and_spread():
    strata = np.repeat(np.arange(4), [50, 30, 15, 5])
    parts = stratified_split(strata, (0.6, 0.2, 0.2), seed=0)
    assert [len(p) for p in parts] == [60, 20, 20]
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    for s, size in enumerate([50, 30, 15, 5]):
        got = [int((strata[p] == s).sum()) for p in parts]
        assert all(abs(g - f * size) <= 1.0 + 1e-9 for g, f in zip(got, (0.6, 0.2, 0.2)))


def test_limit_takes_a_seeded_subset(tmp_path):
    root = make_fitz(tmp_path / "f")
    s = load_fitzpatrick17k(root, image_size=8, limit=10)
    assert _n(s) == 10 and s.info["limited_to"] == 10


# ---------------------------------------------------------------- ISIC 2019


def test_isic_drop_unknown_sex(tmp_path):
    s = load_isic2019(make_isic(tmp_path / "i"), image_size=12)
    # metadata sexes for rows 0..18 cycle F M F M '' F M unknown; row 19 has no metadata
    # unknown: rows 4, 7, 12, 15 and 19 -> 5 dropped, 15 kept
    assert s.info["dropped_unknown_sex"] == 5 and s.info["rows_without_metadata"] == 1 and _n(s) == 15
    assert s.train.group_names == ["female", "male"]
    assert s.train.class_names == CLASSES[:5]
    assert s.info["classes_without_samples"] == ["DF", "VASC", "SCC", "UNK"]
    assert s.train.images.shape[1:] == (3, 12, 12)
    assert (len(s.train), len(s.val), len(s.test)) == (9, 3, 3)


def test_isic_unknown_sex_as_group(tmp_path):
    s = load_isic2019(make_isic(tmp_path / "i"), image_size=8, unknown_sex="group")
    assert _n(s) == 20 and s.train.group_names == ["female", "male", "unknown"]
    groups = np.concatenate([d.groups for d in _all(s)])
    assert np.bincount(groups).tolist() == [8, 7, 5]
    with pytest.raises(FqhwError, match="unknown_sex"):
        load_isic2019(tmp_path / "i", unknown_sex="keep")


def test_isic_labels_not_one_hot(tmp_path):
    root = make_isic(tmp_path / "i", n=6)
    p = root / "ISIC_2019_Training_GroundTruth.csv"
    text = p.read_text().splitlines()
    text[2] = text[2].replace("0.0", "1.0", 1)
    p.write_text("\n".join(text) + "\n")
    with pytest.raises(FqhwError, match="line 3.*not one-hot"):
        load_isic2019(root)


# ---------------------------------------------------------------- CSV folder + registry


def _make_csv_folder(root, with_split=False, n=12):
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        _image(root / "img" / f"x{i}.png", i)
        row = [f"x{i}.png" if i % 2 else f"x{i}", ["cat", "dog"][i % 2], ["a", "b", "c"][i % 3]]
        if with_split:
            row.append(["train", "train", "val", "test"][i % 4])
        rows.append(row)
    _write_csv(root / "data.csv", ["image", "label", "group"] + (["split"] if with_split else []), rows)
    return root / "data.csv"


def test_csv_folder_honours_split_column(tmp_path):
    csv_path = _make_csv_folder(tmp_path / "d", with_split=True)
    s = load_csv_folder(csv_path, tmp_path / "d" / "img", image_size=8)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 3, 3)
    assert s.train.group_names == ["a", "b", "c"] and s.train.class_names == ["cat", "dog"]


def test_registry_specs(tmp_path):
    csv_path = _make_csv_folder(tmp_path / "d")
    s = load_data(f"csv:{csv_path},{tmp_path / 'd' / 'img'}", image_size=8, seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == (7, 3, 2) and s.name == "data"
    root = make_fitz(tmp_path / "f")
    s = load_data(f"fitzpatrick17k:{root};groups=light-dark;limit=12", image_size=8)
    assert s.train.group_names == ["light", "dark"] and _n(s) == 12
    s = load_data(f"isic2019:{make_isic(tmp_path / 'i')};unknown_sex=group", image_size=8)
    assert s.train.num_groups == 3
    from fqhw.data.synthetic import SyntheticDermConfig

    b = load_data("builtin", builtin=SyntheticDermConfig(n_train=20, n_val=10, n_test=10, image_size=8))
    assert len(b.train) == 20 and b.train.images.shape[1:] == (3, 8, 8)
    with pytest.raises(FqhwError, match="unknown kind 'imagenet'.*fitzpatrick17k:PATH.*isic2019:PATH.*csv:PATH"):
        load_data("imagenet:/x")
    with pytest.raises(FqhwError, match="fitzpatrick17k accepts"):
        load_data(f"fitzpatrick17k:{root};colour=red")


# ---------------------------------------------------------------- errors


def test_missing_root_and_csv(tmp_path):
    with pytest.raises(FqhwError, match="data folder .*nope.* not found"):
        load_fitzpatrick17k(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FqhwError, match="fitzpatrick17k.csv not found"):
        load_fitzpatrick17k(tmp_path / "empty")
    with pytest.raises(FqhwError, match="ISIC_2019_Training_GroundTruth.csv not found"):
        load_isic2019(tmp_path / "empty")
    with pytest.raises(FqhwError, match="missing.csv not found"):
        load_csv_folder(tmp_path / "missing.csv")


def test_missing_column_is_named_with_columns_found(tmp_path):
    root = make_fitz(tmp_path / "f", type_column="skin")
    with pytest.raises(FqhwError, match="no column 'fitzpatrick_scale' or 'fitzpatrick' \\(columns found: md5hash, label, skin\\)"):
        load_fitzpatrick17k(root)
    with pytest.raises(FqhwError, match="no column 'diagnosis'.*label_column="):
        load_fitzpatrick17k(root, label_column="diagnosis")
    csv_path = _make_csv_folder(tmp_path / "d")
    with pytest.raises(FqhwError, match="no column 'sex' \\(columns found: image, label, group\\)"):
        load_csv_folder(csv_path, tmp_path / "d" / "img", group_column="sex")


def test_missing_corrupt_and_truncated_images(tmp_path):
    root = make_fitz(tmp_path / "f")
    (root / "images" / "h001.jpg").unlink()
    with pytest.raises(FqhwError, match="line 3: image .*h001 not found"):
        load_fitzpatrick17k(root)
    (root / "images" / "h001.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(FqhwError, match="image .*h001.jpg cannot be read.*corrupt"):
        load_fitzpatrick17k(root)
    good = (root / "images" / "h002.jpg").read_bytes()
    (root / "images" / "h001.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(FqhwError, match="image .*h001.jpg cannot be read") as e:
        load_fitzpatrick17k(root)
    assert "\n" not in str(e.value)


def test_empty_csv(tmp_path):
    p = tmp_path / "e.csv"
    p.write_text("")
    with pytest.raises(FqhwError, match="is empty"):
        load_csv_folder(p)
    p.write_text("image,label,group\n")
    with pytest.raises(FqhwError, match="header .* but no rows"):
        load_csv_folder(p)


def test_single_group_left(tmp_path):
    rows = [(f"h{i}", F_LABELS[i % 3], [-1, 2][i % 2]) for i in range(12)]
    with pytest.raises(FqhwError, match="only group 'FST-II' left.*at least two groups.*6 rows of unknown skin type"):
        load_fitzpatrick17k(make_fitz(tmp_path / "f", rows=rows))
    with pytest.raises(FqhwError, match="only group 'light' left"):
        rows = [(f"h{i}", F_LABELS[i % 3], [1, 2, 3][i % 3]) for i in range(12)]
        load_fitzpatrick17k(make_fitz(tmp_path / "g", rows=rows), groups="light-dark")


def test_unparseable_labels(tmp_path):
    rows = _fitz_rows(12)
    rows[4] = (rows[4][0], rows[4][1], "pale")
    with pytest.raises(FqhwError, match="line 6: fitzpatrick_scale='pale' cannot be parsed"):
        load_fitzpatrick17k(make_fitz(tmp_path / "f", rows=rows))
    rows[4] = (rows[4][0], rows[4][1], 7)
    with pytest.raises(FqhwError, match="fitzpatrick_scale='7' cannot be parsed"):
        load_fitzpatrick17k(make_fitz(tmp_path / "g", rows=rows))
    root = make_isic(tmp_path / "i", n=6)
    p = root / "ISIC_2019_Training_GroundTruth.csv"
    p.write_text(p.read_text().replace("1.0", "yes", 1))
    with pytest.raises(FqhwError, match="line 2: class columns .*cannot be parsed"):
        load_isic2019(root)
    csv_path = _make_csv_folder(tmp_path / "d", with_split=True)
    csv_path.write_text(csv_path.read_text().replace("val", "holdout", 1))
    with pytest.raises(FqhwError, match="split='holdout' cannot be parsed"):
        load_csv_folder(csv_path, tmp_path / "d" / "img")


def test_bad_options(tmp_path):
    root = make_fitz(tmp_path / "f")
    with pytest.raises(FqhwError, match="groups='sex' is not known"):
        load_fitzpatrick17k(root, groups="sex")
    with pytest.raises(FqhwError, match="image_size=30"):
        load_fitzpatrick17k(root, image_size=30)
    with pytest.raises(FqhwError, match="split="):
        load_fitzpatrick17k(root, split=(0.5, 0.5, 0.5))
