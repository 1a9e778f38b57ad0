"""Loader-worker errors that must end the process (4), a decoded cache that must notice edited
files behind a path column (5), labels in files instead of folders (8), a dataset in the Hub's
own cache read offline (9), and three messages (10).

Every run is a real train.py process (its exit code, its whole output, stdout and stderr
together), started in a session of its own: a run that hangs is killed with its loader
workers, which today ignore SIGTERM, and the test fails saying so. The data are made here from
tests/own_data.py's digits."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

import own_data as od
from conftest import launch_cmd, results, run_main

HANG_TIMEOUT = 240  # s: a run on tens of tiny images takes ~10 s; today's hangs never end


# ----------------------------------------------------------------------------- helpers

def write_csv(path: Path, header: list, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def processes(pid: int) -> str:
    """The still-running process tree under pid, for the message of a hung run."""
    try:
        top = psutil.Process(pid)
        tree = [top, *top.children(recursive=True)]
        return "; ".join(f"pid {p.pid} {p.name()} {p.status()}" for p in tree)
    except psutil.Error:
        return "(the main process is gone; loader workers may remain in its session)"


def cli(*args, cwd: Path | None = None, env: dict | None = None,
        timeout: int = 600) -> tuple[int, str]:
    """train.py as a process in its own session: (exit code, stdout + stderr). Past `timeout`
    the whole session is SIGKILLed (loader workers included) and the test fails."""
    proc = subprocess.Popen(launch_cmd() + [str(a) for a in args], cwd=cwd or Path.cwd(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out + err
    except subprocess.TimeoutExpired:
        alive = processes(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)  # SIGTERM does not do: the workers ignore it
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        out, err = "", "(no output: its pipes stayed open after SIGKILL)"
    pytest.fail(f"train.py {' '.join(map(str, args))} did not end within {timeout} s (hung; "
                f"still running: {alive}); its output:\n{(out + err)[-3000:]}")


def error_exit(code: int, output: str, *needles: str) -> None:
    """Exit 2 with train.py's own message, containing every needle, and no traceback."""
    assert code == 2, (code, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    for needle in needles:
        assert needle in output, (needle, output[-3000:])


def png(path: Path, index: int, size: int = 12) -> Path:
    """Digit number `index` of scikit-learn's as a size x size greyscale PNG."""
    return od.save(od.digit(index, size), path)


def broken(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a png")
    return path


NAMES = ["cat", "dog", "fox"]  # labels given as strings, not in digit order


def labelled_rows(per_class: int = 20, offset: int = 0) -> list[tuple[int, str]]:
    """(digit index, label name): digit c is class NAMES[c], classes interleaved."""
    picks = [od.digit_indices(c)[offset:offset + per_class] for c in range(len(NAMES))]
    return [(picks[c][k], NAMES[c]) for k in range(per_class) for c in range(len(NAMES))]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("label_files")


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory with nothing of the data in it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


# ----------------------------------------------------------------------------- 4. worker errors

@pytest.fixture(scope="module")
def clean_run(data) -> Path:
    """Weights trained for one epoch on a clean train/ + validation/ folder (zero, one, two)."""
    folder = od.three_class_folder(data / "clean", train_per_class=16, val_per_class=4, size=12)
    run = data / "clean_run"
    assert run_main("--dataset", folder, "--epochs", 1, "--num_workers", 0,
                    "--output_dir", run) == 0
    return run


@pytest.fixture(scope="module")
def predict_folder(data) -> Path:
    """Twelve digit PNGs and broken.png, which is not an image."""
    folder = data / "to_predict"
    for i in range(12):
        png(folder / f"{i:02d}.png", i)
    broken(folder / "broken.png")
    return folder


@pytest.fixture(scope="module")
def broken_class_folder(data) -> Path:
    """Class folders zero/, one/, two/ (no split folders), one/broken.png among them."""
    folder = data / "broken_classes"
    for c, name in enumerate(od.CLASSES3):
        for k, i in enumerate(od.digit_indices(c)[100:108]):
            png(folder / name / f"{k:03d}.png", i)
    broken(folder / "one" / "broken.png")
    return folder


@pytest.fixture(scope="module")
def broken_val_folder(data) -> Path:
    """train/ and validation/ of zero, one, two; validation/one/broken.png. Only training
    images are looked at before the loaders start, so a loader worker meets the broken one."""
    folder = od.three_class_folder(data / "broken_val", train_per_class=16, val_per_class=4,
                                   size=12, offset=40)
    broken(folder / "validation" / "one" / "broken.png")
    return folder


@pytest.fixture(scope="module")
def broken_big_val_folder(data) -> Path:
    """train/ (30 images) and validation/ (510 images and broken.png: over 500, so that the
    decoded cache is built by worker processes; today's train.py uses none for 500 images or
    fewer), 8 px; validation/one/broken.png. The validation images repeat the training ones:
    nothing is learned here."""
    folder = data / "broken_big_val"
    for c, name in enumerate(od.CLASSES3):
        for k, i in enumerate(od.digit_indices(c)[:170]):
            png(folder / "validation" / name / f"{k:03d}.png", i, size=8)
            if k < 10:
                png(folder / "train" / name / f"{k:03d}.png", i, size=8)
    broken(folder / "validation" / "one" / "broken.png")
    return folder


def test_predict_with_workers_exits_on_a_broken_file(tmp_path, clean_run, predict_folder):
    """4a. --predict with 2 loader workers: today the error line is printed, then the process
    never ends (multiprocessing's exit handler joins a worker that ignores its SIGTERM)."""
    code, out = cli("--predict", predict_folder, "--weights", clean_run,
                    "--output_dir", tmp_path / "out", "--num_workers", 2, timeout=HANG_TIMEOUT)
    error_exit(code, out, "broken.png")
    assert not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.parametrize("mode", ["auto", "stream"])
def test_eval_only_with_workers_exits_on_a_broken_file(tmp_path, clean_run, broken_class_folder,
                                                       mode):
    """4b. --eval_only on class folders holding broken.png, 2 loader workers. auto picks memory
    mode, decoded in this process (a guard: exits 2 today); stream decodes in the workers
    (hangs today)."""
    code, out = cli("--eval_only", "--weights", clean_run, "--dataset", broken_class_folder,
                    "--data_mode", mode, "--num_workers", 2, "--output_dir", tmp_path / "out",
                    timeout=HANG_TIMEOUT)
    error_exit(code, out, "broken.png")
    assert not (tmp_path / "out" / "results.json").exists()


def test_stream_training_with_workers_exits_on_a_broken_file(tmp_path, broken_val_folder):
    """4c. Streamed training, 2 workers: the epoch trains, the evaluation's worker meets
    validation/one/broken.png; today the process hangs after printing the error."""
    code, out = cli("--dataset", broken_val_folder, "--data_mode", "stream", "--num_workers", 2,
                    "--epochs", 1, "--output_dir", tmp_path / "run", timeout=HANG_TIMEOUT)
    error_exit(code, out, "broken.png")
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("size", ["small", "over 500"])
def test_cache_build_with_workers_exits_on_a_broken_file(tmp_path, request, size):
    """4d. --data_mode cache, --num_workers 2. small: 12 validation images, decoded into the
    cache in this process (a guard: exits 2 today). over 500: the cache is decoded by worker
    processes, one of which meets broken.png; today the process hangs after the error."""
    folder = request.getfixturevalue("broken_val_folder" if size == "small"
                                     else "broken_big_val_folder")
    code, out = cli("--dataset", folder, "--data_mode", "cache", "--cache_dir",
                    tmp_path / "cache", "--num_workers", 2, "--epochs", 1,
                    "--output_dir", tmp_path / "run", timeout=HANG_TIMEOUT)
    error_exit(code, out, "broken.png")
    assert "cache: decoding" in out  # it failed building the cache, not before
    assert not (tmp_path / "run" / "results.json").exists()


# ----------------------------------------------------------------------------- 5. stale cache

def test_edited_file_behind_a_path_column_is_decoded_again(tmp_path, elsewhere):
    """5. A save_to_disk dataset whose "image" column holds file paths (strings: save_to_disk
    would embed the bytes of an Image column) keeps its fingerprint when a file it points to
    is replaced: today the second run reuses the old decoded pixels."""
    import datasets
    rows = labelled_rows(per_class=12)
    files = [png(tmp_path / "pngs" / f"{n}_{k:02d}.png", i) for k, (i, n) in enumerate(rows)]
    features = datasets.Features({"image": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=NAMES)})
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files],
                                     "label": [NAMES.index(n) for _, n in rows]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    common = ["--dataset", tmp_path / "saved", "--data_mode", "cache", "--cache_dir",
              tmp_path / "cache", "--epochs", 1, "--num_workers", 0]
    code, out = cli(*common, "--output_dir", tmp_path / "o1", cwd=elsewhere)
    assert code == 0 and "cache: decoding" in out, (code, out[-3000:])
    before, old = files[0].stat(), files[0].read_bytes()
    png(files[0], od.digit_indices(2)[50])  # another digit, the same 12 x 12 size
    os.utime(files[0], ns=(before.st_atime_ns, before.st_mtime_ns + 10**10))  # 10 s later
    assert files[0].read_bytes() != old
    code, out = cli(*common, "--output_dir", tmp_path / "o2", cwd=elsewhere)
    assert code == 0, out[-3000:]
    # decoded again: once, for both splits (validation is held out of the same cache)
    assert out.count("cache: decoding") == 1, out[-3000:]


