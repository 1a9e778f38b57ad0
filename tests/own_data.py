"""Realistic test data for tests/test_own_data.py (issue 9): photo crops, mixed sizes and
pixel formats, phone-sized JPEGs, damaged files, several label columns, a Hub snapshot.

Plain functions that write under a given folder and return paths; the fixtures live in the
test file. Everything is made from scikit-learn's bundled photos and digits (no network)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import PIL.Image

CLASSES3 = ["zero", "one", "two"]


@functools.cache
def photos() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's two sample photos, 427 x 640 RGB uint8: (china, flower)."""
    from sklearn.datasets import load_sample_images
    china, flower = load_sample_images().images
    return china, flower


@functools.cache
def _digits():
    from sklearn.datasets import load_digits
    return load_digits()


def digit(index: int, size: int = 16) -> PIL.Image.Image:
    """Digit `index` of scikit-learn's 1,797 (8 x 8, 0..16) as a greyscale image."""
    a = np.round(_digits().images[index] * 255 / 16).astype(np.uint8)
    return PIL.Image.fromarray(a).resize((size, size), PIL.Image.BILINEAR)


def digit_indices(label: int) -> list[int]:
    return np.flatnonzero(_digits().target == label).tolist()


def photo_crop(rng: np.random.Generator, photo: np.ndarray, width: int, height: int,
               gray: bool) -> PIL.Image.Image:
    """A random region of the photo (64 to 200 px across, the output's aspect ratio), scaled
    down to width x height: what a small crop of a real picture looks like."""
    ph, pw = photo.shape[:2]
    side = int(rng.integers(64, 201))
    cw, ch = (side, max(8, round(side * height / width))) if width >= height else \
        (max(8, round(side * width / height)), side)
    cw, ch = min(cw, pw), min(ch, ph)
    x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    img = PIL.Image.fromarray(photo[y:y + ch, x:x + cw]).resize((width, height),
                                                                 PIL.Image.BILINEAR)
    return img.convert("L") if gray else img


def save(img: PIL.Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def two_class_crops(root: Path, seed: int = 0, train_per_class: int = 80,
                    val_per_class: int = 20) -> Path:
    """Greyscale photo crops, class a from china.jpg and class b from flower.jpg, each side
    24..40 px (mixed sizes and aspect ratios): train/{a,b}/ and validation/{a,b}/, PNG."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("validation", val_per_class)):
        for name, photo in zip("ab", photos()):
            for i in range(n):
                w, h = (int(v) for v in rng.integers(24, 41, size=2))
                save(photo_crop(rng, photo, w, h, gray=True), root / split / name / f"{i:03d}.png")
    return root


def mixed_colour_folder(root: Path, seed: int = 1, per_class: int = 40) -> Path:
    """No split folders, two classes of colour crops (china, flower): half 20 wide x 50 high,
    half 50 x 20, a few 30 x 30; every fifth file greyscale; PNG and JPEG mixed."""
    rng = np.random.default_rng(seed)
    shapes = [(20, 50), (50, 20)] * 4 + [(30, 30)]
    for name, photo in zip(("china", "flower"), photos()):
        for i in range(per_class):
            w, h = shapes[int(rng.integers(len(shapes)))]
            img = photo_crop(rng, photo, w, h, gray=i % 5 == 2)
            ext = "jpg" if i % 3 == 0 else "png"
            save(img, root / name / f"{i:03d}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    return root


def same_size_folder(root: Path, size: int = 16, per_class: int = 30) -> Path:
    """train/ and validation/ of three digit classes, every image size x size greyscale."""
    for c, name in enumerate(CLASSES3):
        for k, i in enumerate(digit_indices(c)[:per_class]):
            split = "validation" if k % 5 == 0 else "train"
            save(digit(i, size), root / split / name / f"{k:03d}.png")
    return root


def phone_photos(root: Path, per_class: int = 6, val_per_class: int = 2, seed: int = 2) -> Path:
    """1500 wide x 2000 high JPEGs (what a phone takes, portrait), few of them: decoding is
    slow. train/{china,flower}/ and validation/{china,flower}/."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("validation", val_per_class)):
        for name, photo in zip(("china", "flower"), photos()):
            for i in range(n):
                img = photo_crop(rng, photo, 300, 400, gray=False).resize(
                    (1500, 2000), PIL.Image.BICUBIC)
                noise = rng.normal(0, 4, (2000, 1500, 3))  # sensor noise: not a flat upscale
                pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255)
                save(PIL.Image.fromarray(pixels.astype(np.uint8)), root / split / name /
                     f"IMG_{i:04d}.jpg", quality=85)
    return root


