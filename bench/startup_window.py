"""How long after its start a stop signal still kills train.py (issue 16, the start-up window).

Slurm's SIGTERM, a Ctrl-C or a scheduler's SIGUSR1 can come at any moment, also in the first
milliseconds of the process. Until train.py has installed its handlers the signal's default
action applies: the process dies with -15 (SIGTERM) instead of exiting 75 (stopped, requeue
me). This sends SIGTERM at fixed delays after Popen() of the default run
(`python train.py --output_dir <tmp>`) and records each exit code, quiet and with K busy-loop
processes competing for the cores (a loaded node stretches the window).

    python bench/startup_window.py                  # 10 tries per delay, load 0 and 2
    python bench/startup_window.py --tries 3 --load 4
    python bench/startup_window.py --delays 0,1,2,5 --train /other/checkout/train.py

Prints a table per condition (delay: caught = exit 75, killed = -15, other codes) and the
measured window: the largest delay at which any try was killed. A try the handler caught runs
to the end of its imports before it exits 75 (a few seconds), so the default (9 delays x 10
tries x 2 loads) takes a while; --tries 1 is a quick look. Children are killed and the temp
directories removed on every exit, Ctrl-C and SIGTERM included."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DELAYS_MS = [0, 5, 10, 20, 30, 50, 75, 100, 150]
CAUGHT, KILLED = 75, -signal.SIGTERM

children: list[subprocess.Popen] = []  # every process started here, until reaped
temp_dirs: list[Path] = []


def stop_children() -> None:
    for p in children:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: loader workers too
            except (ProcessLookupError, PermissionError):
                p.kill()
    for p in children:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    children.clear()


def remove_temp_dirs() -> None:
    for d in temp_dirs:
        shutil.rmtree(d, ignore_errors=True)
    temp_dirs.clear()


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
    children.append(p)
    return p


def reap(p: subprocess.Popen, timeout: float) -> int | None:
    """Its exit code (negative: the signal that killed it), or None if it outlived timeout."""
    try:
        code = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        code = None
    children.remove(p)
    return code


def start_load(k: int) -> list[subprocess.Popen]:
    busy = [spawn([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    time.sleep(0.3 if k else 0)  # running, not starting
    return busy


def one_try(train_py: Path, delay_ms: float, work: Path, timeout: float) -> int | None:
    out = Path(tempfile.mkdtemp(prefix="try-", dir=work))
    try:
        p = spawn([sys.executable, str(train_py), "--output_dir", str(out / "run")], cwd=out,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()  # Popen returns once the child has exec'd the interpreter
        while (left := delay_ms / 1000 - (time.perf_counter() - t0)) > 0:
            time.sleep(left)
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        return reap(p, timeout)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def table(load: int, codes: dict[float, list]) -> float | None:
    print(f"\nload {load} (busy-loop processes beside it), {os.cpu_count()} CPU(s):")
    print(f"  {'delay ms':>8}  {'tries':>5}  {'caught 75':>9}  {'killed -15':>10}  other")
    for delay, got in codes.items():
        count = Counter(got)
        other = ", ".join(f"{'timeout' if c is None else c} x{n}" for c, n in count.items()
                          if c not in (CAUGHT, KILLED))
        print(f"  {delay:>8g}  {len(got):>5}  {count[CAUGHT]:>9}  {count[KILLED]:>10}  "
              f"{other or '-'}", flush=True)
    killed = [d for d, got in codes.items() if KILLED in got]
    window = max(killed) if killed else None
    if window is None:
        print(f"  window: no try was killed (every delay from {min(codes):g} ms caught)")
    else:
        caught_after = [d for d, got in codes.items() if d > window]
        if caught_after:
            print(f"  window: {window:g} ms (the largest delay at which a try was killed; "
                  f"every try from {min(caught_after):g} ms on was caught)")
        else:
            print(f"  window: at least {window:g} ms (killed at the largest delay tried: pass "
                  "--delays with larger values to find its end)")
    return window


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=10, help="tries per delay (default 10)")
    parser.add_argument("--load", type=int, action="append",
                        help="busy-loop processes running meanwhile; repeatable (default: "
                             "0 and 2)")
    parser.add_argument("--delays", default=",".join(map(str, DELAYS_MS)),
                        help="milliseconds after Popen() (default %(default)s)")
    parser.add_argument("--train", type=Path, default=ROOT / "train.py",
                        help="the train.py to start (default: this checkout's)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds a try may run after its signal (a safety net)")
    args = parser.parse_args(argv)
    if args.tries < 1:
        parser.error("--tries must be at least 1")
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    loads = args.load if args.load else [0, 2]
    if any(k < 0 for k in loads) or any(d < 0 for d in delays) or not delays:
        parser.error("--load and --delays must be >= 0")

    def terminate(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, terminate)  # cleaned up like a Ctrl-C
    work = Path(tempfile.mkdtemp(prefix="startup-window-"))
    temp_dirs.append(work)
    print(f"SIGTERM at {', '.join(f'{d:g}' for d in delays)} ms after Popen of "
          f"`{Path(sys.executable).name} {args.train} --output_dir <tmp>`; {args.tries} "
          f"tries per delay; exit 75 = caught, -15 = killed before the handler", flush=True)
    windows = {}
    try:
        for load in loads:
            busy = start_load(load)
            try:
                codes = {d: [] for d in delays}
                for _ in range(args.tries):  # delays interleaved: drift spreads over all
                    for d in delays:
                        codes[d].append(one_try(args.train, d, work, args.timeout))
                windows[load] = table(load, codes)
            finally:
                for p in busy:
                    p.kill()
                    reap(p, 30)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'Ctrl-C'}): children killed, temp dirs removed",
              file=sys.stderr)
        return 130
    finally:
        stop_children()
        remove_temp_dirs()
    largest = max(delays)
    print("\nmeasured window: " + "; ".join(
        f"load {k}: " + ("none" if w is None else f">= {w:g} ms" if w == largest else f"{w:g} ms")
        for k, w in windows.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
