"""bench/streaming.py --quick keeps running: both sections' rows, parsed back, positive."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT
from test_bench import bench


@pytest.mark.slow
def test_streaming_bench_quick_runs_both_sections(tmp_path):
    out = bench(tmp_path, str(ROOT / "bench" / "streaming.py"), "--quick")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    rates = dict(re.findall(r"^  (parquet shards|tar shards|stream mode|decoded cache) +"
                            r"(\d+) img/s", text, re.M))
    assert len(rates) == 4 and all(int(v) > 0 for v in rates.values()), text
    assert re.search(r"stream mode / parquet shards: \d+\.\d\d", text), text
    startup = re.findall(r"^ +(\d+) rows  (--streaming parquet|--streaming tar|parquet, "
                         r"map-style) +(\d+\.\d+) s .* peak RSS +(\d+) MB$", text, re.M)
    assert len(startup) == 6 and {int(n) for n, *_ in startup} == {400, 800}, text
    assert all(float(s) > 0 and int(mb) > 0 for _, _, s, mb in startup), text