# ----------------------------------------------------------------------------- 8. label files

def write_images(root: Path, rows: list[tuple[int, str]], name) -> list[str]:
    """Save each row's digit under root as name(k, label) (a relative path); returns those."""
    paths = []
    for k, (i, label) in enumerate(rows):
        rel = name(k, label)
        png(root / rel, i)
        paths.append(rel)
    return paths


def assert_trained_on_names(code: int, out: str, run: Path, names: list[str]) -> dict:
    assert code == 0, out[-3000:]
    res = results(run)
    assert sorted(res["val_per_class_acc"]) == sorted(names), res["val_per_class_acc"]
    return res


def test_labels_csv_with_relative_paths_from_another_cwd(tmp_path, elsewhere):
    """8a. DIR/labels.csv (file,label; paths relative to the CSV's folder), run from another
    working directory. Today: '--dataset ... is a file'."""
    root = tmp_path / "ds"
    rows = labelled_rows()
    paths = write_images(root, rows, lambda k, label: f"imgs/{label[0]}{k}.png")
    write_csv(root / "labels.csv", ["file", "label"],
              ([p, label] for p, (_, label) in zip(paths, rows)))
    code, out = cli("--dataset", root / "labels.csv", "--epochs", 2, "--num_workers", 0,
                    "--output_dir", tmp_path / "run", cwd=elsewhere)
    res = assert_trained_on_names(code, out, tmp_path / "run", NAMES)
    assert res["val_count"] == 12  # 20% of 60, held out


