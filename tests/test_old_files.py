"""Files that an older train.py wrote still work with this one: the fixture
tests/fixtures/3cd1482.tar.gz (made by commit 3cd1482; 3cd1482.md says how) holds a run that
was stopped mid-epoch and a finished run. The stopped run resumes here to the very weights that an
uninterrupted run of this train.py trains; the finished run's weights evaluate to the accuracy
they were saved with, predict, and start a new run."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, assert_same_weights, digit_images, events, results, run_main

# Kept as one archive (tests/fixtures/3cd1482.md says how it was made): its config.json files
# would make tests/ look like a Hub download to --dataset, which some tests point at tests/.
ARCHIVE = ROOT / "tests" / "fixtures" / "3cd1482.tar.gz"


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> Path:
    """The archive unpacked: interrupted/, finished/, cpu.json."""
    root = tmp_path_factory.mktemp("3cd1482")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(root, filter="data")
    return root
# The flags that made interrupted/ (stopped by SIGUSR1 after step 7, 22 steps an epoch).
# --cpu: a GPU would train the rest of the run with other arithmetic than the CPU that made
# the fixture.
INTERRUPTED = ["--cpu", "--epochs", 2, "--checkpoint_every", 7, "--keep_checkpoints", 1,
               "--log_every", 2]


def this_cpu() -> dict:
    """The CPU's model name and feature flags (they choose torch's kernels, and so the last
    bits of a float result), as cpu.json in the fixture records the one that made it."""
    info = Path("/proc/cpuinfo").read_text()
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split()
    return {"model_name": re.search(r"^model name\s*:\s*(.*)$", info, re.M).group(1).strip(),
            "flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()}


def step_dirs(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step_*"))


def same_tensors(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(wa[k].dtype == wb[k].dtype and wa[k].equal(wb[k])
                                          for k in wa)


def test_the_old_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path, capsys,
                                                                      fixture):
    run = tmp_path / "resumed"
    shutil.copytree(fixture / "interrupted", run)
    (checkpoint,) = step_dirs(run)
    step = int(checkpoint.name[5:])
    assert 0 < step < 22 and not (run / "results.json").exists()  # stopped mid-epoch 1
    assert run_main(*INTERRUPTED, "--output_dir", run) == 0
    assert f"resumed from {checkpoint}" in capsys.readouterr().out
    assert results(run)["resumed_from"] == str(checkpoint)
    reference = tmp_path / "uninterrupted"
    assert run_main(*INTERRUPTED, "--output_dir", reference) == 0
    assert results(run)["steps"] == results(reference)["steps"] == 44
    # metrics.jsonl: the old run's lines as they were, then this run's, as if never stopped
    old_lines = events(fixture / "interrupted")
    assert old_lines and events(run)[:len(old_lines)] == old_lines
    where = lambda run: [(e["event"], e["step"], e["epoch"]) for e in events(run)]  # noqa: E731
    assert where(run) == where(reference)
    if this_cpu() != json.loads((fixture / "cpu.json").read_text()):
        # Another CPU kind computes the fixture's first 8 steps with other kernels: the same
        # run, not the same bits. The resume must still continue that run.
        assert abs(results(run)["val_acc"] - results(reference)["val_acc"]) <= 0.03
        return
    if not same_tensors(run / "model.safetensors", reference / "model.safetensors"):
        # Which half differs: the steps before the stop (made by 3cd1482) or after it (here)?
        again = tmp_path / "diagnosis"
        assert run_main(*INTERRUPTED, "--checkpoint_every", step, "--keep_checkpoints", 0,
                        "--output_dir", again) == 0
        old = fixture / "interrupted" / "checkpoints" / checkpoint.name  # the run pruned it
        before = same_tensors(old / "model.safetensors",
                              again / "checkpoints" / checkpoint.name / "model.safetensors")
        raise AssertionError(
            "the resumed run's weights differ from the uninterrupted run's; " + (
                f"the first {step} steps already differ from 3cd1482's: this train.py trains "
                "differently from it (bench/identical.py tells), or this machine's CPU or "
                "torch computes differently from the one that made the fixture (its "
                "README.md: regenerate it)" if not before else
                f"the first {step} steps are 3cd1482's: resuming its checkpoint is not exact"))
    assert_same_weights(run, reference)
    for key in ("steps", "val_acc", "val_loss", "train_loss", "train_acc"):
        assert results(run)[key] == results(reference)[key], key


def test_eval_only_reproduces_the_old_validation_accuracy(tmp_path, fixture):
    finished = shutil.copytree(fixture / "finished", tmp_path / "finished")
    assert run_main("--cpu", "--eval_only", "--weights", finished,
                    "--output_dir", tmp_path / "eval") == 0
    old, new = results(finished), results(tmp_path / "eval")
    assert (new["val_acc"], new["val_count"]) == (old["val_acc"], old["val_count"])
    assert new["val_loss"] == pytest.approx(old["val_loss"], rel=1e-6)


def test_predict_with_the_old_weights_writes_a_row_per_image(tmp_path, fixture):
    finished = shutil.copytree(fixture / "finished", tmp_path / "finished")
    images = tmp_path / "images"
    images.mkdir()
    for i, (img, label) in enumerate(digit_images(classes=3, per_class=2, size=8)):
        if i % 2:  # an RGB JPEG of another size beside grayscale 8x8 PNGs
            img.resize((24, 24)).convert("RGB").save(images / f"{label}_{i}.jpg", quality=95)
        else:
            img.save(images / f"{label}_{i}.png")
    assert run_main("--cpu", "--predict", images, "--weights", finished,
                    "--output_dir", tmp_path / "predict") == 0
    with open(tmp_path / "predict" / "predictions.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["file"] + [f"{w}_{i}" for i in range(1, 6)
                                 for w in ("label", "probability")]
    assert sorted(r[0] for r in rows) == sorted(p.name for p in images.iterdir())
    names = {str(c) for c in range(10)}
    for row in rows:
        assert set(row[1::2]) <= names and len(set(row[1::2])) == 5
        assert 0 < sum(float(p) for p in row[2::2]) <= 1 + 1e-5


def test_init_from_the_old_run_loads_every_tensor(tmp_path, capsys, fixture):
    finished = shutil.copytree(fixture / "finished", tmp_path / "finished")
    n = len(load_file(str(finished / "model.safetensors")))
    assert run_main("--cpu", "--epochs", 1, "--init_from", finished,
                    "--output_dir", tmp_path / "warm") == 0
    assert f"start: {n} of {n} tensors from {finished}" in capsys.readouterr().out
    assert results(tmp_path / "warm")["steps"] == 22


def test_an_old_run_killed_before_its_first_checkpoint_starts_again(tmp_path, capsys, fixture):
    """The stopped run as if killed before any checkpoint (config.json and metrics.jsonl of
    the older train.py, whose run identity has fewer keys): the same command starts it again
    instead of calling it another run."""
    run = tmp_path / "run"
    shutil.copytree(fixture / "interrupted", run)
    shutil.rmtree(run / "checkpoints")
    assert (run / "config.json").exists() and not list(run.glob("*.safetensors"))
    assert run_main(*INTERRUPTED, "--epochs", 1, "--output_dir", run) == 0
    assert "already holds" not in capsys.readouterr().err
    assert results(run)["steps"] == 22