def gradient16(path: Path, width: int = 256, height: int = 8) -> Path:
    """A 16-bit greyscale PNG: a horizontal gradient 0 .. 65535."""
    row = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    img = PIL.Image.fromarray(np.tile(row, (height, 1)))
    assert img.mode == "I;16", img.mode
    return save(img, path)


def quadrants(width: int, height: int) -> PIL.Image.Image:
    """An RGB image with four distinct coloured quadrants, so any rotation or flip shows."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:height // 2, :width // 2] = (220, 30, 30)
    a[:height // 2, width // 2:] = (30, 200, 40)
    a[height // 2:, :width // 2] = (40, 40, 210)
    a[height // 2:, width // 2:] = (230, 220, 60)
    return PIL.Image.fromarray(a)


def exif_rotated(path: Path, img: PIL.Image.Image, orientation: int = 6,
                 quality: int = 95) -> Path:
    """A JPEG storing `img` as is, with an EXIF orientation tag (6: show rotated 90 degrees
    clockwise, as a phone held upright writes it)."""
    exif = img.getexif()
    exif[0x0112] = orientation
    return save(img, path, exif=exif, quality=quality)


def stripes(width: int = 40, height: int = 20) -> PIL.Image.Image:
    """Left quarter red, middle half green, right quarter blue."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, :width // 4] = (255, 0, 0)
    a[:, width // 4:3 * width // 4] = (0, 255, 0)
    a[:, 3 * width // 4:] = (0, 0, 255)
    return PIL.Image.fromarray(a)


def formats_folder(root: Path, per_class: int = 24) -> Path:
    """Mostly colour photo crops, every one 16 wide x 24 high as displayed, in four formats
    (a quarter each): 16-bit greyscale PNG, RGB JPEG stored 24 x 16 with EXIF orientation 6,
    RGB JPEG, RGB PNG. The file sorting first, train/china/000.png, is a 16-bit one."""
    rng = np.random.default_rng(3)
    for name, photo in zip(("china", "flower"), photos()):
        for i in range(per_class):
            split = "validation" if i % 6 == 5 else "train"
            img = photo_crop(rng, photo, 16, 24, gray=False)
            path = root / split / name / f"{i:03d}"
            kind = i % 4
            if kind == 0:  # 16-bit greyscale, the full 0..65535 range used
                grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
                save(PIL.Image.fromarray(grey), path.with_suffix(".png"))
            elif kind == 1:  # stored sideways, EXIF says how to turn it upright
                exif_rotated(path.with_suffix(".jpg"), img.transpose(PIL.Image.ROTATE_90))
            elif kind == 2:
                save(img, path.with_suffix(".jpg"), quality=90)
            else:
                save(img, path.with_suffix(".png"))
    return root


def corrupt(path: Path) -> Path:
    """Junk with a PNG name (and a PNG signature): what an interrupted copy leaves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"interrupted copy " * 20)
    return path


def three_class_folder(root: Path, train_per_class: int = 48, val_per_class: int = 12,
                       size: int = 16, offset: int = 0) -> Path:
    """train/ and validation/ of real digits 0, 1, 2 as classes zero, one, two."""
    for c, name in enumerate(CLASSES3):
        idx = digit_indices(c)[offset:offset + train_per_class + val_per_class]
        for k, i in enumerate(idx):
            split = "train" if k < train_per_class else "validation"
            save(digit(i, size), root / split / name / f"{k:03d}.png")
    return root


def flat_three_class(root: Path, per_class: int = 100, size: int = 16, offset: int = 60) -> Path:
    """Class subfolders only, no split folders: 3 x per_class digits (others than
    three_class_folder's)."""
    for c, name in enumerate(CLASSES3):
        for k, i in enumerate(digit_indices(c)[offset:offset + per_class]):
            save(digit(i, size), root / name / f"{k:03d}.png")
    return root


def only_test_split(root: Path, per_class: int = 20, size: int = 16, offset: int = 155) -> Path:
    """Only test/{zero,one,two}/: a labelled test set, nothing to train on."""
    for c, name in enumerate(CLASSES3):
        for k, i in enumerate(digit_indices(c)[offset:offset + per_class]):
            save(digit(i, size), root / "test" / name / f"{k:03d}.png")
    return root


def unseen_class_folder(root: Path, val_images: int = 5) -> Path:
    """train/{a,b}/ and validation/{a,b,c}/: class c has `val_images` validation images and
    no training images (photo crops, a: china, b: flower, c: flower again)."""
    two_class_crops(root, seed=4, train_per_class=24, val_per_class=6)
    rng = np.random.default_rng(5)
    for i in range(val_images):
        save(photo_crop(rng, photos()[1], 32, 32, gray=True), root / "validation" / "c" /
             f"{i:03d}.png")
    return root


def small_folder(root: Path, train_per_class: int = 6, val_per_class: int = 4) -> Path:
    """12 training images (fewer than one default batch) and 8 validation images."""
    return two_class_crops(root, seed=6, train_per_class=train_per_class,
                           val_per_class=val_per_class)


def two_label_dataset(path: Path, fine_name: str = "fine_label") -> Path:
    """save_to_disk DatasetDict (train, validation) of digits 0..5 with two ClassLabel
    columns, coarse listed first: coarse_label (small: 0-2, large: 3-5) and `fine_name`
    (the digit, 6 classes)."""
    import datasets
    fine_names = ["zero", "one", "two", "three", "four", "five"]
    features = datasets.Features({
        "image": datasets.Image(),
        "coarse_label": datasets.ClassLabel(names=["small", "large"]),
        fine_name: datasets.ClassLabel(names=fine_names)})
    splits = {}
    for split, (lo, hi) in (("train", (0, 30)), ("validation", (30, 40))):
        rows = [(i, c) for c in range(6) for i in digit_indices(c)[lo:hi]]
        splits[split] = datasets.Dataset.from_dict(
            {"image": [digit(i, 12) for i, _ in rows], "coarse_label": [c // 3 for _, c in rows],
             fine_name: [c for _, c in rows]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def many_unseen_labels(path: Path, unseen: int = 3000, class_label: bool = False) -> Path:
    """save_to_disk: 80 training images labelled "zero"/"one", a validation split whose
    `unseen` images each carry a distinct label that training never saw (string labels, or
    ClassLabel columns with those names)."""
    import datasets
    train_rows = [(i, CLASSES3[c]) for c in (0, 1) for i in digit_indices(c)[:40]]
    val_rows = [(digit_indices(k % 2)[40 + k % 100], f"species_{k:05d}") for k in range(unseen)]
    if class_label:
        feats = [datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=names)})
                 for names in (["zero", "one"], [n for _, n in val_rows])]
    else:
        feats = [datasets.Features({"image": datasets.Image(),
                                    "label": datasets.Value("string")})] * 2
    splits = {}
    for (split, rows), f in zip((("train", train_rows), ("validation", val_rows)), feats):
        labels = [n for _, n in rows]
        if class_label:
            labels = [f["label"].str2int(n) for n in labels]
        splits[split] = datasets.Dataset.from_dict(
            {"image": [digit(i, 8) for i, _ in rows], "label": labels}, features=f)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


CARD_FEATURES = """\
dataset_info:
  features:
  - name: image
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
          '0': zero
          '1': one
          '2': two
"""  # a dataset card's features: digits 0-2 as ClassLabel

HUB_CARD = """\
---
license: cc-by-4.0
task_categories:
- image-classification
pretty_name: Handwritten digits 0-2
""" + CARD_FEATURES + """\
  splits:
  - name: train
    num_bytes: {train_bytes}
    num_examples: {train}
  - name: test
    num_bytes: {test_bytes}
    num_examples: {test}
  download_size: {download_size}
  dataset_size: {dataset_size}
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---

# Handwritten digits 0-2

Scikit-learn's 8x8 digits 0, 1 and 2, upscaled to 16x16 PNG. Downloaded with
`huggingface_hub.snapshot_download(repo_id, repo_type="dataset")`.
"""


def hub_snapshot(root: Path, train_per_class: int = 40, test_per_class: int = 12) -> Path:
    """What `snapshot_download` of a Hub image dataset leaves: README.md (a dataset card
    with YAML) and data/{train,test}-00000-of-00001.parquet written by Dataset.to_parquet."""
    import datasets
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASSES3)})
    counts = {}
    for split, (lo, hi) in (("train", (0, train_per_class)),
                            ("test", (train_per_class, train_per_class + test_per_class))):
        rows = [(i, c) for c in range(3) for i in digit_indices(c)[lo:hi]]
        ds = datasets.Dataset.from_dict({"image": [digit(i) for i, _ in rows],
                                         "label": [c for _, c in rows]}, features=features)
        (root / "data").mkdir(parents=True, exist_ok=True)
        file = root / "data" / f"{split}-00000-of-00001.parquet"
        ds.to_parquet(str(file))
        counts.update({split: len(ds), f"{split}_bytes": ds.data.nbytes})
        counts["download_size"] = counts.get("download_size", 0) + file.stat().st_size
    counts["dataset_size"] = counts["train_bytes"] + counts["test_bytes"]
    (root / "README.md").write_text(HUB_CARD.format(**counts))
    (root / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    return root


def corrupt_validation_folder(root: Path) -> Path:
    """three_class_folder plus a damaged validation image, validation/one/broken.png."""
    three_class_folder(root, train_per_class=32, val_per_class=8, offset=20)
    corrupt(root / "validation" / "one" / "broken.png")
    return root



def nested_folder(root: Path, per_class: int = 40, seed: int = 4) -> Path:
    """The layout people keep photos in: class/<year>/IMG_0001.JPG (upper-case extensions),
    plus files that are not images (.DS_Store, a README)."""
    rng = np.random.default_rng(seed)
    for name, photo in zip(("china", "flower"), photos()):
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(24, 49, size=2))
            save(photo_crop(rng, photo, w, h, gray=False),
                 root / name / ("2019" if i % 2 else "2020") / f"IMG_{i:04d}.JPG", quality=90)
        (root / name / ".DS_Store").write_bytes(b"\0\1 not an image")
    (root / "README.txt").write_text("holiday photos\n")
    return root


