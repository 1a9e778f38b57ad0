"""bench/cache.py --quick keeps running: every section's rows, parsed back. A file of its own
so that the two benchmarks' smoke runs, the longest tests, go to different xdist workers."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT
from test_bench import bench


@pytest.mark.slow
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
