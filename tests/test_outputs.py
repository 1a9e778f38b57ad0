"""What a run leaves behind and says: model_best.safetensors and results.json's best_val_acc and
best_epoch, pruning a finished run's checkpoints to the newest one, --freeze_backbone keeping
BatchNorm statistics as loaded, --predict's wording about skipped files, and --help's wording."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import digit_images, events, results, run_cli, run_main, weights

# Digits, 3 epochs of 22 steps (66), a checkpoint every 5 steps and at every epoch end. A constant
# learning rate of 0.3 makes the validation accuracy peak before the last epoch (96.67% at
# epoch 2, then 96.11%), so that the best weights and the final ones differ here.
ARGS = ["--epochs", 3, "--checkpoint_every", 5, "--schedule", "constant", "--lr", 0.3]


def step_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def every_checkpoint(run: Path) -> list[str]:
    """The checkpoint names such a run writes: every 5th step and every epoch's last step."""
    steps = {s for s in range(5, results(run)["steps"] + 1, 5)}
    steps |= {e["step"] for e in events(run) if e["event"] == "eval"}
    return sorted(f"step_{s:08d}" for s in steps)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """The shared run: ARGS with the default --keep_checkpoints."""
    run = tmp_path_factory.mktemp("digits") / "run"
    assert run_main(*ARGS, "--output_dir", run) == 0
    return run


def test_model_best_holds_the_best_evaluation_and_results_name_it(tmp_path, digits_run):
    """best_epoch is the first epoch with the highest val_acc; model_best.safetensors, evaluated
    on the same validation split, gives best_val_acc exactly, the final weights the last one."""
    evals = [e for e in events(digits_run) if e["event"] == "eval"]
    accs = [e["val_acc"] for e in evals]
    assert [e["epoch"] for e in evals] == [1, 2, 3]
    best = accs.index(max(accs))
    r = results(digits_run)
    assert r["best_epoch"] == evals[best]["epoch"]
    assert r["best_val_acc"] == accs[best] and r["val_acc"] == accs[-1]
    assert (digits_run / "model_best.safetensors").is_file()
    best_w = load_file(str(digits_run / "model_best.safetensors"))
    final_w = weights(digits_run)
    assert best_w.keys() == final_w.keys()
    # the best weights are the final ones only when the last epoch was the best (on these
    # machines this run peaks at epoch 2; another CPU kind's rounding may move the peak)
    same = all(torch.equal(best_w[k], final_w[k]) for k in best_w)
    assert same == (r["best_epoch"] == 3), (accs, same)

    assert run_main("--eval_only", "--weights", digits_run / "model_best.safetensors",
                    "--output_dir", tmp_path / "best") == 0
    evaluated = results(tmp_path / "best")
    assert evaluated["evaluated"] == "the validation split of the training data"
    assert evaluated["val_count"] == r["val_count"] == 360
    assert evaluated["val_acc"] == r["best_val_acc"]
    assert run_main("--eval_only", "--weights", digits_run,
                    "--output_dir", tmp_path / "final") == 0
    assert results(tmp_path / "final")["val_acc"] == accs[-1] == r["val_acc"]


def test_finished_run_keeps_only_its_newest_checkpoint_unless_told(tmp_path, digits_run):
    """Without --keep_checkpoints only the newest checkpoint (the last step's) is left; with
    --keep_checkpoints 3 the newest 3, with --keep_checkpoints 0 every one written."""
    steps = results(digits_run)["steps"]
    assert steps == 66
    assert step_dirs(digits_run) == [f"step_{steps:08d}"]

    assert run_main(*ARGS, "--keep_checkpoints", 3, "--output_dir", tmp_path / "three") == 0
    written = every_checkpoint(tmp_path / "three")
    assert len(written) == 16  # 13 multiples of 5 and the ends of epochs 1-3 (22, 44, 66)
    assert step_dirs(tmp_path / "three") == written[-3:] == [
        "step_00000060", "step_00000065", "step_00000066"]

    assert run_main(*ARGS, "--keep_checkpoints", 0, "--output_dir", tmp_path / "all") == 0
    assert step_dirs(tmp_path / "all") == every_checkpoint(tmp_path / "all") == written


