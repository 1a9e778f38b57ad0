"""Fine-tuning (issue 11): starting from weights: torchvision's pretrained weights read offline from
a TORCH_HOME that the test fills, --init_from another run or a state dict file, a new head
for another class count, --freeze_backbone and --head_lr_scale, and their bit-exact resume;
MixUp and CutMix; an EMA of the weights."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import assert_same_weights, digit_images, results, run_main, weights
from test_checkpoints import finish, start, wait_for_step


def digits_subset(path: Path, classes: list[int], images: slice) -> Path:
    """Real digits of the given classes (the `images` of each class) as a save_to_disk
    dataset; the validation part is held out."""
    import datasets
    items = [(img, c) for img, c in digit_images(classes=10, per_class=images.stop, size=8)
             if c in classes]
    items = [it for c in classes for it in [i for i in items if i[1] == c][images]]
    names = [str(c) for c in classes]
    ds = datasets.Dataset.from_dict(
        {"image": [i for i, _ in items], "label": [classes.index(c) for _, c in items]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=names)}))
    ds.save_to_disk(str(path))
    return path


def stopped_and_resumed(args: list, run: Path) -> None:
    """Start a run, stop it with SIGUSR1 after step 12 (exit 75), then finish it."""
    proc = start([*args, "--output_dir", run])
    wait_for_step(proc, 12)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75
    proc.stdout.close()
    finish([*args, "--output_dir", run])


@pytest.fixture(scope="module")
def first_half(tmp_path_factory) -> Path:
    """A cnn trained on 60 images of each digit: the weights the other tests start from."""
    root = tmp_path_factory.mktemp("first_half")
    data = digits_subset(root / "data", list(range(10)), slice(0, 60))
    assert run_main("--dataset", data, "--epochs", 4, "--output_dir", root / "run") == 0
    assert results(root / "run")["val_acc"] > 0.85
    return root / "run"


@pytest.fixture(scope="module")
def second_half(tmp_path_factory) -> Path:
    """Other images (30 each) of four digits: another task, with a 4-class head."""
    return digits_subset(tmp_path_factory.mktemp("second_half") / "data", [5, 6, 7, 8],
                         slice(60, 90))


def test_init_from_a_run_keeps_the_backbone_and_learns_faster(tmp_path, capsys, first_half,
                                                             second_half):
    common = ["--dataset", second_half, "--epochs", 1]
    assert run_main(*common, "--output_dir", tmp_path / "scratch") == 0
    capsys.readouterr()
    assert run_main(*common, "--init_from", first_half, "--output_dir", tmp_path / "warm") == 0
    out = capsys.readouterr().out
    # every tensor but the head (5 classes there, 4 here) comes from the first run
    n = len(train.read_weights(str(first_half))[0])
    assert f"start: {n - 2} of {n} tensors from {first_half}; new: 12.weight, 12.bias" in out
    # 12 steps: from scratch 50-63% (seeds 0-2), from the other run's weights 83-96%
    scratch, warm = results(tmp_path / "scratch")["val_acc"], results(tmp_path / "warm")["val_acc"]
    assert warm > scratch + 0.15, (warm, scratch)
    # a plain state dict file works the same
    state = weights(first_half)
    torch.save(state, tmp_path / "state.pt")
    assert run_main(*common, "--init_from", tmp_path / "state.pt",
                    "--output_dir", tmp_path / "file") == 0
    assert_same_weights(tmp_path / "file", tmp_path / "warm")


def test_init_from_refuses_another_architecture_and_non_weights(tmp_path, capsys, first_half,
                                                                 second_half):
    common = ["--dataset", second_half, "--epochs", 1, "--output_dir", tmp_path / "r"]
    assert run_main(*common, "--init_from", first_half, "--model", "resnet18",
                    "--image_size", 16) == 2
    err = capsys.readouterr().err
    assert "tensors fit --model resnet18" in err and "Traceback" not in err
    (tmp_path / "notes.txt").write_text("not weights")
    assert run_main(*common, "--init_from", tmp_path / "notes.txt") == 2
    assert "not a run directory, model.safetensors or state dict" in capsys.readouterr().err
    assert run_main(*common, "--freeze_backbone") == 2
    assert "add --pretrained or --init_from" in capsys.readouterr().err


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """A TORCH_HOME holding a stand-in for resnet18's IMAGENET1K_V1 file (no network: nothing
    is downloaded). train.py checks a file's sha256 against the hash prefix in torchvision's
    file name (resnet18-f37072fd.pth), which no stand-in can match: the weights' url is
    pointed at a name carrying the stand-in's own prefix, in this process."""
    import hashlib
    import torchvision
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(123)
    file = home / "hub" / "checkpoints" / "stand-in.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), file)
    prefix = hashlib.sha256(file.read_bytes()).hexdigest()[:8]
    file.rename(file.with_name(f"resnet18-{prefix}.pth"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value
    monkeypatch.setattr(weights, "url", weights.url.replace("f37072fd", prefix))
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_pretrained_weights_load_offline_with_their_preprocessing(tmp_path, capsys,
                                                                  torch_home):
    stand_in = torch.load(next((torch_home / "hub" / "checkpoints").iterdir()))
    assert run_main("--model", "resnet18", "--pretrained", "--freeze_backbone",
                    "--head_lr_scale", 4, "--image_size", 16, "--epochs", 1,
                    "--output_dir", tmp_path / "r") == 0
    assert "new: fc.weight, fc.bias; backbone frozen" in capsys.readouterr().out
    saved, meta = train.read_weights(str(tmp_path / "r"))
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])  # the weights' own
    assert meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["image_size"] == [16, 16]
    # frozen: every backbone weight is the file's; the head trained
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight"):
        assert torch.equal(saved[key], stand_in[key]), key
    assert saved["fc.weight"].shape == (10, 512)


