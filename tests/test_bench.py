"""The benchmark is not a test of speed (shared machines are noisy), but it must keep running:
one round of the CNN case, each variant in its own process, parsed back."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

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


def test_bench_runs_and_reports_every_variant(tmp_path):
    out = bench(tmp_path, str(ROOT / "bench" / "bench.py"), "--case", "cnn", "--repeats", "1",
                "--mixed_precision", "bf16")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(re.findall(r"^  (a memory|b stream|c bare) +([\d.]+) ", out.stdout, re.M))
    assert set(rows) == {"a memory", "b stream", "c bare"} and all(float(v) > 0 for v in
                                                                    rows.values())
    assert re.search(r"a/c = [\d.]+ best/best; per round: median [\d.]+", out.stdout)
    accs = [float(a) for a in re.findall(r" ([\d.]+)% +[\d.]+$", out.stdout, re.M)]
    assert len(accs) == 3 and min(accs) > 80  # bf16 autocast on the CPU still learns digits
    assert re.search(r"default `python train.py`: whole process [\d.]+ s", out.stdout)


def test_cache_bench_quick_runs_every_section(tmp_path):
    """bench/cache.py --quick: every section's rows, with positive numbers (no timings)."""
    out = bench(tmp_path, str(ROOT / "bench" / "cache.py"), "--quick")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    warnings = [line for line in text.splitlines()  # a cache not reused, auto not picking it
                if line.startswith("  !") and "train.py changed" not in line]
    assert not warnings, text
    for section in range(1, 7):
        assert f"\n[{section}] " in text, text
    num = r"(\d+\.?\d*)"
    loader = re.findall(rf"^ +64 (cache|stream|imagefolder) +{num} +{num}$", text, re.M)
    assert {v for v, *_ in loader} == {"cache", "stream", "imagefolder"}, text
    training = re.findall(rf"^ +64 (memory|cache) +{num} +{num} +{num} +{num}$", text, re.M)
    assert {m for m, *_ in training} == {"memory", "cache"}, text
    build = re.findall(rf"^ +64 (train|val|all) +(\d+) +{num} +{num} +{num} +{num} +(\d+)$",
                       text, re.M)
    assert {s for s, *_ in build} == {"train", "val", "all"}, text
    rss = re.findall(rf"^ +(\d+) auto +cache +{num} +{num} +{num} +{num}$", text, re.M)
    assert len(rss) == 2, text  # two sizes, and auto picked cache for both
    startup = re.findall(rf"^ +(\d+)((?: +{num}){{6}}) +2/2$", text, re.M)
    assert len(startup) == 2, text  # two folders; the warm run reused both splits' caches
    formats = re.findall(rf"^ +(pread \(OnDisk\)|numpy memmap|Arrow Array3D|Arrow flat) +"
                         rf"{num} +{num}$", text, re.M)
    assert len(formats) == 4, text
    numbers = [float(x) for rows in (loader, training, build, rss, formats) for row in rows
               for x in row[1:]] + [float(x) for _, cols, *_ in startup
                                    for x in cols.split()[:3]]  # cold, warm, imports
    assert numbers and min(numbers) > 0, text
    parts = [float(x) for _, cols, *_ in startup for x in cols.split()[3:]]  # may round to 0
    assert len(parts) == 6 and min(parts) >= 0, text
    assert len(re.findall(r"per round: median [\d.]+, range [\d.]+-[\d.]+", text)) == 6, text
