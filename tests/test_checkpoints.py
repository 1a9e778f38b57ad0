"""Never lose a run (issue 3): crash-safe checkpoints, bit-exact resume after kill -9 at
chosen points, preemption by signals, refusals, non-finite losses."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

import train
from conftest import (ROOT, assert_same_weights, events, launch_cmd, results, run_cli,
                      run_main)

# 3 epochs x 22 steps; checkpoints every 5 steps and at epoch ends (22, 44, 66).
ARGS = ["--epochs", 3, "--checkpoint_every", 5, "--log_every", 1, "--keep_checkpoints", 2]
ARGS2 = ["--epochs", 3, "--checkpoint_every", 4, "--log_every", 1, "--mixed_precision", "no",
         "--batch_size", 64]  # per process: 11 steps an epoch with 2 processes


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref1") / "run"
    proc = run_cli(*ARGS, "--output_dir", run)
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture(scope="module")
def reference2(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref2") / "run"
    proc = run_cli(*ARGS2, "--output_dir", run, nproc=2, launcher="torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def start(args, nproc=1) -> subprocess.Popen:
    return subprocess.Popen(launch_cmd(nproc, "torchrun" if nproc > 1 else "python")
                            + [str(a) for a in args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, step: int) -> str:
    """Reads the run's output until it logs optimizer step `step` (or more)."""
    seen = ""
    for line in proc.stdout:
        seen += line
        m = re.search(r" step (\d+)/", line)
        if m and int(m.group(1)) >= step:
            return seen
    raise AssertionError(f"the run ended before step {step}:\n{seen[-3000:]}")


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (workers run in their own sessions)."""
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    proc.stdout.close()


def finish(args, nproc=1) -> subprocess.CompletedProcess:
    proc = run_cli(*args, nproc=nproc, launcher="torchrun" if nproc > 1 else "python")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def assert_clean_metrics(run: Path, total_steps: int) -> None:
    for kind in ("train", "eval"):
        steps = [e["step"] for e in events(run) if e["event"] == kind]
        assert steps == sorted(set(steps)), f"{kind} steps out of order or duplicated: {steps}"
    assert [e["epoch"] for e in events(run) if e["event"] == "eval"] == [1, 2, 3]
    assert max(e["step"] for e in events(run)) == total_steps


def test_kill9_at_several_points_then_resume_is_bit_exact(tmp_path, reference):
    run = tmp_path / "run"
    args = [*ARGS, "--output_dir", run]
    for step in (7, 22, 31):  # mid-epoch, an epoch boundary, right after a checkpoint (30)
        proc = start(args)
        wait_for_step(proc, step)
        kill9(proc)
    # and once in the middle of writing a checkpoint
    proc = start(args)
    tmp_dirs = run / "checkpoints"
    deadline = time.time() + 60
    while not list(tmp_dirs.glob(".tmp_step_*")) and time.time() < deadline:
        time.sleep(0.0005)
    kill9(proc)
    out = finish(args).stdout
    assert "resumed from" in out
    assert_same_weights(run, reference)
    assert results(run)["val_acc"] == results(reference)["val_acc"]
    assert results(run)["train_acc"] == pytest.approx(results(reference)["train_acc"], abs=1e-12)
    assert_clean_metrics(run, 66)
    assert not list(tmp_dirs.glob(".tmp_step_*"))
    assert len(train.checkpoints(run)) == 2  # --keep_checkpoints 2


@pytest.mark.slow
def test_kill9_two_processes_then_resume_is_bit_exact(tmp_path, reference2):
    run = tmp_path / "run"
    args = [*ARGS2, "--output_dir", run]
    proc = start(args, nproc=2)
    wait_for_step(proc, 13)  # mid-epoch (11 steps per epoch with 2 processes)
    kill9(proc)
    finish(args, nproc=2)
    assert_same_weights(run, reference2)
    assert_clean_metrics(run, 33)
    assert results(run)["val_acc"] == results(reference2)["val_acc"]


@pytest.mark.slow
def test_signal_to_one_process_stops_all_at_the_same_step(tmp_path, reference2):
    run = tmp_path / "run"
    args = [*ARGS2, "--output_dir", run]
    proc = start(args, nproc=2)
    wait_for_step(proc, 6)
    workers = psutil.Process(proc.pid).children(recursive=True)
    # rank 1 only (chosen by its environment: pids may wrap, so their order says nothing);
    # rank 0, which prints, learns of it through the per-step collective
    worker = next(w for w in workers if "train.py" in " ".join(w.cmdline())
                  and w.environ().get("RANK") == "1")
    os.kill(worker.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    # torchrun reports a worker's exit code 75 as 1: the message and the checkpoint tell
    found = re.search(r"stopped by a signal to another process at step (\d+)", out)
    assert found, out[-3000:]
    step = int(found.group(1))
    assert (run / "checkpoints" / f"step_{step:08d}").is_dir()
    assert "results.json" not in os.listdir(run)
    finish(args, nproc=2)
    assert_same_weights(run, reference2)


@pytest.mark.parametrize("signame", [pytest.param(name, marks=pytest.mark.slow) for name in
                                     ("SIGUSR1", "SIGINT")] + ["SIGTERM"])  # one by default
def test_signal_saves_checkpoint_and_exits_75_then_resumes(tmp_path, reference, signame):
    run = tmp_path / "run"
    args = [*ARGS, "--output_dir", run]
    proc = start(args)
    wait_for_step(proc, 12)
    proc.send_signal(getattr(signal, signame))
    if signame == "SIGTERM":  # a second signal while it saves changes nothing
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == train.EXIT_PREEMPTED, out[-2000:]
    step = int(re.search(rf"stopped by {signame} at step (\d+)", out).group(1))
    newest = train.checkpoints(run)[0]
    assert newest.name == f"step_{step:08d}" and train.checkpoint_ok(newest)[0]
    state = json.loads((newest / "loop_state.json").read_text())["loop"]
    assert state["step"] == step and state["batch"] == step % 22
    finish(args)
    assert_same_weights(run, reference)
    assert_clean_metrics(run, 66)


def test_damaged_checkpoints_fall_back_or_refuse(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--epochs", 2, "--checkpoint_every", 5, "--keep_checkpoints", 0,
            "--output_dir", run]
    assert run_main(*args) == 0
    (run / "results.json").unlink()  # pretend it was killed after the last checkpoint
    (run / "model.safetensors").unlink()
    newest, older = train.checkpoints(run)[:2]
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])  # truncated
    # a half-written checkpoint from a kill during a save is never picked
    (run / "checkpoints" / ".tmp_step_00000099").mkdir()
    capsys.readouterr()
    assert run_main("--resume", newest, *args) == 2  # explicit: refuse
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert run_main(*args) == 0  # auto: warn and take the previous complete one
    out = capsys.readouterr().out
    assert f"skipping damaged checkpoint {newest}" in out
    assert f"resumed from {older}" in out


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(tmp_path, capsys, reference2):
    run = tmp_path / "run"
    assert run_main("--epochs", 1, "--checkpoint_every", 5, "--output_dir", run) == 0
    (run / "results.json").unlink()
    for args, what in ((["--model", "resnet18"], "model was 'cnn', now 'resnet18'"),
                       (["--batch_size", 32], "batch_size was 64, now 32"),
                       (["--dataset", ROOT / "tests"], "no image files")):
        assert run_main("--epochs", 1, "--output_dir", run, *args) == 2
        assert what in capsys.readouterr().err
    # a checkpoint written by 2 processes is refused by 1
    ckpt = train.checkpoints(reference2)[0]
    assert run_main(*ARGS2, "--resume", ckpt, "--output_dir", tmp_path / "other") == 2
    assert "num_processes was 2, now 1" in capsys.readouterr().err


def test_resume_none_refuses_to_destroy_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main("--epochs", 1, "--output_dir", run) == 0
    (run / "results.json").unlink()
    (run / "model.safetensors").unlink()
    before = sorted(p.name for p in train.checkpoints(run))
    assert run_main("--epochs", 1, "--resume", "none", "--output_dir", run) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in train.checkpoints(run)) == before


def test_nothing_of_ours_is_pickled(tmp_path):
    assert run_main("--epochs", 1, "--output_dir", tmp_path) == 0
    ckpt = train.checkpoints(tmp_path)[0]
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["loop_state.json", "model.safetensors", "optimizer.bin",
                     "random_states_0.pkl"]
    for name in ("optimizer.bin", "random_states_0.pkl"):  # Accelerate's, safe to load
        from accelerate.utils import load
        assert load(ckpt / name) is not None  # weights_only=True inside


class NaNAt:
    """cross_entropy that returns NaN on its n-th training call."""

    def __init__(self, n: int):
        self.n, self.calls, self.real = n, 0, torch.nn.functional.cross_entropy

    def __call__(self, logits, labels, **kw):
        loss = self.real(logits, labels, **kw)
        if kw.get("reduction", "mean") == "mean":
            self.calls += 1
            if self.calls == self.n:
                return loss * float("nan")
        return loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.F, "cross_entropy", NaNAt(13))
    code = run_main("--epochs", 1, "--checkpoint_every", 5, "--output_dir", tmp_path)
    assert code == 1
    assert "not finite at optimizer step 13" in capsys.readouterr().err
    assert [p.name for p in train.checkpoints(tmp_path)] == ["step_00000010", "step_00000005"]
    assert train.checkpoint_ok(train.checkpoints(tmp_path)[0])[0]
    assert not (tmp_path / "results.json").exists()


def test_nan_loss_skip_policy_drops_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(train.F, "cross_entropy", NaNAt(13))
    assert run_main("--epochs", 1, "--nan_policy", "skip", "--output_dir", tmp_path) == 0
    res = results(tmp_path)
    assert res["skipped_steps"] == 1 and res["steps"] == 22
    # The epoch's train metrics leave the skipped step out: 21 batches of 64, a finite loss.
    assert torch.isfinite(torch.tensor(res["train_loss"])) and res["train_loss"] < 2.5
    assert round(res["train_acc"] * 21 * 64) == pytest.approx(res["train_acc"] * 21 * 64)
    w = torch.cat([t.flatten().float() for t in
                   __import__("conftest").weights(tmp_path).values()])
    assert torch.isfinite(w).all()
