"""Hostile input, as a new user brings it (issue 15): a CSV + image folder with broken,
odd or duplicated entries, checkpoints of another model, and `fqhw compare` / `sidebyside`
with bad lists. Each case is either a documented conversion, checked on the pixels, or one
`fqhw: error:` line naming the file (and CSV line) and the fix, a non-zero exit and nothing
written. Everything runs in-process on 16 px images: no training happens before a refusal."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fqhw.cli import main
from fqhw.data.registry import load_data

from conftest import TINY
from test_hostile import tiny_model

TINY_FLOW = [f for i, f in enumerate(TINY) if "--qat-epochs" not in TINY[max(i - 1, 0): i + 1]]  # compare takes no QAT flags
ROWS = 24  # 2 classes x 2 groups x 6: every (group, class) in every split of the random split


def _labels(i: int) -> tuple[str, str]:
    return "ab"[i % 2], "fm"[(i // 2) % 2]


def make_csv(folder, rows=None, text=None, header="image,label,group", n=ROWS):
    """n random 16 px RGB PNGs img0..img{n-1} and labels.csv (rows: the CSV lines after the
    header, default one per image; text: the whole file instead)."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    rows = rows if rows is not None else [f"img{i}.png,{','.join(_labels(i))}" for i in range(n)]
    path = folder / "labels.csv"
    path.write_text(text if text is not None else "\n".join([header, *rows]) + "\n", newline="")
    return path


