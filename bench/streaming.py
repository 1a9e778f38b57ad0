"""--streaming benchmark: what reading shards as training goes costs against the other input
paths, on the same images. Two sections:

    1 loader    images/s on one core (num_workers=0, batches of 256, no model) of the same
                photo-like JPEGs: streamed parquet shards and streamed tar shards (in the
                order StreamSampler gives), stream mode (train.Decoded over the datasets
                split, random rows) and the decoded cache; ratios against stream mode
    2 startup   from the command's start to the first batch, and peak RSS, at two dataset
                sizes (32x32 PNGs in 8 shards): --streaming's parquet and tar shards against
                the same parquet folder loaded map-style by datasets

    python bench/streaming.py                      # 3,000 JPEGs, startup at 5,000 and 50,000
    python bench/streaming.py --section loader --images 5000 --rounds 5
    python bench/streaming.py --quick              # tiny: does everything still run?

The image folders are bench/cache.py's (made once under /tmp and reused); the shards and the
decoded cache are written to a temporary folder removed at the end. Not a test: it reports
medians and ranges over rounds run seconds apart, it does not assert.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import cache  # noqa: E402  (bench/cache.py: image folders, pinning, the cache's own loader)

SECTIONS = ["loader", "startup"]
SHARDS = 8


def write_shards(folder: Path, out: Path, val_rows: int = 200) -> Path:
    """The folder's images as out/data/{train,validation}-*.parquet (datasets' layout, row
    groups of 100) and out-tar/{train,validation}/*.tar, in one shuffled order."""
    import datasets
    import numpy as np
    files = sorted(folder.rglob("*.[jp][pn]g"))
    order = np.random.default_rng(0).permutation(len(files)).tolist()
    classes = sorted({f.parent.name for f in files})
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=classes)})
    val = min(val_rows, len(files) // 5)
    parts = {"train": order[val:], "validation": order[:val]}
    for split, rows in parts.items():
        k = SHARDS if split == "train" else 1
        for s in range(k):
            mine = rows[s * len(rows) // k:(s + 1) * len(rows) // k]
            name = f"{split}-{s:05d}-of-{k:05d}"
            table = datasets.Dataset.from_dict(
                {"image": [{"bytes": files[i].read_bytes(), "path": None} for i in mine],
                 "label": [classes.index(files[i].parent.name) for i in mine]}, features=features)
            (out / "data").mkdir(parents=True, exist_ok=True)
            table.to_parquet(out / "data" / f"{name}.parquet", batch_size=100)
            tar_dir = out.with_name(out.name + "-tar") / split
            tar_dir.mkdir(parents=True, exist_ok=True)
            with tarfile.open(tar_dir / f"{name}.tar", "w") as tar:
                for i in mine:
                    ext = files[i].suffix[1:]
                    for key, data in ((ext, files[i].read_bytes()),
                                      ("cls", str(classes.index(files[i].parent.name)).encode())):
                        info = tarfile.TarInfo(f"{i:07d}.{key}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return out


# ----------------------------------------------------------------------------- child processes

def child_shards(spec: dict) -> dict:
    """Section 1, on one core: the first `subset` images of epoch 0's plan, decoded."""
    train = cache.import_train(True)
    torch = train.torch
    cfg = train.Config(dataset=spec["dataset"], streaming=True)
    s = train.stream_splits(cfg, None)
    size, cover = train.stored(cache.photo_meta(spec["size"]), True)
    sampler = train.StreamSampler(s.train, 1, 0, 1, cfg)  # the order: windows of 1,024
    plan = list(sampler.plan(0, 0))[:spec["subset"]]
    data = train.Decoded(s.train, s.image_col, s.label_col, "RGB", size, cover)
    for i in plan[-16:]:  # first-call costs (PIL plugins, resize kernels) out of the timing
        data[i]
    s.train.cache.clear()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, plan), batch_size=256)
    n, took = cache.timed_epochs(loader, 0)
    return {"images": n, "s": took}


def child_startup(spec: dict) -> dict:
    """Section 2: from this process's start to the first training batch, and peak RSS."""
    t0 = time.perf_counter()
    train = cache.import_train(False)
    t_import = time.perf_counter() - t0
    cfg = train.Config(dataset=spec["dataset"], streaming=spec["streaming"])
    s = train.stream_splits(cfg, None) if cfg.streaming else train.load_splits(cfg, None)
    sizes, colour = train.probe_images(s.source_train, s.image_col)
    data = train.Decoded(s.train, s.image_col, s.label_col, "RGB", (32, 32))
    sampler = train.StreamSampler(s.train, 64, 0, 1, cfg) if cfg.streaming else \
        train.EpochSampler(len(s.train), 0)
    next(iter(train.torch.utils.data.DataLoader(data, batch_size=64, sampler=sampler)))
    return {"s": time.perf_counter() - t0, "after_imports_s": time.perf_counter() - t0 - t_import,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rows": len(s.train)}


CHILDREN = {"shards": child_shards, "startup": child_startup}


def child(name: str, **spec) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", name, json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"child {name} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- sections

def loader(a, tmp: Path) -> None:
    folder = cache.image_folder("jpeg", a.images)
    shards = write_shards(folder, tmp / "jpeg-shards")
    print(f"\n1 loader: images/s on one core, {a.loader_images} of {a.images} photo-like JPEGs "
          f"(~500x375) decoded to {a.size} px (photo recipe: {round(a.size / 0.875)} px stored), "
          f"{a.rounds} round(s)")
    rates = {k: [] for k in ("parquet shards", "tar shards", "stream mode", "decoded cache")}
    for r in range(a.rounds):
        got = {"parquet shards": child("shards", dataset=str(shards), size=a.size,
                                       subset=a.loader_images),
               "tar shards": child("shards", dataset=str(shards) + "-tar", size=a.size,
                                   subset=a.loader_images),
               "stream mode": cache.child("loader", variant="stream", dataset=str(folder),
                                          size=a.size, seed=r, subset=a.loader_images,
                                          cache_dir=str(tmp / "decoded"), min_s=a.min_s),
               "decoded cache": cache.child("loader", variant="cache", dataset=str(folder),
                                            size=a.size, seed=r, subset=a.loader_images,
                                            cache_dir=str(tmp / "decoded"), min_s=a.min_s)}
        for k, v in got.items():
            rates[k].append(v["images"] / v["s"])
    base = statistics.median(rates["stream mode"])
    for k, v in rates.items():
        v = sorted(v)
        print(f"  {k:15s} {statistics.median(v):8.0f} img/s (range {v[0]:.0f}-{v[-1]:.0f}); "
              f"{statistics.median(v) / base:.2f}x stream mode")
    ratio = base / statistics.median(rates["parquet shards"])
    print(f"  stream mode / parquet shards: {ratio:.2f} (target: at most 1.5)")


def startup(a, tmp: Path) -> None:
    print(f"\n2 startup: to the first batch (imports included) and peak RSS, 32x32 PNGs in "
          f"{SHARDS} training shards, {a.rounds} round(s)")
    for n in a.startup_files:
        shards = write_shards(cache.image_folder("png32", n), tmp / f"png-shards-{n}")
        for name, dataset, streaming in (("--streaming parquet", shards, True),
                                         ("--streaming tar", str(shards) + "-tar", True),
                                         ("parquet, map-style", shards, False)):
            runs = []
            for r in range(a.rounds):
                os.environ["HF_DATASETS_CACHE"] = str(tmp / f"hf-{n}-{r}")  # cold each round
                runs.append(child("startup", dataset=str(dataset), streaming=streaming))
            s = statistics.median(x["s"] for x in runs)
            after = statistics.median(x["after_imports_s"] for x in runs)
            rss = statistics.median(x["rss_mb"] for x in runs)
            print(f"  {runs[0]['rows']:6d} rows  {name:20s} {s:6.2f} s ({after:5.2f} s after "
                  f"the imports), peak RSS {rss:5.0f} MB", flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", nargs="+", default=SECTIONS, choices=SECTIONS)
    p.add_argument("--images", type=int, default=3000, help="section 1: JPEGs in the folder")
    p.add_argument("--loader_images", type=int, default=1000, help="section 1: decoded per run")
    p.add_argument("--size", type=int, default=64, help="section 1: px")
    p.add_argument("--startup_files", type=cache.ints, default=[5000, 50000], help="section 2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min_s", type=float, default=2.0, help="the cache's timed read loop, s")
    p.add_argument("--quick", action="store_true", help="everything tiny: a smoke test")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.images, a.loader_images, a.startup_files, a.rounds, a.min_s = 300, 100, [500, 1000], 1, .2
    return a


def main() -> None:
    a = parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child[0]](json.loads(a.child[1]))))
        return
    print(f"machine: {cache.cpu_model()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; train.py {cache.train_py_version()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="streambench-"))
    os.environ.update(HF_DATASETS_CACHE=str(tmp / "hf"), HF_HUB_OFFLINE="1",
                      HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    t0 = time.perf_counter()
    try:
        for name in a.section:
            globals()[name](a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
