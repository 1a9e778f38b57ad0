"""The benchmark is not a test of speed (shared machines are noisy), but it must keep running:
one round of the CNN case, each variant in its own process, parsed back."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_bench_runs_and_reports_every_variant():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--case", "cnn",
                          "--repeats", "1", "--mixed_precision", "bf16"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(re.findall(r"^  (a memory|b stream|c bare) +([\d.]+) ", out.stdout, re.M))
    assert set(rows) == {"a memory", "b stream", "c bare"} and all(float(v) > 0 for v in
                                                                    rows.values())
    assert re.search(r"a/c = [\d.]+ best/best; per round: median [\d.]+", out.stdout)
    accs = [float(a) for a in re.findall(r" ([\d.]+)% +[\d.]+$", out.stdout, re.M)]
    assert len(accs) == 3 and min(accs) > 80  # bf16 autocast on the CPU still learns digits
    assert re.search(r"default `python train.py`: whole process [\d.]+ s", out.stdout)
