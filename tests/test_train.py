"""The core product (issue 2): zero-argument run, the explicit loop, launchers, data
sources, models, exact distributed metrics, outputs, trackers and bad input."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import train
from conftest import ROOT, events, results, run_cli, run_main, weights


def test_zero_argument_run_trains_digits_offline(tmp_path):
    proc = run_cli(cwd=tmp_path)  # `python train.py`, nothing else, HF_HUB_OFFLINE=1
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    res = results(run_dir)
    assert res["val_acc"] >= 0.97
    assert res["val_count"] == 360 and res["steps"] == 8 * (1437 // 64)
    for key in ("val_loss", "train_acc", "train_loss", "wall_time_s", "train_time_s",
                "images_per_s", "peak_rss_mb", "num_processes"):
        assert key in res
    assert res["num_processes"] == 1 and res["peak_rss_mb"] > 0
    epoch_lines = re.findall(r"^epoch (\d)/8  train loss [\d.]+ acc [\d.]+%  val loss [\d.]+ "
                             r"acc [\d.]+%  [\d.]+s  \d+ img/s", proc.stdout, re.M)
    assert epoch_lines == [str(i) for i in range(1, 9)]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["lr"] == 0.05 and config["config"]["momentum"] == 0.9
    assert config["config"]["epochs"] == 8 and config["config"]["optimizer"] == "sgd"
    assert config["num_processes"] == 1 and config["effective_batch_size"] == 64
    evals = [e for e in events(run_dir) if e["event"] == "eval"]
    assert [e["epoch"] for e in evals] == list(range(1, 9))
    assert evals[-1]["val_acc"] == res["val_acc"]
    assert (run_dir / "checkpoints").is_dir()


def test_model_file_rebuilds_model_and_preprocessing(tmp_path):
    assert run_main("--epochs", 1, "--output_dir", tmp_path / "run") == 0
    w, meta = train.read_weights(str(tmp_path / "run"))
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["image_size"] == [8, 8] and meta["channels"] == 1 and meta["model"] == "cnn"
    model = train.build_model(meta)
    model.load_state_dict(w)  # strict: every tensor accounted for
    assert run_main("--eval_only", "--weights", tmp_path / "run" / "model.safetensors",
                    "--output_dir", tmp_path / "eval") == 0
    assert results(tmp_path / "eval")["val_acc"] == results(tmp_path / "run")["val_acc"]
    assert results(tmp_path / "eval")["val_count"] == 360


def NoBatchNorm(*args) -> nn.Sequential:
    """The CNN with GroupNorm: BatchNorm's batch statistics differ between batch sizes."""
    model = train.cnn(*args)
    for i, layer in enumerate(model):
        if isinstance(layer, nn.BatchNorm2d):
            model[i] = nn.GroupNorm(4, layer.num_features)
    return model


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_accumulation_equals_larger_batch(tmp_path, monkeypatch, schedule):
    monkeypatch.setattr(train, "build_model", lambda meta, *a, **k: NoBatchNorm(
        meta["channels"], meta["num_classes"], min(meta["image_size"])))
    common = ["--epochs", 1, "--crop_padding", 0, "--schedule", schedule, "--keep_checkpoints", 1]
    assert run_main(*common, "--batch_size", 32, "--gradient_accumulation_steps", 2,
                    "--output_dir", tmp_path / "accum") == 0
    assert run_main(*common, "--batch_size", 64, "--output_dir", tmp_path / "big") == 0
    a, b = weights(tmp_path / "accum"), weights(tmp_path / "big")
    assert results(tmp_path / "accum")["steps"] == results(tmp_path / "big")["steps"] == 22
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # and the updates are not trivially equal: training moved the weights
    assert results(tmp_path / "big")["val_acc"] > 0.25  # chance is 0.1


