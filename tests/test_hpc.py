"""What HPC users meet outside the test cluster: a task that Slurm binds to fewer CPUs than
the node has (Accelerate then chose threads from the node's cores), srun's --cpus-per-task
(not inherited from sbatch since Slurm 22.05), a sweep given one --output_dir for every task,
and a decoded cache that can be read but not written (a colleague's, a read-only mount)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_main

TRAIN = [sys.executable, str(ROOT / "train.py")]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_task_bound_to_one_cpu_gets_one_thread(tmp_path):
    """lib.sh's srun line: rank variables, no OMP_NUM_THREADS, the task bound to one CPU
    (taskset stands in for Slurm's binding). Accelerate set torch's threads to the machine's
    physical cores (2.4x slower here); Accelerate's two-line warning is not shown."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(["taskset", "-c", "0", *TRAIN, "--epochs", "1", "--output_dir",
                           tmp_path / "run"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["torch_threads"] == 1, config["torch_threads"]
    assert "OMP_NUM_THREADS/MKL_NUM_THREADS unset" not in proc.stderr, proc.stderr[-2000:]


def stubs(tmp_path: Path) -> dict:
    """srun and scontrol stand-ins: srun logs what it was given (its CPUs per task and the
    run directory) instead of starting train.py."""
    bin_dir, log = tmp_path / "bin", tmp_path / "srun.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "cpus=${SRUN_CPUS_PER_TASK:-unset} $*" >> "$STUB_LOG"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho n1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
            "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NAME": "sweep", "SLURM_JOB_ID": "1231",
            "SLURM_ARRAY_JOB_ID": "1230", "SLURM_ARRAY_TASK_ID": "1", "SLURM_NTASKS": "1",
            "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_PER_TASK": "3"}


def test_srun_gets_cpus_per_task_and_a_sweep_refuses_one_output_dir(tmp_path):
    env, sweep = stubs(tmp_path), ["bash", "slurm/sweep_array.sbatch", "slurm/sweep_example.txt"]
    done = subprocess.run([*sweep, "--epochs", "1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "srun.log").read_text()
    assert log.startswith("cpus=3 ") and "--output_dir runs/sweep-1230/1 " in log, log
    shared = subprocess.run([*sweep, "--epochs", "1", "--output_dir", "runs/mine"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert shared.returncode == 2, shared.stdout + shared.stderr  # every task in runs/mine
    assert "error: --output_dir among the flags for every task" in shared.stdout
    assert (tmp_path / "srun.log").read_text() == log  # nothing started


def read_only(folder: Path) -> None:
    """`folder` bind-mounted read-only over itself; skips where that needs root."""
    reason = "a read-only bind mount needs root" if os.geteuid() != 0 else None
    if reason is None:
        made = subprocess.run(f"mount --bind {folder} {folder} && mount -o remount,bind,ro "
                              f"{folder} {folder}", shell=True, capture_output=True, text=True)
        reason = made.returncode and f"cannot mount: {made.stderr.strip()}"
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run the read-only cache test, but {reason}")
    if reason:
        pytest.skip(reason)


def test_a_read_only_cache_is_read_when_complete(tmp_path, flat_folder, capsys):
    from test_attacks import unmount
    cache, empty = tmp_path / "cache", tmp_path / "empty"
    empty.mkdir()
    args = ["--dataset", flat_folder, "--epochs", 1, "--num_workers", 0]
    assert run_main(*args, "--data_mode", "cache", "--cache_dir", cache,
                    "--output_dir", tmp_path / "build") == 0
    capsys.readouterr()
    read_only(cache)
    try:  # refused before: "cannot write to --cache_dir ...: Read-only file system"
        assert run_main(*args, "--data_mode", "cache", "--cache_dir", cache,
                        "--output_dir", tmp_path / "reuse") == 0
        assert capsys.readouterr().out.count("cache: reusing") == 2
    finally:
        unmount(cache)
    read_only(empty)
    try:  # auto chose the cache for a disk it cannot write, then failed
        assert run_main(*args, "--memory_budget_gb", 1e-6, "--cache_dir", empty,
                        "--output_dir", tmp_path / "auto") == 0
        assert "data: stream mode" in capsys.readouterr().out
        code = run_main(*args, "--data_mode", "cache", "--cache_dir", empty,
                        "--output_dir", tmp_path / "refused")
        err = capsys.readouterr().err
        assert code == 2 and "no complete cache of this data is there" in err, err
    finally:
        unmount(empty)
