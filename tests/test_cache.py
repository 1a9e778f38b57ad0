"""The decoded on-disk cache (issue 12): --data_mode cache trains bit-identically to memory
mode, is built once per key (by one of several processes, also by two racing runs), reused by
later runs, never used half-built (kill -9, a stop signal), rebuilt when damaged or when an
image changes, and a full disk or an unwritable --cache_dir is one line.

Real runs of train.py on real files: digits in-process where speed matters, and a folder of
1,200 PNG photo crops (a build that takes long enough to be interrupted) in processes."""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import own_data
import train
from conftest import ROOT, launch_cmd, mount_tmpfs, results, run_cli, run_main
from test_checkpoints import kill9
from test_faults import one_error_line

PHOTO_FLAGS = ["--image_size", 32, "--recipe", "photo", "--epochs", 1, "--batch_size", 32]


def cache_dirs(root: Path) -> list[Path]:
    """The complete caches under root (temporary build folders excluded)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and ".tmp-" not in p.name)


def tmp_builds(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.tmp-*"))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """1,200 PNG crops of the two sample photos, 160-320 px of mixed aspect, some greyscale:
    PNG (no JPEG draft decoding) makes the build last a couple of seconds on two cores."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, photo in zip(("china", "flower"), own_data.photos()):
        for i in range(600):
            w, h = (int(v) for v in rng.integers(160, 321, size=2))
            own_data.save(own_data.photo_crop(rng, photo, w, h, gray=i % 7 == 0),
                          root / name / f"{i:04d}.png")
    return root


def weights_bytes(run: Path) -> bytes:
    return (run / "model.safetensors").read_bytes()


def same_run(a: Path, b: Path) -> None:
    ra, rb = results(a), results(b)
    for key in ("val_acc", "val_loss", "train_loss", "train_acc", "steps", "val_count"):
        assert ra[key] == rb[key], (key, ra[key], rb[key])
    assert weights_bytes(a) == weights_bytes(b)


# ----------------------------------------------------------------------------- same training

