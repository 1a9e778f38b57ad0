"""Every file it reads may be hostile (issue 16): the attack file.

Each test forges one input that train.py reads (a cached download, a lock, the decoded cache,
a checkpoint, a run's config, a flag, a file name), runs train.py on it and checks what it
must do: the exit code, one error line on stderr and no traceback (or, where the run must go
on, the line that says what it did instead), and the side effect (no marker file written by a
pickle, a victim file unchanged, nothing trained on forged data, no directory left behind).

ATTACKS below is the contract: the forged input, the exit code and the message fragments of
every case. The tests look their expectations up there, so weakening one shows in the table.

In process (run_main) where that is enough; real processes where signals, memory limits or a
process that must end (a file that never ends) matter. One small trained run (2 epochs,
checkpoints every 5 steps, all kept) and one decoded cache are shared by the module and copied
per test."""
from __future__ import annotations

import ast
import csv
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import ROOT, assert_same_weights, mount_tmpfs, run_cli, run_main
from test_faults import Limited, one_error_line

# (case, the forged input, exit code, fragments the one error line must hold; with exit 0 or
#  75: what the output must hold). "a|b": either. {name}: filled in by the test (a file name).
ATTACKS = [
    # 1. --pretrained: torchvision's cached download
    ("pretrained-wrong-sha256", "a marker-writing pickle as $TORCH_HOME/hub/checkpoints/"
     "resnet18-f37072fd.pth (the name's hash prefix does not match it)", 2,
     ("{file}", "sha256")),
    ("pretrained-own-sha256", "the same pickle named after its own sha256 prefix, the weights' "
     "url pointed at that name: it is read with weights_only=True", 2, ("{file}",)),
    # 2. locks
    ("run-lock-symlink", "<output_dir>/.lock a symbolic link to a victim file", 2,
     (".lock", "remove it")),
    ("run-lock-hardlink", "<output_dir>/.lock a hard link to a victim file", 2,
     (".lock", "remove it")),
    ("run-lock-dangling-symlink", "<output_dir>/.lock a symbolic link to a file that does not "
     "exist yet (it must not be created)", 2, (".lock", "remove it")),
    ("cache-lock-symlink", "<cache_dir>/<key>.lock a symbolic link to a victim file", 2,
     (".lock", "remove it")),
    # 3. the decoded cache: rebuilt, never trained on
    ("cache-shape", "cache.json shape [1, 8, 8] -> [1, 4, 16] (same bytes per row, same "
     "sample digest)", 0, ("building it again",)),
    ("cache-labels-header", "labels.npy whose header declares 10**12 rows", 0,
     ("building it again",)),
    ("cache-zero-rows", "cache.json rows 0 and shape [0, 8, 8], images.u8 emptied to match", 0,
     ("building it again",)),
    # 4. a checkpoint's manifest names files outside it
    ("manifest-dev-zero", "loop_state.json's file list names /dev/zero; --resume PATH", 2,
     ("loop_state.json|{ckpt}",)),
    ("manifest-parent", "loop_state.json's file list names ../../config.json (its true size "
     "and sha256); --resume PATH", 2, ("loop_state.json|{ckpt}",)),
    ("manifest-dev-zero-auto", "the newest checkpoint's file list names /dev/zero; --resume "
     "auto with an older complete one", 0, ("skipping damaged checkpoint", "resumed from")),
    ("manifest-parent-auto", "the newest checkpoint's file list names ../../config.json; "
     "--resume auto with an older complete one", 0,
     ("skipping damaged checkpoint", "resumed from")),
    ("manifest-huge-file-sigterm", "the manifest lists a sparse 100 GB file with its true size "
     "and a wrong sha256; SIGTERM while it is hashed", 75, ("SIGTERM",)),
    # 5. the pickled RNG states (Accelerate ignores a bad one and resumes)
    ("random-states-dict", "random_states_0.pkl = torch.save({'foo': 1}), manifest updated; "
     "--resume PATH", 2, ("random_states_0.pkl",)),
    ("random-states-garbage", "random_states_0.pkl = garbage bytes, manifest updated; --resume "
     "PATH", 2, ("random_states_0.pkl",)),
    ("random-states-auto", "the newest checkpoint's random_states_0.pkl = torch.save({'foo': "
     "1}), manifest updated; --resume auto with an older complete one", 0,
     ("skipping damaged checkpoint", "random_states_0.pkl", "resumed from")),
    # 6. one line instead of a traceback
    ("model-resnet-pretrained", "--model resnet --pretrained (no such model)", 2,
     ("--model resnet",)),
    ("optimizer-garbage", "optimizer.bin = garbage bytes, manifest updated; --resume PATH", 2,
     ("{ckpt}",)),
    ("loop-epoch-string", "loop_state.json loop.epoch \"141\" (a string); --resume PATH", 2,
     ("loop_state.json",)),
    ("loop-empty-last-metrics", "loop_state.json loop.last_metrics {} at an epoch-end "
     "checkpoint that still owes its evaluation; --resume PATH", 2, ("loop_state.json",)),
    ("crop-padding-100000", "--crop_padding 100000", 2, ("--crop_padding",)),
    ("crop-padding-3000", "--crop_padding 3000", 2, ("--crop_padding",)),
    ("crop-padding-minus-5", "--crop_padding -5", 2, ("--crop_padding",)),
    ("config-truncated", "the resumed run's config.json cut in half", 0, ("resumed from",)),
    ("config-foreign", "the resumed run's config.json = {\"foo\": 1}", 0, ("resumed from",)),
    # 8. smaller
    ("disk-full-at-start", "--output_dir on a file system filled to the last byte", 1,
     ("No space left on device",)),
    ("cache-space-slack", "--cache_dir on a 600 KB tmpfs: the cache plus the 1 MiB slack does "
     "not fit", 1, ("needs", "are wanted")),
    ("flag-epochs-x", "--epochs x", 2, ("--epochs",)),
    ("flag-lr-abc", "--lr abc", 2, ("--lr",)),
    ("flag-optimizer-foo", "--optimizer foo", 2, ("--optimizer",)),
    ("init-from-garbage", "--init_from bad.safetensors (not safetensors at all)", 2,
     ("--init_from",)),
    ("refused-new-output-dir", "--resume /nonexistent/ckpt with a new --output_dir", 2,
     ("/nonexistent/ckpt",)),
    ("predict-formula-names", "--predict on images named =cmd.png, +a.png, -b.png, @c.png", 0,
     ("predictions.csv",)),
]
CASES = {case: (forged, code, fragments) for case, forged, code, fragments in ATTACKS}
assert len(CASES) == len(ATTACKS), "duplicate case names"