# ----------------------------------------------------------------------------- downloads
# (tests/test_downloads.py): layouts and files as downloaded from Kaggle, the Hub, scanners.

def loose_digits(folder: Path, count: int, size: int = 12, offset: int = 300) -> Path:
    """`count` unlabelled digits straight in `folder` (no class folders): u000.png, ..."""
    for k in range(count):
        save(digit(offset + k, size), folder / f"u{k:03d}.png")
    return folder


def kaggle_folder(root: Path, per_class: int = 20, loose: int = 12, size: int = 12) -> Path:
    """A Kaggle competition download: train/{zero,one,two}/*.png (labelled) beside test/*.png,
    `loose` unlabelled images outside any class folder."""
    for c, name in enumerate(CLASSES3):
        for k, i in enumerate(digit_indices(c)[:per_class]):
            save(digit(i, size), root / "train" / name / f"{k:03d}.png")
    loose_digits(root / "test", loose, size)
    return root


def unlabeled_beside_splits(root: Path, train_per_class: int = 16, val_per_class: int = 5,
                            loose: int = 7, size: int = 12) -> Path:
    """train/{zero,one,two}/, val/{zero,one,two}/ and unlabeled/*.png (`loose` images)."""
    three_class_folder(root, train_per_class, val_per_class, size)
    (root / "validation").rename(root / "val")
    loose_digits(root / "unlabeled", loose, size)
    return root


