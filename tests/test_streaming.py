"""Data bigger than the disk: --streaming from parquet and WebDataset .tar shards the tests
write (scikit-learn's digits as PNG bytes), trained, resumed bit-exactly after kill -9 and a
signal, evaluated exactly, every example of an epoch once across processes and workers, and
bad shards refused in one line."""
from __future__ import annotations

import io
import json
import re
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import psutil
import PIL.Image
import pytest
import torch

import train
from conftest import ROOT, assert_same_weights, events, results, run_cli, run_main
from test_checkpoints import kill9, start, wait_for_step

TRAIN_SHARDS = (310, 290, 260, 300, 277)  # 1,437 rows in uneven shards
VAL_ROWS = 360


def digits() -> tuple[list[bytes], np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    out = []
    for img in d.images:
        buf = io.BytesIO()
        PIL.Image.fromarray(np.round(img * 255 / 16).astype(np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out, d.target


def parquet_shards(root: Path, row_group: int = 50) -> Path:
    """data/train-0000N-of-00005.parquet and data/validation-*.parquet, as datasets writes
    them (Image and ClassLabel features in the schema), with an id column."""
    import datasets
    images, labels = digits()
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64"),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    (root / "data").mkdir(parents=True)
    bounds = np.cumsum([0, *TRAIN_SHARDS, VAL_ROWS // 2, VAL_ROWS - VAL_ROWS // 2])
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        name = (f"train-{k:05d}-of-00005" if k < 5 else f"validation-{k - 5:05d}-of-00002")
        rows = {"image": [{"bytes": images[i], "path": None} for i in range(a, b)],
                "id": list(range(a, b)), "label": labels[a:b].tolist()}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            root / "data" / f"{name}.parquet", batch_size=row_group)
    return root


def tar_shards(root: Path) -> Path:
    """train/*.tar and validation/*.tar: a PNG and a .cls per sample, as WebDataset writes."""
    images, labels = digits()
    bounds = np.cumsum([0, *TRAIN_SHARDS, VAL_ROWS])
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        split = "train" if k < 5 else "validation"
        (root / split).mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / split / f"{split}-{k:04d}.tar", "w") as tar:
            for i in range(a, b):
                for ext, data in (("png", images[i]), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"sample{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return parquet_shards(tmp_path_factory.mktemp("parquet") / "digits")


ARGS = ["--streaming", "--epochs", 4, "--log_every", 1, "--mixed_precision", "no",
        "--checkpoint_every", 5]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    run = tmp_path_factory.mktemp("stream-ref") / "run"
    proc = run_cli(*ARGS, "--dataset", shards, "--output_dir", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_parquet_shards_train_and_validate(reference, shards):
    res = results(reference)
    assert res["val_acc"] > 0.9 and res["val_count"] == VAL_ROWS
    assert res["steps"] == 4 * (1437 // 64)
    out = (reference / "top_losses.csv").read_text().splitlines()
    assert out[1].split(",")[0].startswith(str(shards / "data" / "validation-0000"))
    assert " row " in out[1]
    config = json.loads((reference / "config.json").read_text())
    assert config["config"]["streaming"] is True and config["resolved"]["streaming"] is True
    assert config["identity"]["streaming"] == 1024


def test_kill9_mid_epoch_then_resume_is_bit_exact(tmp_path, reference, shards):
    run = tmp_path / "run"
    args = [*ARGS, "--dataset", shards, "--output_dir", run]
    for step in (8, 30):  # inside epoch 1 (a checkpoint at 5) and epoch 2 (at 30)
        proc = start(args)
        wait_for_step(proc, step)
        kill9(proc)
    proc = run_cli(*args)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    assert_same_weights(run, reference)
    assert (run / "metrics.jsonl").read_text() != ""
    keep = ("step", "epoch", "loss", "acc", "val_loss", "val_acc", "train_loss")
    assert [{k: e.get(k) for k in keep} for e in events(run)] == [
        {k: e.get(k) for k in keep} for e in events(reference)]


def test_two_processes_signal_then_resume_is_bit_exact(tmp_path, shards):
    """2 processes x 1 worker: stopped by SIGUSR1 mid-epoch, resumed, the same as a run that
    was not stopped; the streamed validation equals a map-style evaluation of its rows."""
    def args(run):
        return [*ARGS, "--epochs", 2, "--dataset", shards, "--output_dir", run,
                "--num_workers", 1]
    whole = run_cli(*args(tmp_path / "whole"), nproc=2, launcher="torchrun")
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = start(args(tmp_path / "run"), nproc=2)
    wait_for_step(proc, 14)  # 22 steps an epoch: a global batch of 64 over 2 processes
    rank1 = next(w for w in psutil.Process(proc.pid).children(recursive=True)
                 if "train.py" in " ".join(w.cmdline()) and w.environ().get("RANK") == "1")
    os.kill(rank1.pid, signal.SIGUSR1)  # rank 0 learns of it in the per-step collective
    out, _ = proc.communicate(timeout=300)
    assert "stopped by a signal to another process at step" in out, out[-3000:]
    assert "results.json" not in os.listdir(tmp_path / "run")
    again = run_cli(*args(tmp_path / "run"), nproc=2, launcher="torchrun")
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    assert_same_weights(tmp_path / "run", tmp_path / "whole")
    res = results(tmp_path / "whole")
    assert res["val_count"] == VAL_ROWS and res["val_acc"] > 0.6  # 2 epochs; 10% is chance
    # the same rows read map-style by datasets (no --streaming), in 1 process
    assert run_main("--eval_only", "--weights", tmp_path / "whole", "--dataset", shards,
                    "--split", "validation", "--output_dir", tmp_path / "eval") == 0
    one = results(tmp_path / "eval")
    assert one["val_count"] == VAL_ROWS and one["val_acc"] == res["val_acc"]
    assert abs(one["val_loss"] - res["val_loss"]) < 1e-6
    assert one["val_confusion_matrix"] == res["val_confusion_matrix"]


def id_loader(shards_dir: Path, rank: int, workers: int, cfg):
    """The training loader of one of 2 processes, reading the id column instead of the label."""
    s = train.stream_splits(cfg, None)
    s.train.use("image", "id", [str(i) for i in range(1437)], cfg.shuffle_window)
    sampler = train.StreamSampler(s.train, 32, rank, 2, cfg)
    dataset = train.Decoded(s.train, "image", "id", "L", (8, 8))
    return sampler, torch.utils.data.DataLoader(dataset, batch_size=32, sampler=sampler,
                                                drop_last=True, num_workers=workers)


def test_every_example_once_per_epoch_over_processes_and_workers(shards):
    cfg = train.Config(dataset=str(shards), streaming=True, shuffle_window=256)
    epochs = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            sampler, loader = id_loader(shards, rank, 2, cfg)  # 2 workers each
            sampler.set_epoch(epoch)
            seen += [int(i) for _, ids in loader for i in ids]
        assert len(seen) == len(set(seen)) == 2 * (1437 // 2 // 32 * 32)  # 1,408 of 1,437
        epochs.append(seen)
    assert epochs[0] != epochs[1] and set(epochs[0]) != set(epochs[1])  # other order, other rest
    # the plan is a function of (seed, epoch): started at batch 9 it is the same from there
    sampler, _ = id_loader(shards, 1, 0, cfg)
    assert list(sampler.plan(1, 9)) == list(sampler.plan(1, 0))[9 * 32:]
    # each process reads its own stretch of the shards: few shards in common
    plans = [{s for s, _ in id_loader(shards, r, 0, cfg)[0].plan(0, 0)} for r in (0, 1)]
    assert len(plans[0] & plans[1]) <= 1


def test_tar_shards_train(tmp_path):
    data = tar_shards(tmp_path / "wds")
    proc = run_cli("--streaming", "--dataset", data, "--epochs", 3, "--output_dir",
                   tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 training and 1 validation tar shards" in proc.stdout
    assert "classes 0-9 from the .cls labels (--classes names them)" in proc.stdout
    res = results(tmp_path / "run")
    assert res["val_count"] == VAL_ROWS and res["val_acc"] > 0.8


def rewrite(path: Path, rows: dict | None = None, data: bytes | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    if data is not None:
        path.write_bytes(data)
        return
    table = pq.read_table(path)
    if rows is None:
        pq.write_table(table.slice(0, 0), path)
        return
    new = rows(table)  # the same columns keep datasets' features (the schema's metadata)
    pq.write_table(pa.table(new, schema=table.schema if list(new) == table.column_names
                            else None), path)


def copy(shards: Path, to: Path) -> Path:
    import shutil
    shutil.copytree(shards, to)
    return to


def test_bad_shards_get_one_line_and_exit_2(tmp_path, shards, capsys):
    def refused(data, *extra, workers: bool = False):
        """In this process; with loader workers as a program (its exit ends the workers
        that an error leaves: in this process they would outlive the test)."""
        args = ["--streaming", "--dataset", data, "--output_dir",
                tmp_path / f"r-{Path(data).name}", "--epochs", 1, *extra]
        if workers:
            proc = run_cli(*args, "--num_workers", 1, timeout=300)
            code, err = proc.returncode, proc.stderr
        else:
            capsys.readouterr()
            code, err = run_main(*args), capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    one = copy(shards, tmp_path / "garbage")
    rewrite(one / "data" / "train-00002-of-00005.parquet", data=b"not parquet at all")
    err = refused(one)
    assert "cannot read shard" in err and "train-00002-of-00005.parquet" in err

    empty = copy(shards, tmp_path / "empty")
    rewrite(empty / "data" / "train-00001-of-00005.parquet")
    assert "train-00001-of-00005.parquet holds no examples" in refused(empty)

    other = copy(shards, tmp_path / "columns")
    rewrite(other / "data" / "train-00003-of-00005.parquet",
            lambda t: {"image": t["image"], "label": t["label"]})
    err = refused(other)
    assert "train-00003-of-00005.parquet has columns image (" in err and "id (int64)" in err

    broken = copy(shards, tmp_path / "corrupt")
    path = broken / "data" / "train-00000-of-00005.parquet"
    rewrite(path, lambda t: {"image": [
        {"bytes": b"\x89PNG garbage" if i == 7 else im["bytes"], "path": None}
        for i, im in enumerate(t["image"].to_pylist())], "id": t["id"], "label": t["label"]})
    err = refused(broken)
    assert f"cannot read image {path} row 7" in err  # among the images probed up front

    # in a loader worker, while training: a shard past the probed ones
    late = copy(shards, tmp_path / "late")
    path = late / "data" / "train-00004-of-00005.parquet"
    rewrite(path, lambda t: {"image": [{"bytes": b"\x89PNG garbage", "path": None}] * len(t),
                             "id": t["id"], "label": t["label"]})
    err = refused(late, workers=True)
    assert f"cannot read image {path} row " in err
    labels = copy(shards, tmp_path / "labels")
    path = labels / "data" / "train-00004-of-00005.parquet"
    rewrite(path, lambda t: {"image": t["image"], "id": t["id"], "label": [12] * len(t)})
    err = refused(labels, workers=True)
    assert f"{path} row " in err and "label 12 is not one of the 10 classes" in err

    pages = copy(shards, tmp_path / "pages")  # the footer intact, the data pages not
    path = pages / "data" / "train-00004-of-00005.parquet"
    raw = bytearray(path.read_bytes())
    raw[4:len(raw) // 2] = bytes(len(raw) // 2 - 4)
    path.write_bytes(bytes(raw))
    err = refused(pages, workers=True)
    assert f"cannot read shard {path}, row group " in err

    forged = copy(shards, tmp_path / "forged")
    path = forged / "data" / "train-00000-of-00005.parquet"
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata(
        {"huggingface": '{"info": {"features": {"image": {"_type": "Nonsense"}}}}'}), path)
    assert f"cannot read shard {path}: " in refused(forged)

    no_val = copy(shards, tmp_path / "noval")
    for f in (no_val / "data").glob("validation-*"):
        f.unlink()
    assert "--streaming needs a validation split" in refused(no_val)

    assert "no such directory" in refused(tmp_path / "nowhere")
    assert "--classes names.txt: no such file" in refused(shards, "--classes", "names.txt")
    # a Hub id while the Hub is off (the tests run with HF_HUB_OFFLINE=1): at once
    assert "HF_HUB_OFFLINE" in refused("someone/some-shards")
    # flags that only mean something with --streaming, or cannot go with it
    capsys.readouterr()
    assert run_main("--classes", "names.txt") == 2
    assert "--classes goes with --streaming" in capsys.readouterr().err
    assert run_main("--streaming", "--data_mode", "memory") == 2
    assert "drop --data_mode memory" in capsys.readouterr().err
    assert run_main("--streaming", "--eval_only", "--weights", "run") == 2
    assert "--streaming is for training" in capsys.readouterr().err


def test_tar_sample_without_a_label_is_refused(tmp_path, capsys):
    data = tar_shards(tmp_path / "wds")
    with tarfile.open(data / "train" / "train-0000.tar", "a") as tar:
        info = tarfile.TarInfo("lonely.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert run_main("--streaming", "--dataset", data, "--output_dir", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "train-0000.tar: sample lonely has png" in err and ".cls label" in err


def test_a_glob_takes_the_shards_it_matches(tmp_path, shards, capsys):
    glob = shards / "data" / "*-0000[0-2]-of-*.parquet"  # train 0-2 (860 rows), validation
    assert run_main("--streaming", "--dataset", glob, "--epochs", 1, "--output_dir",
                    tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "streaming: 3 training and 2 validation parquet shards" in out
    assert "data: 860 training and 360 validation images" in out
    assert results(tmp_path / "run")["steps"] == 860 // 64
    # relative, as a user types it in the folder above
    os.chdir(shards)
    try:
        assert run_main("--streaming", "--dataset", "./data/*-0000[0-2]-of-*.parquet",
                        "--epochs", 1, "--output_dir", tmp_path / "relative") == 0
    finally:
        os.chdir(ROOT)
    assert "data: 860 training and 360 validation images" in capsys.readouterr().out
    assert run_main("--streaming", "--dataset", shards / "data" / "*.tar", "--output_dir",
                    tmp_path / "none") == 2
    assert "holds no data files" in capsys.readouterr().err


def test_parquet_of_file_paths_reads_the_files(tmp_path, image_folder, capsys):
    """datasets' to_parquet of an image folder stores paths, not bytes: the files are read."""
    import datasets
    folder = datasets.load_dataset("imagefolder", data_dir=str(image_folder))
    (tmp_path / "paths" / "data").mkdir(parents=True)
    for split, rows in folder.items():
        rows.to_parquet(tmp_path / "paths" / "data" / f"{split}-00000-of-00001.parquet")
    assert run_main("--streaming", "--dataset", tmp_path / "paths", "--epochs", 6,
                    "--output_dir", tmp_path / "run") == 0
    res = results(tmp_path / "run")
    assert res["val_count"] == 30 and res["val_acc"] > 0.8
    first = (tmp_path / "run" / "top_losses.csv").read_text().splitlines()[1]
    assert first.startswith(str(image_folder / "validation" / "digit"))


def bad_copy(shards: Path, to: Path) -> tuple[Path, Path, Path]:
    """Shards with one unreadable image among those probed up front (train-00000 row 3) and 40
    that only a loader worker meets (train-00004 rows 0-39)."""
    data = copy(shards, to)
    first = data / "data" / "train-00000-of-00005.parquet"
    rewrite(first, lambda t: {"image": [
        {"bytes": b"\x89PNG garbage" if i == 3 else im["bytes"], "path": None}
        for i, im in enumerate(t["image"].to_pylist())], "id": t["id"], "label": t["label"]})
    late = data / "data" / "train-00004-of-00005.parquet"
    rewrite(late, lambda t: {"image": [
        {"bytes": b"\x89PNG garbage" if i < 40 else im["bytes"], "path": None}
        for i, im in enumerate(t["image"].to_pylist())], "id": t["id"], "label": t["label"]})
    return data, first, late


def expected_skips(data: Path, epochs: int) -> int:
    """The bad rows' occurrences in the epochs' plans: what --skip_bad_examples replaces."""
    cfg = train.Config(dataset=str(data), streaming=True)
    sampler = train.StreamSampler(train.stream_splits(cfg, None).train, 64, 0, 1, cfg)
    bad = {(0, 3)} | {(4, r) for r in range(40)}
    return sum(i in bad for epoch in range(epochs) for i in sampler.plan(epoch, 0))


def test_skip_bad_examples_replaces_them_and_names_them(tmp_path, shards):
    """--skip_bad_examples: unreadable training images (one probed up front, 40 met by a loader
    worker) are named in note lines and replaced by the next readable row of their shard; the
    run finishes. Without the flag the same data stop it (exit 2)."""
    data, first, late = bad_copy(shards, tmp_path / "bad")
    args = ["--streaming", "--dataset", data, "--epochs", 2, "--num_workers", 1]
    proc = run_cli(*args, "--skip_bad_examples", "--output_dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    noted = proc.stdout + proc.stderr
    assert f"note: skipped: cannot read image {first} row 3" in noted
    late_rows = {int(r) for r in re.findall(rf"skipped: cannot read image {late} row (\d+)", noted)}
    assert late_rows and late_rows <= set(range(40))
    res = results(tmp_path / "run")
    assert res["steps"] == 2 * 22 and res["val_acc"] > 0.6
    # counted once per trained occurrence: epoch 0's and 1's plans hold these rows
    assert expected_skips(data, 2) > 40 and res["skipped_examples"] == expected_skips(data, 2)
    stopped = run_cli(*args, "--output_dir", tmp_path / "strict")
    assert stopped.returncode == 2 and f"cannot read image {first} row 3" in stopped.stderr


@pytest.mark.slow
def test_skip_bad_examples_count_and_weights_survive_kill9(tmp_path, shards):
    """Killed with -9 mid-epoch and resumed: the same replacements, the same count (pending
    ones are counted at each checkpoint, the batches after it trained and counted again), the
    same weights as a run left alone."""
    data, _, _ = bad_copy(shards, tmp_path / "bad")
    args = ["--streaming", "--dataset", data, "--epochs", 2, "--num_workers", 1,
            "--skip_bad_examples", "--checkpoint_every", 5, "--log_every", 1]
    whole = run_cli(*args, "--output_dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = start([*args, "--output_dir", tmp_path / "run"])
    wait_for_step(proc, 31)
    kill9(proc)
    again = run_cli(*args, "--output_dir", tmp_path / "run")
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    assert_same_weights(tmp_path / "run", tmp_path / "whole")
    assert results(tmp_path / "run")["skipped_examples"] == results(tmp_path / "whole")[
        "skipped_examples"] == expected_skips(data, 2)


def test_tar_shards_may_mix_image_formats(tmp_path):
    """WebDataset shards whose samples are .png and .jpg, and whose first samples differ."""
    data = tar_shards(tmp_path / "wds")
    images, labels = digits()
    with tarfile.open(data / "train" / "train-0001.tar", "w") as tar:  # rows 310-599
        for i in range(310, 600):
            buf = io.BytesIO()
            PIL.Image.open(io.BytesIO(images[i])).save(buf, "JPEG", quality=95)
            ext, blob = ("jpg", buf.getvalue()) if i % 2 == 0 else ("png", images[i])
            for name, payload in ((ext, blob), ("cls", str(labels[i]).encode())):
                info = tarfile.TarInfo(f"sample{i:05d}.{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    proc = run_cli("--streaming", "--dataset", data, "--epochs", 2, "--num_workers", 1,
                   "--output_dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results(tmp_path / "run")["steps"] == 2 * 22