# Evaluation batches for weights whose metadata declares a size: (image_size, channels, asked,
# at most).
# (declared image size, channels, --batch_size (0: not given), images per evaluation batch):
# forged metadata of 4096x4096 must not make a batch of 64 (12.9 GB of float input); an
# explicit --batch_size is what the user asked for.
EVAL_BATCH_BOUNDS = [([4096, 4096], 3, 0, 1), ([224, 224], 3, 0, 64), ([4096, 4096], 3, 16, 16)]

FINISHED = ["--epochs", 2, "--checkpoint_every", 5, "--keep_checkpoints", 0]  # 44 steps
CACHE_RUN = ["--epochs", 1, "--data_mode", "cache"]
NEWEST, OLDER = "step_00000044", "step_00000040"
# A normal run reads ~100 MB (imports included); reading more than this means it hashes a file
# that never ends. Not a clock: a slower machine reads the same bytes.
ENDLESS_READ = 5e9


def expect(case: str, code: int, out: str, err: str, **names) -> str:
    """The table's exit code and fragments; returns the line they were found in (the one error
    line, or for exit 0 / 75 all the output)."""
    forged, want, fragments = CASES[case]
    assert code == want, f"{case} ({forged}): exit {code}, expected {want}\n" \
                         f"{out[-2000:]}\n{err[-3000:]}"
    if want in (0, 75):
        assert "Traceback" not in out + err, (out + err)[-3000:]
        where = out + err
    else:
        where = one_error_line(err)
        assert where.startswith("train.py: "), where
    for fragment in fragments:
        choices = [f.format(**names) for f in fragment.split("|")]
        assert any(c in where for c in choices), f"{case}: none of {choices} in:\n{where[-3000:]}"
    return where


