"""Cache-mode benchmark (--data_mode cache): what decoding once into a file of uint8 rows buys
over decoding every epoch, and what it costs. Six sections, each runnable alone:

    1 loader    images/s per core (num_workers=0, pinned to one CPU), no model: the cache's
                random batches (OnDisk) vs stream (train.Decoded) vs torchvision's ImageFolder
    2 train     train.py CLI, resnet18, 1 epoch: cache vs memory mode, alternating order
    3 build     the cache build (the first epoch's extra cost): s, images/s, GB written
    4 rss       peak RSS of --data_mode auto past --memory_budget_gb (it picks cache), by size
    5 startup   start-up against file count (32x32 PNGs): cold and warm runs, load_splits
    6 formats   the storage choice: random rows by pread, numpy memmap, Arrow Array3D, flat

    python bench/cache.py                        # everything, 20,000 JPEGs (~15 min, 2 cores)
    python bench/cache.py --section loader build --images 5000
    python bench/cache.py --section 2 --train_sizes 64 --rounds 5
    python bench/cache.py --quick                # tiny, ~1-2 min: does everything still run?

Photos are made once from random crops, flips and scales of scikit-learn's sample photos
(~500x375 JPEGs, 10 classes) into /tmp/cachebench-v1-jpeg-N, and the start-up folders into
/tmp/cachebench-v1-png32-N: later invocations reuse them. The decoded caches and the datasets
cache (HF_DATASETS_CACHE) live in a temporary folder removed at the end.

Not a test: timings on shared machines are noisy, so it reports, it does not assert. Each
timed variant runs in its own process; ratios come from runs made seconds apart, per round.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE = Path(tempfile.gettempdir())  # generated image folders, kept between invocations
VERSION = "v1"  # in the generated folders' names: bump it when the generators change
SECTIONS = ["loader", "train", "build", "rss", "startup", "formats"]  # numbered 1-6
BATCH = 256
CLASSES = 10


# ----------------------------------------------------------------------------- image folders

def photo_jpeg(photos, tints, cls: int, i: int):
    """One photo-like JPEG: a random crop (35-100% of the largest that fits) of a sample
    photo, tinted by its class, scaled to ~500x375 (30% portrait) and maybe flipped."""
    import numpy as np
    import PIL.Image
    rng = np.random.default_rng([cls, i])
    src = photos[int(rng.integers(2))]
    long = int(rng.integers(460, 541))
    w, h = (round(long * 3 / 4), long) if rng.random() < 0.3 else (long, round(long * 3 / 4))
    scale = min(src.shape[0] / h, src.shape[1] / w) * rng.uniform(0.35, 1.0)
    ch, cw = int(h * scale), int(w * scale)
    y, x = int(rng.integers(src.shape[0] - ch + 1)), int(rng.integers(src.shape[1] - cw + 1))
    crop = (src[y:y + ch, x:x + cw] * tints[cls]).clip(0, 255).astype(np.uint8)
    image = PIL.Image.fromarray(crop).resize((w, h), PIL.Image.BICUBIC)
    return image.transpose(PIL.Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def small_png(photos, tints, cls: int, i: int):
    """One 32x32 colour image: a random 32-200 px square of a sample photo, tinted."""
    import numpy as np
    import PIL.Image
    rng = np.random.default_rng([cls, i, 32])
    src = photos[int(rng.integers(2))]
    side = int(rng.integers(32, 201))
    y, x = int(rng.integers(src.shape[0] - side)), int(rng.integers(src.shape[1] - side))
    crop = (src[y:y + side, x:x + side] * tints[cls]).clip(0, 255).astype(np.uint8)
    return PIL.Image.fromarray(crop).resize((32, 32), PIL.Image.BOX)


_PHOTOS = None


def _write_images(job: tuple[str, str, list[tuple[int, int]]]) -> int:
    """Pool worker: write a chunk of (class, index) images of one kind into a folder."""
    global _PHOTOS
    import numpy as np
    if _PHOTOS is None:
        from sklearn.datasets import load_sample_images
        tints = 0.7 + 0.6 * np.random.default_rng(1).random((CLASSES, 3))
        _PHOTOS = load_sample_images().images, tints
    kind, folder, items = job
    make, ext = (photo_jpeg, "jpg") if kind == "jpeg" else (small_png, "png")
    for cls, i in items:
        path = Path(folder, f"class{cls:02d}", f"{i:05d}.{ext}")
        make(*_PHOTOS, cls, i).save(path, **({"quality": 90} if ext == "jpg" else {}))
    return len(items)


def image_folder(kind: str, count: int) -> Path:
    """STORE/cachebench-v1-{jpeg|png32}-count: made once (all cores), then reused. Written
    in a temporary folder renamed when complete, so an interrupted one is never used."""
    final = STORE / f"cachebench-{VERSION}-{kind}-{count}"
    if final.is_dir():
        return final
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    per_class = [count // CLASSES + (c < count % CLASSES) for c in range(CLASSES)]
    items = [(c, i) for c in range(CLASSES) for i in range(per_class[c])]
    for c in range(CLASSES):
        (tmp / f"class{c:02d}").mkdir(parents=True)
    t0 = time.perf_counter()
    jobs = [(kind, str(tmp), items[k:k + 200]) for k in range(0, len(items), 200)]
    try:
        with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
            for _ in pool.imap_unordered(_write_images, jobs):
                pass
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"  (made {final}: {count} images in {time.perf_counter() - t0:.0f} s)", flush=True)
    return final


# ----------------------------------------------------------------------------- child processes

def pin_one_core() -> None:
    """This process on one CPU with one thread (before torch is imported): rates per core."""
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    os.environ["OMP_NUM_THREADS"] = "1"


def import_train(one_core: bool):
    """train.py imported as benchmarks do, optionally on one core (pin_one_core)."""
    if one_core:
        pin_one_core()
    sys.path.insert(0, str(ROOT))
    import train
    train.choose_wait_policy()
    train.import_libraries()
    if one_core:
        train.torch.set_num_threads(1)
    return train


def photo_meta(size: int) -> dict:
    return {"channels": 3, "image_size": [size, size], "recipe": "photo", "crop_fraction": 0.875}


def splits(train, dataset: str):
    return train.load_splits(train.Config(dataset=dataset), None)


def timed_epochs(loader, min_s: float) -> tuple[int, float]:
    """Images delivered by whole passes over `loader` until at least min_s have passed."""
    n, t0 = 0, time.perf_counter()
    while True:
        for images, _ in loader:
            n += len(images)
        took = time.perf_counter() - t0
        if took >= min_s:
            return n, took


def child_build(spec: dict) -> dict:
    """Section 3: train.cached for the training and validation splits, timed apart."""
    train = import_train(False)
    s = splits(train, spec["dataset"])
    out = {}
    for name, split, is_train in (("train", s.train, True), ("val", s.val, False)):
        t0 = time.perf_counter()
        data = train.cached(Path(spec["cache_dir"]), train.Source(split, s.image_col,
                                                                  s.label_col),
                            photo_meta(spec["size"]), is_train)
        out[name] = {"images": len(data), "s": time.perf_counter() - t0,
                     "bytes": data.path.stat().st_size, "workers": train.cpu_count()}
    return out


def child_loader(spec: dict) -> dict:
    """Section 1, one variant on one core: a loader with num_workers=0 and batches of 256.
    cache: random batches from the built cache (whole passes until min_s); stream and
    imagefolder: one pass over the same `subset` training images, decoded to the same size."""
    train = import_train(True)
    torch = train.torch
    s = splits(train, spec["dataset"])
    meta = photo_meta(spec["size"])
    size, cover = train.stored(meta, True)
    gen = torch.Generator().manual_seed(spec["seed"])
    if spec["variant"] == "cache":
        data = train.cached(Path(spec["cache_dir"]),
                            train.Source(s.train, s.image_col, s.label_col), meta, True)
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, collate_fn=train.as_is,
                                             sampler=torch.utils.data.RandomSampler(
                                                 data, generator=gen))
        next(iter(loader))  # the file opened, its first pages touched
        n, took = timed_epochs(loader, spec["min_s"])
        return {"images": n, "s": took, "rows": len(data)}
    order = torch.randperm(len(s.train), generator=gen).tolist()
    subset, warm = order[:spec["subset"]], order[-16:]
    if spec["variant"] == "stream":
        data = train.Decoded(s.train, s.image_col, s.label_col, "RGB", size, cover)
    else:
        rows = subset + warm
        paths = [image["path"] for image in s.train.select(rows)[s.image_col]]
        data = imagefolder(spec["dataset"], dict(zip(rows, paths)), size[0])
    for i in warm:  # first-call costs (PIL plugins, resize kernels) out of the timing
        data[i]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, subset), batch_size=BATCH)
    n, took = timed_epochs(loader, 0)
    return {"images": n, "s": took}


class _Reordered:
    """An ImageFolder indexed like the split's training rows: row i is the split's file i."""

    def __init__(self, folder, rows: dict[int, int]):
        self.folder, self.rows = folder, rows

    def __getitem__(self, i: int):
        return self.folder[self.rows[i]]


def imagefolder(root: str, paths: dict[int, str], side: int):
    """torchvision's ImageFolder (PIL loader; Resize, CenterCrop, PILToTensor) indexed like
    the split: row i is the file paths[i] (see child_loader)."""
    from torchvision import datasets as tvd
    from torchvision import transforms as T
    folder = tvd.ImageFolder(root, transform=T.Compose(
        [T.Resize(side), T.CenterCrop(side), T.PILToTensor()]))
    where = {os.path.abspath(p): k for k, (p, _) in enumerate(folder.samples)}
    return _Reordered(folder, {i: where[os.path.abspath(p)] for i, p in paths.items()})


def child_startup_parts(spec: dict) -> dict:
    """Section 5: the start-up's parts on a built cache, as train.py does them: imports,
    load_splits, probe_images, opening both cached splits (checks included)."""
    t0 = time.perf_counter()
    train = import_train(False)
    t1 = time.perf_counter()
    cfg = train.Config(dataset=spec["dataset"], data_mode="cache", cache_dir=spec["cache_dir"])
    s = train.load_splits(cfg, None)
    t2 = time.perf_counter()
    sizes, colour = train.probe_images(s.source_train, s.image_col)
    t3 = time.perf_counter()
    meta = {**train.image_properties(cfg, "cnn", sizes, colour)[0], "recipe": "small"}
    for split, is_train in ((s.train, True), (s.val, False)):
        train.cached(train.cache_root(cfg), train.Source(split, s.image_col, s.label_col,
                                                         train.part_of(s, meta, is_train)),
                     meta, is_train)
    t4 = time.perf_counter()
    return {"imports": t1 - t0, "load_splits": t2 - t1, "probe": t3 - t2, "open": t4 - t3}


FORMAT_SHAPE = (3, 73, 73)  # a 64 px photo-recipe training row


def child_formats_setup(spec: dict) -> dict:
    """Section 6: the same random rows as a raw file, an Arrow Array3D file, a flat one."""
    import datasets
    import numpy as np
    from datasets.arrow_writer import ArrowWriter
    folder, n = Path(spec["folder"]), spec["rows"]
    rows = np.random.default_rng(0).integers(0, 256, (n, *FORMAT_SHAPE), dtype=np.uint8)
    rows.tofile(folder / "images.u8")
    flat = datasets.List(datasets.Value("uint8"), length=rows[0].size)
    for name, feature, view in (("array3d", datasets.Array3D(FORMAT_SHAPE, "uint8"), rows),
                                ("flat", flat, rows.reshape(n, -1))):
        writer = ArrowWriter(features=datasets.Features({"image": feature}),
                             path=str(folder / f"{name}.arrow"))
        for k in range(0, n, 1000):
            writer.write_batch({"image": view[k:k + 1000]})
        writer.finalize()
        writer.close()
    return {"rows": n}


def child_formats_read(spec: dict) -> dict:
    """Section 6, one format on one core: random batches of 256 rows until min_s."""
    folder, n, fmt = Path(spec["folder"]), spec["rows"], spec["format"]
    if fmt == "pread":  # train.py's own reader (and so torch: ~2 s more to start)
        train = import_train(True)
        disk = train.OnDisk(folder, FORMAT_SHAPE, train.torch.zeros(n, dtype=train.torch.int64))
        read = lambda idx: disk.__getitems__(idx.tolist())[0]  # noqa: E731
    else:
        pin_one_core()
    import numpy as np
    if fmt == "memmap":
        rows = np.memmap(folder / "images.u8", np.uint8, "r", shape=(n, *FORMAT_SHAPE))
        read = lambda idx: rows[idx]  # noqa: E731
    elif fmt != "pread":
        import datasets
        ds = datasets.Dataset.from_file(str(folder / f"{fmt}.arrow")).with_format("numpy")
        read = lambda idx: ds[idx.tolist()]["image"]  # noqa: E731
    rng = np.random.default_rng(spec["seed"])
    assert tuple(read(rng.permutation(n)[:BATCH]).shape) in ((BATCH, *FORMAT_SHAPE),
                                                           (BATCH, np.prod(FORMAT_SHAPE)))
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < spec["min_s"]:
        order = rng.permutation(n)
        for k in range(0, n - BATCH + 1, BATCH):
            read(order[k:k + BATCH])
            done += BATCH
            if time.perf_counter() - t0 >= spec["min_s"]:
                break
    return {"rows": done, "s": time.perf_counter() - t0}


CHILDREN = {f.__name__[6:]: f for f in (child_build, child_loader, child_startup_parts,
                                        child_formats_setup, child_formats_read)}


def child(name: str, **spec) -> dict:
    """Run CHILDREN[name](spec) in a new process; its last stdout line is the JSON answer."""
    proc = subprocess.run([sys.executable, __file__, "--child", name, json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child {name} {spec} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stdout": proc.stdout}


def run_train_py(flags: list, out: Path) -> dict:
    """python train.py FLAGS in its own process: results.json, its wall time and stdout."""
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, flags), "--output_dir", str(out),
           "--overwrite", "--keep_checkpoints", "1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"train.py {' '.join(map(str, flags))} failed (exit "
                         f"{proc.returncode}):\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    return {**res, "process_wall_s": wall, "stdout": proc.stdout}


# ----------------------------------------------------------------------------- sections

def per_round(values: list[float], name: str, target: str = "") -> str:
    v = sorted(values)
    return (f"{name} per round: median {statistics.median(v):.2f}, range {v[0]:.2f}-"
            f"{v[-1]:.2f} ({len(v)} rounds){' (target ' + target + ')' if target else ''}")


class Bench:
    """One invocation: its settings, its temporary folder and the caches built in it."""

    def __init__(self, args, tmp: Path):
        self.a, self.tmp = args, tmp
        self.builds: dict[int, dict] = {}  # size -> child_build's answer, shared by 1 and 3

    def photos(self, count: int | None = None) -> Path:
        return image_folder("jpeg", count or self.a.images)

    def build(self, size: int) -> dict:
        """The big folder's caches at `size` in this invocation's cache folder (once)."""
        if size not in self.builds:
            self.builds[size] = child("build", dataset=str(self.photos()), size=size,
                                      cache_dir=str(self.tmp / "cache"))
            if "cache: reusing" in self.builds[size]["stdout"]:
                print("  ! build: a cache was reused in a fresh --cache_dir", flush=True)
        return self.builds[size]

    def loader(self) -> None:
        a = self.a
        print(f"\n[1] loader throughput, one core (num_workers=0, pinned, batches of {BATCH}), "
              f"no model; {a.images} JPEGs; stream and imagefolder decode {a.loader_images} "
              "training images, cache reads random batches of all of them", flush=True)
        print(f"    {'px':>4} {'variant':12} {'img/s/core':>12} {'vs stream':>10}")
        for size in a.sizes:
            self.build(size)
            runs: dict[str, list[float]] = {"cache": [], "stream": [], "imagefolder": []}
            for r in range(a.rounds):
                names = list(runs) if r % 2 == 0 else list(runs)[::-1]
                for variant in names:
                    res = child("loader", dataset=str(self.photos()), size=size,
                                variant=variant, cache_dir=str(self.tmp / "cache"), seed=r,
                                subset=a.loader_images, min_s=a.min_s)
                    runs[variant].append(res["images"] / res["s"])
                    if "cache: decoding" in res["stdout"]:
                        print("  ! loader: the cache built in [3] was not reused", flush=True)
            best = {k: max(v) for k, v in runs.items()}
            for variant, rate in best.items():
                print(f"    {size:>4} {variant:12} {rate:12.1f} {rate / best['stream']:10.2f}")
            ratios = [c / s for c, s in zip(runs["cache"], runs["stream"])]
            folder = [s / f for s, f in zip(runs["stream"], runs["imagefolder"])]
            print(f"    {size:>4} {per_round(ratios, 'cache/stream', '>= 10')}")
            print(f"    {size:>4} {per_round(folder, 'stream/imagefolder')}", flush=True)

    def train(self) -> None:
        a = self.a
        folder = self.photos(a.train_images)
        print(f"\n[2] training throughput: train.py --model resnet18 --epochs 1 --precise_bn 0, "
              f"{a.train_images} JPEGs (80% train), cache vs memory, order alternating over "
              f"{a.rounds} round(s); best of rounds", flush=True)
        print(f"    {'px':>4} {'mode':8} {'train s':>8} {'img/s':>8} {'startup s':>10} "
              f"{'RSS MB':>8}")
        for size in a.train_sizes:
            runs: dict[str, list[dict]] = {"memory": [], "cache": []}
            for r in range(a.rounds):
                for mode in (["memory", "cache"] if r % 2 == 0 else ["cache", "memory"]):
                    runs[mode].append(run_train_py(
                        ["--dataset", folder, "--model", "resnet18", "--image_size", size,
                         "--data_mode", mode, "--cache_dir", self.tmp / "cache2", "--epochs",
                         1, "--precise_bn", 0], self.tmp / "runs" / mode))
                    assert runs[mode][-1]["data_mode"] == mode
            for mode, results in runs.items():
                b = max(results, key=lambda x: x["images_per_s"])
                print(f"    {size:>4} {mode:8} {b['train_time_s']:8.2f} {b['images_per_s']:8.1f}"
                      f" {b['startup_s']:10.2f} {b['peak_rss_mb']:8.0f}")
            ratios = [m["images_per_s"] / c["images_per_s"]
                      for m, c in zip(runs["memory"], runs["cache"])]
            print(f"    {size:>4} {per_round(ratios, 'memory/cache img/s', '<= 1.15')}",
                  flush=True)

    def build_section(self) -> None:
        a = self.a
        print(f"\n[3] cache build, the first epoch's extra cost: train.cached on {a.images} "
              "JPEGs (training rows at size / 0.875, validation rows at size)", flush=True)
        print(f"    {'px':>4} {'split':6} {'images':>7} {'seconds':>8} {'img/s':>8} "
              f"{'img/s/core':>11} {'GB written':>11} {'workers':>8}")
        for size in a.sizes:
            res = self.build(size)
            parts = [res["train"], res["val"]]
            parts.append({k: sum(p[k] for p in parts) for k in ("images", "s", "bytes")})
            for name, p in zip(("train", "val", "all"), parts):
                rate = p["images"] / p["s"]
                cores = os.cpu_count()
                print(f"    {size:>4} {name:6} {p['images']:7d} {p['s']:8.2f} {rate:8.1f} "
                      f"{rate / cores:11.1f} {p['bytes'] / 1e9:11.3f} "
                      f"{res['train']['workers']:8d}", flush=True)

    def rss(self) -> None:
        a = self.a
        print(f"\n[4] peak RSS (results.json: the main process): train.py --model cnn "
              f"--image_size 64 --epochs 1 --precise_bn 0 --memory_budget_gb {a.rss_budget_gb}"
              ", --data_mode auto (should pick cache; a fresh --cache_dir: the build included)"
              + (" and stream for reference" if a.rss_stream else ""), flush=True)
        print(f"    {'images':>7} {'asked':6} {'picked':7} {'peak RSS MB':>12} {'img/s':>8} "
              f"{'startup s':>10} {'wall s':>7}")
        for mode in ["auto"] + (["stream"] if a.rss_stream else []):
            for count in a.rss_images:
                res = run_train_py(
                    ["--dataset", self.photos(count), "--model", "cnn", "--image_size", 64,
                     "--data_mode", mode, "--memory_budget_gb", a.rss_budget_gb, "--cache_dir",
                     self.tmp / f"cache4-{count}", "--epochs", 1, "--precise_bn", 0],
                    self.tmp / "runs" / f"rss-{mode}-{count}")
                print(f"    {count:7d} {mode:6} {res['data_mode']:7} {res['peak_rss_mb']:12.1f} "
                      f"{res['images_per_s']:8.1f} {res['startup_s']:10.2f} "
                      f"{res['process_wall_s']:7.1f}", flush=True)
                if mode == "auto" and res["data_mode"] != "cache":
                    print(f"  ! auto picked {res['data_mode']}, not cache", flush=True)

    def startup(self) -> None:
        a = self.a
        print("\n[5] start-up against file count: 32x32 PNGs, train.py --data_mode cache "
              "--epochs 1 --model cnn; cold (a fresh --cache_dir: decodes) and warm (the same "
              "command again); then start-up's parts in a fresh process on the warm cache",
              flush=True)
        print(f"    {'files':>7} {'cold s':>8} {'warm s':>8} {'imports':>8} {'splits':>8} "
              f"{'probe':>8} {'caches':>8} {'reused':>7}")
        for count in a.startup_files:
            folder, cache = image_folder("png32", count), self.tmp / f"cache5-{count}"
            flags = ["--dataset", folder, "--data_mode", "cache", "--cache_dir", cache,
                     "--epochs", 1, "--model", "cnn"]
            cold = run_train_py(flags, self.tmp / "runs" / f"cold-{count}")
            warm = run_train_py(flags, self.tmp / "runs" / f"warm-{count}")
            parts = child("startup_parts", dataset=str(folder), cache_dir=str(cache))
            reused = warm["stdout"].count("cache: reusing")
            if "cache: decoding" in parts["stdout"]:
                print("  ! start-up parts: the warm cache was not reused", flush=True)
            print(f"    {count:7d} {cold['startup_s']:8.2f} {warm['startup_s']:8.2f} "
                  f"{parts['imports']:8.2f} {parts['load_splits']:8.2f} {parts['probe']:8.2f} "
                  f"{parts['open']:8.2f} {reused:5d}/2", flush=True)
            if reused != 2 or "cache: decoding" in warm["stdout"]:
                print("  ! the warm run decoded again:\n" + warm["stdout"][-1500:], flush=True)

    def formats(self) -> None:
        a = self.a
        folder = self.tmp / "formats"
        folder.mkdir()
        child("formats_setup", folder=str(folder), rows=a.format_rows)
        print(f"\n[6] storage formats: random batches of {BATCH} of {a.format_rows} rows of "
              f"{'x'.join(map(str, FORMAT_SHAPE))} uint8, one core, {a.rounds} round(s)",
              flush=True)
        print(f"    {'format':14} {'rows/s/core':>12} {'vs pread':>9}")
        names = {"pread": "pread (OnDisk)", "memmap": "numpy memmap", "array3d": "Arrow Array3D",
                 "flat": "Arrow flat"}
        runs: dict[str, list[float]] = {k: [] for k in names}
        for r in range(a.rounds):
            for fmt in (list(names) if r % 2 == 0 else list(names)[::-1]):
                res = child("formats_read", folder=str(folder), rows=a.format_rows, format=fmt,
                            seed=r, min_s=a.min_s)
                runs[fmt].append(res["rows"] / res["s"])
        for fmt, rates in runs.items():
            best = max(rates)
            print(f"    {names[fmt]:14} {best:12.0f} {best / max(runs['pread']):9.3f}")
        for fmt in list(names)[1:]:
            ratios = [x / p for x, p in zip(runs[fmt], runs["pread"])]
            print(f"    {per_round(ratios, fmt + '/pread')}")
        sys.stdout.flush()


# ----------------------------------------------------------------------------- main

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_py_version() -> str:
    """train.py's sha256 prefix and git commit: the bench measures the file as it is now."""
    import hashlib
    digest = hashlib.sha256((ROOT / "train.py").read_bytes()).hexdigest()[:12]
    git = subprocess.run(["git", "log", "-1", "--format=%h", "--", "train.py"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "train.py"], cwd=ROOT,
                           capture_output=True).returncode
    return f"sha256 {digest} (last commit {git or '?'}{', edited since' if dirty else ''})"


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", "--only", nargs="+", default=["all"],
                   help="names or numbers: " + ", ".join(f"{i + 1} {n}"
                                                         for i, n in enumerate(SECTIONS)))
    p.add_argument("--images", type=int, default=20000, help="JPEGs in the big folder")
    p.add_argument("--sizes", type=ints, default=[64, 160], help="px for sections 1 and 3")
    p.add_argument("--loader_images", type=int, default=2000,
                   help="section 1: images stream and imagefolder decode per run")
    p.add_argument("--train_images", type=int, default=2000, help="section 2's folder")
    p.add_argument("--train_sizes", type=ints, default=[64, 160], help="section 2: px")
    p.add_argument("--rss_images", type=ints, default=None, help="section 4 (5000,IMAGES)")
    p.add_argument("--rss_budget_gb", type=float, default=0.01, help="section 4")
    p.add_argument("--rss_stream", type=int, default=1, help="section 4: stream too (1/0)")
    p.add_argument("--startup_files", type=ints, default=[5000, 50000], help="section 5")
    p.add_argument("--format_rows", type=int, default=20000, help="section 6")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min_s", type=float, default=2.0, help="seconds per timed read loop")
    p.add_argument("--quick", action="store_true", help="everything tiny: a smoke test")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: NAME JSON
    a = p.parse_args()
    if a.quick:
        a.images, a.sizes, a.loader_images, a.train_images = 300, [64], 100, 300
        a.train_sizes = [64]
        a.rss_images, a.rss_stream, a.startup_files = [150, 300], 0, [500, 1000]
        a.rss_budget_gb = 0.001
        a.format_rows, a.rounds, a.min_s = 2000, 1, 0.2
    a.rss_images = a.rss_images or [5000, a.images]
    wanted = set(a.section)
    unknown = wanted - {"all", *SECTIONS, *map(str, range(1, len(SECTIONS) + 1))}
    if unknown:
        p.error(f"--section {' '.join(sorted(unknown))}: choose from {SECTIONS} or 1-6")
    a.section = [n for i, n in enumerate(SECTIONS)
                 if wanted & {"all", n, str(i + 1)}]
    return a


def main() -> None:
    a = parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child[0]](json.loads(a.child[1]))))
        return
    v = {k: importlib.metadata.version(k) for k in ("torch", "torchvision", "datasets")}
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} "
          f"usable), load average {os.getloadavg()[0]:.2f}; python "
          f"{platform.python_version()}, " + ", ".join(f"{k} {x}" for k, x in v.items()))
    version = train_py_version()
    print(f"train.py {version}")
    print(f"sections {' '.join(a.section)}; {a.images} JPEGs, sizes {a.sizes}, "
          f"{a.rounds} round(s){', quick' if a.quick else ''}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="cachebench-run-"))
    os.environ.update(HF_DATASETS_CACHE=str(tmp / "hf"), HF_HUB_OFFLINE="1",
                      HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    t0 = time.perf_counter()
    try:
        bench = Bench(a, tmp)
        for name in a.section:
            t = time.perf_counter()
            getattr(bench, "build_section" if name == "build" else name)()
            print(f"    ({name}: {time.perf_counter() - t:.0f} s, load average "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}")
    if train_py_version() != version:
        print(f"  ! train.py changed during the run: now {train_py_version()}")


if __name__ == "__main__":
    main()
