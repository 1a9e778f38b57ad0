"""Training options as timm and Lightning users use them: squeezenet (a convolution for a
head), inception and googlenet with their weights' input transform, --freeze_backbone over
tensors that were not loaded, --init_from state dicts with DDP's, torch.compile's or
Lightning's prefixes, the automatic batch's note with accumulation, and a process that an
idle thread pool (inductor's, after a first --compile) kept from exiting."""
from __future__ import annotations

import subprocess
import sys
import types

import torch
import torchvision

import train
from conftest import ROOT, run_main, weights


def test_squeezenet_has_a_head():
    """squeezenet has no nn.Linear: finding the head was an IndexError (a traceback)."""
    model = torchvision.models.squeezenet1_1(num_classes=3)
    assert train.head_names(model) == {"classifier.1.weight", "classifier.1.bias"}
    groups = train.make_optimizer(train.Config(model="squeezenet1_1"), model).param_groups
    assert [len(g["params"]) for g in groups] == [50, 2]


def test_inception_and_googlenet_take_their_weights_input_transform():
    """torchvision builds them with transform_input=True when given weights, which expect
    inputs in [-1, 1]; built without weights and loaded after, they got ImageNet-normalized
    input."""
    for name in ("googlenet", "inception_v3"):
        cfg = train.Config(model=name, pretrained="DEFAULT")
        _, meta, _ = train.preprocessing(cfg, types.SimpleNamespace(class_names=["a", "b"]),
                                         [(299, 299)], 1)
        assert meta["transform_input"] is True
        assert train.build_model(meta, probe=False).transform_input is True
    cfg = train.Config(model="googlenet")  # no weights: as before
    _, meta, _ = train.preprocessing(cfg, types.SimpleNamespace(class_names=["a", "b"]),
                                     [(64, 64)], 1)
    assert "transform_input" not in meta and not train.build_model(meta, probe=False)\
        .transform_input


def test_init_from_prefixed_state_dicts_and_frozen_tensors_that_were_not_loaded(
        tmp_path, image_folder, capsys):
    run = tmp_path / "digits"
    assert run_main("--epochs", 1, "--num_workers", 0, "--output_dir", run) == 0
    state = weights(run)
    for prefix in ("module.", "_orig_mod.", "model."):  # "only 0 of 20 tensors fit" before
        path = tmp_path / f"{prefix.strip('.')}.pt"
        torch.save({prefix + k: v for k, v in state.items()}, path)
        out = tmp_path / f"from_{prefix.strip('.')}"
        assert run_main("--epochs", 1, "--num_workers", 0, "--init_from", path,
                        "--output_dir", out) == 0
        assert "start: 20 of 20 tensors from" in capsys.readouterr().out
        assert train.read_weights(str(out))[0].keys() == state.keys()
    # 3 channels: the first convolution is new, and --freeze_backbone would keep it random
    code = run_main("--dataset", image_folder, "--channels", 3, "--image_size", 8,
                    "--init_from", run, "--freeze_backbone", "--output_dir", tmp_path / "frozen")
    err = capsys.readouterr().err
    assert code == 2 and "--freeze_backbone would keep 0.weight as initialized" in err, err


def test_the_automatic_batch_note_counts_the_short_last_group():
    batch, note = train.batch_size(train.Config(gradient_accumulation_steps=3), 1437, 1)
    assert batch == 32 and "1437 training images per process make 15 steps per epoch" in note


def test_an_idle_thread_pool_does_not_keep_the_process_alive():
    """After a first --compile (a cold inductor cache) the run printed 'done' and then waited
    forever: exit_now joined the compile pool's workers, which never end on their own."""
    code = ("import concurrent.futures, sys; sys.path.insert(0, sys.argv[1]); import train; "
            "pool = concurrent.futures.ThreadPoolExecutor(2); pool.submit(int).result(); "
            "train.exit_now(0)")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