def in_process(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_main(*args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rchar(pid: int) -> int:
    """Bytes the process has read so far (/proc/PID/io), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration, ValueError):
        return 0


def wait_reading_at_most(p: Limited, limit: float, timeout: float = 300) -> Limited:
    """Waits for the process to end; fails (and kills it) once it has read more than `limit`
    bytes, i.e. it reads a file that never ends. `timeout` is only a safety net."""
    while p.running():
        if rchar(p.proc.pid) > limit:
            p.kill()
            pytest.fail(f"{p.name}: read more than {limit:.0e} bytes and still running: it "
                        f"hashes a file that never ends\n{p.out[-2000:]}{p.err[-2000:]}")
        if time.monotonic() - p.t0 > timeout:
            break  # Limited.wait fails it
        time.sleep(0.05)
    return p.wait(timeout)


# ----------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-epoch digits run with every checkpoint kept (5, 10, ..., 40, 44)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert run_main(*FINISHED, "--output_dir", run) == 0
    assert (run / "checkpoints" / NEWEST).is_dir() and (run / "checkpoints" / OLDER).is_dir()
    return run


def resumable(trained: Path, dest: Path, keep=(OLDER, NEWEST)) -> Path:
    """A copy of the trained run as a run that was stopped: no results, checkpoints `keep`."""
    run = dest / "run"
    shutil.copytree(trained, run)
    (run / ".lock").unlink(missing_ok=True)
    (run / "results.json").unlink()
    (run / "model.safetensors").unlink()
    for ckpt in (run / "checkpoints").iterdir():
        if ckpt.name not in keep:
            shutil.rmtree(ckpt)
    return run


def edit_loop_state(ckpt: Path, change) -> None:
    path = ckpt / "loop_state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state, indent=2, sort_keys=True))


def forge_file(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and record its new size and sha256: the manifest verifies."""
    (ckpt / name).write_bytes(data)
    edit_loop_state(ckpt, lambda s: s["files"].__setitem__(name, [len(data), sha256(data)]))


def list_in_manifest(ckpt: Path, name: str, size: int, digest: str) -> None:
    edit_loop_state(ckpt, lambda s: s["files"].__setitem__(name, [size, digest]))


@pytest.fixture(scope="module")
def cache_ref(tmp_path_factory) -> tuple[Path, Path]:
    """(a decoded digits cache, the 1-epoch run that built it). Digits hold out their
    validation split: one cache folder holds both."""
    root = tmp_path_factory.mktemp("cacheref")
    cache, run = root / "cache", root / "run"
    assert run_main(*CACHE_RUN, "--cache_dir", cache, "--output_dir", run) == 0
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    assert {"cache.json", "labels.npy", "images.u8"} <= {p.name for p in folders[0].iterdir()}
    return cache, run


def cache_copy(cache_ref, dest: Path) -> tuple[Path, Path]:
    """A copy of the decoded cache and its folder C/<key>."""
    cache = dest / "cache"
    shutil.copytree(cache_ref[0], cache)
    return cache, next(p for p in cache.iterdir() if p.is_dir())


class WritesMarker:
    """Unpickling it writes `marker` (and yields an empty dict)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({self.marker!r}).write_text('pwned') and {{}}",)


# ----------------------------------------------------------------------------- 1. --pretrained

PRETRAINED = ["--model", "resnet18", "--pretrained", "--image_size", 16, "--epochs", 1]


def test_pretrained_file_that_does_not_match_its_hash_prefix_is_not_unpickled(
        tmp_path, capsys, monkeypatch):
    home, marker = tmp_path / "torch", tmp_path / "marker"
    monkeypatch.setenv("TORCH_HOME", str(home))
    url = train.torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    file = home / "hub" / "checkpoints" / Path(url).name
    assert file.name == "resnet18-f37072fd.pth"
    file.parent.mkdir(parents=True)
    torch.save(WritesMarker(marker), file)
    code, out, err = in_process(capsys, *PRETRAINED, "--output_dir", tmp_path / "run")
    assert not marker.exists(), "torchvision's cached file was unpickled: its code ran"
    expect("pretrained-wrong-sha256", code, out, err, file=file.name)


def test_pretrained_file_named_after_its_own_hash_is_read_weights_only(
        tmp_path, capsys, monkeypatch):
    home, marker = tmp_path / "torch", tmp_path / "marker"
    monkeypatch.setenv("TORCH_HOME", str(home))
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    forged = folder / "forged.pth"
    torch.save(WritesMarker(marker), forged)
    file = folder / f"resnet18-{sha256(forged.read_bytes())[:8]}.pth"
    forged.rename(file)
    weights = train.torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(weights.value, "url", f"https://download.pytorch.org/models/{file.name}")
    assert weights.url.endswith(file.name)
    code, out, err = in_process(capsys, *PRETRAINED, "--output_dir", tmp_path / "run")
    assert not marker.exists(), "the cached file was unpickled without weights_only: its code ran"
    expect("pretrained-own-sha256", code, out, err, file=file.name)


# ----------------------------------------------------------------------------- 2. locks

VICTIM = b"precious bytes that no lock may touch\n"


@pytest.mark.parametrize("case", ["run-lock-symlink", "run-lock-hardlink",
                                  "run-lock-dangling-symlink"])
def test_a_run_lock_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, capsys, case):
    victim, run = tmp_path / "victim.txt", tmp_path / "run"
    run.mkdir()
    if case == "run-lock-dangling-symlink":
        os.symlink(victim, run / ".lock")
    else:
        victim.write_bytes(VICTIM)
        (os.link if case == "run-lock-hardlink" else os.symlink)(victim, run / ".lock")
    code, out, err = in_process(capsys, "--epochs", 1, "--output_dir", run)
    if case == "run-lock-dangling-symlink":
        assert not victim.exists(), "the lock's link target was created"
    else:
        assert victim.read_bytes() == VICTIM, "the lock's link target was written"
    expect(case, code, out, err)


def test_a_cache_lock_that_is_a_symlink_is_refused_and_its_target_untouched(
        tmp_path, capsys, cache_ref):
    cache, folder = cache_copy(cache_ref, tmp_path)
    lock = cache / f"{folder.name}.lock"
    assert lock.is_file()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    lock.unlink()
    os.symlink(victim, lock)
    code, out, err = in_process(capsys, *CACHE_RUN, "--cache_dir", cache,
                                "--output_dir", tmp_path / "run")
    assert victim.read_bytes() == VICTIM
    expect("cache-lock-symlink", code, out, err)


# ----------------------------------------------------------------------------- 3. the decoded cache

def npy_header(shape: tuple, descr: str = "<i8") -> bytes:
    """A .npy version 1.0 header, written by hand (numpy would refuse to write a lie)."""
    text = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))
    text += " " * (63 - (10 + len(text)) % 64) + "\n"  # the whole header: a multiple of 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def forge_shape(folder: Path) -> None:
    info = json.loads((folder / "cache.json").read_text())
    assert info["shape"] == [1, 8, 8]
    info["shape"] = [1, 4, 16]  # the same 64 bytes a row: size and sampled digest still match
    (folder / "cache.json").write_text(json.dumps(info))


def forge_labels_header(folder: Path) -> None:
    labels = folder / "labels.npy"
    body = labels.read_bytes()[len(npy_header((1797,))):]
    assert npy_header((1797,)) + body == labels.read_bytes()  # the header is numpy's own
    labels.write_bytes(npy_header((10**12,)) + body)  # 8 TB of labels, 14 KB of them there


def forge_zero_rows(folder: Path) -> None:
    info = json.loads((folder / "cache.json").read_text())
    info.update(rows=0, shape=[0, 8, 8])
    (folder / "cache.json").write_text(json.dumps(info))
    os.truncate(folder / "images.u8", 0)  # 0 bytes a row, 0 bytes in all: "consistent"


@pytest.mark.parametrize("case, forge", [("cache-shape", forge_shape),
                                         ("cache-labels-header", forge_labels_header),
                                         ("cache-zero-rows", forge_zero_rows)])
def test_a_forged_decoded_cache_is_rebuilt_not_trained_on(tmp_path, capsys, cache_ref, case,
                                                          forge):
    cache, folder = cache_copy(cache_ref, tmp_path)
    forge(folder)
    run = tmp_path / "run"
    code, out, err = in_process(capsys, *CACHE_RUN, "--cache_dir", cache, "--output_dir", run)
    expect(case, code, out, err)
    assert_same_weights(run, cache_ref[1])  # trained on the rebuilt rows, as the first run
    info = json.loads((folder / "cache.json").read_text())
    assert info["shape"] == [1, 8, 8] and info["rows"] == 1797


# ----------------------------------------------------------------------------- 4. the manifest

def test_a_manifest_naming_dev_zero_is_refused_and_the_run_ends(tmp_path, trained):
    run = resumable(trained, tmp_path)
    ckpt = run / "checkpoints" / OLDER
    list_in_manifest(ckpt, "/dev/zero", 0, "0" * 64)  # /dev/zero's size is 0: it matches
    p = Limited([*FINISHED, "--resume", ckpt, "--output_dir", run], tmp_path, "devzero")
    wait_reading_at_most(p, ENDLESS_READ)
    expect("manifest-dev-zero", p.rc, p.out, p.err, ckpt=ckpt.name)


def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, capsys, trained):
    run = resumable(trained, tmp_path)
    ckpt = run / "checkpoints" / OLDER
    outside = (run / "config.json").read_bytes()
    list_in_manifest(ckpt, "../../config.json", len(outside), sha256(outside))
    code, out, err = in_process(capsys, *FINISHED, "--resume", ckpt, "--output_dir", run)
    expect("manifest-parent", code, out, err, ckpt=ckpt.name)


def resumed_from_the_older_checkpoint(text: str, run: Path, trained: Path) -> None:
    """--resume auto skipped the forged newest checkpoint and finished the run from the older
    one, to the weights of the run that was never forged."""
    assert re.search(rf"skipping damaged checkpoint \S*{NEWEST}", text), text[-3000:]
    assert re.search(rf"resumed from \S*{OLDER}", text), text[-3000:]
    assert_same_weights(run, trained)


def test_resume_auto_skips_a_newest_checkpoint_naming_dev_zero(tmp_path, trained):
    run = resumable(trained, tmp_path)
    list_in_manifest(run / "checkpoints" / NEWEST, "/dev/zero", 0, "0" * 64)
    p = Limited([*FINISHED, "--output_dir", run], tmp_path, "devzero-auto")
    wait_reading_at_most(p, ENDLESS_READ)
    text = expect("manifest-dev-zero-auto", p.rc, p.out, p.err)
    resumed_from_the_older_checkpoint(text, run, trained)


def test_resume_auto_skips_a_newest_checkpoint_naming_a_file_outside_it(tmp_path, capsys,
                                                                        trained):
    run = resumable(trained, tmp_path)
    outside = (run / "config.json").read_bytes()
    list_in_manifest(run / "checkpoints" / NEWEST, "../../config.json", len(outside),
                     sha256(outside))
    code, out, err = in_process(capsys, *FINISHED, "--output_dir", run)
    text = expect("manifest-parent-auto", code, out, err)
    resumed_from_the_older_checkpoint(text, run, trained)


@pytest.mark.slow
def test_sigterm_while_a_huge_checkpoint_file_is_hashed_exits_75(tmp_path, trained):
    run = resumable(trained, tmp_path)
    ckpt = run / "checkpoints" / NEWEST
    huge = ckpt / "padding.bin"
    with open(huge, "wb"):
        pass
    os.truncate(huge, 100 * 10**9)  # sparse: no disk used, 100 GB of zeros to hash
    list_in_manifest(ckpt, huge.name, huge.stat().st_size, "0" * 64)
    p = Limited([*FINISHED, "--output_dir", run], tmp_path, "huge")
    try:
        while p.running() and rchar(p.proc.pid) < 2e9:  # imports read ~0.1 GB: it is hashing
            if time.monotonic() - p.t0 > 120:
                pytest.fail("the resume never read 2 GB: is the 100 GB file hashed at all?\n"
                            + p.out[-2000:] + p.err[-2000:])
            time.sleep(0.05)
        assert p.running(), f"ended before the signal (exit {p.proc.poll()}):\n{p.out[-2000:]}" \
                            f"{p.err[-2000:]}"
        os.kill(p.proc.pid, signal.SIGTERM)
        p.wait(timeout=(time.monotonic() - p.t0) + 120)  # 120 s after the signal: a safety net
    finally:
        p.kill()
    expect("manifest-huge-file-sigterm", p.rc, p.out, p.err)


# ----------------------------------------------------------------------------- 5. RNG states

@pytest.mark.parametrize("case", ["random-states-dict", "random-states-garbage"])
def test_resume_path_refuses_forged_random_states(tmp_path, capsys, trained, case):
    run = resumable(trained, tmp_path)
    ckpt = run / "checkpoints" / OLDER
    if case == "random-states-dict":
        torch.save({"foo": 1}, tmp_path / "states.pkl")
        forge_file(ckpt, "random_states_0.pkl", (tmp_path / "states.pkl").read_bytes())
    else:
        forge_file(ckpt, "random_states_0.pkl", b"\x80\x04 not a pickle of RNG states " * 50)
    code, out, err = in_process(capsys, *FINISHED, "--resume", ckpt, "--output_dir", run)
    expect(case, code, out, err)


def test_resume_auto_skips_a_newest_checkpoint_with_forged_random_states(tmp_path, capsys,
                                                                         trained):
    run = resumable(trained, tmp_path)
    torch.save({"foo": 1}, tmp_path / "states.pkl")
    forge_file(run / "checkpoints" / NEWEST, "random_states_0.pkl",
               (tmp_path / "states.pkl").read_bytes())
    code, out, err = in_process(capsys, *FINISHED, "--output_dir", run)
    text = expect("random-states-auto", code, out, err)
    resumed_from_the_older_checkpoint(text, run, trained)


# ----------------------------------------------------------------------------- 6. one line, exit 2

def test_pretrained_for_a_model_that_does_not_exist_is_one_line(tmp_path, capsys):
    code, out, err = in_process(capsys, "--model", "resnet", "--pretrained", "--epochs", 1,
                                "--output_dir", tmp_path / "run")
    expect("model-resnet-pretrained", code, out, err)


def test_a_garbage_optimizer_state_is_one_line_naming_the_checkpoint(tmp_path, capsys, trained):
    run = resumable(trained, tmp_path)
    ckpt = run / "checkpoints" / OLDER
    forge_file(ckpt, "optimizer.bin", b"these are not optimizer moments\n" * 100)
    code, out, err = in_process(capsys, *FINISHED, "--resume", ckpt, "--output_dir", run)
    expect("optimizer-garbage", code, out, err, ckpt=ckpt.name)


@pytest.mark.parametrize("case", ["loop-epoch-string", "loop-empty-last-metrics"])
def test_a_loop_state_of_the_wrong_types_is_one_line(tmp_path, capsys, trained, case):
    run = resumable(trained, tmp_path)
    ckpt = run / "checkpoints" / NEWEST  # the end of epoch 2, before its evaluation
    if case == "loop-epoch-string":
        edit_loop_state(ckpt, lambda s: s["loop"].update(epoch="141"))
    else:
        assert json.loads((ckpt / "loop_state.json").read_text())["loop"]["evaluated"] == 1
        edit_loop_state(ckpt, lambda s: s["loop"].update(last_metrics={}))
    code, out, err = in_process(capsys, *FINISHED, "--resume", ckpt, "--output_dir", run)
    expect(case, code, out, err)


def test_crop_padding_out_of_range_is_refused_before_allocating(tmp_path):
    cases = {"crop-padding-100000": 100000, "crop-padding-3000": 3000,
             "crop-padding-minus-5": -5}
    procs = {case: Limited(["--crop_padding", value, "--epochs", 1, "--output_dir",
                            tmp_path / case], tmp_path, case) for case, value in cases.items()}
    try:
        for case, p in procs.items():
            p.wait(timeout=300)
    finally:
        for p in procs.values():
            p.kill()
    failures = []
    for case, p in procs.items():
        try:
            expect(case, p.rc, p.out, p.err)
            assert p.maxrss_mb < 3000, f"{case}: peak RSS {p.maxrss_mb:.0f} MB"
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("case", ["config-truncated", "config-foreign"])
def test_resume_with_an_edited_config_json_is_no_traceback(tmp_path, capsys, trained, case):
    run = resumable(trained, tmp_path, keep=(OLDER,))
    config = run / "config.json"
    text = config.read_text()
    config.write_text(text[:len(text) // 2] if case == "config-truncated" else '{"foo": 1}')
    code, out, err = in_process(capsys, *FINISHED, "--output_dir", run)
    expect(case, code, out, err)
    assert_same_weights(run, trained)


@pytest.mark.parametrize("size, channels, asked, batch", EVAL_BATCH_BOUNDS)
def test_eval_batch_is_bounded_by_the_declared_image_size(size, channels, asked, batch):
    assert train.eval_batch({"image_size": size, "channels": channels}, asked) == batch


# ----------------------------------------------------------------------------- 7. start-up window

def test_stop_signals_are_caught_before_any_other_import():
    """A signal during the imports at the top of train.py (0.1-0.5 s, longer on a loaded
    machine) killed the process with -15 instead of exit 75: `import signal` and the handlers
    come first (bench/startup_window.py measures the window that is left)."""
    tree = ast.parse((ROOT / "train.py").read_text())
    body = list(tree.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    while body and isinstance(body[0], ast.ImportFrom) and body[0].module == "__future__":
        body = body[1:]
    assert len(body) >= 2
    first, body = body[0], body[1:]
    assert isinstance(first, ast.Import) and [a.name for a in first.names] == ["signal"] \
        and first.names[0].asname is None, f"first statement: {ast.unparse(first)}"
    # between them at most plain assignments that run nothing (EARLY = []): no call, no import
    while body and isinstance(body[0], (ast.Assign, ast.AnnAssign)) and not any(
            isinstance(n, (ast.Call, ast.Lambda, ast.Await)) for n in ast.walk(body[0])):
        body = body[1:]
    assert body, "no statement after `import signal`"
    second = body[0]
    guard = ast.unparse(second.test) if isinstance(second, ast.If) else ast.unparse(second)
    assert isinstance(second, ast.If) and guard in ('__name__ == "__main__"',
                                                    "__name__ == '__main__'"), \
        f"second statement: {guard[:200]}"

    def outside_functions(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                 ast.ClassDef)):
                continue
            yield node
            yield from outside_functions(ast.iter_child_nodes(node))
    nodes = list(outside_functions(second.body))
    imports = [ast.unparse(n) for n in ast.walk(second) if isinstance(n, (ast.Import,
                                                                          ast.ImportFrom))]
    assert not imports, f"imports in the early block: {imports}"
    calls = [n for n in nodes if isinstance(n, ast.Call) and ast.unparse(n.func) ==
             "signal.signal"]
    assert calls, "the early block does not call signal.signal"
    named = {n.attr for n in nodes if isinstance(n, ast.Attribute)} | {
        "SIG" + n.value.upper().removeprefix("SIG") for n in nodes
        if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert {"SIGTERM", "SIGUSR1", "SIGINT"} <= named, f"signals named: {sorted(named)}"


# ----------------------------------------------------------------------------- 8. smaller

def unmount(disk: Path) -> None:
    gc.collect()  # a lock file an in-process run left open keeps the mount busy
    if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> None:
    """Fill the file system to the last byte."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (b"\0" * (1 << 20), b"\0"):
            while True:
                try:
                    if os.write(fd, chunk) == 0:
                        break
                except OSError as e:
                    assert e.errno == 28, e
                    break
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0


def test_an_output_disk_full_at_start_is_exit_1(tmp_path, capsys):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "64k")
    try:
        fill(disk)
        code, out, err = in_process(capsys, "--epochs", 1, "--output_dir", disk / "run")
    finally:
        unmount(disk)
    expect("disk-full-at-start", code, out, err)


def size_bytes(number: str, unit: str) -> float:
    return float(number) * {"B": 1, "KB": 1e3, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
                            "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def test_the_cache_space_message_counts_the_slack_it_refuses_for(tmp_path, capsys):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "600k")
    try:
        code, out, err = in_process(capsys, "--epochs", 1, "--data_mode", "cache",
                                    "--cache_dir", disk, "--output_dir", tmp_path / "run")
    finally:
        unmount(disk)
    line = expect("cache-space-slack", code, out, err)
    unit = r"([\d.]+) ?(B|[kKMGT]i?B)\b"
    need = re.search(r"needs " + unit, line)
    wanted = re.search(r"\(" + unit + r" are wanted", line)  # the need with its slack
    free = re.search(r"has " + unit + " free", line)
    assert need and wanted and free, line
    # digits need ~0.13 MB, less than the ~0.6 MB free; with the 1 MiB slack more than that
    assert size_bytes(*need.groups()) < size_bytes(*free.groups()) < \
        size_bytes(*wanted.groups()), line


@pytest.mark.parametrize("case, args", [("flag-epochs-x", ["--epochs", "x"]),
                                        ("flag-lr-abc", ["--lr", "abc"]),
                                        ("flag-optimizer-foo", ["--optimizer", "foo"])])
def test_a_bad_flag_value_is_one_line_without_the_usage(tmp_path, case, args):
    proc = run_cli(*args, "--output_dir", tmp_path / "run", timeout=120)
    line = expect(case, proc.returncode, proc.stdout, proc.stderr)
    assert line.startswith("train.py: error:"), line
    assert not (tmp_path / "run").exists()


def test_init_from_a_file_that_is_not_weights_names_init_from(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors, not a state dict\n" * 20)
    code, out, err = in_process(capsys, "--init_from", bad, "--epochs", 1,
                                "--output_dir", tmp_path / "run")
    line = expect("init-from-garbage", code, out, err)
    assert "--weights" not in line, line


def test_a_refused_run_leaves_no_new_output_dir_behind(tmp_path, capsys):
    run = tmp_path / "new" / "run"
    code, out, err = in_process(capsys, "--resume", "/nonexistent/ckpt", "--epochs", 1,
                                "--output_dir", run)
    expect("refused-new-output-dir", code, out, err)
    assert not run.exists(), sorted(p.name for p in run.iterdir())


def test_predictions_csv_defuses_file_names_that_spreadsheets_run(tmp_path, capsys, trained):
    import numpy as np
    import PIL.Image
    folder = tmp_path / "new"
    folder.mkdir()
    names = ["=cmd.png", "+a.png", "-b.png", "@c.png", "plain.png"]
    for i, name in enumerate(names):
        PIL.Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(folder / name)
    code, out, err = in_process(capsys, "--predict", folder, "--weights", trained,
                                "--output_dir", tmp_path / "predict")
    expect("predict-formula-names", code, out, err)
    with open(tmp_path / "predict" / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    cells = sorted(row[0] for row in rows[1:])
    want = sorted("'" + n if n[0] in "=+-@" else n for n in names)
    assert cells == want, cells