def test_freeze_backbone_keeps_batchnorm_statistics_as_loaded(tmp_path, flat_folder,
                                                              image_folder):
    """Fine-tuning a resnet18 with --freeze_backbone on other images changes only fc: every
    other tensor of the state dict, BatchNorm's running_mean, running_var and
    num_batches_tracked included, is bit for bit the one --init_from loaded (neither training
    nor PreciseBN's recomputation on the new images moves them). Both are small folders of
    3 digits: a resnet18 run of seconds."""
    common = ["--model", "resnet18", "--image_size", 16, "--epochs", 1]
    assert run_main(*common, "--dataset", flat_folder, "--output_dir", tmp_path / "first") == 0
    assert run_main(*common, "--dataset", image_folder, "--init_from", tmp_path / "first",
                    "--freeze_backbone", "--output_dir", tmp_path / "tuned") == 0
    first, tuned = weights(tmp_path / "first"), weights(tmp_path / "tuned")
    assert first.keys() == tuned.keys()
    buffers = [k for k in first if k.endswith(("running_mean", "running_var",
                                               "num_batches_tracked"))]
    assert len(buffers) == 3 * 20  # resnet18's 20 BatchNorm layers
    assert first["bn1.num_batches_tracked"].item() > 0  # trained statistics were loaded
    changed = [k for k in first if k not in ("fc.weight", "fc.bias")
               and not torch.equal(first[k], tuned[k])]
    assert changed == []
    assert not torch.equal(first["fc.weight"], tuned["fc.weight"])


def test_predict_names_skipped_files_and_counts_in_the_singular(tmp_path, capsys, digits_run):
    """A folder of one PNG and two other files: a note that 2 files were skipped, "predicted
    1 image;" and one row in predictions.csv."""
    folder = tmp_path / "new"
    folder.mkdir()
    digit_images(classes=1, per_class=1, size=8)[0][0].save(folder / "zero.png")
    (folder / "readme.txt").write_text("scanned on Monday\n")
    (folder / "notes.csv").write_text("file,comment\nzero.png,smudged\n")
    capsys.readouterr()
    assert run_main("--predict", folder, "--weights", digits_run,
                    "--output_dir", tmp_path / "p") == 0
    out = capsys.readouterr().out
    assert "note: skipped 2 files that are not images" in out
    assert "predicted 1 image;" in out
    with open(tmp_path / "p" / "predictions.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header[0] == "file" and len(rows) == 1
    assert rows[0][0].endswith("zero.png")


def test_help_wording():
    """--help says any torchvision classifier works, that 0.999 is a typical EMA decay, and
    that --freeze_backbone freezes BatchNorm statistics."""
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines at the terminal's width
    assert "any torchvision classifier" in text
    assert "0.999 is typical" in text
    assert "BatchNorm stats frozen" in text


def test_pictures_are_drawn_and_sent_to_tensorboard(tmp_path):
    """curves.png (1000x400) and confusion.png are real pictures, not blank, and reach
    tensorboard as images."""
    import numpy as np
    import PIL.Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    assert run_main("--epochs", 2, "--report_to", "tensorboard", "--output_dir", run) == 0
    with PIL.Image.open(run / "curves.png") as im:
        assert im.size == (1000, 400)
        curves = np.asarray(im.convert("L"))
    with PIL.Image.open(run / "confusion.png") as im:
        assert min(im.size) >= 300 and im.size[0] == im.size[1]
        confusion = np.asarray(im.convert("RGB"))
    assert (curves < 128).mean() > 0.01 and (curves > 200).mean() > 0.5  # lines on white
    blue = (confusion[..., 2].astype(int) - confusion[..., 0]) > 80  # the diagonal's cells
    assert blue.mean() > 0.02, blue.mean()
    logs = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*"))))
    logs.Reload()
    assert {"curves", "confusion"} <= set(logs.Tags()["images"]), logs.Tags()


@pytest.mark.slow
def test_accelerate_launch_uses_the_cores_when_the_launcher_chose_one_thread(tmp_path):
    """`accelerate launch` sets OMP_NUM_THREADS=1 when the user set nothing: train.py then
    takes the cores per local process (config.json records it); a value the user gave to
    the launcher stands."""
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT
    cores = len(os.sched_getaffinity(0))

    def launch(run: Path, **env) -> dict:
        base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch",
                              "--num_processes", "1", str(ROOT / "train.py"), "--epochs", "1",
                              "--log_every", "0", "--output_dir", str(run)],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env={**base, **env})
        assert out.returncode == 0, out.stderr[-3000:]
        return {"threads": json.loads((run / "config.json").read_text())["resolved"]["threads"],
                "out": out.stdout}

    chosen = launch(tmp_path / "auto")
    assert chosen["threads"] == cores, chosen
    note = f"the launcher set OMP_NUM_THREADS=1: {cores} threads per process"
    assert (note in chosen["out"]) == (cores > 1), chosen["out"][-2000:]  # 1 core: no change
    assert launch(tmp_path / "given", OMP_NUM_THREADS="1")["threads"] == 1
