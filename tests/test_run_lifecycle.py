"""A run's life as users live it: flags changed between a stop and its resume, another
optimizer, a shorter --epochs, a branch from another run's checkpoint, the advice printed on a
stop without --output_dir, --eval_only into a training run's directory, a disk that fills while
the weights are written, weights that are no longer finite under --nan_policy skip, and the
same folder spelled another way. Each was silently wrong or a traceback before."""
from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

import train
from conftest import mount_tmpfs, results, run_main, weights

SHORT = ["--epochs", 2, "--checkpoint_every", 30, "--keep_checkpoints", 0, "--num_workers", 0]


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Path:
    """Digits, 2 epochs of 22 steps: checkpoints at steps 22 (epoch end), 30 and 44."""
    run = tmp_path_factory.mktemp("lifecycle") / "first"
    assert run_main(*SHORT, "--output_dir", run) == 0
    assert [p.name for p in train.checkpoints(run)] == [
        "step_00000044", "step_00000030", "step_00000022"]
    return run


def branch(first: Path, to: Path, *flags) -> int:
    """A longer run (3 epochs) from the first run's last checkpoint (epoch 1 evaluated, the best
    so far), in a new directory."""
    return run_main(*SHORT[2:], "--epochs", 3, "--resume",
                    first / "checkpoints" / "step_00000044", "--output_dir", to, *flags)


def test_changed_optimizer_settings_take_effect_on_resume(tmp_path, first, capsys):
    """--momentum, --weight_decay, --head_lr_scale changed on a resume were recorded in
    config.json (and printed as changed), but load_state put the checkpoint's values back: the
    weights were bit-identical to an unchanged resume."""
    assert branch(first, tmp_path / "same") == 0
    out = capsys.readouterr().out
    # a branch has no model_best of its own: the best is chosen from its own evaluations
    assert "holds no model_best.safetensors" in out, out
    best = results(tmp_path / "same")
    assert best["best_epoch"] in (2, 3) and (tmp_path / "same" / "model_best.safetensors").exists()
    same = weights(tmp_path / "same")
    for flag, value in (("--momentum", 0.5), ("--weight_decay", 0.01), ("--head_lr_scale", 3)):
        run = tmp_path / flag.strip("-")
        assert branch(first, run, flag, value) == 0
        changed = weights(run)
        assert any(not torch.equal(same[k], changed[k]) for k in same), flag


def test_another_optimizer_or_a_shorter_run_is_refused(tmp_path, first, capsys):
    code = branch(first, tmp_path / "adamw", "--optimizer", "adamw")  # a KeyError before
    err = capsys.readouterr().err
    assert code == 2 and "optimizer was 'sgd', now 'adamw'" in err, err
    code = run_main(*SHORT[2:], "--epochs", 1, "--resume",
                    first / "checkpoints" / "step_00000030", "--output_dir", tmp_path / "short")
    err = capsys.readouterr().err  # it trained nothing and reported epoch 1 for step-30 weights
    assert code == 2 and "is in epoch 2, past --epochs 1: pass --epochs 2 or more" in err, err
    assert not (tmp_path / "short" / "results.json").exists()


class StopAt:
    """cross_entropy that sends this process SIGTERM on its n-th training call."""

    def __init__(self, n: int):
        self.n, self.calls, self.real = n, 0, torch.nn.functional.cross_entropy

    def __call__(self, logits, labels, **kw):
        if kw.get("reduction", "mean") == "mean":
            self.calls += 1
            if self.calls == self.n:
                os.kill(os.getpid(), signal.SIGTERM)
        return self.real(logits, labels, **kw)


def test_a_stop_without_output_dir_names_the_directory_to_resume(tmp_path, monkeypatch,
                                                                  capsys):
    """'the same command resumes' started a new runs/<date>-<time>-cnn instead."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.F, "cross_entropy", StopAt(5))
    assert run_main("--epochs", 1, "--num_workers", 0) == train.EXIT_PREEMPTED
    out = capsys.readouterr().out
    found = re.search(r"exit 75, the same command with --output_dir (runs/\S+) resumes", out)
    assert found, out
    monkeypatch.undo()
    assert run_main("--epochs", 1, "--num_workers", 0, "--output_dir", tmp_path / found[1]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert results(tmp_path / found[1])["steps"] == 22


def test_eval_only_into_a_training_runs_directory_is_refused(tmp_path, first, capsys):
    """results.json written there made a stopped run look finished."""
    stopped = tmp_path / "stopped"
    shutil.copytree(first / "checkpoints", stopped / "checkpoints")
    code = run_main("--eval_only", "--weights", first, "--output_dir", stopped)
    err = capsys.readouterr().err
    assert code == 2 and "holds a training run" in err, err
    assert sorted(os.listdir(stopped)) == ["checkpoints"]


def test_a_disk_that_fills_while_weights_are_written_is_an_os_error(tmp_path):
    """safetensors reports it as SafetensorError ('os error 28'): a traceback, exit 1."""
    from test_attacks import fill, unmount
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "64k")
    try:
        fill(disk)
        with pytest.raises(OSError) as raised:
            train.save_tensors({"w": torch.zeros(50_000)}, disk / "model.safetensors")
    finally:
        unmount(disk)
    assert raised.value.errno == 28 and raised.value.filename.endswith("model.safetensors.tmp")


def test_a_model_that_diverged_stops_the_run(tmp_path, capsys):
    """--nan_policy skip with --lr 1e30: after the first update every step was skipped, and the
    run said 'done' with NaN in results.json (not JSON), exit 0."""
    code = run_main("--epochs", 1, "--lr", 1e30, "--nan_policy", "skip", "--num_workers", 0,
                    "--output_dir", tmp_path)
    err = capsys.readouterr().err
    assert code == 1 and "the validation loss is not finite after epoch 1 (21 steps" in err, err
    assert not (tmp_path / "results.json").exists()


def test_the_same_folder_spelled_another_way_resumes(tmp_path, flat_folder, capsys):
    """'belongs to a different run: dataset was '.../flat', now '.../flat/''."""
    run = tmp_path / "run"
    args = ["--epochs", 2, "--checkpoint_every", 3, "--num_workers", 0, "--output_dir", run]
    assert run_main("--dataset", flat_folder, *args) == 0
    (run / "results.json").unlink()  # as if stopped after its last checkpoint
    assert run_main("--dataset", f"{flat_folder}/", *args) == 0
    assert "resumed from" in capsys.readouterr().out