def test_pretrained_names_the_missing_file_and_the_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    common = ["--model", "resnet18", "--image_size", 16, "--output_dir", tmp_path / "r"]
    assert run_main(*common, "--pretrained") == 2
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth" in err and str(tmp_path / "empty") in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert run_main(*common, "--pretrained", "NOPE") == 2
    assert "IMAGENET1K_V1" in capsys.readouterr().err
    assert run_main("--pretrained", "--output_dir", tmp_path / "c") == 2  # the cnn has none
    assert "torchvision --model" in capsys.readouterr().err


def test_frozen_backbone_and_head_lr_resume_bit_exact(tmp_path, first_half, second_half):
    args = ["--dataset", second_half, "--init_from", first_half, "--freeze_backbone",
            "--head_lr_scale", 3, "--epochs", 4, "--batch_size", 16, "--checkpoint_every", 5,
            "--log_every", 1]  # 6 steps per epoch
    finish([*args, "--output_dir", tmp_path / "ref"])
    proc = start([*args, "--output_dir", tmp_path / "run"])
    wait_for_step(proc, 7)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75
    proc.stdout.close()
    finish([*args, "--output_dir", tmp_path / "run"])
    assert_same_weights(tmp_path / "run", tmp_path / "ref")
    ref = weights(tmp_path / "ref")
    assert torch.equal(ref["0.weight"], weights(first_half)["0.weight"])  # frozen
    assert results(tmp_path / "ref")["steps"] == 24 and results(tmp_path / "run")["steps"] == 24


@pytest.mark.slow
def test_mixup_and_cutmix_train_identically_in_both_modes_and_resume_bit_exact(tmp_path):
    """torchvision's MixUp/CutMix draw from torch's RNG: the same draws in memory and stream
    mode, and after a stop and resume (Accelerate's checkpoint keeps that RNG)."""
    mix = ["--mixup", 0.2, "--cutmix", 1.0, "--epochs", 2, "--keep_checkpoints", 1]
    assert run_main(*mix, "--data_mode", "memory", "--output_dir", tmp_path / "m") == 0
    assert run_main(*mix, "--data_mode", "stream", "--num_workers", 1,
                    "--output_dir", tmp_path / "s") == 0
    assert_same_weights(tmp_path / "m", tmp_path / "s")
    assert run_main("--epochs", 2, "--output_dir", tmp_path / "plain") == 0
    mixed, plain = weights(tmp_path / "m"), weights(tmp_path / "plain")
    assert not torch.equal(mixed["0.weight"], plain["0.weight"])  # the mixing happened
    assert results(tmp_path / "m")["val_acc"] > 0.6  # 2 epochs (8 epochs: 98%)
    # mixed targets: the running train accuracy (against the unmixed labels) stays well below
    assert results(tmp_path / "m")["train_acc"] < results(tmp_path / "plain")["train_acc"] - 0.1
    args = [*mix, "--checkpoint_every", 5, "--log_every", 1]
    stopped_and_resumed(args, tmp_path / "run")
    finish([*args, "--output_dir", tmp_path / "ref"])
    assert_same_weights(tmp_path / "run", tmp_path / "ref")