def test_jsonl_with_image_and_label_fields(tmp_path, elsewhere):
    """8b. DIR/data.jsonl with {"image": "imgs/x.png", "label": "cat"} rows. Today: '--dataset
    ... is a file'."""
    root = tmp_path / "ds"
    rows = labelled_rows()
    paths = write_images(root, rows, lambda k, label: f"imgs/{k:03d}.png")
    (root / "data.jsonl").write_text("".join(
        json.dumps({"image": p, "label": label}) + "\n" for p, (_, label) in zip(paths, rows)))
    code, out = cli("--dataset", root / "data.jsonl", "--epochs", 2, "--num_workers", 0,
                    "--output_dir", tmp_path / "run", cwd=elsewhere)
    res = assert_trained_on_names(code, out, tmp_path / "run", NAMES)
    assert res["val_count"] == 12


def test_kaggle_csv_of_ids_without_extension(tmp_path, elsewhere):
    """8c. Kaggle's layout: DIR/train.csv with id,breed, the images DIR/train/<id>.jpg (the id
    has no extension), unlabelled DIR/test/<id>.jpg and sample_submission.csv beside it.
    Today: '--dataset ... is a file'."""
    root = tmp_path / "kaggle"
    breeds = ["beagle", "boxer", "pug"]
    rows = [(i, breeds[NAMES.index(n)]) for i, n in labelled_rows()]
    ids = [hashlib.md5(f"dog{k}".encode()).hexdigest() for k in range(len(rows))]
    for image_id, (i, _) in zip(ids, rows):
        od.save(od.digit(i, 12).convert("RGB"), root / "train" / f"{image_id}.jpg", quality=95)
    write_csv(root / "train.csv", ["id", "breed"],
              ([image_id, breed] for image_id, (_, breed) in zip(ids, rows)))
    test_ids = [hashlib.md5(f"test{k}".encode()).hexdigest() for k in range(6)]
    for k, image_id in enumerate(test_ids):
        od.save(od.digit(200 + k, 12).convert("RGB"), root / "test" / f"{image_id}.jpg")
    (root / "sample_submission.csv").write_text(
        "id," + ",".join(breeds) + "\n"
        + "".join(f"{t},{','.join(['0.333'] * 3)}\n" for t in test_ids))
    code, out = cli("--dataset", root / "train.csv", "--epochs", 2, "--num_workers", 0,
                    "--output_dir", tmp_path / "run", cwd=elsewhere)
    res = assert_trained_on_names(code, out, tmp_path / "run", breeds)
    assert res["val_count"] == 12


