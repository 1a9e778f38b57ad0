"""Folders and tables as users have them: data files and sidecars inside class folders, links
(to folders, broken, in a loop), names that are not UTF-8, class folders without images, one
class, missing labels, names that match two files, unlabelled splits for --eval_only, the
same folder spelled another way, a Hub download's configurations, streamed labels that are
not classes. Each of these trained the wrong thing, or ended in a traceback, before."""
from __future__ import annotations

import csv
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

import train
from conftest import digit_images, results, run_main


def one_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def folder_of(root: Path, classes=("red", "green", "blue"), per_class: int = 12,
              deeper: str = "") -> Path:
    """Class folders (optionally a level deeper: red/2019/...) of 12 px digit images."""
    items = digit_images(classes=len(classes), per_class=per_class, size=12)
    for i, (img, label) in enumerate(items):
        folder = root / classes[label] / deeper
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"img_{i:03d}.png")
    return root


def classes_of(root: Path) -> tuple[list[str], str]:
    source, note = train.load_source(train.Config(dataset=str(root)), None)
    return source["train"].features["label"].names, note


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-epoch run on a folder whose validation part is held out: (folder, run)."""
    tmp = tmp_path_factory.mktemp("trained")
    data, run = folder_of(tmp / "colours"), tmp / "run"
    assert run_main("--dataset", data, "--epochs", 1, "--num_workers", 0,
                    "--output_dir", run) == 0
    return data, run


def test_data_files_inside_class_folders_are_skipped_not_read_as_a_download(tmp_path):
    """A stray album.json or exif.csv in red/2019/ sent the whole folder to datasets'
    imagefolder, whose classes are the innermost folders (2019, 2020); Takeout sidecars
    (photo.png.json beside each photo) were refused as unreadable images."""
    root = folder_of(tmp_path / "nested", deeper="2019")
    (root / "red" / "2019" / "album.json").write_text('{"title": "red"}')
    (root / "green" / "2019" / "exif.csv").write_text("a,b\n1,2\n")
    for png in (root / "blue" / "2019").glob("*.png"):
        Path(f"{png}.json").write_text('{"title": "x"}')
    names, note = classes_of(root)
    assert names == ["blue", "green", "red"]
    assert "folder: 36 images in 3 classes" in note and "skipped 14 files" in note, note
    # data files in folders of their own, with no images, are still datasets' to read
    hub = tmp_path / "download"
    (hub / "data").mkdir(parents=True)
    with open(hub / "data" / "train.csv", "w") as f:
        f.write("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    assert train.walk_images(hub) is None


def test_broken_link_and_link_loop_are_one_line(tmp_path, capsys):
    broken = folder_of(tmp_path / "broken")
    (broken / "green" / "moved.png").symlink_to(tmp_path / "nowhere.png")
    code = run_main("--dataset", broken, "--output_dir", tmp_path / "run1")
    one_line(capsys, code, "green/moved.png", "a link to a missing file")
    looped = folder_of(tmp_path / "looped")
    (looped / "red" / "up").symlink_to("..")  # each image was read ~40 times, most as "red"
    code = run_main("--dataset", looped, "--output_dir", tmp_path / "run2")
    one_line(capsys, code, "red/up", "a loop")
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


def test_names_that_are_not_utf8_are_one_line_for_training_and_predict(tmp_path, capsys,
                                                                       trained):
    root = folder_of(tmp_path / "latin1")
    shutil.copy(next((root / "red").glob("*.png")),
                os.fsdecode(bytes(root / "red") + b"/caf\xe9 photo.png"))
    code = run_main("--dataset", root, "--output_dir", tmp_path / "run")
    one_line(capsys, code, "caf\\xe9 photo.png", "not UTF-8")
    code = run_main("--predict", root, "--weights", trained[1], "--output_dir", tmp_path / "p")
    one_line(capsys, code, "caf\\xe9 photo.png", "not UTF-8")
    assert not (tmp_path / "p" / "predictions.csv").exists()  # it was left cut off


def test_predict_reads_linked_folders_as_training_does(tmp_path, capsys, trained):
    elsewhere = folder_of(tmp_path / "elsewhere", classes=("blue", "red"), per_class=5)
    root = tmp_path / "links"
    root.mkdir()
    (root / "blue").symlink_to(elsewhere / "blue")
    shutil.copytree(elsewhere / "red", root / "red")
    assert run_main("--predict", root, "--weights", trained[1], "--output_dir",
                    tmp_path / "p") == 0
    rows = list(csv.reader(open(tmp_path / "p" / "predictions.csv")))[1:]
    assert sorted(r[0].split("/")[0] for r in rows) == ["blue"] * 5 + ["red"] * 5, rows


def test_class_folders_without_images_are_named(tmp_path):
    root = folder_of(tmp_path / "bare")
    (root / "purple").mkdir()
    (root / "cyan").mkdir()
    (root / "cyan" / "readme.txt").write_text("to do")
    names, note = classes_of(root)
    assert names == ["blue", "green", "red"]
    assert "note: skipped cyan, purple: no images, so not classes" in note, note


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_label_files_with_one_class_missing_labels_or_names_of_two_files(tmp_path, capsys):
    root = folder_of(tmp_path / "table")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    one = write_rows(root / "one.csv", [["file", "label"]] + [[f, "cat"] for f in files])
    code = run_main("--dataset", one, "--output_dir", tmp_path / "r1")  # trained with exit 0
    one_line(capsys, code, "has 1 class (cat)", "two or more")
    gaps = write_rows(root / "gaps.csv", [["file", "label"]] + [
        [f, "" if i == 3 else f.split("/")[0]] for i, f in enumerate(files)])
    code = run_main("--dataset", gaps, "--output_dir", tmp_path / "r2")  # a TypeError before
    one_line(capsys, code, "1 of 36 images have no label (-1 or empty)")
    twice = tmp_path / "twice"
    for batch in ("batch1", "batch2"):
        folder_of(twice / batch, per_class=2)
    names = [[p.name, p.parent.name] for p in sorted((twice / "batch1").rglob("*.png"))]
    table = write_rows(twice / "labels.csv", [["file", "label"]] + names)
    code = run_main("--dataset", table, "--output_dir", tmp_path / "r3")  # "no column of paths"
    one_line(capsys, code, ".png' in column 'file' names batch1/", ".png, batch2/", "relative to")


def test_kaggle_folder_with_tables_names_the_label_file_and_the_other_way(tmp_path, capsys):
    root = folder_of(tmp_path / "kaggle" / "train")
    root = root.parent
    (root / "test").mkdir()
    write_rows(root / "sample_submission.csv", [["id", "label"], ["a", "red"]])
    write_rows(root / "train.csv", [["id", "label"], ["b", "red"]])
    code = run_main("--dataset", root, "--output_dir", tmp_path / "run")
    one_line(capsys, code, f"--dataset {root / 'train.csv'};",
             f"move train.csv, sample_submission.csv out of {root}")


def test_eval_only_knows_its_own_folder_however_it_is_spelled(tmp_path, trained,
                                                              monkeypatch, capsys):
    """`./colours/`, `colours` and the absolute path are the folder the weights were trained
    on: their held-out validation images, not the whole folder (training images included).
    Without --dataset it is found from another directory too."""
    data, run = trained
    held_out = results(run)["val_count"]
    monkeypatch.chdir(data.parent)
    for k, spelling in enumerate(["colours", "./colours/", str(data)]):
        out = tmp_path / f"eval{k}"
        assert run_main("--eval_only", "--weights", run, "--dataset", spelling,
                        "--output_dir", out) == 0
        assert results(out)["evaluated"] == "the validation split of the training data"
        assert results(out)["val_count"] == held_out == 8, spelling
    monkeypatch.chdir(tmp_path)
    assert run_main("--eval_only", "--weights", run, "--output_dir", tmp_path / "elsewhere") == 0
    assert results(tmp_path / "elsewhere")["val_count"] == held_out


def test_eval_only_on_an_unlabelled_split_is_one_line(tmp_path, trained, capsys):
    import datasets
    items = digit_images(classes=3, per_class=6, size=12)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=["blue", "green", "red"])})
    parts = {split: datasets.Dataset.from_dict(
        {"image": [img for img, _ in items], "label": labels}, features=features)
        for split, labels in (("train", [c for _, c in items]), ("test", [-1] * len(items)))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hub"))
    code = run_main("--eval_only", "--weights", trained[1], "--dataset", tmp_path / "hub",
                    "--output_dir", tmp_path / "eval")  # an IndexError in cross_entropy
    one_line(capsys, code, "18 of 18 images have no label", "split 'test'", "--split")


CARD = """---
configs:
- config_name: rgb
  default: true
  data_files:
  - split: train
    path: rgb/train-*
