"""Compile on each real data set layout fqhw reads, using tiny stand-in folders.

    python examples/real_data_layouts.py [WORK_DIR]

Writes, under WORK_DIR (default a temporary folder), a few dozen generated lesion images laid
out exactly like Fitzpatrick17k, ISIC2019 and a plain CSV + image folder, then runs the
compile on each with small settings. Point --data at the real folders to use the real sets:

    fqhw compile --data 'fitzpatrick17k:/data/fitzpatrick17k;groups=light-dark'
    fqhw compile --data isic2019:/data/isic2019
    fqhw compile --data csv:/data/my_study/labels.csv,/data/my_study/images
"""
import sys
import tempfile
from pathlib import Path

from PIL import Image

from fqhw.cli import main
from fqhw.data.synthetic import SyntheticDermConfig, generate

SMALL = ["--data-image-size", "16", "--channels", "4,8", "--epochs", "2", "--qat-epochs", "1", "--verify-images", "8", "--quiet"]


def images(n: int):
    """(uint8 HWC image, class index, Fitzpatrick type 1..6) from the built-in generator."""
    d = generate(SyntheticDermConfig(n_train=n, n_val=1, n_test=1, image_size=32, seed=7)).train
    for img, label, group in zip(d.images, d.labels, d.groups):
        yield img.transpose(1, 2, 0), int(label), int(group) + 1


def fitzpatrick17k(root: Path) -> str:
    (root / "images").mkdir(parents=True)
    rows = ["md5hash,fitzpatrick_scale,label"]
    for i, (img, label, fst) in enumerate(images(120)):
        name = f"{i:032x}"
        Image.fromarray(img).save(root / "images" / f"{name}.jpg")
        rows.append(f"{name},{fst if i % 17 else -1},{['nevus', 'melanoma', 'vascular', 'blue nevus'][label]}")
    (root / "fitzpatrick17k.csv").write_text("\n".join(rows) + "\n")
    return f"fitzpatrick17k:{root};groups=light-dark"


def isic2019(root: Path) -> str:
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    (root / "ISIC_2019_Training_Input").mkdir(parents=True)
    truth, meta = ["image," + ",".join(classes)], ["image,age_approx,anatom_site_general,lesion_id,sex"]
    for i, (img, label, fst) in enumerate(images(120)):
        name = f"ISIC_{i:07d}"
        Image.fromarray(img).save(root / "ISIC_2019_Training_Input" / f"{name}.jpg")
        truth.append(name + "," + ",".join("1.0" if k == label else "0.0" for k in range(len(classes))))
        sex = ["female", "male", ""][i % 3 if i % 11 else 2]
        meta.append(f"{name},50,torso,lesion{i},{sex}")
    (root / "ISIC_2019_Training_GroundTruth.csv").write_text("\n".join(truth) + "\n")
    (root / "ISIC_2019_Training_Metadata.csv").write_text("\n".join(meta) + "\n")
    return f"isic2019:{root}"


def csv_folder(root: Path) -> str:
    (root / "images").mkdir(parents=True)
    rows = ["image,label,group"]
    for i, (img, label, fst) in enumerate(images(120)):
        Image.fromarray(img).save(root / "images" / f"case{i}.png")
        rows.append(f"case{i}.png,{['benign', 'malignant'][label % 2]},{'dark' if fst >= 4 else 'light'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return f"csv:{root / 'labels.csv'},{root / 'images'}"


if __name__ == "__main__":
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fqhw-layouts-"))
    for make in (fitzpatrick17k, isic2019, csv_folder):
        spec = make(work / make.__name__)
        print(f"== {make.__name__}: fqhw compile --data '{spec}'")
        rc = main(["compile", "--data", spec, "--out", str(work / f"out-{make.__name__}"), "--cache-dir", str(work / "cache"), *SMALL])
        if rc:
            sys.exit(rc)
    print(f"outputs in {work}")