def test_metadata_csv_beside_the_images(tmp_path, elsewhere):
    """8d. datasets' imagefolder convention: metadata.csv (file_name,label) in the folder of
    the images, passed as the folder. A guard."""
    root = tmp_path / "ds"
    rows = labelled_rows()
    paths = write_images(root, rows, lambda k, label: f"{k:03d}.png")
    write_csv(root / "metadata.csv", ["file_name", "label"],
              ([p, label] for p, (_, label) in zip(paths, rows)))
    code, out = cli("--dataset", root, "--epochs", 2, "--num_workers", 0,
                    "--output_dir", tmp_path / "run", cwd=elsewhere)
    res = assert_trained_on_names(code, out, tmp_path / "run", NAMES)
    assert res["val_count"] == 12


def test_multi_label_column_is_refused_by_name(tmp_path):
    """8e. --label_column naming a Sequence(ClassLabel) column (several labels per image):
    exit 2 saying it is multi-label. Today the message only says what it holds."""
    import datasets
    tags = ["round", "straight", "crossed"]
    features = datasets.Features({"image": datasets.Image(),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=tags))})
    rows = labelled_rows(per_class=10)
    ds = datasets.Dataset.from_dict(
        {"image": [od.digit(i, 12) for i, _ in rows],
         "tags": [[0] if n == "cat" else [1] if n == "dog" else [1, 2] for _, n in rows]},
        features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    code, out = cli("--dataset", tmp_path / "saved", "--label_column", "tags", "--epochs", 1,
                    "--num_workers", 0, "--output_dir", tmp_path / "run")
    error_exit(code, out, "multi-label")


def test_folder_holding_labels_csv_asks_for_the_file(tmp_path, elsewhere):
    """8f. --dataset DIR where DIR holds imgs/ and labels.csv: exit 2, telling to pass
    --dataset DIR/labels.csv."""
    root = tmp_path / "ds"
    rows = labelled_rows(per_class=10)
    paths = write_images(root, rows, lambda k, label: f"imgs/{k:03d}.png")
    (root / "labels.csv").write_text("file,label\n" + "".join(
        f"{p},{label}\n" for p, (_, label) in zip(paths, rows)))
    code, out = cli("--dataset", root, "--epochs", 1, "--num_workers", 0,
                    "--output_dir", tmp_path / "run", cwd=elsewhere)
    error_exit(code, out, "--dataset", "labels.csv")


# ----------------------------------------------------------------------------- 9. Hub cache

def hub_cache_entry(hub: Path, repo: str, make) -> str:
    """What snapshot_download(repo, repo_type="dataset") leaves in the Hub cache `hub`:
    blobs/<sha256> files, snapshots/<commit>/... relative symlinks to them, and refs/main
    holding the commit. `make(folder)` writes the repository's files into a folder."""
    entry = hub / f"datasets--{repo.replace('/', '--')}"
    staging = entry.parent / f"staging-{entry.name}"
    make(staging)
    commit = hashlib.sha1(repo.encode()).hexdigest()
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = file.relative_to(staging)
        blob = entry / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(file, blob)
        link = entry / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    shutil.rmtree(staging)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


def train_parquet_only(root: Path, per_class: int = 30) -> Path:
    """data/train-00000-of-00001.parquet only: 3 x per_class digits, an Image column and a
    ClassLabel."""
    import datasets
    rows = [(i, c) for c in range(3) for i in od.digit_indices(c)[:per_class]]
    ds = datasets.Dataset.from_dict(
        {"image": [od.digit(i, 12) for i, _ in rows], "label": [c for _, c in rows]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=od.CLASSES3)}))
    (root / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


@pytest.mark.parametrize("layout", ["parquet only", "card and test split"])
def test_hub_id_from_the_hub_cache_offline(tmp_path, elsewhere, layout):
    """9. HF_HOME=TMP/hf, HF_HUB_OFFLINE=1, the dataset where snapshot_download put it:
    --dataset owner/name trains. Today: 'not in the local Hub cache'. (tests/own_data.py's
    hub_snapshot makes the card-and-test-split repository; test_own_data.py covers that
    snapshot passed as a folder, not found by its Hub id.)"""
    hf = tmp_path / "hf"
    make = train_parquet_only if layout == "parquet only" else od.hub_snapshot
    hub_cache_entry(hf / "hub", "owner/name", make)
    env = {"HF_HOME": str(hf), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_CACHE": str(hf / "hub"), "HF_DATASETS_CACHE": str(hf / "datasets")}
    code, out = cli("--dataset", "owner/name", "--epochs", 1, "--num_workers", 0,
                    "--output_dir", tmp_path / "run", cwd=elsewhere, env=env)
    assert code == 0, out[-3000:]
    res = results(tmp_path / "run")
    assert sorted(res["val_per_class_acc"]) == sorted(od.CLASSES3)
    assert res["val_count"] == (18 if layout == "parquet only" else 36)  # held out / test


# ----------------------------------------------------------------------------- 10. messages

SHORT_CARD = """\
---
""" + od.CARD_FEATURES + """\
  splits:
  - name: train
    num_bytes: 123456
    num_examples: 500
  download_size: 120000
  dataset_size: 123456
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---

# Digits 0-2
"""


def test_card_counting_more_rows_than_the_files_is_an_incomplete_download(tmp_path):
    """10a. The dataset card records 500 training rows, the parquet file holds 60: datasets
    raises NonMatchingSplitsSizesError. Expected: one line saying 'incomplete download' with
    both numbers."""
    root = train_parquet_only(tmp_path / "download", per_class=20)
    (root / "README.md").write_text(SHORT_CARD)
    code, out = cli("--dataset", root, "--epochs", 1, "--num_workers", 0,
                    "--output_dir", tmp_path / "run",
                    env={"HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")})
    error_exit(code, out, "incomplete download", "500", "60")


def test_val_fraction_too_small_for_the_classes_suggests_one(tmp_path):
    """10b. 60 classes of 2 images: --val_fraction 0.2 holds out 24 images, fewer than the
    classes. Expected: the smallest fraction that works, rounded up to 0.05: 60/120 = 0.5."""
    root = tmp_path / "sixty"
    for c in range(60):
        for k in range(2):
            png(root / f"class_{c:02d}" / f"{k}.png", 2 * c + k, size=8)
    code, out = cli("--dataset", root, "--epochs", 1, "--num_workers", 0,
                    "--output_dir", tmp_path / "run")
    error_exit(code, out, "--val_fraction 0.5")


def test_data_line_counts_both_splits_and_the_classes(tmp_path):
    """10c. A save_to_disk DatasetDict (train 96, test 30, 3 classes): one line 'data: 96
    training and 30 validation images, 3 classes'."""
    import datasets
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=od.CLASSES3)})
    splits = {}
    for name, (lo, hi) in (("train", (0, 32)), ("test", (32, 42))):
        rows = [(i, c) for c in range(3) for i in od.digit_indices(c)[lo:hi]]
        splits[name] = datasets.Dataset.from_dict(
            {"image": [od.digit(i, 12) for i, _ in rows], "label": [c for _, c in rows]},
            features=features)
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    n_train, n_test = len(splits["train"]), len(splits["test"])
    code, out = cli("--dataset", tmp_path / "saved", "--epochs", 1, "--num_workers", 0,
                    "--output_dir", tmp_path / "run")
    assert code == 0, out[-3000:]
    assert f"data: {n_train} training and {n_test} validation images, 3 classes" in out, \
        out[-3000:]