def mixed_split_folder(root: Path, per_class: int = 10, size: int = 12) -> Path:
    """train/{zero,one,two}/ and validation/{zero,one,two}/, plus one image straight in
    train/ (train/stray.png): a split folder holding class folders and a loose image."""
    three_class_folder(root, per_class, per_class // 2, size)
    save(digit(400, size), root / "train" / "stray.png")
    return root


def float_tiff(values: np.ndarray, path: Path) -> Path:
    """A 32-bit float greyscale TIFF (PIL mode "F"): what scientific cameras and scanners write."""
    img = PIL.Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    assert img.mode == "F", img.mode
    return save(img, path)


def float_tiff_folder(root: Path, per_class: int = 30, size: int = 16, seed: int = 8) -> Path:
    """Two classes of size x size float TIFFs with values in 0..1: a/ bright left half, b/
    bright right half (0.75 against 0.15, noise 0.05)."""
    rng = np.random.default_rng(seed)
    for name in "ab":
        for k in range(per_class):
            a = np.full((size, size), 0.15)
            if name == "a":
                a[:, :size // 2] = 0.75
            else:
                a[:, size // 2:] = 0.75
            a = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 0.99)
            float_tiff(a, root / name / f"{k:03d}.tif")
    return root


def two_image_columns(path: Path, per_class: int = 20, size: int = 12) -> Path:
    """save_to_disk DatasetDict (train, validation) with Image columns `before` and `after`
    (neither named image: the digit, and the digit flipped) and a ClassLabel `label`."""
    import datasets
    features = datasets.Features({"before": datasets.Image(), "after": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASSES3)})
    splits = {}
    for split, (lo, hi) in (("train", (0, per_class)), ("validation", (per_class, per_class + 6))):
        rows = [(i, c) for c in range(3) for i in digit_indices(c)[lo:hi]]
        splits[split] = datasets.Dataset.from_dict(
            {"before": [digit(i, size) for i, _ in rows],
             "after": [digit(i, size).transpose(PIL.Image.FLIP_LEFT_RIGHT) for i, _ in rows],
             "label": [c for _, c in rows]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def unlabelled_test_split(path: Path, train_per_class: int = 30, test_images: int = 24,
                          size: int = 12) -> Path:
    """save_to_disk DatasetDict: "train" (digits 0-2, labelled) and "test" whose labels are all
    -1 (a competition's test set: same ClassLabel names, no answers)."""
    import datasets
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASSES3)})
    rows = [(i, c) for c in range(3) for i in digit_indices(c)[:train_per_class]]
    test = [digit_indices(k % 3)[train_per_class + k // 3] for k in range(test_images)]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": [digit(i, size) for i, _ in rows],
                                             "label": [c for _, c in rows]}, features=features),
        "test": datasets.Dataset.from_dict({"image": [digit(i, size) for i in test],
                                            "label": [-1] * len(test)}, features=features),
    }).save_to_disk(str(path))
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid-looking 8-bit greyscale PNG whose header says width x height, with a tiny IDAT
    (a few rows of zeros): a decompression bomb as far as a header probe can tell."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    idat = zlib.compress(b"\0" * (4 * (width + 1)))  # 4 rows (filter byte + pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))
    return path


def bomb_folder(root: Path, per_class: int = 10, size: int = 12) -> Path:
    """Class folders zero/ and one/ of small PNGs, plus one/huge.png whose header says
    20000 x 20000 (400 megapixels: over twice PIL's default MAX_IMAGE_PIXELS)."""
    for c, name in enumerate(CLASSES3[:2]):
        for k, i in enumerate(digit_indices(c)[:per_class]):
            save(digit(i, size), root / name / f"{k:03d}.png")
    png_header_only(root / "one" / "huge.png", 20000, 20000)
    return root
