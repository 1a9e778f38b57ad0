"""Fast by default (issue 5): two input paths with one meaning, the speed knobs, and the
numbers that results.json reports."""
from __future__ import annotations

import json

import pytest
import torch

import train
from conftest import assert_same_weights, results, run_cli, run_main, weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memory_and_stream_train_the_same_model(tmp_path, capsys, seed):
    common = ["--epochs", 3, "--seed", seed, "--keep_checkpoints", 1]
    assert run_main(*common, "--data_mode", "memory", "--output_dir", tmp_path / "m") == 0
    assert run_main(*common, "--data_mode", "stream", "--num_workers", 1,
                    "--output_dir", tmp_path / "s") == 0
    m, s = results(tmp_path / "m"), results(tmp_path / "s")
    assert m["data_mode"] == "memory" and s["data_mode"] == "stream"
    # Same decoded bytes, same order, same augmentation on the device: the same model.
    assert_same_weights(tmp_path / "m", tmp_path / "s")
    assert m["val_acc"] == s["val_acc"] and m["val_acc"] > 0.9


def test_auto_mode_follows_the_memory_budget(tmp_path, capsys):
    assert run_main("--epochs", 1, "--output_dir", tmp_path / "a") == 0
    assert "data: memory mode" in capsys.readouterr().out
    assert run_main("--epochs", 1, "--memory_budget_gb", 1e-5, "--num_workers", 0,
                    "--cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "b") == 0
    assert "data: cache mode" in capsys.readouterr().out  # stream without room: test_cache.py
    assert results(tmp_path / "b")["data_mode"] == "cache"


def test_batch_augmentation_crops_and_flips_per_image():
    images = torch.arange(1, 2 * 3 * 4 * 5 + 1, dtype=torch.uint8).view(2, 3, 4, 5)
    images = images.repeat(100, 1, 1, 1)
    out = train.augment(images, 1, True, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    # Each output is exactly one of the 9 zero-padded shifts of its input, mirrored or not,
    # the same for all channels; all 18 choices occur over 200 images.
    seen = set()
    for o, i in zip(out, images):
        padded = torch.nn.functional.pad(i, (1, 1, 1, 1))
        match = [(dy, dx, f) for dy in range(3) for dx in range(3) for f in (0, 1)
                 if torch.equal(o, (padded.flip(2) if f else padded)[:, dy:dy + 4, dx:dx + 5])]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 18
    flipped = train.augment(images, 0, True, torch.Generator().manual_seed(0))
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(2)) for f, i in zip(flipped, images))
    assert 70 < sum(torch.equal(f, i.flip(2)) for f, i in zip(flipped, images)) < 130
    assert torch.equal(train.augment(images, 0, False, torch.Generator()), images)


@pytest.mark.parametrize("flags", [
    ["--channels_last"],
    ["--mixed_precision", "bf16"],
    ["--num_workers", 2, "--data_mode", "stream"],
    ["--compile"],
], ids=lambda f: " ".join(map(str, f)))
def test_speed_knobs_run_on_cpu(tmp_path, flags):
    assert run_main("--epochs", 1, *flags, "--output_dir", tmp_path) == 0
    res = results(tmp_path)
    assert res["val_acc"] > 0.2 and res["steps"] == 22
    config = json.loads((tmp_path / "config.json").read_text())
    if "bf16" in flags:
        assert config["mixed_precision"] == "bf16"
    # the weights load as they are written: --compile saved `_orig_mod.` names before
    assert not [k for k in weights(tmp_path) if "_orig_mod" in k]
    assert run_main("--eval_only", "--weights", tmp_path, "--output_dir", tmp_path / "e") == 0


def test_throughput_and_memory_are_reported(tmp_path):
    # its own process: peak RSS in a pytest worker is the worker's peak over earlier tests
    proc = run_cli("--epochs", 2, "--output_dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(tmp_path)
    assert res["images_per_s"] > 0 and res["images_per_s_per_process"] == res["images_per_s"]
    # ~900 MB here; peak RSS counts the pages of torch's mapped libraries that are resident,
    # which depends on what else has them in the page cache (2,290 MB once, on a busy machine)
    assert 100 < res["peak_rss_mb"] < 4000
    assert res["train_time_s"] < res["wall_time_s"]
    # images/s is what the steps processed in the training time
    assert res["images_per_s"] == pytest.approx(2 * 22 * 64 / res["train_time_s"], rel=0.01)