def test_short_last_accumulation_group_is_a_full_mean(tmp_path, monkeypatch):
    """64 training images at batch 32 with 3 accumulation steps: each epoch is one short group
    of 2 micro-batches. Its update must equal one batch of 64 (Accelerate alone would scale
    it by 2/3)."""
    import datasets
    from conftest import digit_images
    monkeypatch.setattr(train, "build_model", lambda meta, *a, **k: NoBatchNorm(
        meta["channels"], meta["num_classes"], min(meta["image_size"])))
    items = digit_images(per_class=32, size=8)
    ds = datasets.Dataset.from_dict(
        {"image": [i for i, _ in items], "label": [c for _, c in items]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=["0", "1", "2"])}))
    path = tmp_path / "ds"
    ds = ds.shuffle(seed=0)  # every class in both splits
    datasets.DatasetDict({"train": ds.select(range(64)), "validation": ds.select(range(64, 96))}
                         ).save_to_disk(str(path))
    common = ["--dataset", path, "--epochs", 2, "--crop_padding", 0, "--schedule", "constant"]
    assert run_main(*common, "--batch_size", 32, "--gradient_accumulation_steps", 3,
                    "--output_dir", tmp_path / "accum") == 0
    assert run_main(*common, "--batch_size", 64, "--output_dir", tmp_path / "big") == 0
    assert results(tmp_path / "accum")["steps"] == results(tmp_path / "big")["steps"] == 2
    a, b = weights(tmp_path / "accum"), weights(tmp_path / "big")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("launcher", [
    "torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_two_processes_split_the_data_and_metrics_are_exact(tmp_path, launcher):
    # 360 validation images: not a multiple of 2 processes x 32 (the automatic batch: a global
    # 64 split over the processes), so the last batches are padded
    run = tmp_path / "run"
    proc = run_cli("--epochs", 2, "--mixed_precision", "no", "--output_dir", run,
                   nproc=2, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["num_processes"] == 2 and config["effective_batch_size"] == 64
    assert len(config["hostnames"]) == 2
    res = results(run)
    assert res["num_processes"] == 2 and res["steps"] == 2 * (1437 // 64)
    assert res["val_count"] == 360
    assert run_main("--eval_only", "--weights", run, "--output_dir", tmp_path / "eval1") == 0
    one = results(tmp_path / "eval1")
    assert one["val_count"] == 360
    assert one["val_acc"] == res["val_acc"]
    assert abs(one["val_loss"] - res["val_loss"]) < 1e-6
    # top-5, per-class accuracy and the confusion matrix: the same counts, every image once
    assert one["val_top5_acc"] == res["val_top5_acc"] and res["val_top5_acc"] >= res["val_acc"]
    assert one["val_confusion_matrix"] == res["val_confusion_matrix"]
    assert sum(map(sum, res["val_confusion_matrix"])) == 360
    diagonal = sum(res["val_confusion_matrix"][i][i] for i in range(10))
    assert diagonal == round(res["val_acc"] * 360)
    assert one["val_per_class_acc"] == res["val_per_class_acc"]
    assert list(res["val_per_class_acc"]) == [str(i) for i in range(10)]


def test_data_sources_image_folder_with_splits(tmp_path, image_folder):
    assert run_main("--dataset", image_folder, "--epochs", 6, "--batch_size", 16,
                    "--output_dir", tmp_path / "r") == 0
    res, meta = results(tmp_path / "r"), train.read_weights(str(tmp_path / "r"))[1]
    assert res["val_count"] == 30  # the validation/ folder, not a held-out split
    assert meta["class_names"] == ["digit0", "digit1", "digit2"]
    assert meta["channels"] == 1 and meta["image_size"] == [16, 16]  # first image: grayscale
    assert res["val_acc"] > 0.6


def test_data_sources_flat_folder_gets_stratified_split(tmp_path, flat_folder):
    assert run_main("--dataset", flat_folder, "--epochs", 2, "--batch_size", 8,
                    "--val_fraction", 0.3, "--image_size", 20, "--model", "resnet18",
                    "--output_dir", tmp_path / "r") == 0
    res, meta = results(tmp_path / "r"), train.read_weights(str(tmp_path / "r"))[1]
    assert res["val_count"] == 27  # 30% of 90, 9 per class
    assert meta["image_size"] == [20, 20] and meta["channels"] == 3  # torchvision takes RGB
    assert meta["model"] == "resnet18" and meta["num_classes"] == 3


def test_data_sources_save_to_disk_with_named_columns(tmp_path, saved_dataset):
    args = ["--dataset", saved_dataset, "--epochs", 1, "--batch_size", 8]
    assert run_main(*args, "--output_dir", tmp_path / "a") == 2  # no Image column found
    assert run_main(*args, "--image_column", "pixels", "--label_column", "digit",
                    "--output_dir", tmp_path / "b") == 0
    res, meta = results(tmp_path / "b"), train.read_weights(str(tmp_path / "b"))[1]
    assert res["val_count"] == 30  # the saved "test" split
    assert meta["class_names"] == ["0", "1", "2"]


def test_validation_classes_are_matched_by_name(tmp_path):
    import datasets
    from conftest import digit_images
    items = digit_images(per_class=20, size=8)
    names = ["zero", "one", "two"]
    feats = datasets.Features({"image": datasets.Image(),
                              "label": datasets.ClassLabel(names=names)})
    train_ds = datasets.Dataset.from_dict({"image": [i for i, _ in items],
                                           "label": [c for _, c in items]}, features=feats)
    # the validation split lists its classes in another order and lacks "one"
    val_items = [(i, c) for i, c in items if c != 1][::2]
    val_feats = datasets.Features({"image": datasets.Image(),
                                   "label": datasets.ClassLabel(names=["two", "zero"])})
    val_ds = datasets.Dataset.from_dict(
        {"image": [i for i, _ in val_items],
         "label": [{0: 1, 2: 0}[c] for _, c in val_items]}, features=val_feats)
    path = tmp_path / "ds"
    datasets.DatasetDict({"train": train_ds, "validation": val_ds}).save_to_disk(str(path))
    splits = train.load_splits(train.Config(dataset=str(path)), None)
    val_split, label = splits.val, splits.label_col
    assert val_split.features[label].names == names
    assert val_split[label] == [c for _, c in val_items]  # "zero" -> 0, "two" -> 2
    assert run_main("--dataset", path, "--epochs", 6, "--batch_size", 8, "--lr", 0.02,
                    "--output_dir", tmp_path / "r") == 0
    assert results(tmp_path / "r")["val_acc"] > 0.8


def test_accelerates_per_step_lookups_are_answered_once(tmp_path):
    """The README's claim: is_lomo_available() (twice per optimizer.step()) and
    inspect.signature(zero_grad) (every zero_grad()) are cached, and training still works."""
    import accelerate.optimizer as accelerate_optimizer
    assert run_main("--epochs", 2, "--output_dir", tmp_path) == 0
    assert accelerate_optimizer.is_lomo_available.cache_info().hits >= 2 * 44 - 1
    assert accelerate_optimizer.inspect.signature.cache_info().hits >= 44 - 1
    assert results(tmp_path)["val_acc"] > 0.5  # chance is 0.1


def test_optimizer_schedule_and_options(tmp_path):
    assert run_main("--epochs", 2, "--optimizer", "adamw", "--lr", 0.003, "--weight_decay", 0.05,
                    "--label_smoothing", 0.1, "--schedule", "onecycle", "--max_grad_norm", 1.0,
                    "--log_every", 4, "--output_dir", tmp_path / "r") == 0
    logged = [e for e in events(tmp_path / "r") if e["event"] == "train"]
    assert [e["step"] for e in logged] == list(range(4, 44, 4))  # 44: the epoch line instead
    lrs = [e["lr"] for e in logged]
    assert max(lrs) <= 0.003 and lrs[0] < max(lrs) and lrs[-1] < max(lrs)
    assert results(tmp_path / "r")["val_acc"] > 0.8


def test_lr_schedule_is_a_function_of_the_step():
    cfg = train.Config(lr=0.1, schedule="cosine", warmup_steps=10)
    lrs = [train.lr_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    one = train.Config(lr=1.0, schedule="onecycle")
    assert train.lr_at(24, 100, one) == pytest.approx(1.0)  # peak at 25%
    assert train.lr_at(99, 100, one) == pytest.approx(1 / 75 * 1)


def test_tensorboard_scalars_are_written_and_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert run_main("--epochs", 2, "--report_to", "tensorboard", "--output_dir", tmp_path) == 0
    acc = EventAccumulator(str(tmp_path / "tensorboard"))  # hparams go to a subfolder
    acc.Reload()
    val = acc.Scalars("eval/val_acc")
    assert [v.step for v in val] == [22, 44]
    assert val[-1].value == pytest.approx(results(tmp_path)["val_acc"], abs=1e-6)


def test_refuses_to_overwrite_another_run(tmp_path):
    assert run_main("--epochs", 1, "--output_dir", tmp_path) == 0
    before = weights(tmp_path)
    assert run_main("--epochs", 1, "--output_dir", tmp_path) == 2  # finished run there
    assert run_main("--epochs", 1, "--seed", 1, "--resume", "none", "--output_dir", tmp_path) == 2
    after = weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert run_main("--epochs", 1, "--seed", 1, "--overwrite", "--output_dir", tmp_path) == 0
    assert json.loads((tmp_path / "config.json").read_text())["config"]["seed"] == 1


BAD_INPUTS = [
    (["--dataset", "/no/such/dir"], "no such directory"),
    (["--dataset", "someone/not-cached"], "HF_HUB_OFFLINE"),
    (["--model", "resnet19"], "did you mean resnet18"),
    (["--model", "inception_v3"], "cannot take 3x8x8 images"),
    (["--batch_size", "-1"], "--batch_size must be >= 0"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--mixed_precision", "fp16", "--cpu"], "fp16 needs a GPU"),
    (["--batch_size", "5000"], "lower --batch_size"),
    (["--stop_signals", "USR9"], "unknown signal"),
    (["--eval_only"], "--eval_only needs --weights"),
    (["--report_to", "wandb"], "pip install wandb"),
    (["--val_fraction", "1.5"], "--val_fraction must be between 0 and 1"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_gets_a_clear_message(tmp_path, capsys, args, message):
    assert run_main(*args, "--output_dir", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2


def test_bad_data_gets_a_clear_message(tmp_path, capsys, image_folder, saved_dataset):
    import shutil
    corrupt = tmp_path / "corrupt"
    shutil.copytree(image_folder, corrupt)
    bad = corrupt / "train" / "digit1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    empty = tmp_path / "empty"  # a validation/ folder without images
    shutil.copytree(image_folder / "train", empty / "train")
    (empty / "validation" / "digit0").mkdir(parents=True)
    (empty / "validation" / "digit0" / "notes.txt").write_text("no images here")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["--dataset", corrupt, "--data_mode", "memory"], "broken.png"),
        (["--dataset", corrupt, "--data_mode", "stream", "--num_workers", 1], "broken.png"),
        (["--dataset", empty], "validation holds no images"),
        (["--dataset", saved_dataset, "--image_column", "pixels"], "no ClassLabel column"),
        (["--dataset", saved_dataset, "--image_column", "nope"], "no such column"),
        (["--dataset", a_file], "is a file"),
        (["--output_dir", a_file / "sub"], "cannot write to --output_dir"),
    ]
    for args, message in cases:
        out = args[-1] if args[0] == "--output_dir" else tmp_path / "out"
        code = run_main(*args, "--epochs", 1, "--batch_size", 8, "--output_dir", out,
                        "--overwrite")
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err, (args, err)


def test_offline_hub_id_fails_fast_without_traceback(tmp_path):
    proc = run_cli("--dataset", "uoft-cs/cifar10", "--output_dir", tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "not in the local Hub cache" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_every_option_with_its_default():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for f in train.Config.__dataclass_fields__:
        assert f"--{f}" in proc.stdout
    assert "(default: 0.05)" in proc.stdout and "(default: 8)" in proc.stdout


def test_import_is_cheap_and_side_effect_free(tmp_path):
    import subprocess
    import sys
    code = "import os, train; print(sorted(os.listdir('.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path):
    """A tqdm bar with loss and accuracy when stderr is a terminal (here: a pseudo-terminal
    made by `script`), periodic plain lines in a log file."""
    import shlex
    import subprocess
    import sys
    cmd = f"stty cols 120 rows 40; {shlex.quote(sys.executable)} {ROOT / 'train.py'} " \
          f"--epochs 1 --log_every 4 --output_dir {tmp_path / 'tty'}"  # 0 columns: no bar
    tty = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                         timeout=120)
    assert tty.returncode == 0, tty.stdout[-2000:]
    assert re.search(r"epoch 1/1: .*/22 \[.*it/s, acc=[\d.]+%, loss=[\d.]+\]", tty.stdout)
    plain = run_cli("--epochs", 1, "--log_every", 4, "--output_dir", tmp_path / "log")
    assert plain.returncode == 0
    assert re.search(r"^epoch 1 step 4/22  loss [\d.]+ acc [\d.]+%", plain.stdout, re.M)
    assert "it/s" not in plain.stdout + plain.stderr
