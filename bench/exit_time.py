"""How long a finished run's process takes to exit after its "done" line, and how far the
whole-process time it prints is from the time measured outside it.

    python bench/exit_time.py [--runs 3] [train.py flags]

Each run is `python train.py --epochs 1` (plus the flags) in a fresh directory; its stdout is
read line by line as it comes, so the "done" line is timed as it is printed.
"""
import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(flags: list[str]) -> tuple[float, float, float]:
    """(printed whole-process seconds, measured seconds, seconds from "done" to exit)."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--epochs", "1",
                                 *flags, "--output_dir", f"{tmp}/run"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        done_at, printed = None, None
        for line in proc.stdout:
            if line.startswith("done:"):
                done_at = time.perf_counter()
                printed = float(re.search(r"([\d.]+)s \(whole process", line).group(1))
        proc.wait()
        end = time.perf_counter()
        if proc.returncode or done_at is None:
            sys.exit(f"train.py exited {proc.returncode} without a done line")
        return printed, end - t0, end - done_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args, flags = parser.parse_known_args()
    rows = [one_run(flags) for _ in range(args.runs)]
    for printed, measured, after in rows:
        print(f"printed {printed:6.2f} s  measured {measured:6.2f} s  (ratio "
              f"{printed / measured:.3f})  done line to exit {after:5.2f} s")
    after = sorted(r[2] for r in rows)[len(rows) // 2]
    print(f"median: done line to exit {after:.2f} s")


if __name__ == "__main__":
    main()
