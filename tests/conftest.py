"""Helpers shared by the tests: real runs of train.py, in-process (fast) or as processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

# Before torch is imported: one thread per test process (tests run two at a time on two
# cores), and never the network.
os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                  HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

train.import_libraries()  # what main() does after parsing the flags
torch.set_num_threads(1)


def run_main(*args) -> int:
    """train.main() in this process; Accelerate's singletons and the signal handlers that
    main() installs (and, as a program, never restores) are reset afterwards."""
    from accelerate.state import AcceleratorState, GradientState
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        return train.main([str(a) for a in args])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        for s, handler in handlers.items():
            signal.signal(s, handler)


def launch_cmd(nproc: int = 1, launcher: str = "python") -> list[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), str(ROOT / "train.py")]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "accelerate_config.yaml"), "--num_processes", str(nproc),
                "--main_process_port", str(free_port()), str(ROOT / "train.py")]
    return [sys.executable, str(ROOT / "train.py")]


def run_cli(*args, nproc: int = 1, launcher: str = "python", cwd=None, timeout: int = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = launch_cmd(nproc, launcher) + [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ in {different}"


def digit_images(classes: int = 3, per_class: int = 40, size: int = 16):
    """Real handwritten digits (scikit-learn's), upscaled, as PIL images and labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    out = []
    for c in range(classes):
        for img in d.images[d.target == c][:per_class]:
            a = np.round(img * 255 / 16).astype(np.uint8)
            out.append((PIL.Image.fromarray(a).resize((size, size)), c))
    return out


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """train/ and validation/ folders of class subfolders; PNG and JPEG, grayscale and RGB."""
    root = tmp_path_factory.mktemp("imagefolder")
    items = digit_images(per_class=50)
    for i, (img, label) in enumerate(items):
        split = "validation" if i % 5 == 0 else "train"
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:  # some RGB JPEGs among grayscale PNGs
            img.convert("RGB").save(folder / f"{i}.jpg", quality=95)
        else:
            img.save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def flat_folder(tmp_path_factory) -> Path:
    """Class subfolders only (no split folders): the validation split is held out."""
    root = tmp_path_factory.mktemp("flatfolder")
    for i, (img, label) in enumerate(digit_images(per_class=30, size=12)):
        folder = root / f"class_{label}"
        folder.mkdir(exist_ok=True)
        img.save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def saved_dataset(tmp_path_factory) -> Path:
    """A save_to_disk DatasetDict with unusual column names and an int label column."""
    import datasets
    items = digit_images(per_class=40, size=10)
    ds = datasets.Dataset.from_dict(
        {"pixels": [img for img, _ in items], "digit": [label for _, label in items],
         "note": ["x"] * len(items)},
        features=datasets.Features({"pixels": datasets.Image(), "digit": datasets.Value("int64"),
                                    "note": datasets.Value("string")}))
    parts = ds.train_test_split(test_size=0.25, seed=0)
    path = tmp_path_factory.mktemp("saved") / "ds"
    datasets.DatasetDict({"train": parts["train"], "test": parts["test"]}).save_to_disk(str(path))
    return path


def mount_tmpfs(disk: Path, size: str) -> None:
    """A real file system of `size` (a tmpfs) at `disk`, made here: the disk-full tests. Skips
    where it cannot be mounted (not root), and fails instead under CI, which must run them."""
    disk.mkdir()
    reason = "mounting a tmpfs needs root" if os.geteuid() != 0 else None
    if reason is None:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                  str(disk)], capture_output=True, text=True)
        if mounted.returncode != 0:
            reason = f"cannot mount a tmpfs: {mounted.stderr.strip()}"
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run the disk-full tests, but {reason}")
    if reason:
        pytest.skip(reason)