@pytest.mark.slow
def test_ema_is_saved_resumed_bit_exact_and_the_same_on_every_process(tmp_path):
    """--ema_decay: torch's AveragedModel, written into every checkpoint as safetensors and
    beside the weights; with 2 processes its gathered validation accuracy equals a 1-process
    evaluation of the saved EMA weights, so every process held the same average."""
    args = ["--ema_decay", 0.9, "--epochs", 2, "--checkpoint_every", 5, "--log_every", 1]
    stopped_and_resumed(args, tmp_path / "run")
    finish([*args, "--output_dir", tmp_path / "ref"])
    a = load_file(str(tmp_path / "run" / "model_ema.safetensors"))
    b = load_file(str(tmp_path / "ref" / "model_ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], weights(tmp_path / "ref")["0.weight"])
    assert results(tmp_path / "ref")["val_acc_ema"] > 0.5
    two = tmp_path / "two"
    finish(["--ema_decay", 0.9, "--epochs", 2, "--mixed_precision", "no",
            "--output_dir", two], nproc=2)
    assert run_main("--eval_only", "--weights", two / "model_ema.safetensors",
                    "--output_dir", tmp_path / "eval") == 0
    assert results(tmp_path / "eval")["val_acc"] == results(two)["val_acc_ema"]


def test_predict_writes_each_file_once_with_the_runs_preprocessing(tmp_path, image_folder):
    """--predict: a folder searched deeply (and a single file); with 2 processes every file
    appears exactly once, with the same classes and probabilities as with 1."""
    import csv
    run = tmp_path / "run"
    assert run_main("--dataset", image_folder, "--epochs", 6, "--batch_size", 16,
                    "--output_dir", run) == 0
    one = tmp_path / "one"
    assert run_main("--predict", image_folder / "validation", "--weights", run,
                    "--output_dir", one) == 0
    finish(["--predict", image_folder / "validation", "--weights", run,
            "--output_dir", tmp_path / "two"], nproc=2)
    read = lambda d: list(csv.reader(open(d / "predictions.csv")))  # noqa: E731
    rows1, rows2 = read(one), read(tmp_path / "two")
    files = sorted(str(p.relative_to(image_folder / "validation"))
                   for p in (image_folder / "validation").rglob("*.*"))
    assert rows1[0] == ["file", "label_1", "probability_1", "label_2", "probability_2",
                        "label_3", "probability_3"]  # 3 classes: top-3
    assert [r[0] for r in rows1[1:]] == files == [r[0] for r in rows2[1:]]
    for a, b in zip(rows1[1:], rows2[1:]):
        assert a[1::2] == b[1::2]
        assert all(abs(float(x) - float(y)) < 1e-5 for x, y in zip(a[2::2], b[2::2]))
        assert abs(sum(float(x) for x in a[2::2]) - 1) < 1e-4
    right = sum(r[1] == r[0].split("/")[0] for r in rows1[1:]) / len(files)
    assert abs(right - results(run)["val_acc"]) <= 1 / len(files)  # its validation images
    single = files[0]
    assert run_main("--predict", image_folder / "validation" / single, "--weights", run,
                    "--output_dir", tmp_path / "single") == 0
    assert [r[0] for r in read(tmp_path / "single")[1:]] == [Path(single).name]


# ----------------------------------------------------------------------------- photo recipe

def test_photo_recipe_is_the_same_in_both_modes_and_in_evaluation(tmp_path, capsys):
    """From 64 px up: random resized crops + flips on the device (both input paths hand it the
    same stored pixels and the same seeded draws, so the models are bit-identical), and the
    evaluation's resize-then-centre-crop is what --eval_only and the run itself use."""
    from own_data import nested_folder
    photos = nested_folder(tmp_path / "photos", per_class=24)
    common = ["--dataset", photos, "--image_size", 64, "--epochs", 2, "--keep_checkpoints", 1]
    assert run_main(*common, "--data_mode", "memory", "--output_dir", tmp_path / "m") == 0
    assert run_main(*common, "--data_mode", "stream", "--num_workers", 1,
                    "--output_dir", tmp_path / "s") == 0
    assert_same_weights(tmp_path / "m", tmp_path / "s")
    meta = train.read_weights(str(tmp_path / "m"))[1]
    assert (meta["recipe"], meta["crop_scale"], meta["crop_fraction"]) == ("photo", 0.08, 0.875)
    assert meta["crop_ratio"] == pytest.approx(4 / 3)
    assert results(tmp_path / "m")["val_acc"] >= 0.7
    assert run_main("--eval_only", "--weights", tmp_path / "m",
                    "--output_dir", tmp_path / "e") == 0
    assert results(tmp_path / "e")["val_acc"] == results(tmp_path / "m")["val_acc"]


def test_resized_crops_follow_torchvisions_distribution():
    """Each output is a box of the input (pixels encode their coordinates) whose area and
    aspect ratio are drawn as torchvision's RandomResizedCrop draws them."""
    import torchvision
    t = 200
    ys, xs = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    image = torch.stack([xs, ys, xs * 0]).to(torch.uint8)  # x, y, 0 (t < 256)
    batch = image.expand(2000, 3, t, t)
    out = train.resized_crop(batch, [32, 32], 0.08, False, torch.Generator().manual_seed(0))
    assert out.shape == (2000, 3, 32, 32) and out.dtype == torch.float32
    width = out[:, 0].amax((1, 2)) - out[:, 0].amin((1, 2)) + 1  # about the box, in pixels
    height = out[:, 1].amax((1, 2)) - out[:, 1].amin((1, 2)) + 1
    area = (width * height / t**2).numpy()
    assert area.min() > 0.06 and area.max() <= 1.0
    ratio = (width / height).numpy()
    assert ratio.min() > 0.6 and ratio.max() < 1.6
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = [torchvision.transforms.RandomResizedCrop.get_params(image, [0.08, 1], [3 / 4, 4 / 3])
           for _ in range(2000)]
    ref_area = [h * w / t**2 for _, _, h, w in ref]
    assert abs(area.mean() - sum(ref_area) / len(ref_area)) < 0.04
    wide = train.resized_crop(batch[:500], [32, 32], 0.3, False, gen, max_ratio=3.0)
    wide_ratio = ((wide[:, 0].amax((1, 2)) - wide[:, 0].amin((1, 2)) + 1)
                  / (wide[:, 1].amax((1, 2)) - wide[:, 1].amin((1, 2)) + 1))
    assert wide_ratio.max() > 2 and wide_ratio.min() < 0.5  # --crop_ratio widens the range
    flipped = train.resized_crop(batch[:400], [32, 32], 1.0, True, gen)  # whole image, flips
    left_to_right = (flipped[:, 0, :, -1] > flipped[:, 0, :, 0]).all(1)
    assert 120 < int(left_to_right.sum()) < 280


def test_evaluation_view_is_resize_then_centre_crop(tmp_path):
    """decode with cover 0.875 at 32 px: the shorter side resized to 32 / 0.875 (37), then the
    centre 32 x 32: torchvision's ImageNet evaluation transform."""
    import PIL.Image
    from torchvision.transforms.v2 import functional as TF
    rng = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 90, 120), generator=rng, dtype=torch.uint8)
    path = tmp_path / "x.png"
    PIL.Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
    got = train.decode({"bytes": None, "path": str(path)}, "RGB", (32, 32), "x", 0.875)
    want = TF.center_crop(TF.resize(pixels, [37, 49], antialias=True), [32, 32])
    assert torch.equal(got, want)
