"""Contention benchmark: the default `python train.py` (the whole process, imports included), as
a user runs it, on a quiet machine and beside N competing busy processes (each a Python loop
spinning on one core), in interleaved rounds. Two variants: the default (train.py's own
behaviour, with OMP_WAIT_POLICY and GOMP_SPINCOUNT removed from the environment) and
OMP_WAIT_POLICY=ACTIVE (the old behaviour, for reference: OpenMP threads spin-wait, so a thread
that shares its core with the load keeps every parallel region waiting). Prints wall time quiet
and contended, the per-round ratio contended/quiet, train_time_s and val_acc.

    python bench/contention.py                      # 3 rounds, 1 competing process
    python bench/contention.py --rounds 5 --load 2

Not a test: timings on shared machines are noisy, so it reports, it does not assert.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"default": {}, "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"}}
# Spins one core in user space; checks every ~10 ms that its parent still lives, so that it
# cannot outlive this script even if the script is killed before its finally block runs.
SPIN = ("import os\np = os.getppid()\nwhile os.getppid() == p:\n"
        "    for _ in range(200_000): pass\n")


def start_load(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-S", "-c", SPIN]) for _ in range(n)]
    time.sleep(0.5 if n else 0)  # let them reach the scheduler before the measured run
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def run_train_py(env_over: dict[str, str], load: int, out: Path) -> dict:
    """One fresh `python train.py` with `load` busy processes running throughout."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_over)
    cmd = [sys.executable, str(ROOT / "train.py"), "--output_dir", str(out)]
    procs = []
    try:
        procs = start_load(load)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
    finally:
        stop_load(procs)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    return {"wall_s": wall, "train_time_s": res["train_time_s"], "val_acc": res["val_acc"]}


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; each runs every variant quiet and contended, back to back")
    p.add_argument("--load", type=int, default=1, help="competing busy processes")
    args = p.parse_args()
    # Turn SIGTERM into SystemExit, so that the finally blocks stop the load.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"{os.cpu_count()} CPUs, {args.load} competing process(es), {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    runs: dict[tuple[str, int], list[dict]] = {(v, n): [] for v in VARIANTS
                                                for n in (0, args.load)}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):  # interleaved, so that drifting load hits all alike
            for v, env_over in VARIANTS.items():
                for n in (0, args.load) if i % 2 == 0 else (args.load, 0):
                    runs[v, n].append(run_train_py(env_over, n, Path(tmp) / f"{v}-{n}-{i}"))
                    r = runs[v, n][-1]
                    print(f"  round {i + 1} {v:22} load {n}: {r['wall_s']:5.1f} s", flush=True)
    print(f"\n{'variant':22} {'quiet s':>8} {'contended s':>12} "
          f"{'contended/quiet, median (range)':>32} {'train s q/c':>12} {'val acc':>8}")
    ratios = {}
    for v in VARIANTS:
        quiet, cont = runs[v, 0], runs[v, args.load]
        ratios[v] = [c["wall_s"] / q["wall_s"] for q, c in zip(quiet, cont)]
        train = [statistics.median(r["train_time_s"] for r in rs) for rs in (quiet, cont)]
        acc = statistics.median(r["val_acc"] for r in quiet + cont)
        print(f"{v:22} {statistics.median(r['wall_s'] for r in quiet):8.1f} "
              f"{statistics.median(r['wall_s'] for r in cont):12.1f} {med(ratios[v]):>32} "
              f"{train[0]:5.2f}/{train[1]:<6.2f} {acc:8.2%}")
    print(f"default: contended/quiet = {statistics.median(ratios['default']):.2f} "
          f"(target <= 1.5)")


if __name__ == "__main__":
    main()
