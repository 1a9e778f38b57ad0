"""The benchmark is not a test of speed (shared machines are noisy), but it must keep running:
one round of the CNN case (2 epochs), each variant in its own process, parsed back."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

# A quiet 2-core machine runs each bench in 1-5 min; a busy one three times slower must pass
# too. The benches write under TMPDIR: a private one, removed even when a run is killed.
TIMEOUT = 1800


def bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    try:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              timeout=TIMEOUT, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_bench_runs_and_reports_every_variant(tmp_path):
    out = bench(tmp_path, str(ROOT / "bench" / "bench.py"), "--case", "cnn", "--repeats", "1",
                "--mixed_precision", "bf16", "--epochs", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(re.findall(r"^  (a memory|b stream|c bare) +([\d.]+) ", out.stdout, re.M))
    assert set(rows) == {"a memory", "b stream", "c bare"} and all(float(v) > 0 for v in
                                                                    rows.values())
    assert re.search(r"a/c = [\d.]+ best/best; per round: median [\d.]+", out.stdout)
    accs = [float(a) for a in re.findall(r" ([\d.]+)% +[\d.]+$", out.stdout, re.M)]
    assert len(accs) == 3 and min(accs) > 70  # bf16 autocast on the CPU learns (2 epochs: 78%)
    assert re.search(r"default `python train.py`: whole process [\d.]+ s", out.stdout)