def fails(capsys, tmp_path, args, *needles, cmd="compile") -> str:
    """main(args) is one `fqhw: error:` line holding every needle, a non-zero exit, and
    writes neither an output folder nor anything beside it (a cache only if it was asked)."""
    before = set(tmp_path.iterdir())
    out = ["--out", str(tmp_path / "out")] if cmd in ("compile", "sidebyside", "compare") else []
    rc = main([cmd, *out, "--cache-dir", str(tmp_path / "cache"), *args])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc != 0 and len(lines) == 1, lines
    assert lines[0].startswith("fqhw: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    assert set(tmp_path.iterdir()) - before <= {tmp_path / "cache"}, sorted(p.name for p in tmp_path.iterdir())
    assert not (tmp_path / "out").exists()
    return lines[0]


def csv_fails(capsys, tmp_path, csv_path, *needles) -> str:
    return fails(capsys, tmp_path, ["--data", f"csv:{csv_path}", *TINY], *needles)


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels (8-bit RGB) and holds almost no data: what a
    decompression bomb's header looks like, without the memory to build a real one."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- images that cannot be used


@pytest.mark.parametrize("damage, needle", [
    ("empty", "cannot be read"),
    ("text", "cannot be read"),
    ("one_pixel", "is 1 x 1 px, smaller than 8 px on a side"),
    ("bomb", "too large to decode safely"),
    ("over_limit", "10000 x 10000 = 100000000 px, over the"),
])
def test_unusable_image_is_named_with_its_line(tmp_path, capsys, damage, needle):
    csv_path = make_csv(tmp_path / "in")
    img = tmp_path / "in" / "img5.png"  # CSV line 7
    if damage == "empty":
        img.write_bytes(b"")
    elif damage == "text":
        img.write_text("a text file, named .png\n")
    elif damage == "one_pixel":
        Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(img)
    elif damage == "bomb":  # over twice the limit: Pillow itself refuses to open it
        img.write_bytes(png_header_only(20000, 20000))
    else:  # between the limit and twice it, Pillow only warns (and the warning is silenced): fqhw refuses
        img.write_bytes(png_header_only(10000, 10000))
    line = csv_fails(capsys, tmp_path, csv_path, f"{csv_path} line 7: image {img} ", needle, "remove its row")
    assert "Traceback" not in line


def test_truncated_jpeg(tmp_path, capsys):
    rows = [f"img{i}.{'jpg' if i == 3 else 'png'},{','.join(_labels(i))}" for i in range(ROWS)]
    csv_path = make_csv(tmp_path / "in", rows=rows)
    jpg = tmp_path / "in" / "img3.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[:400])
    csv_fails(capsys, tmp_path, csv_path, f"{csv_path} line 5: image {jpg} cannot be read", "corrupt or truncated")


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_image_outside_the_folder_is_refused(tmp_path, capsys, name):
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(outside)
    name = str(outside) if name == "ABSOLUTE" else name
    rows = [f"{name if i == 4 else f'img{i}.png'},{','.join(_labels(i))}" for i in range(ROWS)]
    csv_path = make_csv(tmp_path / "in", rows=rows)
    csv_fails(capsys, tmp_path, csv_path, f"{csv_path} line 6: image {name!r} is outside the image folder", "no '..'")


# ---------------------------------------------------------------- documented conversions


def _loaded(csv_path, size=16):
    return load_data(f"csv:{csv_path}", image_size=size, seed=0)


@pytest.mark.parametrize("kind", ["gray", "rgba", "png16", "palette"])
def test_image_modes_are_converted_as_documented(tmp_path, kind):
    """Grayscale is copied to R, G and B; alpha is dropped (colour kept); a 16-bit image
    keeps its high byte; a palette image is expanded. Checked against the same data set with
    the expected 8-bit RGB picture in its place."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    if kind == "gray":
        odd, want = Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, axis=2)
    elif kind == "rgba":
        alpha = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
        odd, want = Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA"), rgb
    elif kind == "png16":
        wide = gray.astype(np.uint16) * 256 + rng.integers(0, 256, (16, 16), dtype=np.uint16)  # low byte: noise
        odd, want = Image.fromarray(wide), np.repeat(gray[..., None], 3, axis=2)
        assert odd.mode.startswith("I;16")
    else:
        odd = Image.fromarray(rgb).quantize(16)
        want = np.asarray(odd.convert("RGB"))
    csv_path = make_csv(tmp_path / "a")
    odd.save(tmp_path / "a" / "img5.png")
    if kind == "png16":
        assert Image.open(tmp_path / "a" / "img5.png").mode.startswith("I")  # really 16-bit on disk
    ref_path = make_csv(tmp_path / "b")
    Image.fromarray(want).save(tmp_path / "b" / "img5.png")
    got, ref = _loaded(csv_path), _loaded(ref_path)
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(got, split).images, getattr(ref, split).images), split
    # and the picture really is in the set (not dropped): 24 rows in all
    assert sum(len(getattr(got, s)) for s in ("train", "val", "test")) == ROWS


def test_bom_and_crlf(tmp_path):
    plain = make_csv(tmp_path / "a")
    lines = ["image,label,group", *[f"img{i}.png,{','.join(_labels(i))}" for i in range(ROWS)]]
    dos = make_csv(tmp_path / "b", text="\ufeff" + "".join(ln + "\r\n" for ln in lines))
    assert dos.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in dos.read_bytes()
    a, b = _loaded(plain), _loaded(dos)
    assert b.train.class_names == ["a", "b"] and b.train.group_names == ["f", "m"]  # no "\ufeffimage", no "m\r"
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(a, split).images, getattr(b, split).images)
        assert np.array_equal(getattr(a, split).labels, getattr(b, split).labels)


def test_duplicate_rows_are_dropped(tmp_path):
    """The same row twice is one image: kept twice, it could sit in train and test at once."""
    rows = [f"img{i}.png,{','.join(_labels(i))}" for i in range(ROWS)]
    csv_path = make_csv(tmp_path / "in", rows=rows + rows[:5] + ["img7,b,m"])  # 'img7' is img7.png
    got = _loaded(csv_path)
    assert got.info["duplicate_rows_dropped"] == 6 and got.info["rows_read"] == ROWS + 6
    assert sum(len(getattr(got, s)) for s in ("train", "val", "test")) == ROWS
    seen = [im.tobytes() for s in ("train", "val", "test") for im in getattr(got, s).images]
    assert len(set(seen)) == ROWS  # no picture twice


def test_duplicate_image_with_another_label_is_refused(tmp_path, capsys):
    rows = [f"img{i}.png,{','.join(_labels(i))}" for i in range(ROWS)]
    csv_path = make_csv(tmp_path / "in", rows=rows + ["img3.png,a,f"])  # img3 is b,m on line 5
    csv_fails(capsys, tmp_path, csv_path, f"{csv_path} line 26: image ", "img3.png is also on line 5", "b/m there, a/f here")


# ---------------------------------------------------------------- splits that cannot be learnt or measured


def test_label_never_seen_in_training(tmp_path, capsys):
    header = "image,label,group,split"
    rows = [f"img{i}.png,{','.join(_labels(i))},{('train', 'val', 'test')[(i // 4) % 3]}" for i in range(ROWS)]
    rows.append(f"img{ROWS}.png,scar,f,test")
    csv_path = make_csv(tmp_path / "in", rows=rows, header=header, n=ROWS + 1)
    csv_fails(capsys, tmp_path, csv_path, "class 'scar' has no rows in the train split (1 in val/test)", "assign the rows in a split column")


def test_group_without_test_images(tmp_path, capsys):
    header = "image,label,group,split"
    rows = [f"img{i}.png,{_labels(i)[0]},{'f' if i < 16 else 'x'},{('train', 'val', 'test')[(i // 4) % 3] if i < 16 else ('train', 'val')[i % 2]}"
            for i in range(ROWS)]
    csv_path = make_csv(tmp_path / "in", rows=rows, header=header)
    csv_fails(capsys, tmp_path, csv_path, "group 'x' has no rows in the test split (8 rows in all)")


def test_rare_group_missing_from_a_random_split(tmp_path, capsys):
    rows = [f"img{i}.png,{_labels(i)[0]},{'x' if i == 0 else 'f'}" for i in range(ROWS)]  # one row of group x
    csv_path = make_csv(tmp_path / "in", rows=rows)
    csv_fails(capsys, tmp_path, csv_path, "group 'x' has no rows in the ", "(1 rows in all)", "add rows of it")


def test_empty_csv_and_header_only(tmp_path, capsys):
    csv_path = make_csv(tmp_path / "in", text="")
    csv_fails(capsys, tmp_path, csv_path, f"CSV {csv_path} is empty (no header line)")
    csv_path.write_text("image,label,group\r\n")
    csv_fails(capsys, tmp_path, csv_path, "has a header (image, label, group) but no rows")


# ---------------------------------------------------------------- checkpoints


def test_inf_weights(tmp_path, capsys):
    state = tiny_model().state_dict()
    state["features.0.conv.weight"][0, 0, 0, 0] = float("inf")
    path = tmp_path / "inf.pt"
    torch.save(state, path)
    fails(capsys, tmp_path, ["--checkpoint", str(path), *TINY], "tensor 'features.0.conv.weight' holds NaN or Inf values")


def test_checkpoint_of_another_model(tmp_path, capsys):
    import timm

    path = tmp_path / "resnet.pt"
    torch.save(timm.create_model("resnet18", num_classes=4, pretrained=False).state_dict(), path)
    fails(capsys, tmp_path, ["--checkpoint", str(path), *TINY], f"checkpoint {path} does not fit the model: missing key",
          "saved from a different model")


# ---------------------------------------------------------------- compare and sidebyside lists


def test_compare_unknown_target_is_refused_before_any_work(tmp_path, capsys):
    # without --network the flow would load (here: train) the float model first
    fails(capsys, tmp_path, ["--targets", "pynq-z2,pynq-z9", *TINY_FLOW], "unknown target 'pynq-z9': known targets are", cmd="compare")
    assert not (tmp_path / "cache").exists()
    fails(capsys, tmp_path, ["--targets", " , ", *TINY_FLOW], "no targets given", cmd="compare")
    fails(capsys, tmp_path, ["--targets", "bitfusion", "--budgets", ",", *TINY_FLOW], "--budgets is empty", cmd="compare")
    assert not (tmp_path / "cache").exists()


def test_compare_repeated_target_and_budget_count_once(compiled, tmp_path):
    import json

    out, _ = compiled
    src = ["--network", str(out / "network.json"), "--sensitivity", str(out / "sensitivity.json"), "--time-limit", "2", "--quiet"]
    assert main(["compare", "--targets", "bitfusion,BitFusion", "--budgets", "4,4,5", "--out", str(tmp_path / "p"), *src]) == 0
    res = json.loads((tmp_path / "p" / "pareto.json").read_text())
    assert res["targets"] == ["bitfusion"] and res["budgets"] == [4.0, 5.0]


@pytest.mark.parametrize("flags, needle", [
    (["--methods", "uniform8,fairgrape9"], "unknown method(s) fairgrape9: known methods are"),
    (["--target", "pynq-z9"], "unknown target 'pynq-z9'"),
    (["--seeds", "0,1,0"], "seed 0 is given twice"),
    (["--methods", "uniform8,uniform8"], "method uniform8 is given twice"),
])
def test_sidebyside_bad_lists(tmp_path, capsys, flags, needle):
    fails(capsys, tmp_path, [*flags, *TINY], needle, cmd="sidebyside")
    assert not (tmp_path / "cache").exists()  # refused before the data or the float model


def test_sidebyside_empty_method_list():
    import dataclasses

    from fqhw.errors import FqhwError
    from fqhw.flow import CompileConfig
    from fqhw.sidebyside import SideBySideConfig, side_by_side

    with pytest.raises(FqhwError, match="--methods is empty"):
        side_by_side(SideBySideConfig(compile=dataclasses.replace(CompileConfig(), progress=False), seeds=(0,), methods=()))