- config_name: two
  data_files:
  - split: train
    path: two/train-*
---
"""


def test_dataset_config_chooses_among_a_local_downloads_configurations(tmp_path, capsys):
    import datasets
    items = digit_images(classes=3, per_class=8, size=12)
    root = tmp_path / "download"
    for config, names in (("rgb", ["red", "green", "blue"]), ("two", ["warm", "cold"])):
        rows = [(img, c) for img, c in items if c < len(names)]
        (root / config).mkdir(parents=True)
        datasets.Dataset.from_dict(
            {"image": [img for img, _ in rows], "label": [c for _, c in rows]},
            features=datasets.Features({"image": datasets.Image(),
                                        "label": datasets.ClassLabel(names=names)})
        ).to_parquet(root / config / "train-00000-of-00001.parquet")
    (root / "README.md").write_text(CARD)
    source, _ = train.load_source(train.Config(dataset=str(root), dataset_config="two"), None)
    assert source["train"].features["label"].names == ["warm", "cold"]  # was rgb's 3 classes
    assert len(source["train"]) == 16


def tar_split(root: Path, split: str, labels: list[int]) -> None:
    (root / split).mkdir(parents=True)
    items = digit_images(classes=3, per_class=len(labels), size=12)
    with tarfile.open(root / split / f"{split}-0000.tar", "w") as tar:
        for i, label in enumerate(labels):
            png = io.BytesIO()
            items[i][0].save(png, format="PNG")
            for ext, data in (("png", png.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_streamed_labels_that_are_not_training_classes_are_named(tmp_path, capsys):
    """A validation .cls past every training label made phantom classes (a model with 8
    outputs for 3 classes); a string label missing from --classes was reported as -1."""
    root = tmp_path / "tars"
    tar_split(root, "train", [0, 1, 2] * 8)
    tar_split(root, "validation", [0, 1, 7])
    code = run_main("--dataset", root, "--streaming", "--output_dir", tmp_path / "r1")
    one_line(capsys, code, "validation class 7 (.cls) has no training examples")
    import datasets
    items = digit_images(classes=2, per_class=10, size=12)
    (tmp_path / "pq" / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(
            {"image": [img for img, _ in items], "label": [["red", "blue"][c] for _, c in items]},
            features=datasets.Features({"image": datasets.Image(),
                                        "label": datasets.Value("string")})
        ).to_parquet(tmp_path / "pq" / "data" / f"{split}-00000-of-00001.parquet")
    (tmp_path / "classes.txt").write_text("red\ngreen\n")
    code = run_main("--dataset", tmp_path / "pq", "--streaming", "--classes",
                    tmp_path / "classes.txt", "--num_workers", 0, "--output_dir", tmp_path / "r2")
    one_line(capsys, code, "label 'blue' is not one of the 2 classes")
