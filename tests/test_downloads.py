"""Data as it comes from downloads: a Kaggle layout (train/<class>/ beside a folder of loose,
unlabelled images), float and 32-bit integer TIFFs (scanners, microscopes), two Image columns
neither named "image", a decompression bomb's header, and a Hub dataset whose test split has
no labels (-1). And what skipping loose images must not change: a loose image among class
folders is still refused, at the top (a guard) or in a split folder. The data comes from
tests/own_data.py; every run is `python train.py` (run_cli)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import own_data as od
import train
from conftest import results, run_cli

FAST = ["--epochs", 1, "--num_workers", 0]


def cli(*args) -> tuple[int, str]:
    """`python train.py ARGS`: the exit code and stdout + stderr together."""
    proc = run_cli(*args, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def image(path: Path) -> dict:
    return {"bytes": None, "path": str(path)}  # what Image(decode=False) gives


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


# ----------------------------------------------------------------------------- 1. Kaggle layout

def test_kaggle_layout_skips_the_unlabelled_test_folder(tmp_path, data):
    """train/<class>/ beside test/*.png (12 loose images): today the classes were "test" and
    "train"."""
    root = od.kaggle_folder(data / "kaggle", per_class=18, loose=12)
    code, out = cli("--dataset", root, *FAST, "--output_dir", tmp_path / "run")
    assert code == 0, out[-3000:]
    res = results(tmp_path / "run")
    assert set(res["val_per_class_acc"]) == set(od.CLASSES3), res["val_per_class_acc"]
    assert "skipped test/: 12 images outside class folders" in out, out[-3000:]
    assert res["val_count"] == math.ceil(0.2 * 54), res  # held out of train/: test/ unused


def test_unlabeled_folder_beside_train_and_val_is_skipped(tmp_path, data):
    """train/<class>/, val/<class>/ and unlabeled/*.png (7): today three classes (train,
    unlabeled, val) and a held-out validation split."""
    root = od.unlabeled_beside_splits(data / "unlabeled", train_per_class=16, val_per_class=5,
                                      loose=7)
    code, out = cli("--dataset", root, *FAST, "--output_dir", tmp_path / "run")
    assert code == 0, out[-3000:]
    res = results(tmp_path / "run")
    assert set(res["val_per_class_acc"]) == set(od.CLASSES3), res["val_per_class_acc"]
    assert res["val_count"] == len(list((root / "val").rglob("*.png"))) == 15, res
    assert "skipped unlabeled/: 7 images" in out, out[-3000:]


@pytest.fixture(scope="module")
def mixed(data) -> Path:
    """train/{zero,one,two}/ and validation/{zero,one,two}/, plus train/stray.png."""
    return od.mixed_split_folder(data / "mixed")


def test_loose_image_beside_class_folders_is_refused(tmp_path, mixed):
    """Guard (passes today): --dataset train/, a folder of class folders with stray.png
    among them, is refused; skipping folders of loose images must not change that."""
    code, out = cli("--dataset", mixed / "train", *FAST, "--output_dir", tmp_path / "run")
    assert code == 2, out[-3000:]
    assert "outside any class folder" in out and "stray.png" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_loose_image_inside_a_split_folder_of_classes_is_refused(tmp_path, mixed):
    """train/stray.png beside train/<class>/ is not a folder of loose images to skip: its class
    is unknown. Today it trained two classes, "train" and "validation"."""
    code, out = cli("--dataset", mixed, *FAST, "--output_dir", tmp_path / "run")
    assert code == 2, out[-3000:]
    assert "outside any class folder" in out and "stray.png" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_split_folders_of_loose_images_never_become_classes(tmp_path):
    """train/*.png beside test/*.png (no class folders anywhere) is not a two-class dataset
    named "train" and "test" (today: trained as one, exit 0): refused, naming the split."""
    od.loose_digits(tmp_path / "data" / "train", 20)
    od.loose_digits(tmp_path / "data" / "test", 10, offset=400)
    code, out = cli("--dataset", tmp_path / "data", *FAST, "--output_dir", tmp_path / "run")
    assert code == 2, out[-3000:]
    assert "names a split" in out and "class folders" in out and "Traceback" not in out, out


# ----------------------------------------------------------------------------- 2. float TIFF

def test_float_tiff_decodes_to_its_grey_levels(tmp_path):
    """Mode "F", values 0..1: v decodes to round(v * 255) (today: 0 below 1.0, 1 at 1.0)."""
    values = np.linspace(0, 1, 8 * 32, dtype=np.float32).reshape(8, 32)
    path = od.float_tiff(values, tmp_path / "float.tif")
    with PIL.Image.open(path) as im:
        assert im.mode == "F" and im.size == (32, 8)
    pixels = train.decode(image(path), "L", (8, 32), "float.tif")
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (1, 8, 32)
    expected = np.round(values * 255).astype(np.int64)
    diff = np.abs(pixels[0].numpy().astype(np.int64) - expected)
    assert diff.max() <= 1, {"decoded": pixels[0, -1].tolist(),
                             "expected": expected[-1].tolist()}


def test_a_pixel_mode_it_does_not_handle_is_refused_by_name(tmp_path, monkeypatch):
    """A mode outside the ones decode() converts as they are, or scales, is refused with the
    file and the mode named, never clipped. (Every mode PIL opens today is handled, so one is
    taken off the list.)"""
    path = od.save(PIL.Image.new("LA", (8, 8), (90, 255)), tmp_path / "grey_alpha.png")
    assert torch.equal(train.decode(image(path), "L", (8, 8), "grey_alpha.png"),
                       torch.full((1, 8, 8), 90, dtype=torch.uint8))
    monkeypatch.setattr(train, "NARROW_MODES", train.NARROW_MODES - {"LA"})
    with pytest.raises(train.Exit) as refused:
        train.decode(image(path), "L", (8, 8), "grey_alpha.png")
    assert "grey_alpha.png" in str(refused.value) and "pixel mode LA" in str(refused.value)


def test_32_bit_integer_tiff_is_shifted_by_its_bit_depth(tmp_path):
    """Mode "I", values up to 2**20 - 1: shifted right by 20 - 8 = 12 bits (today: clipped to
    65535 first, so everything from 65536 up is 255)."""
    values = np.round(np.linspace(0, 2**20 - 1, 4 * 64)).astype(np.int32).reshape(4, 64)
    path = od.save(PIL.Image.fromarray(values), tmp_path / "int32.tif")
    with PIL.Image.open(path) as im:
        assert im.mode == "I" and int(np.asarray(im).max()) == 2**20 - 1
    pixels = train.decode(image(path), "L", (4, 64), "int32.tif")
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (1, 4, 64)
    expected = values.astype(np.int64) >> 12
    diff = np.abs(pixels[0].numpy().astype(np.int64) - expected)
    assert diff.max() <= 1, {"decoded": pixels[0, -1].tolist(),
                             "expected": expected[-1].tolist()}


def test_float_tiff_classes_are_learned(tmp_path, data):
    """Bright left half against bright right half, 16x16 float TIFFs: today every image
    decodes black and validation accuracy is chance."""
    root = od.float_tiff_folder(data / "float_tiffs", per_class=30, size=16)
    code, out = cli("--dataset", root, "--epochs", 3, "--num_workers", 0,
                    "--output_dir", tmp_path / "run")
    assert code == 0, out[-3000:]
    res = results(tmp_path / "run")
    assert res["val_count"] == 12, res
    assert res["val_acc"] >= 0.9, res


# ----------------------------------------------------------------------------- 3. image columns

def test_two_image_columns_the_choice_is_announced(tmp_path, data):
    """Image columns before and after, neither named image: today "before" was taken without
    a word about "after"."""
    path = od.two_image_columns(data / "before_after")
    code, out = cli("--dataset", path, *FAST, "--output_dir", tmp_path / "run")
    assert code == 0, out[-3000:]
    assert "other image columns: after" in out, out[-3000:]
    assert "--image_column picks" in out, out[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resolved"]["image_column"] == "before", config["resolved"]


# ----------------------------------------------------------------------------- 6. bombs

@pytest.fixture(scope="module")
def bomb(data) -> Path:
    root = od.bomb_folder(data / "bomb")
    limit, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
    try:  # the header is all PIL reads to know the size
        with PIL.Image.open(root / "one" / "huge.png") as im:
            assert im.size == (20000, 20000) and im.mode == "L"
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = limit
    return root


def test_decompression_bomb_is_one_line_naming_the_file(tmp_path, bomb):
    """A PNG whose header says 20000x20000: today PIL's DecompressionBombError escaped as a
    traceback (exit 1)."""
    code, out = cli("--dataset", bomb, *FAST, "--output_dir", tmp_path / "run")
    assert code == 2, (code, out[-3000:])
    assert "huge.png" in out and "20000x20000" in out, out[-3000:]
    assert "--max_image_pixels" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_max_image_pixels_raises_the_limit(tmp_path, bomb):
    """--max_image_pixels 500000000 lets the 400-megapixel header through: whatever happens
    next, the limit is not what stops it (today: an unknown flag)."""
    code, out = cli("--dataset", bomb, *FAST, "--max_image_pixels", 500_000_000,
                    "--output_dir", tmp_path / "run")
    assert "--max_image_pixels" not in out, (code, out[-3000:])


# ----------------------------------------------------------------------------- 7. unlabelled test

def test_unlabelled_test_split_is_not_the_validation_split(tmp_path, data):
    """"test" split with every label -1 (a competition's test set): today refused ("images
    have no label"); it is set aside and validation is held out of train."""
    path = od.unlabelled_test_split(data / "no_test_labels", train_per_class=30, test_images=24)
    code, out = cli("--dataset", path, *FAST, "--output_dir", tmp_path / "run")
    assert code == 0, out[-3000:]
    assert 'split "test" has no labels' in out and "held out" in out, out[-3000:]
    assert results(tmp_path / "run")["val_count"] == math.ceil(0.2 * 90)