def test_cache_mode_trains_bit_identically_to_memory_mode_and_is_reused(tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["--epochs", 2, "--log_every", 0]
    assert run_main(*common, "--data_mode", "memory", "--output_dir", tmp_path / "mem") == 0
    assert run_main(*common, "--data_mode", "cache", "--cache_dir", cache,
                    "--output_dir", tmp_path / "c1") == 0
    first = capsys.readouterr().out
    # validation is held out of the training data and stored alike: one cache holds both
    assert len(re.findall(r"^cache: decoding ", first, re.M)) == 1, first
    assert len(re.findall(r"^cache: reusing ", first, re.M)) == 1, first
    assert len(cache_dirs(cache)) == 1 and not tmp_builds(cache)
    same_run(tmp_path / "mem", tmp_path / "c1")
    assert results(tmp_path / "c1")["data_mode"] == "cache"
    stamps = {p: (p / "images.u8").stat().st_mtime_ns for p in cache_dirs(cache)}
    assert run_main(*common, "--data_mode", "cache", "--cache_dir", cache,
                    "--output_dir", tmp_path / "c2") == 0
    second = capsys.readouterr().out
    assert "decoding" not in second and len(re.findall(r"^cache: reusing ", second, re.M)) == 2
    assert {p: (p / "images.u8").stat().st_mtime_ns for p in cache_dirs(cache)} == stamps
    same_run(tmp_path / "mem", tmp_path / "c2")
    # stored as the loop sees it: all 1,797 8x8 greyscale rows
    assert [(p / "images.u8").stat().st_size for p in cache_dirs(cache)] == [1797 * 64]


@pytest.mark.slow
def test_photo_recipe_from_the_cache_equals_memory_mode(tmp_path, photo_folder):
    """Mixed sizes and modes, photo recipe: the training rows are stored at size /
    crop_fraction for the random resized crops, the evaluation rows as their centre crop."""
    cache = tmp_path / "cache"
    for mode in ("memory", "cache"):
        assert run_main("--dataset", photo_folder, *PHOTO_FLAGS, "--data_mode", mode,
                        "--cache_dir", cache, "--output_dir", tmp_path / f"run-{mode}") == 0
    same_run(tmp_path / "run-memory", tmp_path / "run-cache")
    rows = {(p / "images.u8").stat().st_size // 3 for p in cache_dirs(cache)}
    # all 1,200 at round(32 / 0.875) = 37 for training, the 240 held out at 32 for evaluation
    assert rows == {1200 * 37 * 37, 240 * 32 * 32}


@pytest.mark.slow
def test_other_seeds_reuse_the_cache_of_the_data_they_hold_out_of(tmp_path, photo_folder,
                                                                   capsys):
    """A seed sweep on data without a validation split: the training rows come from one cache
    of all the data; only the photo recipe's smaller evaluation rows are decoded per seed."""
    cache = tmp_path / "cache"
    for seed in (0, 1):
        assert run_main("--seed", seed, "--epochs", 1, "--data_mode", "cache", "--cache_dir",
                        cache, "--output_dir", tmp_path / f"digits{seed}") == 0
    assert run_main("--seed", 1, "--epochs", 1, "--output_dir", tmp_path / "memory1") == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^cache: decoding ", out, re.M)) == 1, out
    same_run(tmp_path / "memory1", tmp_path / "digits1")  # other rows, read right
    photo = ["--dataset", photo_folder, *PHOTO_FLAGS, "--data_mode", "cache", "--cache_dir",
             cache]
    for seed in (0, 1):
        assert run_main(*photo, "--seed", seed, "--output_dir", tmp_path / f"photo{seed}") == 0
        out = capsys.readouterr().out
        assert re.findall(r"^cache: decoding (\d+) (\w+)", out, re.M) == (
            [("1200", "training"), ("240", "evaluation")] if seed == 0 else
            [("240", "evaluation")]), out


def test_eval_only_reads_the_cache_the_run_built(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert run_main("--epochs", 1, "--data_mode", "cache", "--cache_dir", cache,
                    "--output_dir", tmp_path / "run") == 0
    capsys.readouterr()
    assert run_main("--eval_only", "--weights", tmp_path / "run", "--data_mode", "cache",
                    "--cache_dir", cache, "--output_dir", tmp_path / "eval") == 0
    out = capsys.readouterr().out
    assert "cache: reusing" in out and "decoding" not in out, out
    assert results(tmp_path / "eval")["val_acc"] == results(tmp_path / "run")["val_acc"]


# ----------------------------------------------------------------------------- one build

@pytest.mark.slow
def test_two_processes_of_one_run_build_each_split_once(tmp_path):
    """torchrun, 2 gloo processes, an empty --cache_dir: one process builds, the other waits
    for the key's lock and reuses; the run equals its memory-mode twin."""
    cache = tmp_path / "cache"
    runs = {}
    for mode in ("memory", "cache"):
        proc = run_cli("--epochs", 1, "--data_mode", mode, "--cache_dir", cache,
                       "--output_dir", tmp_path / f"run-{mode}", nproc=2, launcher="torchrun")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        runs[mode] = proc.stdout
    assert len(re.findall(r"^cache: decoding ", runs["cache"], re.M)) == 1, runs["cache"]
    assert len(cache_dirs(cache)) == 1 and not tmp_builds(cache)
    same_run(tmp_path / "run-memory", tmp_path / "run-cache")


@pytest.mark.slow
def test_two_runs_racing_for_one_cache_build_it_once(tmp_path, photo_folder):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(launch_cmd() + [str(a) for a in (
        "--dataset", photo_folder, *PHOTO_FLAGS, "--data_mode", "cache", "--cache_dir", cache,
        "--output_dir", tmp_path / f"run{i}")], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    both = "".join(outs)
    assert len(re.findall(r"^cache: decoding ", both, re.M)) == 2, both
    assert len(re.findall(r"^cache: reusing ", both, re.M)) == 2, both
    assert len(cache_dirs(cache)) == 2 and not tmp_builds(cache)
    same_run(tmp_path / "run0", tmp_path / "run1")


def test_one_folder_spelled_three_ways_shares_one_cache(tmp_path, capsys):
    for label in (1, 7):
        for i in own_data.digit_indices(label)[:30]:
            own_data.save(own_data.digit(i), tmp_path / "data" / str(label) / f"{i}.png")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    cache, outs = tmp_path / "cache", []
    spellings = [tmp_path / "data", tmp_path / "link", tmp_path / "link" / ".." / "data"]
    for i, spelling in enumerate(spellings):
        assert run_main("--dataset", spelling, "--epochs", 1, "--data_mode", "cache",
                        "--cache_dir", cache, "--output_dir", tmp_path / f"run{i}") == 0
        outs.append(capsys.readouterr().out)
    assert [len(re.findall(r"^cache: decoding ", out, re.M)) for out in outs] == [1, 0, 0], outs
    assert len(cache_dirs(cache)) == 1


def test_without_file_locks_it_warns_and_an_overlapping_build_uses_the_first(tmp_path,
                                                                               capsys,
                                                                               monkeypatch):
    """Lustre without the flock mount option refuses locks (ENOLCK): the run warns and goes
    on; a second build of a key that finished meanwhile keeps the finished one."""
    def refuse(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        m.setattr(train.fcntl, "flock", refuse)
        assert run_main("--epochs", 1, "--data_mode", "cache", "--cache_dir", cache,
                        "--output_dir", tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert re.search(rf"^warning: cannot lock {cache}/\w+\.lock \(No locks available\): "
                     "processes may decode the same split", out, re.M), out
    [done] = cache_dirs(cache)
    s = train.load_splits(train.Config(), None)
    meta = {"channels": 1, "image_size": [8, 8], "recipe": "small"}
    assert train.cache_folder(cache, s.source_train, "image", "label", meta, True) == done
    before = (done / "cache.json").read_text()
    data = train.build_cache(done, train.Source(s.source_train, "image", "label"), meta,
                             True)  # as if it had started before `done` existed
    assert (done / "cache.json").read_text() == before and not tmp_builds(cache)
    assert len(data) == 1797 and data.path == done / "images.u8"


# ----------------------------------------------------------------------------- crash safety

def start_build(tmp_path: Path, photo_folder: Path, cache: Path) -> subprocess.Popen:
    """A run that is building the training split's cache when this returns."""
    proc = subprocess.Popen(launch_cmd() + [str(a) for a in (
        "--dataset", photo_folder, *PHOTO_FLAGS, "--data_mode", "cache", "--cache_dir", cache,
        "--output_dir", tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        part = [p / "images.u8" for p in tmp_builds(cache) if (p / "images.u8").exists()]
        if part and part[0].stat().st_size > 0:  # the first batch is written, more to come
            return proc
        time.sleep(0.01)
    out, err = proc.communicate()
    pytest.fail(f"no build seen (exit {proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")


@pytest.mark.slow
def test_kill9_during_the_build_leaves_nothing_that_is_used(tmp_path, photo_folder):
    cache = tmp_path / "cache"
    proc = start_build(tmp_path, photo_folder, cache)
    kill9(proc)
    assert cache_dirs(cache) == [] and len(tmp_builds(cache)) == 1  # killed mid-build
    again = run_cli("--dataset", photo_folder, *PHOTO_FLAGS, "--data_mode", "cache",
                    "--cache_dir", cache, "--output_dir", tmp_path / "run")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert len(re.findall(r"^cache: decoding ", again.stdout, re.M)) == 2
    assert len(cache_dirs(cache)) == 2 and not tmp_builds(cache)  # the stale build removed
    memory = run_cli("--dataset", photo_folder, *PHOTO_FLAGS, "--data_mode", "memory",
                     "--output_dir", tmp_path / "memory")
    assert memory.returncode == 0, memory.stderr[-3000:]
    same_run(tmp_path / "memory", tmp_path / "run")


def test_a_stop_signal_during_the_build_exits_75_and_removes_the_partial_build(
        tmp_path, photo_folder):
    cache = tmp_path / "cache"
    proc = start_build(tmp_path, photo_folder, cache)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-2000:] + err[-3000:]
    line = one_error_line(err)
    assert "stopped by SIGTERM while building the decoded cache" in line, line
    assert cache_dirs(cache) == [] and tmp_builds(cache) == []


def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["--epochs", 1, "--data_mode", "cache", "--cache_dir", cache, "--log_every", 0]
    assert run_main(*args, "--output_dir", tmp_path / "first") == 0
    capsys.readouterr()
    train_rows = max(cache_dirs(cache), key=lambda p: (p / "images.u8").stat().st_size)
    images = train_rows / "images.u8"
    damages = {
        "of the wrong size": lambda: os.truncate(images, images.stat().st_size - 64),
        "sampled rows differ": lambda: images.write_bytes(bytes(64) + images.read_bytes()[64:]),
        "unreadable": lambda: (train_rows / "cache.json").write_text("{"),
        "labelled differently": lambda: np.save(train_rows / "labels.npy", np.roll(
            np.load(train_rows / "labels.npy"), 1)),
    }
    for i, (why, damage) in enumerate(damages.items()):
        damage()
        assert run_main(*args, "--output_dir", tmp_path / f"run{i}") == 0
        out = capsys.readouterr().out
        assert re.search(rf"^note: the decoded cache {train_rows} is .*{why}.*: building it "
                         "again", out, re.M), out
        assert len(re.findall(r"^cache: decoding ", out, re.M)) == 1, out
        same_run(tmp_path / "first", tmp_path / f"run{i}")


@pytest.mark.slow
def test_an_edited_image_makes_a_new_cache(tmp_path, photo_folder, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(photo_folder, folder)
    cache = tmp_path / "cache"
    args = ["--dataset", folder, *PHOTO_FLAGS, "--data_mode", "cache", "--cache_dir", cache]
    assert run_main(*args, "--output_dir", tmp_path / "a") == 0
    capsys.readouterr()
    edited = folder / "china" / "0000.png"
    own_data.save(own_data.photo_crop(np.random.default_rng(1), own_data.photos()[1], 200, 200,
                                      gray=False), edited)  # same name, other pixels
    assert run_main(*args, "--output_dir", tmp_path / "b") == 0
    out = capsys.readouterr().out
    # the validation split is held out of the same folder: a new dataset, both decoded again
    assert len(re.findall(r"^cache: decoding ", out, re.M)) == 2, out
    assert "reusing" not in out and len(cache_dirs(cache)) == 4


# ----------------------------------------------------------------------------- disk and dirs

@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "64k")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_no_room_for_the_cache_is_one_line_naming_the_space(tmp_path, small_disk):
    proc = run_cli("--epochs", 1, "--data_mode", "cache", "--cache_dir", small_disk,
                   "--output_dir", tmp_path / "run")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert f"needs {1797 * (64 + 8) / 1e6:.1f} MB in {small_disk}, which has " in line, line
    assert cache_dirs(small_disk) == [] and tmp_builds(small_disk) == []


def test_a_disk_that_fills_during_the_build_is_one_line(tmp_path, small_disk, capsys,
                                                        monkeypatch):
    """The free-space check is told there is room; the real write then fails (ENOSPC)."""
    real = shutil.disk_usage
    monkeypatch.setattr(train.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1 << 40))
    code = run_main("--epochs", 1, "--data_mode", "cache", "--cache_dir", small_disk,
                    "--output_dir", tmp_path / "run")
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"in {small_disk}, which has " in line and "B free" in line, line
    assert cache_dirs(small_disk) == [] and tmp_builds(small_disk) == []


def test_auto_mode_picks_memory_cache_or_stream_and_says_why(tmp_path, small_disk, capsys):
    cache = tmp_path / "cache"
    picks = []
    for budget, where in ((4, cache), (1e-5, cache), (1e-5, cache), (1e-5, small_disk)):
        assert run_main("--epochs", 1, "--memory_budget_gb", budget, "--cache_dir", where,
                        "--output_dir", tmp_path / f"run{len(picks)}") == 0
        out = capsys.readouterr().out
        picks.append(re.search(r"^data: (\w+) mode \((.*)\)$", out, re.M).groups())
    assert [mode for mode, _ in picks] == ["memory", "cache", "cache", "stream"], picks
    assert f"cache {cache}: 0.1 MB to build" in picks[1][1], picks[1]
    assert f"cache {cache}: built" in picks[2][1], picks[2]
    assert re.search(rf"cache {small_disk}: 0.1 MB to build, 0.1 MB free", picks[3][1]), picks
    assert [results(tmp_path / f"run{i}")["data_mode"] for i in range(4)] == \
        ["memory", "cache", "cache", "stream"]
    same_run(tmp_path / "run0", tmp_path / "run1")


def test_an_unwritable_cache_dir_is_one_line_exit_2(tmp_path):
    proc = run_cli("--epochs", 1, "--data_mode", "cache", "--cache_dir", "/proc/no-cache",
                   "--output_dir", tmp_path / "run")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "cannot write to --cache_dir /proc/no-cache" in one_error_line(proc.stderr)


# ----------------------------------------------------------------------------- start-up

@pytest.mark.slow
def test_held_out_validation_is_datasets_stratified_split(photo_folder):
    """hold_out reads the labels in one batch (start-up that does not grow with the rows'
    Python formatting) but must choose the rows train_test_split chooses."""
    sources = [train.digits_dataset(), train.image_folder(photo_folder)[0]["train"]]
    for source in sources:
        for seed, fraction in ((0, 0.2), (7, 0.35)):
            theirs = source.train_test_split(test_size=fraction, seed=seed,
                                             stratify_by_column="label")
            labels = train.labels_of(source, "label")
            ours = [source.select(rows) for rows in train.hold_out(
                labels, source.features["label"], fraction, seed)]
            for part, name in zip(ours, ("train", "test")):
                assert part["image"][:] == theirs[name]["image"][:]
                assert part["label"][:] == theirs[name]["label"][:]


def test_a_class_with_one_image_cannot_be_held_out(tmp_path):
    for i in range(5):
        own_data.save(own_data.digit(i), tmp_path / "data" / "many" / f"{i}.png")
    own_data.save(own_data.digit(9), tmp_path / "data" / "single" / "0.png")
    proc = run_cli("--dataset", tmp_path / "data", "--output_dir", tmp_path / "run")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "cannot hold out --val_fraction 0.2 of 6 images: class 'single' has 1 image" in line


def test_start_up_reads_the_data_in_batches_not_row_by_row(tmp_path, monkeypatch):
    """Start-up that does not grow with the file count, counted instead of timed: datasets
    formats a Column row by row (np.asarray(ds[col]), train_test_split's stratification),
    2 calls per image: ~1.5 s per 50,000 files at every start. A held-out split of 3,000
    files may take a handful of batch reads."""
    import datasets.arrow_dataset as arrow_dataset
    for label in range(3):
        for i in range(1000):
            own_data.save(own_data.digit(i), tmp_path / "data" / f"c{label}" / f"{i}.png")
    calls = []
    real = arrow_dataset.format_table
    monkeypatch.setattr(arrow_dataset, "format_table",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    s = train.load_splits(train.Config(dataset=str(tmp_path / "data")), None)
    train.probe_images(s.source_train, s.image_col)
    assert (len(s.train), len(s.val)) == (2400, 600)
    assert len(calls) <= 5, len(calls)
