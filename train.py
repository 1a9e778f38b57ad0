"""Train an image classifier with an explicit PyTorch loop, anywhere: laptop CPU, one GPU,
many GPUs, many nodes, Slurm with preemption. Hugging Face Accelerate owns devices,
processes, mixed precision, accumulation and state; Hugging Face `datasets` owns loading.

    python train.py                           # laptop: built-in digits, ~99% in seconds
    python train.py --dataset ./my_images     # class subfolders; size, colour, batch inferred
    accelerate launch --config_file accelerate_config.yaml train.py --dataset uoft-cs/cifar10
    torchrun --nproc_per_node 2 train.py      # on a CPU-only machine: 2 gloo processes
    sbatch slurm/multi_node.sbatch --dataset /data/imagenette --epochs 30
    python train.py --dataset ./photos --model resnet18 --pretrained --freeze_backbone
    python train.py --eval_only --weights runs/x --dataset ./other_images --output_dir runs/x-eval
    python train.py --predict ./new_photos --weights runs/x --output_dir runs/x-predict

Evidence (2-core x86 CPU, no GPU): the default run reaches 99.2% validation accuracy on
digits (98.1-99.2% over seeds 0-4) in 8 epochs of 0.5-1 s; README.md has the details.

Contents, in the order a run reads them:
    settings        Config: every flag, one line each
    the run         main, Run, train (the update step), after_step, a training run's set-up
                    and results, --eval_only, --predict
    evaluation      evaluate (exact over processes), PreciseBN
    model           the small CNN, torchvision models, starting weights, optimizer, the
                    learning rate, EMA, augmentation on the device
    data            sources, columns, splits, image properties, decode, loaders
    run directory   LoopState, checkpoints, the lock, metrics.jsonl, weights, config.json
    flags, signals  CHECKS, parse_config, StopFlag, Exit; libraries, the accelerator
    streamed shards --streaming: parquet or .tar shards read as training goes, exact resume
    decoded cache   --data_mode cache: decoded once into files, read by index
    workarounds     each opens with the library behaviour it works around

A run directory holds config.json, metrics.jsonl, results.json, model.safetensors and
checkpoints/step_XXXXXXXX/. Re-running the same command resumes from the newest complete
checkpoint; a second run in a directory that a live run holds is refused.

Exit codes: 0 done; 2 bad usage or input; 75 stopped by a signal after saving a checkpoint,
or before training started (requeue me); 1 anything else (a non-finite loss, a full disk).
"""
from __future__ import annotations

import signal

EARLY_SIGNALS: list[int] = []  # stop signals that came before main() took over (StopFlag)
if __name__ == "__main__":  # first, before the imports below: a stop signal then means exit 75
    for _signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(_signum, lambda signum, frame: EARLY_SIGNALS.append(signum))

import time  # noqa: E402 (the imports follow the handlers)

T_START = time.perf_counter()  # the process's start, for its printed whole-process time

import argparse, bisect, contextlib, csv, dataclasses, datetime, difflib, errno, fcntl, fnmatch
import functools, hashlib, inspect, io, itertools, json, math, multiprocessing, os, random, re
import resource, shutil, socket, stat, sys, tarfile, threading, traceback, types, urllib.parse
import warnings, weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED = 0, 1, 2, 75
MAX_IMAGE_SIZE = 4096     # pixels per side: 48 MB per decoded RGB image already
AUTO_SIZE_CAP = 224       # inferred image sizes stop here (torchvision's classification size)
MIN_STEPS_PER_EPOCH = 10  # the automatic batch size shrinks (down to 8) to give this many
EVAL_PIXELS = 2**24       # pixels per --eval_only/--predict batch without --batch_size
TOP_LOSSES = 50           # validation images listed in top_losses.csv


# ----------------------------------------------------------------------------- settings

def opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})

@dataclass
class Config:
    # data
    dataset: str = opt("digits", "digits (built in), a Hub id, an image folder, a save_to_disk dir")
    dataset_config: str | None = opt(None, "Hub dataset configuration name")
    revision: str | None = opt(None, "Hub dataset revision: branch, tag or commit")
    image_column: str | None = opt(None, "image column; default: the Image feature")
    label_column: str | None = opt(None, "label column; default: the ClassLabel feature")
    val_fraction: float = opt(0.2, "held out, stratified, when there is no validation split")
    image_size: int = opt(0, f"square side in pixels; 0 = auto (at most {AUTO_SIZE_CAP})")
    channels: int = opt(0, "1 (grayscale) or 3 (RGB); 0 = auto from the images", (0, 1, 3))
    data_mode: str = opt("auto", "memory, cache (decoded files), stream, or auto by size",
                         ("auto", "memory", "cache", "stream"))
    memory_budget_gb: float = opt(4.0, "largest decoded dataset --data_mode auto keeps in memory")
    cache_dir: str | None = opt(None, "--data_mode cache's folder; default: HF_DATASETS_CACHE's")
    streaming: bool = opt(False, "read a folder or Hub id of parquet or WebDataset .tar shards "
                          "as training goes (nothing listed or decoded up front)")
    shuffle_window: int = opt(1024, "--streaming: examples shuffled together (held per worker)")
    classes: str | None = opt(None, "--streaming: a file of class names, one per line")
    skip_bad_examples: bool = opt(False, "--streaming: an unreadable training example is "
                                  "replaced by the next of its shard, with a note")
    max_image_pixels: int = opt(2 * 89_478_485, "larger images are refused (PIL's bomb guard)")
    num_workers: int = opt(-1, "loader worker processes; -1 = from the CPU count, 0 = none")
    crop_padding: int = opt(-1, "small recipe: random-crop padding in pixels; -1 = size // 8")
    hflip: str = opt("auto", "random horizontal flips; auto = on for colour data",
                     ("auto", "yes", "no"))
    recipe: str = opt("auto", "augmentation: small (pad+crop), photo (resized crop); auto: photo "
                      "from 64 px", ("auto", "small", "photo"))
    crop_scale: float = opt(0.08, "photo: smallest random crop, as a fraction of the area")
    crop_ratio: float = opt(4 / 3, "photo: largest aspect ratio of a random crop")
    crop_fraction: float = opt(0.875, "photo: evaluation crops this part of the resized image")
    # model
    model: str = opt("cnn", "cnn (small, defined here) or any torchvision classifier's name")
    pretrained: str | None = opt(None, "torchvision's weights for --model: DEFAULT or a name")
    init_from: str | None = opt(None, "start from a run directory, model.safetensors or state dict")
    freeze_backbone: bool = opt(False, "train only the classifier head; BatchNorm stats frozen")
    head_lr_scale: float = opt(1.0, "learning-rate multiplier for the classifier head")
    # optimization
    epochs: int = opt(8, "passes over the training data")
    batch_size: int = opt(0, "images per process per micro-batch; 0 = auto: 64, or fewer for few")
    lr: float = opt(0.05, "peak learning rate")
    optimizer: str = opt("sgd", "sgd (momentum) or adamw", ("sgd", "adamw"))
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(0.0, "decoupled for adamw, L2 for sgd; 0 = off")
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing; 0 = off")
    mixup: float = opt(0.0, "MixUp alpha; 0 = off")
    cutmix: float = opt(0.0, "CutMix alpha; 0 = off (with --mixup: one of them per batch)")
    max_grad_norm: float = opt(0.0, "gradient clipping norm; 0 = off")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    schedule: str = opt("cosine", "learning-rate curve after warmup",
                        ("constant", "cosine", "onecycle"))
    warmup_steps: int = opt(0, "optimizer steps of linear warmup; 0 = off (onecycle: 25%%)")
    nan_policy: str = opt("stop", "on a NaN/inf loss: stop (exit 1) or skip the step",
                          ("stop", "skip"))
    ema_decay: float = opt(0.0, "decay of an EMA of the weights (0.999 is typical); 0 = off")
    precise_bn: int = opt(2048, "images that recompute BatchNorm statistics to evaluate; 0 = off")
    # outputs and logging
    output_dir: str | None = opt(None, "run directory; default: a new runs/<date>-<time>-<model>")
    overwrite: bool = opt(False, "replace a finished or different run in --output_dir")
    log_every: int = opt(50, "optimizer steps between train log lines (metrics.jsonl, trackers: "
                         "at least 4 an epoch); 0 = epoch lines only")
    report_to: str = opt("none", "trackers through Accelerate",
                         ("none", "tensorboard", "wandb", "mlflow", "all"))
    # checkpoints and preemption
    checkpoint_every: int = opt(0, "optimizer steps between checkpoints; 0 = epoch ends only")
    keep_checkpoints: int = opt(3, "newest checkpoints kept; 0 = keep all")
    resume: str = opt("auto", "auto (newest complete checkpoint), none, or a checkpoint directory")
    stop_signals: str = opt("USR1,TERM,INT", "signals that mean: checkpoint, then exit 75")
    # system
    seed: int = opt(0, "seeds the split, the data order, augmentation and the weights")
    cpu: bool = opt(False, "train on the CPU even when an accelerator is present")
    mixed_precision: str | None = opt(None, "no, fp16 or bf16; default: the launcher's on a GPU",
                                      ("no", "fp16", "bf16"))
    compile: bool = opt(False, "torch.compile the model (inductor)")
    channels_last: bool = opt(False, "channels-last memory format for model and inputs")
    threads: int = opt(0, "CPU threads per process; 0 = torch's default (OMP_NUM_THREADS)")
    # evaluation only
    eval_only: bool = opt(False, "evaluate --weights, no training")
    weights: str | None = opt(None, "for --eval_only and --predict: a run dir or model.safetensors")
    predict: str | None = opt(None, "with --weights: predictions.csv for this image file or folder")
    split: str | None = opt(None, "for --eval_only: the split to evaluate; default: validation")


# ----------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> int:
    """Flags, libraries, the accelerator; then training, --eval_only or --predict."""
    t_start = T_START if argv is None else time.perf_counter()  # None: the command line
    stop, run_dir, made = StopFlag(), None, False
    try:
        stop.catch(Config.stop_signals)  # first: from here on a stop signal means exit 75
        cfg, given = parse_config(argv)
        stop.catch(cfg.stop_signals)
        hub = hub_access(cfg.dataset)  # before datasets is imported
        contended = choose_wait_policy()
        with stop.deferred():  # not raised inside an import: it can leave a module half made
            import_libraries()
        PIL.Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels // 2  # PIL refuses twice this
        if not (cfg.eval_only or cfg.predict):
            check_model_name(cfg.model)  # before minutes of data loading
        cpu = use_cpu(cfg)
        accelerate.PartialState(cpu=cpu)  # the process group: the run directory is agreed on it
        run_dir, made = resolve_run_dir(cfg, "eval" if cfg.eval_only else "predict"
                                        if cfg.predict else cfg.model)
        accelerator = make_accelerator(cfg, cpu, run_dir)
        if contended:
            print0(accelerator, contended)
        run = Run(cfg, given, accelerator, run_dir, stop, hub, t_start)
        predict(run) if cfg.predict else evaluate_only(run) if cfg.eval_only else training(run)
        return EXIT_OK
    except (Exit, KeyboardInterrupt, OSError, MemoryError, RuntimeError) as error:
        return exit_code(error, stop, run_dir, made)
    finally:
        if made and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".lock"}:
            shutil.rmtree(run_dir)  # a default run directory that nothing was written to

@dataclass
class Run:
    """What a run holds, passed as one. `cfg` is the one resolved configuration: the flags as
    given (`asked`) with what every automatic setting became, once the data are known."""
    asked: Config
    given: set                  # the flags given explicitly
    accelerator: object
    dir: Path
    stop: StopFlag
    hub: str | None             # a Hub id's reachability (hub_access)
    t_start: float
    cfg: Config = None
    data: Data | None = None
    model: object = None        # prepared by Accelerate
    optimizer: object = None
    ema: object = None          # torch's AveragedModel, or None
    state: LoopState = field(default_factory=lambda: LoopState())
    log: MetricsLog | None = None
    identity: dict = field(default_factory=dict)  # what a checkpoint must match to resume
    saved: dict = field(default_factory=dict)     # the loop_state.json resumed from
    worst: list = field(default_factory=list)     # the last evaluation's top losses

    def __post_init__(self):
        self.cfg = self.cfg or self.asked

    def bare(self):
        """The model without Accelerate's wrappers and torch.compile's (`_orig_mod.` names)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

def train(run: Run) -> None:
    """The explicit loop, to the end of the last epoch (or Exit 75 after a stop's checkpoint)."""
    cfg, accelerator, state, model = run.cfg, run.accelerator, run.state, run.model
    optimizer, meta, rank = run.optimizer, run.data.meta, accelerator.process_index
    batches, accum = len(run.data.train), cfg.gradient_accumulation_steps
    tail, total = batches % accum, -(-batches // accum) * cfg.epochs  # short last group; steps
    aug, norm = torch.Generator(device=accelerator.device), normalizer(meta, accelerator.device)
    mix = mixer(cfg, meta["num_classes"])
    while state.epoch < cfg.epochs:
        model.train()
        bar, clock = epoch_batches(run)  # and frozen BatchNorm layers back in eval mode
        # This step's summed mean losses, correct predictions and stop signal on this process,
        # kept on the device: reduced over processes once per step, then summed into Python.
        step_loss, step_correct, step_stop = sums = torch.zeros(  # views of one tensor
            3, dtype=torch.float64, device=accelerator.device)
        for images, labels in bar:
            aug.manual_seed(hash((cfg.seed, state.epoch, state.batch, rank)) % 2**62)
            images = augment_batch(images, meta, aug)
            # Accelerate divides every loss by `accum`, also in a short last group: rescale
            # so that each update is the mean over the micro-batches it really has.
            scale = accum / tail if tail and state.batch >= batches - tail else 1.0
            # ---- the update step
            with accelerator.accumulate(model):
                x, targets = to_input(images, norm, cfg.channels_last), labels
                if mix is not None:  # targets become class probabilities
                    x, targets = mix(x, labels)
                logits = model(x)
                loss = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
                accelerator.backward(loss if scale == 1 else loss * scale)
                step_loss += loss.detach()
                step_correct += (logits.argmax(1) == labels).sum()
                if accelerator.sync_gradients:
                    # One collective per step: loss and accuracy over all processes (a NaN/inf
                    # anywhere makes the sum non-finite) and whether any got a stop signal.
                    step_stop.fill_(run.stop.signal is not None)
                    loss_sum, correct, stops = accelerator.reduce(sums).tolist()
                    nonfinite = not math.isfinite(loss_sum)
                    if nonfinite and cfg.nan_policy == "stop":
                        raise non_finite(state)
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(state.step, total, cfg) * group["lr_scale"]
                    if cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    if nonfinite:  # --nan_policy skip: drop this update
                        optimizer.zero_grad(set_to_none=True)
                        state.skipped_steps += 1
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            # ---- bookkeeping, keyed on the optimizer step
            state.batch += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if not nonfinite:  # the epoch's running sums, the same on every process
                grouped = tail if tail and state.batch == batches else accum  # micro-batches
                seen = grouped * cfg.batch_size * accelerator.num_processes  # drop_last
                state.epoch_sums = [a + b for a, b in zip(
                    state.epoch_sums, (loss_sum * cfg.batch_size, correct, seen))]
            sums.zero_()
            after_step(run, bar, clock, total, stopping=stops > 0)

def non_finite(state: LoopState) -> Exit:
    return Exit(f"the loss is not finite at optimizer step {state.step + 1} (epoch "
                f"{state.epoch + 1}). The newest checkpoint is kept. Lower --lr, set "
                "--max_grad_norm, or pass --nan_policy skip", EXIT_FAILED)

def after_step(run: Run, bar, clock: dict, total: int, stopping: bool) -> None:
    """Log, end the epoch, checkpoint, evaluate: what follows an optimizer step. The epoch's
    checkpoint comes before its evaluation, so an evaluation that fails loses no training."""
    cfg, state = run.cfg, run.state
    clock["log_steps"] += 1
    if run.ema is not None:
        run.ema.update_parameters(run.bare())
    end_of_epoch = state.batch == len(run.data.train)
    every = min(cfg.log_every, max(1, total // cfg.epochs // 4))  # >= 4 points per epoch
    if cfg.log_every and state.step % every == 0 and not end_of_epoch and state.epoch_sums[2]:
        log_train(run, bar, clock, total)
    if not (end_of_epoch or stopping or (
            cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0)):
        return
    # train time excludes evaluation and saving, and survives resumes
    state.train_time_s += time.perf_counter() - clock["train"]
    if end_of_epoch:  # the epoch's training metrics, and the loop state moves to the next
        bar.close()
        epoch_time = time.perf_counter() - clock["epoch"]
        loss_sum, correct, count = state.epoch_sums
        count = count or math.nan  # every step of the epoch skipped (--nan_policy skip)
        rate, processes = count / epoch_time, run.accelerator.num_processes
        state.last_metrics = {"train_loss": loss_sum / count, "train_acc": correct / count,
                              "epoch_time_s": round(epoch_time, 3), "images_per_s": round(rate, 1),
                              "images_per_s_per_process": round(rate / processes, 1)}
        state.epoch, state.batch, state.epoch_sums = state.epoch + 1, 0, [0.0] * 3
    path = save_checkpoint(run)
    evaluate_epoch(run)
    clock["train"] = time.perf_counter()
    if stopping:
        raise preempted(run, f"at step {state.step}: saved {path}")

def preempted(run: Run, when: str) -> Exit:
    print0(run.accelerator, f"stopped by {run.stop.signal or 'a signal to another process'} "
                            f"{when}; exit {EXIT_PREEMPTED}, the same command "
                            + ("" if run.asked.output_dir else f"with --output_dir {run.dir} ")
                            + "resumes")
    return Exit("", EXIT_PREEMPTED)

def log_train(run: Run, bar, clock: dict, total: int) -> None:
    """A train event: metrics.jsonl, the trackers, the progress bar or, with no terminal, a line."""
    state, acc = run.state, run.accelerator
    loss_sum, correct, count = state.epoch_sums
    loss, accuracy = loss_sum / count, correct / count
    per_step = run.cfg.batch_size * run.cfg.gradient_accumulation_steps * acc.num_processes
    rate = per_step * clock["log_steps"] / (time.perf_counter() - clock["log"])
    clock["log"], clock["log_steps"] = time.perf_counter(), 0
    lr = run.optimizer.param_groups[0]["lr"]
    run.log("train", state.step, state.epoch + 1, loss=loss, acc=accuracy, lr=lr,
            images_per_s=round(rate, 1))
    if acc.is_main_process and sys.stderr.isatty():
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.2%}")
    elif state.step % run.cfg.log_every == 0:
        print0(acc, f"epoch {state.epoch + 1} step {state.step}/{total}  loss {loss:.4f} acc "
                    f"{accuracy:.2%}  lr {lr:.4g}  {rate:.0f} img/s")

def epoch_batches(run: Run):
    """The rest of this epoch's batches, with a progress bar on a terminal, and its clocks."""
    loader, state, acc = run.data.train, run.state, run.accelerator
    # --freeze_backbone: its BatchNorm statistics frozen too (eval mode, as timm's freeze does)
    for m in run.model.modules() if run.cfg.freeze_backbone else ():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    run.data.sampler.set_epoch(state.epoch)
    if isinstance(loader, Streamed):
        epoch_loader = loader.from_batch(state.batch)
    else:
        epoch_loader = acc.skip_first_batches(loader, state.batch) if state.batch else loader
        # A prepared loader sets its sampler's epoch from its own pass counter, which starts
        # at 0 in a resumed process (and in the loader skip_first_batches makes): set both.
        epoch_loader.set_epoch(state.epoch)
    clock = dict.fromkeys(("epoch", "log", "train"), time.perf_counter()) | {"log_steps": 0}
    return tqdm(epoch_loader, total=len(loader), initial=state.batch,
                disable=not (acc.is_main_process and sys.stderr.isatty()),
                desc=f"epoch {state.epoch + 1}/{run.cfg.epochs}", leave=False), clock

def evaluate_epoch(run: Run) -> None:
    """The evaluation of the epoch just finished, if it is still owed (after its checkpoint)."""
    state, acc, data = run.state, run.accelerator, run.data
    if state.evaluated >= state.epoch:
        return
    precise_bn(run, run.model)
    metrics = {**state.last_metrics, **evaluate(acc, run.model, data.val, data.meta,
                                                 run.cfg.channels_last)}
    run.worst = metrics.pop("val_top_losses")
    if not math.isfinite(metrics["val_loss"]):  # --nan_policy skip: the weights diverged
        raise Exit(f"the validation loss is not finite after epoch {state.epoch} "
                   f"({state.skipped_steps} steps skipped): the model diverged; lower --lr or set "
                   "--max_grad_norm, and start again (--overwrite)", EXIT_FAILED)
    if run.ema is not None:  # its BatchNorm statistics recomputed for its weights as well
        precise_bn(run, run.ema.module)
        averaged = evaluate(acc, run.ema.module, data.val, data.meta, run.cfg.channels_last)
        metrics.update(val_acc_ema=averaged["val_acc"], val_loss_ema=averaged["val_loss"])
    metrics["peak_rss_mb"], metrics["peak_device_mb"] = peak_memory_mb(acc)
    state.evaluated, state.last_metrics = state.epoch, metrics
    if metrics["val_acc"] > state.best_val_acc:  # the model's, not the EMA's
        state.best_val_acc, state.best_epoch = metrics["val_acc"], state.epoch
        if acc.is_main_process:
            save_weights(run.bare(), run.dir / "model_best.safetensors", data.meta)
    run.log("eval", state.step, state.epoch, **{k: v for k, v in metrics.items()  # scalars
                                                  if isinstance(v, (int, float))})
    rate = metrics["images_per_s"]
    ema = f"ema acc {metrics['val_acc_ema']:.2%}  " if run.ema is not None else ""
    print0(acc, f"epoch {state.epoch}/{run.cfg.epochs}  train loss {metrics['train_loss']:.4f} "
                f"acc {metrics['train_acc']:.2%}  val loss {metrics['val_loss']:.4f} acc "
                f"{metrics['val_acc']:.2%}  {ema}{metrics['epoch_time_s']:.2f}s  {rate:.0f} img/s "
                f"({rate / acc.num_processes:.0f}/process)  peak {metrics['peak_rss_mb']:.0f} MB")

def training(run: Run) -> None:
    """A training run from its data to its results: set up (or resumed), trained, saved."""
    acc, cfg = run.accelerator, run.asked
    if (run.dir / "results.json").exists() and cfg.resume == "auto" and not cfg.overwrite:
        already_holds(run.dir, "a finished run (results.json)")  # before minutes of loading
    start = None
    if cfg.pretrained or cfg.init_from:  # read (or downloaded, once per machine) up front
        with acc.main_process_first():
            start = starting_state(cfg)
    run.data = build_data(run)  # resolves run.cfg
    resume, lock = prepare_run_dir(run)
    with lock or contextlib.nullcontext():  # the open lock file, closed at the end
        accelerate.utils.set_seed(cfg.seed)
        model = build_model(run.data.meta, run.cfg.batch_size)
        if start is not None:
            print0(acc, load_start(run.cfg, model, start))
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        run.model, run.optimizer = acc.prepare(model, make_optimizer(run.cfg, model))
        run.ema = make_ema(run.cfg, run.bare())
        if resume is not None:
            load_checkpoint(run, resume)
        write_config(run, resume)
        run.log = MetricsLog(acc, run.dir, run.state if resume is not None else None)
        if cfg.report_to != "none":
            acc.init_trackers(cfg.report_to if cfg.report_to != "all" else "train",
                              config=tracker_config(run.cfg))
        startup = time.perf_counter() - run.t_start  # imports, data, model, resume
        try:
            # From here on a stop signal only sets the flag: agree on one from start-up on any
            # process; then the evaluation that a resumed epoch-end checkpoint may still owe.
            run.stop.training()
            flag = torch.tensor([float(run.stop.signal is not None)], device=acc.device)
            if acc.reduce(flag).item():
                raise preempted(run, "before training started: nothing new to save")
            evaluate_epoch(run)  # e.g. it failed on a corrupt validation image
            train(run)
            write_results(run, startup, resume)
        finally:
            acc.end_training()  # trackers closed, process group destroyed

def load_checkpoint(run: Run, resume: Path) -> None:
    state, cfg = loop_state(run.saved["loop"], resume), run.cfg
    check_loop_state(state, len(run.data.train), cfg.gradient_accumulation_steps, resume)
    if state.epoch > cfg.epochs or state.epoch == cfg.epochs and state.batch:
        raise Exit(f"checkpoint {resume} is in epoch {state.epoch + 1}, past --epochs "
                   f"{cfg.epochs}: pass --epochs {state.epoch + 1} or more, or --resume none "
                   "--overwrite to start again")
    # load_state restores the groups' momentum, weight decay and lr_scale: the flags' stand
    asked = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    try:
        run.accelerator.load_state(str(resume))
    except Exception as e:  # a forged optimizer.bin: UnpicklingError, ...
        raise Exit(f"checkpoint {resume} does not load ({first_line(e)}): damaged or edited; "
                   "--resume another checkpoint") from None
    for group, settings in zip(run.optimizer.param_groups, asked):
        group.update(settings)
    if run.ema is not None:
        load_ema(run.ema, resume)
    if state.best_val_acc >= 0 and not (run.dir / "model_best.safetensors").exists():
        print0(run.accelerator, f"note: {run.dir} holds no model_best.safetensors (resumed from "
                                "another run's checkpoint?): the best is chosen from here on")
        state.best_val_acc, state.best_epoch = -1.0, 0
    run.state = state
    print0(run.accelerator, f"resumed from {resume} (epoch {state.epoch + 1}, batch "
                            f"{state.batch}, step {state.step})")
    note_changes(run)

def write_results(run: Run, startup: float, resume: Path | None) -> None:
    """The weights, the pictures, top_losses.csv, then results.json (a finished run's mark)."""
    acc, state, cfg = run.accelerator, run.state, run.cfg
    confused = mistakes(run, run.worst, state.last_metrics.get("val_confusion_matrix"),
                        run.data.val_split, run.data.meta["class_names"])
    if acc.is_main_process:
        save_weights(run.bare(), run.dir / "model.safetensors", run.data.meta)
        if run.ema is not None:
            save_weights(run.ema.module, run.dir / "model_ema.safetensors", run.data.meta)
        draw_pictures(run)
        for old in checkpoints(run.dir)[1:] if "keep_checkpoints" not in run.given else []:
            shutil.rmtree(old)  # finished: the newest is what resuming a longer run needs
    rss, dev = peak_memory_mb(acc)
    images = cfg.epochs * len(run.data.train) * cfg.batch_size * acc.num_processes
    rate = images / state.train_time_s
    wall_time = time.perf_counter() - run.t_start  # the whole process's, measured last
    results = {**state.last_metrics, "steps": state.step, "epochs": cfg.epochs,
               "wall_time_s": round(wall_time, 3), "startup_s": round(startup, 3),
               "train_time_s": round(state.train_time_s, 3), "images_per_s": round(rate, 1),
               "images_per_s_per_process": round(rate / acc.num_processes, 1),
               "peak_rss_mb": rss, "peak_device_mb": dev, "num_processes": acc.num_processes,
               "best_val_acc": state.best_val_acc, "best_epoch": state.best_epoch,
               "skipped_steps": state.skipped_steps, "most_confused": confused,
               "skipped_examples": state.skipped_examples,
               "data_mode": cfg.data_mode, "resumed_from": str(resume) if resume else None}
    if acc.is_main_process:
        write_json(run.dir / "results.json", results)
    print0(acc, f"done: val acc {results['val_acc']:.2%} (best {state.best_val_acc:.2%}, epoch "
                f"{state.best_epoch}: model_best.safetensors), {state.step} steps, "
                f"{wall_time:.1f}s (whole process, imports included); wrote {run.dir}")

def draw_pictures(run: Run) -> None:
    """curves.png (per epoch, from metrics.jsonl) and confusion.png (the last evaluation's), also
    to tensorboard. Figures without pyplot: no backend (display) to choose."""
    from matplotlib.figure import Figure
    evals = [e for e in map(json.loads, run.log.path.read_text().splitlines())
             if e["event"] == "eval"]
    curves = Figure(figsize=(10, 4), layout="constrained")
    for ax, name, title in zip(curves.subplots(1, 2), ("loss", "acc"), ("loss", "accuracy")):
        for split, label in (("train", "train"), ("val", "validation")):
            ax.plot([e["epoch"] for e in evals], [e[f"{split}_{name}"] for e in evals], "o-",
                    label=label)
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    pictures = {"curves": curves}
    matrix, names = run.state.last_metrics.get("val_confusion_matrix"), run.data.meta["class_names"]
    if matrix:
        side = min(20, 3 + len(names) * 0.35)
        pictures["confusion"] = Figure(figsize=(side, side), layout="constrained")
        ax = pictures["confusion"].subplots()
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
        ax.set(xlabel="predicted", ylabel="true class", title="validation confusion matrix")
        for (i, j), n in np.ndenumerate(np.array(matrix)) if len(names) <= 20 else ():
            ax.text(j, i, n, ha="center", va="center", fontsize=8,
                    color="white" if n > np.max(matrix) / 2 else "black")
    for name, figure in pictures.items():
        figure.savefig(run.dir / f"{name}.tmp.png", dpi=100)
        os.replace(run.dir / f"{name}.tmp.png", run.dir / f"{name}.png")
        if run.cfg.report_to in ("tensorboard", "all"):
            run.accelerator.get_tracker("tensorboard", unwrap=True).add_figure(
                name, figure, run.state.step)

def evaluate_only(run: Run) -> None:
    """--eval_only: the weights on the split they were validated on, or on other data."""
    acc, cfg = run.accelerator, run.asked
    model, meta = trained_model(cfg)
    if checkpoints(run.dir) or (run.dir / "model.safetensors").exists():
        raise Exit(f"{run.dir} holds a training run: its results.json would be --eval_only's, and "
                   "a resume would take the run as finished; use another --output_dir")
    refuse_to_replace(run.dir / "results.json", cfg)
    with acc.main_process_first():
        split, image_col, label_col, what, part = load_eval_split(run, meta)
    mode = pick_mode(run, [(split, False, part)], meta, image_col, label_col)
    loader = make_loader(run, Source(split, image_col, label_col, part), meta, mode,
                         eval_batch(meta, cfg.batch_size), None)
    metrics = evaluate(acc, acc.prepare(model), loader, meta, cfg.channels_last)
    worst = metrics.pop("val_top_losses")
    results = {**metrics, "weights": str(cfg.weights), "evaluated": what,
               "num_processes": acc.num_processes,
               "wall_time_s": round(time.perf_counter() - run.t_start, 3)}
    run.cfg = dataclasses.replace(cfg, image_column=image_col)
    results["most_confused"] = mistakes(run, worst, metrics.get("val_confusion_matrix"), split,
                                        meta["class_names"])
    if acc.is_main_process:
        write_json(run.dir / "results.json", results)
    print0(acc, f"eval: {what}, {metrics['val_count']} images: loss {metrics['val_loss']:.4f} "
                f"acc {metrics['val_acc']:.2%}; wrote {run.dir / 'results.json'}")
    acc.end_training()

def predict(run: Run) -> None:
    """predictions.csv: each image under --predict (the processes take every n-th file) decoded
    and normalized as the weights' run did, with its top classes and probabilities."""
    acc, cfg = run.accelerator, run.asked
    model, meta = trained_model(cfg)
    root = Path(cfg.predict).expanduser()
    every = [root] if root.is_file() else sorted(  # as training reads folders, links too
        Path(path) for _, name, path in walk_files(root) if not name.startswith("."))
    files = [p for p in every if p.suffix.lower() in image_extensions()]
    if len(files) < len(every):
        print0(acc, f"note: skipped {len(every) - len(files)} files that are not images")
    if not files:
        raise Exit(f"--predict {cfg.predict}: no image files there")
    refuse_to_replace(run.dir / "predictions.csv", cfg)
    mine = files[acc.process_index::acc.num_processes]
    images = [{"image": {"path": str(f)}, "label": 0} for f in mine]  # rows as Decoded reads
    loader = torch.utils.data.DataLoader(
        Decoded(images, "image", "label", pil_mode(meta), *stored(meta, train=False)),
        batch_size=eval_batch(meta, cfg.batch_size), num_workers=worker_count(cfg),
        worker_init_fn=init_worker)
    k, rows = min(5, meta["num_classes"]), []
    for logits, _ in inferred(model.to(acc.device), loader, meta, acc.device, cfg.channels_last):
        probs, classes = logits.softmax(1).topk(k, 1)
        for p, c in zip(probs.tolist(), classes.tolist()):
            name = mine[len(rows)]
            rows.append([str(name.relative_to(root)) if name != root else name.name,
                         *[v for i, q in zip(c, p) for v in (meta["class_names"][i], f"{q:.6f}")]])
    rows = accelerate.utils.gather_object(rows)
    if acc.is_main_process:
        run.dir.mkdir(parents=True, exist_ok=True)
        write_csv(run.dir / "predictions.csv", ["file"] + [
            f"{w}_{i}" for i in range(1, k + 1) for w in ("label", "probability")], sorted(rows))
    print0(acc, f"predicted {len(rows)} image{'s' * (len(rows) != 1)}; wrote "
                f"{run.dir / 'predictions.csv'}")
    acc.end_training()

def write_csv(path: Path, header: list[str], rows: list) -> None:
    """A cell (a file or class name) that a spreadsheet would run as a formula gets a quote."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows([["'" + cell if cell.startswith(("=", "+", "-", "@", "\t", "\r")) else cell
                        for cell in row] for row in rows])


# ----------------------------------------------------------------------------- evaluation

def inferred(model, loader, meta: dict, device, channels_last: bool):
    """(float logits, labels) per batch, in eval mode: evaluation's and --predict's one path."""
    model.eval()
    norm = normalizer(meta, device)
    for images, labels in loader:
        with torch.no_grad():
            yield model(to_input(images.to(device), norm, channels_last)).float(), labels

def evaluate(accelerator, model, loader, meta: dict, channels_last: bool) -> dict:
    """Exact over processes: per-image values gathered (no padding duplicates), the loss summed
    per batch, counts over all. Top-5 accuracy above 5 classes; confusion up to 100 (rows: true)."""
    k, rows = meta["num_classes"], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for logits, labels in inferred(model, loader, meta, accelerator.device, channels_last):
        losses = F.cross_entropy(logits, labels, reduction="none")
        top5 = (logits.topk(min(5, k), 1).indices == labels[:, None]).any(1)
        prob, preds = logits.softmax(1).max(1)
        gathered = accelerator.gather_for_metrics((losses, labels, preds, prob, top5))
        loss_sum += gathered[0].double().sum()
        rows.append(torch.stack([t.double() for t in gathered], 1))
    every = torch.cat(rows).cpu()  # per image, in the split's order: loss, label, pred, prob, top5
    count, labels, preds = len(every), every[:, 1].long(), every[:, 2].long()
    hit, top5 = labels[preds == labels], every[:, 4].sum().item()  # hit: right ones' labels
    seen, hits = (torch.bincount(t, minlength=k).tolist() for t in (labels, hit))
    metrics = {"val_loss": loss_sum.item() / count, "val_acc": len(hit) / count,
               "val_count": count, **({"val_top5_acc": top5 / count} if k > 5 else {}),
               "val_per_class_acc": {name: h / n if n else None
                                     for name, n, h in zip(meta["class_names"], seen, hits)}}
    if k <= 100:
        metrics["val_confusion_matrix"] = torch.bincount(
            labels * k + preds, minlength=k * k).view(k, k).tolist()
    order = torch.sort(every[:, 0], descending=True, stable=True).indices[:TOP_LOSSES]
    metrics["val_top_losses"] = [(i, int(every[i, 1]), int(every[i, 2]), float(every[i, 3]),
                                  float(every[i, 0])) for i in order.tolist()]
    return metrics

def mistakes(run: Run, worst: list, matrix: list | None, split, names: list[str]) -> list:
    """top_losses.csv from evaluate's `worst` (images of `split`); returns (and prints) the most
    confused class pairs."""
    pairs = sorted((-int(n), i, j) for (i, j), n in np.ndenumerate(matrix or [[0]])
                   if n and i != j)[:5]
    confused = ", ".join(f"{names[i]} as {names[j]} ({-n})" for n, i, j in pairs) or (
        "none" if matrix else "not counted (over 100 classes)")
    print0(run.accelerator, f"most confused: {confused}; the worst images: "
                            f"{run.dir / 'top_losses.csv'}")
    if run.accelerator.is_main_process:
        column = run.cfg.image_column
        images = [split[i][column] for i, *_ in worst] if isinstance(split, Shards) else \
            split.select([i for i, *_ in worst]).select_columns([column])[column]
        rows = [[(image or {}).get("path") or f"row {i}", names[true], names[pred], f"{prob:.6f}",
                 f"{loss:.6f}"] for (i, true, pred, prob, loss), image in zip(worst, images)]
        run.dir.mkdir(parents=True, exist_ok=True)  # --eval_only's: made once it has results
        write_csv(run.dir / "top_losses.csv",
                  ["image", "label", "predicted", "probability", "loss"], rows)
    return [{"true": names[i], "predicted": names[j], "count": -n} for n, i, j in pairs]

def precise_bn(run: Run, model) -> None:
    """BatchNorm's statistics recomputed (torch's update_bn on --precise_bn training images, mean
    over processes): the running ones trail the weights; after 16 steps eval predicted one class."""
    acc, cfg, data = run.accelerator, run.cfg, run.data
    net = acc.unwrap_model(model)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not cfg.precise_bn or cfg.freeze_backbone:  # frozen: kept as they are
        return
    dataset, ranks = data.train.dataset, acc.num_processes
    picked = epoch_permutation(len(dataset), cfg.seed, run.state.epoch)[:cfg.precise_bn]
    mine = picked[acc.process_index::ranks][:len(picked) // ranks].tolist()
    if isinstance(data.sampler, StreamSampler):  # the first of its own rows: few row groups
        mine = list(itertools.islice(data.sampler.plan(run.state.epoch, 0), len(mine)))
    loader = torch.utils.data.DataLoader(  # full batches: BatchNorm cannot take one image
        torch.utils.data.Subset(dataset, mine), batch_size=cfg.batch_size,
        drop_last=len(mine) >= cfg.batch_size,
        collate_fn=None if isinstance(dataset, Decoded) else as_is,
        num_workers=cfg.num_workers if isinstance(dataset, Decoded) else 0,
        worker_init_fn=init_worker, generator=torch.Generator().manual_seed(cfg.seed))
    norm, size = normalizer(data.meta, acc.device), data.meta["image_size"]
    torch.optim.swa_utils.update_bn(  # the photo recipe stores more than size: the eval view
        (to_input(TF.center_crop(images.to(acc.device), size), norm, cfg.channels_last)
         for images, *_ in loader), net)
    stats = [t for m in norms for t in (m.running_mean, m.running_var)]
    means = acc.reduce(torch.cat(stats), "mean")  # every process evaluates the same model
    for t, mean in zip(stats, means.split([t.numel() for t in stats])):
        t.copy_(mean)

def peak_memory_mb(accelerator) -> tuple[float, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    dev = torch.cuda.max_memory_allocated() / 2**20 if accelerator.device.type == "cuda" else 0.0
    peaks = accelerator.reduce(torch.tensor([rss, dev], device=accelerator.device), "max")
    return tuple(round(v, 1) for v in peaks.tolist())

def eval_batch(meta: dict, asked: int = 0) -> int:
    """--eval_only / --predict: --batch_size, else 64 images, fewer where 64 take gigabytes."""
    h, w = meta["image_size"]
    return asked or max(1, min(64, EVAL_PIXELS // (h * w)))


# ----------------------------------------------------------------------------- model

def conv_block(cin: int, cout: int) -> list:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]

def cnn(channels: int, num_classes: int, image_size: int):
    """Conv-BN-ReLU blocks that double the width and halve the resolution down to 4 px, a last
    block, global average pooling and a linear head: 99% on 8x8 digits in about a second."""
    width, size, layers = 16, image_size, conv_block(channels, 16)
    while size > 4:
        layers += conv_block(width, min(2 * width, 256)) + [nn.MaxPool2d(2)]
        width, size = min(2 * width, 256), size // 2
    layers += conv_block(width, min(2 * width, 256))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(min(2 * width, 256), num_classes))

def check_model_name(name: str) -> None:
    known = torchvision.models.list_models(module=torchvision.models)
    if name != "cnn" and name not in known:
        close = difflib.get_close_matches(name, known + ["cnn"], n=3)
        raise Exit(f"--model {name}: not 'cnn' or a torchvision classifier"
                   + (f"; did you mean {', '.join(close)}?" if close else ""))

def build_model(meta: dict, batch_size: int = 2, probe: bool = True):
    """The model the metadata describes; `probe`: refuse, in one line, an image size or a
    batch of 1 that it cannot take, before training starts."""
    name, classes = meta["model"], meta["num_classes"]
    if name == "cnn":
        return cnn(meta["channels"], classes, min(meta["image_size"]))
    check_model_name(name)
    # Auxiliary heads would make the training forward return a tuple instead of logits.
    # torchvision's builders turn on transform_input (ImageNet stats to [-1, 1]) with weights
    extra = {"aux_logits": False, "transform_input": meta.get("transform_input", False)} \
        if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=classes, **extra)
    if not probe:
        return model
    shape = f"{meta['channels']}x{meta['image_size'][0]}x{meta['image_size'][1]}"
    zeros = torch.zeros(1, meta["channels"], *meta["image_size"])
    with torch.no_grad():
        try:  # e.g. inception_v3 needs 75 px or more
            model.eval()(zeros)
        except (RuntimeError, ValueError, AssertionError) as e:
            raise Exit(f"--model {name} cannot take {shape} images ({first_line(e)}); choose "
                       "another --image_size") from None
        if batch_size == 1:  # BatchNorm cannot normalize one value per channel
            try:  # on a second model: a training forward moves BatchNorm's running statistics
                torchvision.models.get_model(name, num_classes=classes, **extra).train()(zeros)
            except ValueError as e:
                raise Exit(f"--batch_size 1 is too small for --model {name} at {shape} "
                           f"({first_line(e)}); use --batch_size 2 or more") from None
    return model.train()

def head_names(model) -> set[str]:
    """The classifier head: the last linear layer (resnet's fc, vit's heads.head, ...), or the last
    convolution where there is none (squeezenet's classifier.1)."""
    last = ([name for name, m in model.named_modules() if isinstance(m, nn.Linear)] or
            [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)])[-1]
    return {f"{last}.{p}" for p, _ in model.get_submodule(last).named_parameters()}

def make_optimizer(cfg: Config, model):
    """Two parameter groups, backbone and head; each carries an `lr_scale` that the loop
    applies to lr_at(step). --freeze_backbone leaves the backbone out (and frozen)."""
    head = head_names(model)
    groups = [{"params": [p for n, p in model.named_parameters() if n in head],
               "lr_scale": cfg.head_lr_scale}]
    if not cfg.freeze_backbone:
        groups.insert(0, {"params": [p for n, p in model.named_parameters() if n not in head],
                          "lr_scale": 1.0})
    for name, p in model.named_parameters():
        p.requires_grad_(name in head or not cfg.freeze_backbone)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)

def lr_at(step: int, total: int, cfg: Config) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total`. Computed, not stepped:
    a scheduler passed through accelerate.prepare() steps once per process."""
    warmup = cfg.warmup_steps or (total // 4 if cfg.schedule == "onecycle" else 0)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "onecycle":
        return cfg.lr * (1 - progress)
    return cfg.lr

def make_ema(cfg: Config, model):
    """torch's AveragedModel with an EMA update, BatchNorm buffers averaged too; the same on
    every process (it averages the synchronized weights)."""
    if not cfg.ema_decay:
        return None
    swa = torch.optim.swa_utils
    return swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(cfg.ema_decay),
                             use_buffers=True)

def load_ema(ema, checkpoint: Path) -> None:
    if not (checkpoint / "ema.safetensors").exists():
        raise Exit(f"checkpoint {checkpoint} holds no EMA (it was written without "
                   "--ema_decay): resume without it, or start over")
    state = safetensors.torch.load_file(str(checkpoint / "ema.safetensors"))
    ema.load_state_dict({k: v.to(ema.n_averaged.device) for k, v in state.items()})

def pretrained_weights(cfg: Config):
    """torchvision's weights enum member for --model/--pretrained, or a one-line refusal."""
    enum = torchvision.models.get_model_weights(cfg.model)
    try:
        return enum[cfg.pretrained]  # DEFAULT is an alias of one of them
    except KeyError:
        raise Exit(f"--pretrained {cfg.pretrained}: --model {cfg.model} has weights "
                   f"{listing(w.name for w in enum)} (or DEFAULT)") from None

def starting_state(cfg: Config) -> tuple[dict, str]:
    """The tensors to start from (--pretrained or --init_from) and where they came from."""
    if cfg.pretrained:
        return pretrained_state(pretrained_weights(cfg))
    path = Path(cfg.init_from)
    if path.is_dir() or path.suffix == ".safetensors":
        return read_weights(str(path), "--init_from")[0], str(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("not a state dict of tensors")
        return state, str(path)
    except Exception as e:
        raise Exit(f"--init_from {path}: not a run directory, model.safetensors or state dict "
                   f"({first_line(e)})") from None

def load_start(cfg: Config, model, start: tuple[dict, str]) -> str:
    """Load the tensors that fit the model; the rest (a head of another class count) stay new."""
    state, source = start
    own = model.state_dict()
    for prefix in ("", "module.", "_orig_mod.", "model."):  # DDP's, torch.compile's, Lightning's
        named = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        fits = {k: v for k, v in named.items() if k in own and own[k].shape == v.shape}
        if len(fits) >= len(own) / 2:
            break
    new = [k for k in own if k not in fits]
    if len(fits) < len(own) / 2:
        raise Exit(f"{source}: only {len(fits)} of {len(own)} tensors fit --model {cfg.model} "
                   "(also without a module., _orig_mod. or model. prefix): weights of another "
                   "architecture?")
    if cfg.freeze_backbone and (random := [k for k in new if k not in head_names(model)
                                           and not k.endswith("num_batches_tracked")]):
        raise Exit(f"--freeze_backbone would keep {listing(random, 4)} as initialized: "
                   f"{source} has no tensor of that shape for them; drop --freeze_backbone to "
                   "train them, or start from weights that have them")
    model.load_state_dict(fits, strict=False)
    return (f"start: {len(fits)} of {len(own)} tensors from {source}"
            + (f"; new: {listing(new, 4)}" if new else "")
            + ("; backbone frozen" if cfg.freeze_backbone else ""))

def mixer(cfg: Config, num_classes: int):
    """torchvision's batch MixUp / CutMix (random draws from torch's RNG, which checkpoints
    keep), or None. They turn the labels into class probabilities for the cross-entropy."""
    from torchvision.transforms import v2
    mixes = [mix(alpha=alpha, num_classes=num_classes)
             for mix, alpha in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if alpha]
    return None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

@functools.cache
def crop_indices(h: int, w: int, padding: int, device):
    """Flat indices into a zero-padded image: the unshifted h x w window, the same mirrored,
    and the (2p+1)^2 offsets of the shifted windows."""
    wide = w + 2 * padding
    rows = torch.arange(h, device=device).view(h, 1) * wide
    cols = torch.arange(w, device=device)
    shifts = torch.arange(2 * padding + 1, device=device)
    return ((rows + cols).flatten(), (rows + cols.flip(0)).flatten(),
            (shifts.view(-1, 1) * wide + shifts).flatten())

def augment(images, padding: int, hflip: bool, gen):
    """Random padded crop and horizontal flip per image as one gather: on a CPU each op costs
    ~30 us next to a small model's step, so the indices are cached and the draws index them."""
    n, c, h, w = images.shape
    if not (padding or hflip):
        return images
    plain, mirrored, offsets = crop_indices(h, w, padding, images.device)
    window = plain
    if hflip:
        flip = torch.rand(n, 1, generator=gen, device=images.device) < 0.5
        window = torch.where(flip, mirrored, plain)
    pick = torch.randint(0, len(offsets), (n, 1), generator=gen, device=images.device)
    index = window + offsets[pick]  # n x (h * w)
    padded = F.pad(images, (padding,) * 4).flatten(2)
    return padded.gather(2, index.unsqueeze(1).expand(n, c, h * w)).view(n, c, h, w)

def resized_crop(images, size: list[int], min_scale: float, hflip: bool, gen,
                 max_ratio: float = 4 / 3):
    """torchvision's RandomResizedCrop and a flip for the whole batch as one roi_align, a box per
    image (one wider than the image is clipped, where torchvision draws again); float 0-255."""
    n, _, t, s = images.shape
    u = torch.rand(n, 5, generator=gen, device=images.device)
    area = (min_scale + (1 - min_scale) * u[:, 0]) * t * s
    ratio = torch.exp(math.log(max_ratio) * (2 * u[:, 1] - 1))
    w, h = (area * ratio).sqrt().clamp(max=s), (area / ratio).sqrt().clamp(max=t)
    x0, y0 = u[:, 2] * (s - w), u[:, 3] * (t - h)
    boxes = torch.stack([torch.arange(n, device=images.device, dtype=torch.float), x0, y0,
                         x0 + w, y0 + h], 1)
    out = torchvision.ops.roi_align(images.float(), boxes, list(size), 1.0, 2, aligned=True)
    if hflip:
        out = torch.where((u[:, 4] < 0.5).view(n, 1, 1, 1), out.flip(3), out)
    return out

def augment_batch(images, meta: dict, gen):
    """The training recipe's augmentation of a uint8 batch on the device (see --recipe)."""
    if meta["recipe"] == "photo":
        return resized_crop(images, meta["image_size"], meta["crop_scale"], meta["hflip"], gen,
                            meta["crop_ratio"])
    return augment(images, meta["crop_padding"], meta["hflip"], gen)

def normalizer(meta: dict, device):
    """(scale, shift) with (x / 255 - mean) / std == x * scale - shift, made once per loop."""
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    return 1 / (255 * std), mean / std

def to_input(images, norm, channels_last: bool):
    x = images.float().mul_(norm[0]).sub_(norm[1])
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------- data

COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"}
WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # > 8 bits: scaled (eight_bits)
NARROW_MODES = COLOUR_MODES | {"1", "L", "LA", "La"}  # what PIL's convert reads as it is
VAL_SPLITS = ("validation", "valid", "val", "test")
PROBE_IMAGES = 512  # images whose headers decide colour and size: spread over the whole split
SPLIT_DIRS = {"train": "train", "training": "train", "validation": "validation",
              "valid": "validation", "val": "validation", "dev": "validation", "test": "test",
              "testing": "test"}
DATA_FILES = (".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl")  # a Hub download
STRINGS = ("string", "large_string")
LABEL_FILES = (".csv", ".tsv", ".jsonl", ".json")  # --dataset FILE: a row per image
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # PIL's ways of saying "not an image"

def digits_dataset():
    """scikit-learn's bundled 8x8 digits (1,797 images) as an Image/ClassLabel dataset."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(p) for p in pixels], "label": digits.target.tolist()},
        features=features)

@functools.cache
def image_extensions() -> frozenset[str]:
    """The file endings PIL can open (.jpg, .png, .tif, ...)."""
    return frozenset(e for e, fmt in PIL.Image.registered_extensions().items()
                     if fmt in PIL.Image.OPEN)

def walk_files(root: Path):
    """(folder parts, name, path) of each file under root, sorted, through links to folders (one
    read twice is refused: a loop), not into hidden or __ folders (__MACOSX)."""
    seen = {}
    for folder, subfolders, names in os.walk(root, followlinks=True):
        info = os.stat(folder)
        if (first := seen.setdefault((info.st_dev, info.st_ino), folder)) != folder:
            raise Exit(f"{folder} is {first} again (a link to a folder read already, or a loop): "
                       "remove the link")
        subfolders[:] = sorted(d for d in subfolders if not d.startswith((".", "__")))
        inside = Path(folder).relative_to(root).parts
        for name in sorted(names):
            path = os.path.join(folder, name)
            try:
                path.encode()
            except UnicodeEncodeError:  # bytes that are not UTF-8: pyarrow cannot hold the name
                raise Exit(f"{str(os.fsencode(path))[2:-1]}: the name is not UTF-8 (a zip made "
                           "on Windows?); rename it") from None
            yield inside, name, path

def walk_images(root: Path) -> tuple[list[tuple], int, str] | None:
    """Every image under root as its path parts, the count of other files, and a digest of the
    files' names, sizes and times; None for data files (a Hub download, a table beside images)."""
    images, found, skipped, tables, files = image_extensions(), [], 0, 0, hashlib.sha256()
    for inside, name, path in walk_files(root):
        ext = os.path.splitext(name)[1].lower()
        if name.startswith("metadata.") or ext in DATA_FILES and (
                not inside or ext in (".parquet", ".arrow")):
            return None
        if name.startswith(".") or ext not in images:
            skipped, tables = skipped + 1, tables + (ext in DATA_FILES)  # sidecars: not data
            continue
        try:
            info = os.stat(path)
        except OSError as e:
            raise Exit(f"cannot read {path}: {e.strerror}" + (
                " (a link to a missing file); remove the link" if os.path.islink(path) else ""))
        found.append((*inside, name))
        files.update(f"{found[-1]}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    if not found and tables:  # data files in folders: datasets reads them
        return None
    if not found:
        raise Exit(f"--dataset {root}: no image files in it ({skipped} other files)")
    return found, skipped, files.hexdigest()

def image_folder(root: Path):
    """Class subfolders, optionally in split folders (train/, val/, ...). The class is the top
    folder, as in torchvision's ImageFolder (datasets' imagefolder takes the innermost one)."""
    if (walked := walk_images(root)) is None:  # a Hub download: datasets reads it
        return None
    found, skipped, digest = walked
    tops = {p[0] for p in found}
    # Split folders (train/, val/, ...) when any holds class folders. A top-level folder of
    # loose images (Kaggle's unlabelled test/) or one that is not a split is not training data.
    split_layout = any(len(p) > 2 and p[0].lower() in SPLIT_DIRS for p in found)
    named = sorted(top for top in tops if top.lower() in SPLIT_DIRS)
    if named and not split_layout:  # split-named folders of loose images: never classes
        raise Exit(f"{root / named[0]} holds images directly, but {named[0]} names a split: put "
                   f"them in class folders ({named[0]}/<class>/...), or pass --predict for them")
    found, left_out = class_folders(root, found, split_layout)
    rows: dict[str, list] = {}
    real = root.resolve()  # one spelling of the paths: one fingerprint, one decoded cache
    for parts in found:
        split = SPLIT_DIRS[parts[0].lower()] if split_layout else "train"
        rows.setdefault(split, []).append((os.path.join(real, *parts),
                                           parts[1] if split_layout else parts[0]))
    classes = sorted({c for split in rows.values() for _, c in split})
    if len(classes) < 2:
        raise Exit(f"{root} has one class folder ({classes[0]}); --dataset must be the folder "
                   "whose subfolders are the classes")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=classes)})
    note = (f"folder: {len(found)} images in {len(classes)} classes ({listing(classes)})"
            + (f", splits {listing(rows)}" if split_layout else "")
            + (f"; skipped {skipped} files that are not images" if skipped else "")
            + "".join(f"\nnote: {line}" for line in left_out))
    # datasets fingerprints an in-memory dataset by its contents, here paths and labels; the
    # files' sizes and times in its description make an edited image a new dataset, so that
    # --data_mode cache (keyed by the fingerprint) decodes it again.
    about = f"image folder {real}; files {digest}"
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"image": [p for p, _ in items], "label": [classes.index(c) for _, c in items]},
        features=features, info=datasets.DatasetInfo(description=about, features=features))
        for split, items in rows.items()}), note

def class_folders(root: Path, found: list[tuple], split_layout: bool) -> tuple[list, list]:
    """The images in class folders, and notes on the folders left out (unlabelled, not a split,
    no images); loose images and empty split folders are refused."""
    left_out, tops = [], {p[0] for p in found}
    for top in sorted({p[0] for p in found if len(p) > 1} if split_layout else ()):
        inside = [p for p in found if p[0] == top]
        unlabelled = all(len(p) == 2 for p in inside)
        if unlabelled or top.lower() not in SPLIT_DIRS:
            left_out.append(f"skipped {top}/: {len(inside)} images " + (
                "outside class folders (unlabelled: --predict is for them)" if unlabelled
                else "(not a split: train, val, test)"))
            found = [p for p in found if p[0] != top]
    loose = [Path(*p) for p in found if len(p) < (3 if split_layout else 2)]
    if loose:
        raise Exit(f"{len(loose)} image(s) in {root} outside any class folder (e.g. {loose[0]}); "
                   "put each image in a folder named after its class")
    if split_layout:  # a split folder without images would be silently replaced
        empty = [d.name for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_DIRS
                 and d.name not in tops]
        if empty:
            raise Exit(f"{root / empty[0]} holds no images; add images to it or remove it")
    have = {p[:2 if split_layout else 1] for p in found}  # class folders that hold no images
    bare = [str(d.relative_to(root)) for parent in sorted({root / p[0] for p in found}
                                                          if split_layout else [root])
            for d in sorted(parent.iterdir()) if d.is_dir() and not d.name.startswith((".", "__"))
            and d.relative_to(root).parts not in have]
    if bare:
        left_out.append(f"skipped {listing(bare)}: no images, so not classes")
    return found, left_out

def load_source(cfg: Config, hub: str | None):
    """A Dataset or DatasetDict for --dataset and a line about it, or a one-line Exit."""
    if cfg.dataset == "digits":
        return digits_dataset(), ""
    path = Path(cfg.dataset).expanduser()
    if path.is_file() and path.suffix.lower() in LABEL_FILES:
        return label_file(path, cfg), ""
    if path.is_file():
        raise Exit(f"--dataset {cfg.dataset} is a file; pass a folder of class subfolders, a "
                   f"label file ({listing(LABEL_FILES)}), a save_to_disk directory, a Hub id "
                   "or 'digits'")
    saved = any((path / f).exists() for f in ("dataset_dict.json", "state.json"))
    if path.is_dir() and not saved and (folder := image_folder(path)) is not None:
        return folder
    if path.is_dir():
        tables = sorted((f.name for f in path.iterdir() if f.suffix.lower() in LABEL_FILES
                         and not f.name.startswith("metadata.")),  # Kaggle's labels first
                        key=lambda n: ("submission" in n.lower() or "test" in n.lower(), n))
        if tables and any(f.suffix.lower() in image_extensions() for f in path.rglob("*")):
            raise Exit(f"--dataset {path} holds images and {listing(tables)}: to take the labels "
                       f"from a file, pass the file: --dataset {path / tables[0]}; to take them "
                       f"from class folders, move {listing(tables)} out of {path}")
        try:  # a save_to_disk directory, or a Hub download (dataset card + data files)
            return (datasets.load_from_disk(str(path)) if saved
                    else datasets.load_dataset(str(path), cfg.dataset_config)), ""
        except Exception as e:  # an empty split, a damaged file, ...
            raise Exit(f"cannot load {cfg.dataset}: {load_error(e)}") from None
    if hub is None:
        raise Exit(f"--dataset {cfg.dataset}: no such directory")
    try:
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config, revision=cfg.revision), ""
    except Exception as e:  # DatasetNotFoundError, bad config name, gated repo, offline, ...
        if hub == "online":
            raise Exit(f"cannot load --dataset {cfg.dataset}: {load_error(e)}") from None
        try:  # where huggingface_hub's snapshot_download leaves it, if it did
            import huggingface_hub
            folder = huggingface_hub.snapshot_download(cfg.dataset, repo_type="dataset",
                                                       revision=cfg.revision,
                                                       local_files_only=True)
        except Exception:
            why = ("the Hugging Face Hub cannot be reached from here" if hub == "unreachable"
                   else "HF_HUB_OFFLINE=1 is set, so nothing is downloaded (unset it to download)")
            raise Exit(f"--dataset {cfg.dataset}: no local folder of that name, not in the local "
                       f"Hub cache, and {why}; or save it where there is network "
                       "(load_dataset(...).save_to_disk(DIR)) and pass --dataset DIR") from None
        source, note = load_source(dataclasses.replace(cfg, dataset=folder), None)
        return source, f"note: reading the Hub cache's copy {folder}\n{note}".strip()

def local_path(dataset: str) -> str:
    """A --dataset that names a local file or folder as its real path; else (digits, a Hub id) as
    it is: how --eval_only tells the weights' own data, however it is spelled."""
    path = Path(dataset).expanduser()
    return str(path.resolve()) if dataset != "digits" and path.exists() else dataset

def load_error(e: Exception) -> str:
    """datasets' error, or what it means where it says it badly."""
    sizes = re.findall(r"name='([^']*)', num_bytes=\d+, num_examples=(\d+)", str(e))
    if type(e).__name__ == "NonMatchingSplitsSizesError" and len(sizes) >= 2:  # cut short
        (split, card), (_, files) = sizes[:2]
        return (f"its card records {card} examples in split '{split}', the files hold "
                f"{files}: an incomplete download? Download it again")
    return first_line(e)

def label_file(path: Path, cfg: Config):
    """--dataset FILE.csv / .jsonl: a row per image with its label and its path relative to the
    file, or a name or id (no file ending) of an image under its folder, as Kaggle ships them."""
    try:
        table = datasets.load_dataset("json" if "json" in path.suffix.lower() else "csv",
                                      data_files=str(path), split="train",
                                      **({"sep": "\t"} if path.suffix.lower() == ".tsv" else {}))
    except Exception as e:
        raise Exit(f"cannot read --dataset {path}: {load_error(e)}") from None
    folder, found = path.parent.resolve(), {}  # a name or a stem: the files it names
    for f in sorted(folder.rglob("*")):
        if f.suffix.lower() in image_extensions():
            for key in (f.name, f.stem):
                found.setdefault(key, []).append(f)
    columns = [cfg.image_column] if cfg.image_column else list(table.features)
    for col in columns:
        values = [str(v) for v in table[col]] if col in table.features else []
        named = [[folder / v] if (folder / v).is_file() else found.get(v, []) for v in values]
        paths = [str(files[0]) if files else None for files in named]
        if len(paths) > 2 * paths.count(None):
            break
    else:
        raise Exit(f"--dataset {path}: no column of image paths among {listing(table.features)}; "
                   f"paths are read relative to {folder} (--image_column names the column)")
    if None in paths:
        raise Exit(f"--dataset {path}: {paths.count(None)} of {len(paths)} rows name no image "
                   f"file (e.g. '{values[paths.index(None)]}' in column '{col}', under {folder})")
    if twice := next(((v, files) for v, files in zip(values, named) if len(files) > 1), None):
        raise Exit(f"--dataset {path}: '{twice[0]}' in column '{col}' names "
                   f"{listing(f.relative_to(folder) for f in twice[1])}: write the paths relative "
                   f"to {folder}")
    labels = [n for n in table.features if n != col]
    label_col = cfg.label_column or (labels[0] if len(labels) == 1 else "label")
    if label_col not in labels:
        raise Exit(f"--dataset {path}: which column is the label? name it with --label_column "
                   f"(columns: {listing(labels)})")
    table = datasets.Dataset.from_dict({col: paths, label_col: table[label_col]})
    return table.cast_column(col, datasets.Image()).class_encode_column(label_col)

def describe(feature) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return "class labels"
    if isinstance(feature, datasets.Image):
        return "images"
    return getattr(feature, "dtype", type(feature).__name__) + " values"

def find_columns(split, image_column: str | None, label_column: str | None
                 ) -> tuple[str, str, str]:
    """The image and label columns, and a line saying which were chosen among which."""
    features, image_note = split.features, ""
    kinds = {n: getattr(f, "dtype", "") for n, f in features.items()}
    images = [n for n, f in features.items() if isinstance(f, datasets.Image)]
    labels = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
    for flag, wanted in (("--image_column", image_column), ("--label_column", label_column)):
        if wanted is not None and wanted not in features:
            raise Exit(f"{flag} {wanted}: no such column; the columns are {listing(features)}")
    if image_column is None:
        if not images and kinds.get("image") in STRINGS:
            images = ["image"]  # file paths
        if not images:
            raise Exit(f"no Image column among {listing(features)}; name it with "
                       "--image_column NAME")
        image_column = "image" if "image" in images else images[0]
        if len(images) > 1:
            others = listing(n for n in images if n != image_column)
            image_note = f" (other image columns: {others}; --image_column picks one)"
    elif not (image_column in images  # or paths, or encoded bytes
              or kinds[image_column] in (*STRINGS, "binary", "large_binary")):
        raise Exit(f"--image_column {image_column} holds {describe(features[image_column])}, "
                   f"not images; image columns: {listing(images) or 'none'}")
    if label_column is None:
        if not labels and kinds.get("label", "") == "":
            raise Exit(f"no ClassLabel column among {listing(features)}; name it with "
                       "--label_column NAME")
        label_column = "label" if "label" in labels or not labels else labels[0]
    feature, kind = features[label_column], kinds[label_column]
    if isinstance(feature, (datasets.Sequence, list)):
        raise Exit(f"--label_column {label_column} holds lists of labels (multi-label): not "
                   "supported; train.py trains one class per image")
    if not (isinstance(feature, datasets.ClassLabel) or kind.startswith(("int", "uint"))
            or kind in STRINGS) or label_column == image_column:
        raise Exit(f"--label_column {label_column} holds {describe(feature)}, not class labels; "
                   f"label columns: {listing(labels) or 'none'}")
    note = f'columns: image column "{image_column}"{image_note}, label column "{label_column}"'
    if others := [n for n in labels if n != label_column]:
        note += f" (other label columns: {listing(others)}; --label_column picks one)"
    return image_column, label_column, note

@dataclass
class Splits:
    train: object            # datasets.Dataset, images not decoded
    val: object
    image_col: str
    label_col: str
    class_names: list[str]
    source_train: object     # the training data before a validation part was held out
    notes: list[str]
    rows: tuple[list[int], list[int]] | None = None  # held out: train's, val's rows in source_train

@dataclass
class Source:
    """One split to load, and for the decoded cache (part_of) the data it is a part of."""
    split: object
    image_col: str
    label_col: str
    part: tuple | None = None

def part_of(s: Splits, meta: dict, train: bool) -> tuple | None:
    """For the decoded cache: (the data a held-out split is part of, its rows there), so that one
    cache serves every --seed and --val_fraction; not for val stored smaller (photo recipe)."""
    if s.rows is None or not (train or stored(meta, True) == stored(meta, False)):
        return None
    return s.source_train, s.rows[0 if train else 1]

def label_counts(labels, classes: int, where: str):
    check_labels(labels, where)
    return np.bincount(labels, minlength=classes)

def unlabelled(labels) -> int:
    """How many labels are -1 (datasets' "none") or empty cells (None, NaN)."""
    if labels.dtype.kind in "iu":
        return int((labels < 0).sum())
    return sum(v is None or v != v or type(v) is int and v < 0 for v in labels.tolist())

def check_labels(labels, where: str) -> None:
    if missing := unlabelled(labels):
        raise Exit(f"{missing} of {len(labels)} images have no label (-1 or empty) in {where}; "
                   "use labelled data"
                   + (" (--split picks another split, --predict is for unlabelled images)"
                      if missing == len(labels) else ""))

def load_splits(cfg: Config, hub: str | None) -> Splits:
    """Train and validation splits, images undecoded, ClassLabels that mean the same in both."""
    source, folder_note = load_source(cfg, hub)
    train, val, val_name, train_name = source, None, None, "train"
    if isinstance(source, datasets.DatasetDict):
        if not source:
            raise Exit(f"--dataset {cfg.dataset} has no splits")
        train_name = "train" if "train" in source else next(iter(source))
        val_name = next((s for s in VAL_SPLITS if s in source and s != train_name), None)
        train, val = source[train_name], source.get(val_name)
    image_col, label_col, note = find_columns(train, cfg.image_column, cfg.label_column)
    if val is not None and isinstance(val.features.get(label_col), datasets.ClassLabel) and (
            len(val) and unlabelled(labels_of(val, label_col)) == len(val)):  # Hub test splits
        note += (f'\nnote: split "{val_name}" has no labels (all -1): not used for validation; '
                 f'--val_fraction {cfg.val_fraction} of "{train_name}" held out instead')
        val = None
    if len(train) == 0 or (val is not None and len(val) == 0):
        raise Exit(f"--dataset {cfg.dataset} has an empty split; add images to it")
    if val is not None and not {image_col, label_col} <= set(val.features):
        raise Exit(f"the validation split lacks column {image_col} or {label_col}")
    if not isinstance(train.features[label_col], datasets.ClassLabel):
        both = datasets.DatasetDict({"train": train, **({"val": val} if val else {})})
        both = both.class_encode_column(label_col)  # one mapping for every split
        train, val = both["train"], both.get("val")
    classes = train.features[label_col]
    if classes.num_classes < 2:  # an image folder says so itself
        raise Exit(f"--dataset {cfg.dataset} has {classes.num_classes} class "
                   f"({listing(classes.names)}) in column '{label_col}'; a classifier needs two or "
                   "more: is it the right column, the right file?")
    if val is not None:
        val = align_classes(val, label_col, classes.names, "the training classes")
    train = train.cast_column(image_col, datasets.Image(decode=False))
    labels = labels_of(train, label_col)  # read once: counted, then stratified
    source_train, seen, rows = train, label_counts(
        labels, classes.num_classes, f"{cfg.dataset} ({train_name})"), None
    if val is None:
        rows = hold_out(labels, classes, cfg.val_fraction, cfg.seed)
        train, val = train.select(rows[0]), train.select(rows[1])
    else:  # a class that only the validation data has cannot be learned: say so
        asked = label_counts(labels_of(val, label_col), classes.num_classes,
                             f"{cfg.dataset} ({val_name})")
        if orphans := [f"'{classes.names[i]}' ({asked[i]} images)"
                       for i in range(classes.num_classes) if asked[i] and not seen[i]]:
            raise Exit(f"validation class {listing(orphans)} has no training images; add "
                       "training images for it or remove it from the validation data")
    val = val.cast_column(image_col, datasets.Image(decode=False))
    return Splits(train, val, image_col, label_col, classes.names, source_train,
                  [folder_note, note], rows)

def hold_out(labels, classes, fraction: float, seed: int) -> tuple[list, list]:
    """The rows of datasets' stratified train_test_split(test_size=fraction, seed=seed), by its
    own function, from labels read at once (it reads row by row: 1.5 s per 50,000 images)."""
    n, counts = len(labels), np.bincount(labels)
    why = f"cannot hold out --val_fraction {fraction} of {n} images"
    if counts[counts > 0].min() < 2:
        lonely = classes.int2str(int(np.flatnonzero(counts == 1)[0]))
        raise Exit(f"{why}: class '{lonely}' has 1 image, and every class needs 2 (one for "
                   "training, one for validation); add images or a validation split")
    n_val = math.ceil(fraction * n)
    try:
        train, val = next(datasets.utils.stratify.stratified_shuffle_split_generate_indices(
            labels, n - n_val, n_val, rng=np.random.default_rng(seed)))
    except ValueError as e:  # fewer images in one part than there are classes
        k = int((counts > 0).sum())
        least = math.ceil(20 * k / n - 1e-9) / 20  # a validation image for every class
        fix = (f"--val_fraction {least:g} or more gives every class one" if n - least * n >= k
               else "add images or a validation split")
        raise Exit(f"{why}: {first_line(e)}; {fix}") from None
    return train.tolist(), val.tolist()

def align_classes(split, label_col: str, names: list[str], whose: str):
    """Relabel `split` so that its class ids mean `names` (matched by name)."""
    if not isinstance(split.features[label_col], datasets.ClassLabel):
        split = split.class_encode_column(label_col)
    if (have := split.features[label_col].names) == names:
        return split
    if unknown := [n for n in have if n not in names]:
        raise Exit(f"classes {listing(unknown)} are not among {whose} ({listing(names)})")
    return split.align_labels_with_mapping({name: i for i, name in enumerate(names)}, label_col)

def open_image(image: dict):
    source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    try:
        return PIL.Image.open(source)
    except PIL.Image.DecompressionBombError:  # from the header's size: nothing was decoded
        limit, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
        try:
            with PIL.Image.open(source) as im:  # open() rewinds the stream
                w, h = im.size
        finally:
            PIL.Image.MAX_IMAGE_PIXELS = limit
        raise Exit(f"image {image.get('path') or 'in the data'}: {w}x{h} pixels, more than "
                   f"--max_image_pixels {2 * limit} (PIL's guard against decompression bombs); "
                   f"if it is a real image, pass --max_image_pixels {w * h}") from None

def unreadable(image: dict, where: str, error: BaseException) -> Exit:
    return Exit(f"cannot read image {image.get('path') or where}: {first_line(error)}. Replace "
                "or remove the file")

def shown_size(im) -> tuple[int, int]:
    """(height, width) as displayed: EXIF orientations 5-8 turn the stored image by 90."""
    return im.size if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else im.size[::-1]

def probe_images(split, image_col: str, skip: bool = False) -> tuple[list[tuple[int, int]], int]:
    """Displayed (height, width) of up to PROBE_IMAGES images, from their headers (nothing is
    decoded), and how many of them are colour."""
    n, shards = len(split), isinstance(split, Shards)  # streamed: the first shards' images
    rows = list(range(min(n, PROBE_IMAGES))) if shards or n <= PROBE_IMAGES else [
        round(i * (n - 1) / (PROBE_IMAGES - 1)) for i in range(PROBE_IMAGES)]  # spread evenly
    images = [split[i][image_col] for i in rows] if shards else split.select(rows)[image_col][:]
    sizes, colour = [], 0
    for i, image in zip(rows, images):
        try:
            with open_image(image) as im:
                sizes.append(shown_size(im))
                colour += im.mode in COLOUR_MODES
        except READ_ERRORS as e:
            if not skip:
                raise unreadable(image, f"row {i}", e) from None
            print(f"note: skipped: {unreadable(image, f'row {i}', e)} (--skip_bad_examples)")
    if not sizes:
        raise Exit(f"none of the {len(rows)} images sampled can be read")
    return sizes, colour

def image_properties(cfg: Config, model: str, sizes: list[tuple[int, int]], colour: int,
                     source: str = "") -> tuple[dict, str]:
    """Channels, size and flips of the dataset; `source`: where a cfg.image_size came from."""
    share = colour / len(sizes)
    channels = cfg.channels or (3 if model != "cnn" or share >= 0.5 else 1)
    median = sorted(min(s) for s in sizes)[len(sizes) // 2]  # of the shorter sides
    if not cfg.image_size and len(set(sizes)) == 1 and median <= AUTO_SIZE_CAP:
        size, how = sizes[0], f"all {sizes[0][0]}x{sizes[0][1]}"
    else:
        heights, widths = zip(*sizes)
        why = (source or "--image_size") if cfg.image_size else (
            f"heights {min(heights)}-{max(heights)}, widths {min(widths)}-{max(widths)}, median "
            f"shorter side {median}"
            + (f", capped at {AUTO_SIZE_CAP}" if median > AUTO_SIZE_CAP else ""))
        side = cfg.image_size or min(median, AUTO_SIZE_CAP)
        size, how = (side, side), f"{side}x{side} ({why}; shorter side resized, centre crop)"
    hflip = cfg.hflip == "yes" or (cfg.hflip == "auto" and share >= 0.5)
    note = (f"images: {channels} channel{'s' if channels > 1 else ''} ({share:.0%} of "
            f"{len(sizes)} sampled are colour), {how}, flips {'on' if hflip else 'off'}; "
            "--channels, --image_size, --hflip override")
    return {"channels": channels, "image_size": list(size), "hflip": hflip}, note

def decode(image: dict, mode: str, size: tuple[int, int], where: str, cover: float = 1.0):
    """A stored image -> uint8 C x H x W tensor: EXIF-turned, 16-bit scaled to 8, resized to cover
    `size` / `cover` keeping its aspect, centre-cropped (torchvision's way; never stretched)."""
    h, w = size
    try:
        with open_image(image) as im:
            shown = shown_size(im)
            scale = max(h / shown[0], w / shown[1]) / cover
            if im.format == "JPEG" and scale < 0.5:  # decode at 1/2..1/8 scale: photos 4-16x faster
                im.draft(None, (math.ceil(im.size[0] * scale), math.ceil(im.size[1] * scale)))
            PIL.ImageOps.exif_transpose(im, in_place=True)
            if im.mode in WIDE_MODES:  # PIL's convert would clip them to 0..255
                im = PIL.Image.fromarray(eight_bits(np.asarray(im)))
            elif im.mode not in NARROW_MODES:
                raise ValueError(f"its pixel mode {im.mode} is not supported")
            pixels = TF.pil_to_tensor(im.convert(mode))
    except READ_ERRORS as e:
        raise unreadable(image, where, e) from None
    ih, iw = pixels.shape[-2:]
    if (ih, iw) != (h, w):
        scale = max(h / ih, w / iw) / cover
        pixels = TF.resize(pixels, [max(h, round(ih * scale)), max(w, round(iw * scale))],
                           antialias=True)
        pixels = TF.center_crop(pixels, [h, w])
    return pixels

def eight_bits(a):
    """Wide pixels -> uint8 as torchvision's to_dtype scales: floats from 0..1, 0..255 or their
    own range; integers from 16 bits or the bits the largest value needs (32-bit "I")."""
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64))
        lo, hi = a.min(), a.max()
        lo, hi = (0, 1 if hi <= 1 else 255) if lo >= 0 and hi <= 255 else (lo, max(hi, lo + 1e-12))
        return np.round((a - lo) * (255 / (hi - lo))).astype(np.uint8)
    a = a.astype(np.int64).clip(0)
    return (a >> (max(16, int(a.max()).bit_length()) - 8)).astype(np.uint8)

def pil_mode(meta: dict) -> str:
    return "L" if meta["channels"] == 1 else "RGB"

class Decoded:
    """Rows of a split as (uint8 image, label); the decoding runs in loader workers."""

    def __init__(self, split, image_col: str, label_col: str, mode: str, size: tuple[int, int],
                 cover: float = 1.0):
        self.split, self.image_col, self.label_col = split, image_col, label_col
        self.mode, self.size, self.cover = mode, size, cover

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        row = self.split[i]
        image = decode(row[self.image_col], self.mode, self.size, f"row {i}", self.cover)
        return image, row[self.label_col]

class InMemory:
    """Memory mode: a decoded split on the device; `__getitems__` takes a batch in one op."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]):
        index = torch.tensor(indices, device=self.labels.device)
        return self.images[index], self.labels[index]

def as_is(batch):  # collate_fn for InMemory and OnDisk: their batches come whole
    return batch

def stored(meta: dict, train: bool) -> tuple[tuple[int, int], float]:
    """The size images are decoded to and decode()'s `cover`. Photo recipe: training images at
    size / crop_fraction for the random resized crops; evaluation ones the centre crop of that."""
    h, w = meta["image_size"]
    if meta.get("recipe") != "photo":
        return (h, w), 1.0
    fraction = meta["crop_fraction"]
    return ((round(h / fraction), round(w / fraction)), 1.0) if train else ((h, w), fraction)

def decoded_gb(split, meta: dict, train: bool) -> float:
    (h, w), _ = stored(meta, train)
    return len(split) * meta["channels"] * h * w / 1e9

def worker_count(cfg: Config) -> int:
    if cfg.num_workers >= 0:
        return min(cfg.num_workers, cpu_count())
    return max(0, min(8, cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))

def make_loader(run: Run, source: Source, meta: dict, mode: str, batch_size: int,
                sampler: EpochSampler | None):
    """A prepared loader of (uint8 images, labels) on the device; no `sampler`: evaluation."""
    acc, workers, train = run.accelerator, worker_count(run.cfg), sampler is not None
    dataset = (SkipBad if train and run.cfg.skip_bad_examples else Decoded)(
        source.split, source.image_col, source.label_col, pil_mode(meta), *stored(meta, train))
    opts = dict(num_workers=workers, persistent_workers=workers > 0,
                pin_memory=acc.device.type == "cuda", worker_init_fn=init_worker)
    if mode == "cache":
        dataset = cached(cache_root(run.cfg), source, meta, train)
        opts["collate_fn"] = as_is
    elif mode == "memory":
        # Decoded once through the same per-sample path; workers only pay off when large.
        images, labels = zip(*torch.utils.data.DataLoader(
            dataset, batch_size=512, num_workers=workers if len(dataset) > 5000 else 0,
            worker_init_fn=init_worker))
        dataset = InMemory(torch.cat(images).to(acc.device), torch.cat(labels).to(acc.device))
        opts = dict(collate_fn=as_is)
    # Loader iterators draw their base seed from `generator`; a private one keeps the global
    # RNG (dropout) independent of how many loaders were started, so resumes stay bit-exact.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         drop_last=train, **opts,
                                         generator=torch.Generator().manual_seed(run.cfg.seed))
    if isinstance(sampler, StreamSampler):  # --streaming: each process reads its own part
        return Streamed(loader, acc.device)
    return acc.prepare(loader)

def pick_mode(run: Run, splits: list[tuple], meta: dict, image_col: str, label_col: str) -> str:
    """--data_mode auto: memory if the decoded `splits` ((split, train, part_of)) fit the budget,
    else the cache if it is built or fits on the disk, else stream."""
    cfg = run.cfg
    if cfg.data_mode != "auto":
        return cfg.data_mode
    gb = sum(decoded_gb(split, meta, train) for split, train, _ in splits)
    mode, why = "memory", f"{gb:.3f} GB decoded, --memory_budget_gb {cfg.memory_budget_gb}"
    if gb > cfg.memory_budget_gb:
        root = cache_root(cfg)
        folders = {cache_folder(root, part[0] if part else split, image_col, label_col, meta,
                                train): decoded_gb(part[0] if part else split, meta, train)
                   for split, train, part in splits}  # both splits may share one
        need = 1e9 * sum(gb for f, gb in folders.items() if not (f / "cache.json").exists())
        there = next(p for p in [root, *root.parents] if p.exists())
        free = shutil.disk_usage(there).free if os.access(there, os.W_OK) else 0  # read-only
        mode = "cache" if with_slack(need) <= free else "stream"
        why += (f"; cache {root}: {size_text(need)} to build, {size_text(free)} free"
                + ("" if free else " (read-only)") if need else f"; cache {root}: built")
    print0(run.accelerator, f"data: {mode} mode ({why})")
    return mode

@dataclass
class Data:
    train: object | None        # prepared loaders; both yield (uint8 images, labels) on the device
    val: object
    sampler: EpochSampler       # the training order (its epoch is set directly: see train())
    meta: dict                  # what rebuilds the preprocessing: stored with the weights
    counts: tuple[int, int]     # training and validation images
    val_split: object = None    # the validation split (datasets), for top_losses.csv

def build_data(run: Run) -> Data:
    """The run's splits, loaders and resolved settings (run.cfg: the automatic ones resolved)."""
    cfg, acc = run.asked, run.accelerator
    with acc.main_process_first():  # Hub / imagefolder caches are written once
        s = stream_splits(cfg, run.hub) if cfg.streaming else load_splits(cfg, run.hub)
    sizes, colour = probe_images(s.source_train, s.image_col,  # the same for every --seed
                                 cfg.skip_bad_examples)
    resolved, meta, note = preprocessing(cfg, s, sizes, colour)
    batch, batch_note = batch_size(cfg, len(s.train), acc.num_processes, "lr" in run.given)
    counts = (f"data: {len(s.train)} training and {len(s.val)} validation images, "
              f"{len(s.class_names)} classes ({listing(s.class_names)})"
              + (f"; validation held out (--val_fraction {cfg.val_fraction})" if s.rows else ""))
    for line in filter(None, [*s.notes, counts, note, batch_note]):
        print0(acc, line)
    parts = part_of(s, meta, True), part_of(s, meta, False)
    mode = "stream" if cfg.streaming else pick_mode(
        run, [(s.train, True, parts[0]), (s.val, False, parts[1])], meta, s.image_col, s.label_col)
    if cfg.num_workers > (workers := worker_count(cfg)):
        print0(acc, f"note: --num_workers {cfg.num_workers} capped at {workers} (CPU cores)")
    run.cfg = dataclasses.replace(  # the one resolved configuration
        cfg, **resolved, batch_size=batch, data_mode=mode, num_workers=workers,
        image_column=s.image_col, label_column=s.label_col, output_dir=str(run.dir),
        threads=torch.get_num_threads(), mixed_precision=acc.mixed_precision,
        cache_dir=str(cache_root(cfg)) if mode == "cache" else cfg.cache_dir)
    sampler = StreamSampler(s.train, batch, acc.process_index, acc.num_processes, cfg) \
        if cfg.streaming else EpochSampler(len(s.train), cfg.seed)
    train = make_loader(run, Source(s.train, s.image_col, s.label_col, parts[0]), meta, mode,
                        batch, sampler)
    val = make_loader(run, Source(s.val, s.image_col, s.label_col, parts[1]), meta, mode, batch,
                      None)
    meta["data"] = {k: getattr(run.cfg, k) for k in (
        "dataset_config", "revision", "image_column", "label_column", "val_fraction", "seed")}
    meta["data"]["dataset"] = local_path(cfg.dataset)  # found again from any directory
    return Data(train, val, sampler, meta, (len(s.train), len(s.val)), s.val)

def preprocessing(cfg: Config, s: Splits, sizes: list, colour: int) -> tuple[dict, dict, str]:
    """The resolved settings, the weights' metadata (meta) and a line; --pretrained: the weights'
    own normalization, size and crop fraction, unless given."""
    stats, fraction, size = None, cfg.crop_fraction, cfg.image_size
    if cfg.pretrained:
        preset = pretrained_weights(cfg).transforms()
        stats = {"mean": list(preset.mean), "std": list(preset.std)}
        size = size or preset.crop_size[0]
        if fraction == Config.crop_fraction:
            fraction = preset.crop_size[0] / preset.resize_size[0]
    props, note = image_properties(dataclasses.replace(cfg, image_size=size), cfg.model, sizes,
                                   colour, "" if cfg.image_size or not cfg.pretrained else
                                   f"the size of {pretrained_weights(cfg)}")
    side, c = min(props["image_size"]), props["channels"]
    padding = cfg.crop_padding if cfg.crop_padding >= 0 else side // 8
    if padding > side:  # a padded batch of 3,000 px took 3.5 GB
        raise Exit(f"--crop_padding {cfg.crop_padding} is more than the image side ({side} px): "
                   f"use at most {side}, or -1 (auto)")
    recipe = cfg.recipe if cfg.recipe != "auto" else "photo" if side >= 64 else "small"
    resolved = {"image_size": max(props["image_size"]), "channels": c, "hflip": props["hflip"],
                "crop_padding": padding, "crop_fraction": fraction, "recipe": recipe}
    meta = {**props, **(stats or {"mean": [0.5] * c, "std": [0.5] * c}),
            "class_names": s.class_names, "num_classes": len(s.class_names), "model": cfg.model,
            "crop_padding": padding, "recipe": recipe, "crop_scale": cfg.crop_scale,
            "crop_ratio": cfg.crop_ratio, "crop_fraction": fraction,
            **({"transform_input": True} if stats and cfg.model in ("googlenet", "inception_v3")
               else {})}
    return resolved, meta, note

def batch_size(cfg: Config, train_count: int, processes: int, lr_given: bool = False
               ) -> tuple[int, str]:
    """Auto: a global batch of 64 (the default --lr's) over the processes, at least 8 each, halved
    down to 8 until an epoch has MIN_STEPS_PER_EPOCH steps (2 leave BatchNorm's averages behind)."""
    per_process, accum = train_count // processes, cfg.gradient_accumulation_steps
    if per_process == 0:
        raise Exit(f"{train_count} training images cannot be shared by {processes} processes; "
                   "use fewer processes")
    if cfg.batch_size:
        if per_process < cfg.batch_size:
            raise Exit(f"{train_count} training images make no full batch of --batch_size "
                       f"{cfg.batch_size} on each of {processes} processes; lower --batch_size "
                       "(or leave it out: automatic)")
        effective = cfg.batch_size * processes * accum
        return cfg.batch_size, "" if effective <= 64 or lr_given else (
            f"note: effective batch {effective} ({cfg.batch_size} x {processes} process(es) x "
            f"{accum} accumulation), {effective / 64:g}x the 64 that the default --lr {cfg.lr:g}"
            f" is set for; --lr {cfg.lr * effective / 64:g} would scale it linearly")
    batch = max(8, 64 // processes)
    while batch > 8 and per_process // batch // accum < MIN_STEPS_PER_EPOCH:
        batch //= 2
    if per_process < batch:  # per_process >= 1 (see above)
        return per_process, (f"note: only {per_process} training images per process, fewer "
                             f"than a batch: batch size {per_process} per process (auto)")
    split = f", a global batch of {batch * processes}" if processes > 1 else ""
    return batch, "" if batch == 64 else (
        f"note: batch size {batch} per process (auto{split}): {per_process} training images per "
        f"process make {-(-(per_process // batch) // accum)} steps per epoch; --batch_size sets "
        "it per process")

def load_eval_split(run: Run, meta: dict):
    """--eval_only: the split, its columns, what it is, and part_of. The weights' own data: their
    validation split (held out again with their seed); else --split, a validation split or all."""
    cfg, given, own = run.asked, run.given, meta["data"]
    if "dataset" not in given or local_path(cfg.dataset) == local_path(own["dataset"]):
        cfg = dataclasses.replace(cfg, **{k: v for k, v in own.items() if k not in given})
        if "split" not in given:
            s = load_splits(cfg, run.hub)
            return (s.val, s.image_col, s.label_col, "the validation split of the training data",
                    part_of(s, meta, False))
    source, _ = load_source(cfg, run.hub)
    split, what = source, "all of it"
    if isinstance(source, datasets.DatasetDict):
        name = cfg.split or next((n for n in VAL_SPLITS if n in source),
                                 "train" if "train" in source else next(iter(source)))
        if name not in source:
            raise Exit(f"--split {name}: no such split in {cfg.dataset}; its splits are "
                       f"{listing(source)}")
        split, what = source[name], f"split '{name}'"
    elif cfg.split:
        raise Exit(f"--split {cfg.split}: {cfg.dataset} has no splits; leave --split out to "
                   "evaluate all of it")
    if len(split) == 0:
        raise Exit(f"{what} of {cfg.dataset} is empty")
    image_col, label_col, _ = find_columns(split, cfg.image_column, cfg.label_column)
    check_labels(labels_of(split, label_col), f"{cfg.dataset} ({what})")
    split = align_classes(split, label_col, meta["class_names"], "the model's classes")
    return (split.cast_column(image_col, datasets.Image(decode=False)), image_col, label_col,
            f"{what} of {cfg.dataset}", None)


# ----------------------------------------------------------------------------- run directory

@dataclass
class LoopState:
    """All mutable training state besides Accelerate's; stored as JSON in every checkpoint."""
    epoch: int = 0              # epochs finished (the current one, 0-based)
    batch: int = 0              # micro-batches of this epoch already trained, per process
    step: int = 0               # optimizer steps so far
    evaluated: int = 0          # epochs whose evaluation is done (it follows their checkpoint)
    best_val_acc: float = -1.0
    best_epoch: int = 0         # the epoch whose weights model_best.safetensors holds
    skipped_steps: int = 0      # steps dropped by --nan_policy skip
    skipped_examples: int = 0   # streamed examples replaced (--skip_bad_examples)
    train_time_s: float = 0.0   # summed over resumes
    epoch_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss*n, correct, n
    last_metrics: dict = field(default_factory=dict)  # the last finished epoch's metrics

def loop_state(saved, where: Path) -> LoopState:
    """The loop state of a checkpoint, each field of the type it is written with, and the
    metrics that resuming at that point reports."""
    def wrong(what: str) -> Exit:
        return Exit(f"{where / 'loop_state.json'}: {what}: damaged or edited; --resume another "
                    "checkpoint")
    try:
        state = LoopState(**saved)
    except TypeError as e:
        raise wrong(first_line(e)) from None
    for f in fields(LoopState):
        value, kind = getattr(state, f.name), type(getattr(LoopState(), f.name))
        if not (type(value) is kind or kind is float and type(value) is int):
            raise wrong(f"{f.name} is {value!r}, not {kind.__name__}")
    need = ["train_loss", "train_acc", "epoch_time_s", "images_per_s"] if state.epoch else []
    need += ["val_loss", "val_acc"] if state.evaluated and state.evaluated == state.epoch else []
    values = [*state.epoch_sums, *(state.last_metrics.get(k) for k in need)]
    if len(state.epoch_sums) != 3 or not all(type(v) in (int, float) for v in values):
        raise wrong("epoch_sums or last_metrics incomplete")
    return state

def check_loop_state(state: LoopState, batches: int, accum: int, where: Path) -> None:
    """A checkpoint's loop state must be one this run can reach: a batch index past the epoch
    would make the resumed loop skip forever."""
    per_epoch = -(-batches // accum)
    if not (state.epoch >= 0 and 0 <= state.batch < batches and 0 <= state.evaluated
            <= state.epoch and state.step == state.epoch * per_epoch + -(-state.batch // accum)):
        raise Exit(f"{where / 'loop_state.json'} does not fit this run (epoch {state.epoch}, "
                   f"batch {state.batch} of {batches}, step {state.step}): damaged or edited; "
                   "--resume another checkpoint")

def write_json(path: Path, obj) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def open_regular(path: Path, follow: bool = True):
    """A regular file opened for reading, or ValueError: never a device, a FIFO (opening one
    would wait for a writer) or, with follow=False, a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file")
    return open(fd, "rb")

def file_digest(path: Path, follow: bool = True) -> str:
    """sha256 of a regular file, read up to the size it had when opened."""
    digest = hashlib.sha256()
    with open_regular(path, follow) as f:
        left = os.fstat(f.fileno()).st_size
        while left > 0 and (chunk := f.read(min(1 << 20, left))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()

def read_json(path: Path, limit: int = 1 << 24):
    """JSON of a regular file up to `limit` bytes, or ValueError (a forged one may be anything)."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise ValueError(f"{path} is larger than {size_text(limit)}")
        return json.loads(f.read(limit))

def checkpoint_ok(path: Path) -> tuple[bool, str]:
    """Complete: loop_state.json (written last) gives every file's size and sha256, and plain
    files of the directory itself match them; its loop state and random states load."""
    try:
        saved = read_json(path / "loop_state.json")
        for name, (size, digest) in saved["files"].items():  # JSON keys are strings
            if name != Path(name).name or name in ("", "..") or not isinstance(size, int):
                return False, f"loop_state.json names {name!r}, not a file of the checkpoint"
            if (path / name).lstat().st_size != size or \
                    file_digest(path / name, follow=False) != digest:
                return False, f"{name} does not match its recorded size and sha256"
        if not isinstance(saved["identity"], dict):
            return False, "loop_state.json holds no run identity"
        loop_state(saved["loop"], path)
        for name in (n for n in saved["files"] if n.startswith("random_states_")):
            check_random_states(path / name)
        return True, ""
    except Exit as e:
        return False, str(e)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return False, f"{type(e).__name__}: {e}"

def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories, newest first (half-written ones live under .tmp_ names)."""
    root = run_dir / "checkpoints"
    found = root.glob("step_*") if root.is_dir() else []
    return sorted((p for p in found if p.name[5:].isdigit()), key=lambda p: p.name, reverse=True)

def save_checkpoint(run: Run) -> Path:
    """Crash-safe: every process writes into a temporary directory, the main process records
    the manifest last, renames the directory into place, and only then prunes old ones."""
    acc, state, root = run.accelerator, run.state, run.dir / "checkpoints"
    if isinstance(run.data.train, Streamed):  # the examples replaced in the batches trained
        count = acc.reduce(torch.tensor([run.data.train.skipped], device=acc.device))
        state.skipped_examples, run.data.train.skipped = state.skipped_examples + int(count), 0
    final, tmp = root / f"step_{state.step:08d}", root / f".tmp_step_{state.step:08d}"
    if final.exists() and checkpoint_ok(final)[0]:
        return final  # e.g. stopped again right after resuming from it
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))  # model, optimizer, scaler, RNG of every process
    except Exception as e:  # torch.save reports a full disk as "file write failed"
        if shutil.disk_usage(root).free > 4 * sum(p.stat().st_size for p in tmp.iterdir()) + 2**20:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp)) from e
    acc.wait_for_everyone()
    if acc.is_main_process:
        if run.ema is not None:  # safetensors, not Accelerate's pickled custom state
            save_tensors(run.ema.state_dict(), tmp / "ema.safetensors")
        for p in tmp.iterdir():
            follow_umask(p)
        files = {p.name: [p.stat().st_size, file_digest(p)] for p in sorted(tmp.iterdir())}
        write_json(tmp / "loop_state.json", {"loop": asdict(state), "identity": run.identity,
                                             "files": files})
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of the same step
        os.replace(tmp, final)
        dir_fd = os.open(root, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
        keep = run.cfg.keep_checkpoints  # 0: all
        for old in [*(checkpoints(run.dir)[keep:] if keep else []), *root.glob(".tmp_step_*")]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final

def pick_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """--resume auto: the newest checkpoint that verifies; none: None; else the given path."""
    if cfg.resume == "none":
        return None
    for path in checkpoints(run_dir) if cfg.resume == "auto" else [Path(cfg.resume)]:
        ok, why = checkpoint_ok(path)
        if ok:
            return path
        if cfg.resume != "auto":
            raise Exit(f"--resume {cfg.resume} is not a complete checkpoint ({why}); use "
                       "--resume auto to take the newest complete one")
        print(f"warning: skipping damaged checkpoint {path} ({why})", flush=True)
    return None

HELD_LOCKS = weakref.WeakSet()  # the open lock files (take_lock), which workers close

def take_lock(path: Path, wait: bool):
    """flock on `path`, created, never through a link: held until closed or the process ends
    (kill -9 too); None, with a warning, where the file system has none (Lustre without flock)."""
    linked = f"{path} is not a plain file of its own (a link?); remove it"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Exit(linked) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)  # the run lock's file is rewritten: never another file through a link
        raise Exit(linked)
    lock = open(fd, "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise BlockingIOError(str(lock.read(200).strip() or "starting")) from None
        risk = ("processes may decode the same split at the same time" if wait else
                "two runs in this directory are not prevented")
        print(f"warning: cannot lock {path} ({e.strerror}): {risk}", flush=True)
        lock.close()
        return None
    HELD_LOCKS.add(lock)
    return lock

def lock_run_dir(run_dir: Path):
    """An exclusive lock on run_dir/.lock, holding who has it: never stale (see take_lock)."""
    try:
        lock = take_lock(run_dir / ".lock", wait=False)
    except BlockingIOError as holder:
        raise Exit(f"{run_dir} is in use by another run ({holder}); wait for it to end or use "
                   "another --output_dir") from None
    if lock is not None:
        lock.truncate()  # from 0: the file was only opened
        lock.write(f"host {socket.gethostname()}, pid {os.getpid()}, since "
                   f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
        lock.flush()
    return lock

RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "model.safetensors",
             "model_best.safetensors", "model_ema.safetensors", "curves.png", "confusion.png",
             "top_losses.csv", "checkpoints", "tensorboard")

def prepare_run_dir(run: Run) -> tuple[Path | None, object]:
    """Lock the directory and decide, alike on every process: a new run, a resume, or another
    run's directory (refused). Returns the checkpoint to resume, if any, and the lock."""
    cfg, run_dir, acc = run.cfg, run.dir, run.accelerator
    identity = run.identity = run_identity(run)
    answer, lock = [""], None
    if acc.is_main_process:
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = lock_run_dir(run_dir)
            answer = [str(pick_checkpoint(cfg, run_dir) or "") if not cfg.overwrite else ""]
        except OSError as e:  # a full disk is exit 1, like a full disk later on
            answer = [e if e.errno in (errno.ENOSPC, errno.EDQUOT) else
                      Exit(f"cannot write to --output_dir {run_dir}: {e}")]
        except Exit as e:  # in use, or a damaged --resume PATH
            answer = [e]
        if isinstance(answer[0], Exception) and created and (
                lock is not None or isinstance(answer[0], OSError)):  # not: in use by another
            shutil.rmtree(run_dir, ignore_errors=True)  # refused: leave no empty directory
    accelerate.utils.broadcast_object_list(answer)  # the main process hashes; all follow
    if isinstance(answer[0], Exception):
        raise answer[0]
    if not answer[0]:
        clear_run_dir(run)
        return None, lock
    resume = Path(answer[0])
    run.saved = read_json(resume / "loop_state.json")  # verified by the main process
    saved = run.saved["identity"]
    diff = [k for k in identity if k in saved and not same(k, saved[k], identity[k])]
    if diff:
        raise Exit(f"checkpoint {resume} belongs to a different run: " + "; ".join(
            f"{k} was {saved[k]!r}, now {identity[k]!r}" for k in diff)
            + ". Use the same settings, another --output_dir, or --resume none --overwrite")
    if (run_dir / "results.json").exists() and cfg.resume == "auto":
        already_holds(run_dir, "a finished run (results.json)")
    return resume, lock

def clear_run_dir(run: Run) -> None:
    """A new run: another run's files are refused, unless --overwrite (then removed)."""
    run_dir = run.dir
    try:
        old = dict(read_json(run_dir / "config.json").get("identity", {}))
    except (OSError, ValueError, TypeError, AttributeError):
        old = {}  # none or unreadable: not this run's
    other = [f for f in RUN_FILES if (run_dir / f).exists()]
    same_run = old and all(same(k, old.get(k, v), v) for k, v in run.identity.items())
    finished = "results.json" in other or "model.safetensors" in other
    if other and not run.cfg.overwrite and (finished or not same_run or checkpoints(run_dir)):
        already_holds(run_dir, f"another run ({', '.join(other)})")
    run.accelerator.wait_for_everyone()  # everyone has looked before anything is removed
    if run.accelerator.is_main_process:
        for target in (run_dir / f for f in other):
            shutil.rmtree(target) if target.is_dir() else target.unlink()

def already_holds(run_dir: Path, what: str) -> None:
    raise Exit(f"{run_dir} already holds {what}; use another --output_dir, or --overwrite to "
               "replace it")

def refuse_to_replace(path: Path, cfg: Config) -> None:
    if path.exists() and not cfg.overwrite:
        already_holds(path.parent, path.name)

def run_identity(run: Run) -> dict:
    """What a checkpoint must match to be resumed by this run (a view of run.cfg)."""
    cfg, meta = run.cfg, run.data.meta
    return {"dataset": cfg.dataset, "dataset_config": cfg.dataset_config,
            "revision": cfg.revision, "model": cfg.model, "seed": cfg.seed,
            "start": cfg.pretrained or cfg.init_from, "image_size": meta["image_size"],
            "channels": meta["channels"], "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "num_processes": run.accelerator.num_processes, "num_classes": meta["num_classes"],
            "train_count": run.data.counts[0], "optimizer": cfg.optimizer,
            "freeze_backbone": cfg.freeze_backbone,  # the optimizer's state and its groups
            "streaming": cfg.streaming and cfg.shuffle_window}  # the order of a streamed epoch

def same(key: str, before, now) -> bool:
    """An identity's value as before: older identities have fewer keys; a folder, any spelling."""
    return before == now or key == "dataset" and isinstance(before, str) and local_path(
        before) == local_path(now)

def resolve_run_dir(cfg: Config, suffix: str) -> tuple[Path, bool]:
    """--output_dir, or a new runs/<date>-<time>-<suffix>[-N] made here (mkdir is atomic, so
    two runs started in the same second get two directories). Returns (path, made here)."""
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser(), False
    name = [None]
    if accelerate.PartialState().is_main_process:
        base = f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}-{suffix}"
        for path in (f"{base}-{n}" if n > 1 else base for n in range(1, 10_000)):
            with contextlib.suppress(FileExistsError):
                Path(path).mkdir(parents=True)
                name = [path]
                break
    accelerate.utils.broadcast_object_list(name)  # every process uses the main process's name
    return Path(name[0]), True

class MetricsLog:
    """metrics.jsonl (main process) plus the Accelerate trackers; one event per line."""

    def __init__(self, accelerator, run_dir: Path, resumed: LoopState | None):
        self.accelerator, self.path = accelerator, run_dir / "metrics.jsonl"
        if accelerator.is_main_process and resumed is not None and self.path.exists():
            # Keep what happened up to the checkpoint; drop the rest (and any torn last line),
            # and an evaluation that the resumed run will repeat (a new run's: clear_run_dir).
            step, redo, kept = resumed.step, resumed.evaluated < resumed.epoch, []
            for line in self.path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event["step"] < step or event["step"] == step and not (
                        event["event"] == "eval" and redo):
                    kept.append(line + "\n")
            tmp = self.path.with_name("metrics.jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)

    def __call__(self, event: str, step: int, epoch: int, **values) -> None:
        """`epoch`: 1-based, the epoch in progress (train) or just finished (eval)."""
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "step": step, "epoch": epoch, **values})
                        + "\n")
        scalars = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=step)

def save_tensors(state: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                                    str(tmp), metadata=metadata)
    except Exception as e:  # SafetensorError: "I/O error: No space left on device (os error 28)"
        if found := re.search(r"os error (\d+)", str(e)):
            raise OSError(int(found[1]), os.strerror(int(found[1])), str(tmp)) from e
        raise
    follow_umask(tmp)
    os.replace(tmp, path)

def save_weights(model, path: Path, meta: dict) -> None:
    # One metadata key holding sorted JSON: safetensors orders several keys differently per run.
    save_tensors(model.state_dict(), path, {"train_py": json.dumps(meta, sort_keys=True)})

def check_meta(meta) -> dict:
    """The weights' metadata drives allocations (image size, class count): check it first."""
    try:
        size, c, k = meta["image_size"], meta["channels"], meta["num_classes"]
        if (isinstance(meta["model"], str) and c in (1, 3) and len(size) == 2
                and all(isinstance(v, int) and 1 <= v <= MAX_IMAGE_SIZE for v in size)
                and isinstance(k, int) and 1 <= k <= 1_000_000
                and len(meta["class_names"]) == k and len(meta["mean"]) == len(meta["std"]) == c
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in meta["mean"])
                and all(isinstance(v, (int, float)) and v > 0 for v in meta["std"])
                and isinstance(meta["crop_padding"], int) and isinstance(meta["hflip"], bool)
                and isinstance(meta["data"]["dataset"], str)):
            return meta
    except (KeyError, TypeError, ValueError):
        pass
    raise ValueError("its train_py metadata is incomplete or out of range")

def read_weights(path: str, flag: str = "--weights") -> tuple[dict, dict]:
    p = Path(path)
    p = p / "model.safetensors" if p.is_dir() else p
    try:
        with safetensors.safe_open(str(p), "pt") as f:
            meta = check_meta(json.loads(f.metadata()["train_py"]))
        return safetensors.torch.load_file(str(p)), meta
    except Exception as e:  # not a file, not safetensors (SafetensorError), no/odd metadata
        raise Exit(f"{flag} {path}: not a model.safetensors written by train.py "
                   f"({first_line(e)})") from None

def trained_model(cfg: Config) -> tuple[object, dict]:
    """--weights as a model on the CPU, and its metadata: the tensors must fit the model it
    describes, checked first on one built without memory."""
    weights, meta = read_weights(cfg.weights)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(meta, probe=False)
                    .state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if wrong:
        raise Exit(f"--weights {cfg.weights}: the tensors do not fit a {meta['model']} with "
                   f"{meta['num_classes']} classes ({listing(wrong, 4)})")
    model = build_model(meta)
    model.load_state_dict(weights)
    return model, meta

def write_config(run: Run, resume: Path | None) -> None:
    acc, cfg, data = run.accelerator, run.cfg, run.data
    hosts = accelerate.utils.gather_object([os.uname().nodename])
    effective = cfg.batch_size * acc.num_processes * cfg.gradient_accumulation_steps
    if acc.is_main_process:
        write_json(run.dir / "config.json", {
            "config": asdict(run.asked), "resolved": {
                **asdict(cfg), "image_size": data.meta["image_size"],
                "train_count": data.counts[0], "val_count": data.counts[1]},
            "identity": run.identity, "versions": {"python": sys.version.split()[0], **{
                m.__name__: m.__version__ for m in (torch, torchvision, accelerate, datasets)}},
            "num_processes": acc.num_processes, "hostnames": hosts, "device": str(acc.device),
            "mixed_precision": acc.mixed_precision, "data_mode": cfg.data_mode,
            "effective_batch_size": effective, "torch_threads": torch.get_num_threads(),
            "resumed_from": str(resume) if resume else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")})
    h, w = data.meta["image_size"]
    print0(acc, f"{acc.num_processes} process(es) on {acc.device.type}, mixed precision "
                f"{acc.mixed_precision}; effective batch {effective} = {cfg.batch_size} x "
                f"{acc.num_processes} process(es) x {cfg.gradient_accumulation_steps} "
                f"accumulation; {data.counts[0]} train / {data.counts[1]} val images, "
                f"{data.meta['num_classes']} classes, {data.meta['channels']}x{h}x{w}; run "
                f"directory {run.dir}")

def note_changes(run: Run) -> None:
    """On a resume: the flags that differ from those the run began with."""
    if not (run.dir / "config.json").exists():
        return
    try:
        before = read_json(run.dir / "config.json")["config"]
        changed = [f"--{k} {before.get(k)} -> {v}" for k, v in asdict(run.asked).items()
                   if before.get(k) != v and k not in ("resume", "overwrite", "output_dir")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        print0(run.accelerator, f"note: {run.dir / 'config.json'} is unreadable or edited: the "
                                "settings the run began with are not compared (it is rewritten)")
        return
    if changed:
        print0(run.accelerator, "note: changed since the run began: " + ", ".join(changed))

def tracker_config(cfg: Config) -> dict:
    """Trackers take flat scalars and strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in asdict(cfg).items()}


# ----------------------------------------------------------------------------- flags, signals

CHECKS = [(name, ok, requirement) for names, ok, requirement in [  # in the order checked
    ("epochs gradient_accumulation_steps", lambda v: v >= 1, "at least 1"),
    ("lr memory_budget_gb head_lr_scale max_image_pixels", lambda v: v > 0, "> 0"),
    ("weight_decay max_grad_norm warmup_steps precise_bn mixup cutmix log_every checkpoint_every "
     "keep_checkpoints threads", lambda v: v >= 0, ">= 0"),
    ("momentum label_smoothing ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("batch_size", lambda v: v >= 0, ">= 0 (0 = auto)"),
    ("val_fraction", lambda v: 0 < v < 1, "between 0 and 1"),
    ("image_size", lambda v: 0 <= v <= MAX_IMAGE_SIZE, f"between 0 (auto) and {MAX_IMAGE_SIZE}"),
    ("num_workers", lambda v: v >= -1, ">= -1"),
    ("shuffle_window", lambda v: v >= 1, "at least 1"),
    ("crop_scale", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("crop_ratio", lambda v: 1 <= v <= 10, "in [1, 10]"),
    ("crop_fraction", lambda v: 0.2 <= v <= 1, "in [0.2, 1]"),
    ("crop_padding", lambda v: -1 <= v <= MAX_IMAGE_SIZE, ">= 0 or -1 (auto), and at most the "
     "image side"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32) (numpy's seed range)"),
    ("output_dir cache_dir", lambda v: v is None or v.strip() != "", "a directory, not empty"),
] for name in names.split()]
GROUPS = {"dataset": "data", "model": "model", "epochs": "optimization",  # first field: title
          "output_dir": "outputs and logging", "checkpoint_every": "checkpoints and preemption",
          "seed": "system", "eval_only": "evaluation only"}
RULES = [  # (broken, message): flags that cannot go together, in the order they are checked
    *[(lambda c, given, flag=flag: getattr(c, flag) and not c.weights, f"--{flag} needs "
       "--weights RUN_DIR_OR_MODEL_SAFETENSORS") for flag in ("eval_only", "predict")],
    *[(lambda c, given, flag=flag: flag in given and not (
        c.eval_only or (c.predict and flag == "weights")), f"--{flag} goes with --eval_only "
       "(evaluate saved weights) or --predict; drop it to train") for flag in ("weights", "split")],
    (lambda c, given: c.resume not in ("auto", "none") and c.overwrite,
     "--resume {c.resume} continues that checkpoint, --overwrite would delete it: drop "
     "--overwrite"),
    (lambda c, given: c.pretrained and c.init_from,
     "--pretrained and --init_from both give starting weights: pick one"),
    (lambda c, given: c.pretrained and c.model == "cnn", "--pretrained takes torchvision's "
     "weights: name a torchvision --model (resnet18, ...); for a cnn run use --init_from RUN_DIR"),
    (lambda c, given: c.freeze_backbone and not (c.pretrained or c.init_from),
     "--freeze_backbone would train a head on random features: add --pretrained or --init_from"),
    (lambda c, given: c.streaming and (c.eval_only or c.predict), "--streaming is for "
     "training; --eval_only reads a folder, a save_to_disk directory or a Hub id without it"),
    (lambda c, given: c.streaming and c.data_mode in ("memory", "cache"), "--streaming reads "
     "the shards as it trains: drop --data_mode {c.data_mode}"),
    *[(lambda c, given, flag=flag: flag in given and not c.streaming, f"--{flag} goes with "
       "--streaming") for flag in ("shuffle_window", "classes", "skip_bad_examples")],
    (lambda c, given: c.channels == 1 and c.model != "cnn",
     "--channels 1: torchvision models (--model {c.model}) take RGB input"),
]

class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints its 31-line usage first
        raise Exit(f"{message} (--help lists the flags)")

def parse_config(argv: list[str] | None = None) -> tuple[Config, set[str]]:
    """Flags are generated from Config; returns the config and the names given explicitly.
    Everything here is checked before any file is written or any library imported."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           argument_default=argparse.SUPPRESS,
                           allow_abbrev=False)  # slurm/lib.sh reads --output_dir
    group = parser
    for f in fields(Config):
        group = parser.add_argument_group(GROUPS[f.name]) if f.name in GROUPS else group
        text = f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})")
        how = ({"action": argparse.BooleanOptionalAction} if f.type == "bool" else
               {"nargs": "?", "const": "DEFAULT"} if f.name == "pretrained" else  # alone: DEFAULT
               {"type": {"int": int, "float": float}.get(f.type, str),
                "choices": f.metadata["choices"]})
        group.add_argument(f"--{f.name}", help=text, **how)
    given = vars(parser.parse_args(argv))
    cfg = Config(**given)
    for f in fields(Config):
        if f.type == "float" and not math.isfinite(getattr(cfg, f.name)):
            raise Exit(f"--{f.name} must be a finite number (got {getattr(cfg, f.name)})")
    for name, ok, requirement in CHECKS:
        if not ok(getattr(cfg, name)):
            raise Exit(f"--{name} must be {requirement} (got {getattr(cfg, name)!r})")
    signal_numbers(cfg.stop_signals)
    for broken, message in RULES:
        if broken(cfg, given):
            raise Exit(message.format(c=cfg))
    return cfg, set(given)

def signal_numbers(names: str) -> list[int]:
    numbers = []
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        signum = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
        if not isinstance(signum, signal.Signals):
            raise Exit(f"--stop_signals: unknown signal {name}")
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            raise Exit(f"--stop_signals: {signum.name} cannot be caught; use USR1, TERM or INT")
        numbers.append(signum)
    return numbers

class StopFlag:
    """Handlers set this; the processes agree on it at the next step. Until training() (nothing to
    save) they raise KeyboardInterrupt, which no `except Exception` swallows: exit 75."""

    def __init__(self, names: str = ""):
        self.signal: str | None = None
        self.caught, self.immediate = [], True
        self.catch(names)

    def catch(self, names: str) -> None:
        wanted = signal_numbers(names)
        for signum in set(self.caught) - set(wanted):
            signal.signal(signum, signal.SIG_DFL)
        for signum in wanted:
            signal.signal(signum, self.handle)
        self.caught = wanted
        for signum in EARLY_SIGNALS:  # before main() started: in the default set, or not at all
            if signum in wanted:
                self.handle(signum, None)

    def handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        if self.immediate:
            self.immediate = False
            raise KeyboardInterrupt(self.signal)

    def training(self) -> None:
        """From the first step on, a signal only sets the flag (checkpoint, then exit 75)."""
        self.immediate = False

    @contextlib.contextmanager
    def deferred(self):
        """A signal while this block runs takes effect when it ends: a KeyboardInterrupt in the
        middle of numpy's imports left numpy.dtypes half made (a RecursionError, exit 1)."""
        self.immediate = False
        yield
        self.immediate = True
        if self.signal is not None:
            self.handle(signal.Signals[self.signal], None)

def init_worker(worker_id: int) -> None:
    """Loader workers ignore the stop signals (sent to a process group, they crashed the run before
    its checkpoint) and close the run's locks (one held a run directory after a kill -9 of it)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    for lock in list(HELD_LOCKS):
        lock.close()  # this process's descriptor only: flock stays with the others

class Exit(Exception):
    """How a run ends early, with its exit code and its one line (code 2: bad usage or input;
    1: a non-finite loss; 75: stopped, the line already printed by the loop, or none)."""

    def __init__(self, message: str = "", code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code

def exit_code(error: BaseException, stop: StopFlag, run_dir: Path | None, made: bool) -> int:
    """main()'s one handler: the line each expected way of ending prints, and its exit code."""
    if isinstance(error, KeyboardInterrupt) and stop.signal is not None:
        error = Exit(f"stopped by {stop.signal} before training started: nothing to save; exit "
                     f"{EXIT_PREEMPTED}, the same command resumes", EXIT_PREEMPTED)
    elif isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        error = Exit(f"{error.strerror} (writing {error.filename or run_dir}): free some space "
                     "and run the same command" + (f" with --output_dir {run_dir}" if made else "")
                     + " (it resumes from the newest complete checkpoint, if there is one)",
                     EXIT_FAILED)
    elif isinstance(error, MemoryError) or isinstance(error, RuntimeError) and "alloc" in str(
            error):  # torch.OutOfMemoryError is a RuntimeError
        error = Exit(f"out of memory ({first_line(error)}); lower --batch_size or --image_size",
                     EXIT_FAILED)
    elif not isinstance(error, Exit):
        raise error
    message = str(error)
    if "Original Traceback" in message:  # raised in a DataLoader worker
        message = message.strip().splitlines()[-1].split("Exit: ", 1)[-1]
    if error.code != EXIT_PREEMPTED:
        print(f"train.py: error: {message[:2000]}", file=sys.stderr)
    elif message:
        report(f"train.py: {message}")
    return error.code

def report(line: str) -> None:
    """A stop line for the log (stdout) and the error stream: once where they are one file."""
    print(line, flush=True)
    with contextlib.suppress(OSError, ValueError, AttributeError):  # captured streams
        if os.path.samestat(os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())):
            return
    print(line, file=sys.stderr, flush=True)

def print0(accelerator, *values) -> None:
    """Print once per job: accelerator.print prints once per node."""
    if accelerator.is_main_process:
        print(*values, flush=True)

def listing(items, limit: int = 8) -> str:
    """A list for a one-line message: the first few, then how many in all."""
    items = [str(i) for i in items]
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more

def size_text(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"

def first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch's bold error titles
    return f"{type(error).__name__}: {(text.splitlines() or [''])[0][:300]}"

def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ----------------------------------------------------------------------------- libraries

def import_libraries() -> None:
    """These take ~6 s to import: after the flags are checked (--help answers at once) and the
    stop signals caught (one during the imports is not lost). Tests and benchmarks call this."""
    global accelerate, datasets, np, PIL, safetensors, torch, torchvision, nn, F, TF, tqdm
    import accelerate.optimizer
    import accelerate.tracking
    import accelerate.utils
    import datasets
    import numpy as np
    import PIL.Image
    import PIL.ImageOps
    import safetensors.torch
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision
    from torchvision.transforms.v2 import functional as TF
    from tqdm.auto import tqdm
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # they flood log files (Slurm, CI)
    # Accelerate's two-line warning where it sets the threads; make_accelerator settles them
    warnings.filterwarnings("ignore", "OMP_NUM_THREADS/MKL_NUM_THREADS unset")
    short_socket_dir()

def use_cpu(cfg: Config) -> bool:
    """Asked, or no accelerator (MPS, XPU too): without GPUs under torchrun a plain Accelerator()
    has each process train on all the data; cpu=True makes it MULTI_CPU over gloo."""
    cpu = cfg.cpu or not (torch.accelerator.is_available() if hasattr(torch, "accelerator")
                          else torch.cuda.is_available())
    gpus, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", 0))
    if not cpu and torch.cuda.is_available() and local >= gpus:
        raise Exit(f"this process is local rank {local} but the machine has {gpus} GPU(s): "
                   f"launch {gpus} process(es) per machine (accelerate launch --num_processes "
                   f"{gpus}, or plain `accelerate launch train.py`)")
    return cpu

def make_accelerator(cfg: Config, cpu: bool, run_dir: Path):
    available = [str(t) for t in accelerate.tracking.get_available_trackers()]
    if cfg.report_to not in ("none", "all", *available):  # Accelerate would log nowhere
        raise Exit(f"--report_to {cfg.report_to}: the package is not installed (pip install "
                   f"{cfg.report_to})")
    # The shipped launcher config asks for bf16, which on a CPU is slower than fp32 and no
    # better: on the CPU only an explicit --mixed_precision turns it on.
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    mixed = cfg.mixed_precision or ("no" if cpu else None)
    try:
        accelerator = accelerate.Accelerator(
            cpu=cpu, project_dir=str(run_dir), mixed_precision=mixed,
            gradient_accumulation_plugin=accelerate.utils.GradientAccumulationPlugin(
                num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=True),
            dataloader_config=accelerate.utils.DataLoaderConfiguration(non_blocking=True),
            dynamo_plugin=accelerate.utils.TorchDynamoPlugin(backend="inductor")
            if cfg.compile else None,
            log_with=None if cfg.report_to == "none" else cfg.report_to)
    except (ValueError, ImportError) as e:  # e.g. an uninstalled tracker, bf16 unsupported
        raise Exit(str(e).strip().splitlines()[0]) from None
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate accepts this and silently trains in fp32.
        raise Exit("--mixed_precision fp16 needs a GPU; on the CPU use bf16 or no")
    cores, local = cpu_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    on_cpu, asked = accelerator.device.type == "cpu", launcher_processes()
    threads = cfg.threads or (launcher_threads(local) if on_cpu else 0)
    # Where OMP_NUM_THREADS is unset (srun), Accelerate takes the machine's physical cores per
    # local process: more than this process may use when Slurm binds it to a few.
    fair = cores if cores < (os.cpu_count() or 1) else max(1, cores // local)  # bound: its own
    chosen = torch.get_num_threads()
    crowded = on_cpu and not threads and "OMP_NUM_THREADS" not in os.environ and chosen > fair
    threads = fair if crowded else threads
    for shown, line in [
        (cpu and cfg.mixed_precision is None and launcher != "no", f"note: the launcher asks for "
         f"{launcher}; on the CPU this run trains in fp32 (--mixed_precision bf16 insists)"),
        (on_cpu and local > cores, f"warning: {local} processes on {cores} CPU cores and no GPU: "
         "each process gets a fraction of a core. Use `python train.py`, or "
         f"`torchrun --nproc_per_node {cores} train.py ...`"),
        (asked > 1 and accelerator.num_processes == 1, f"warning: the launcher asked for {asked} "
         "processes and started 1 (without GPUs accelerate launch needs --multi_gpu for more): "
         f"use `accelerate launch --multi_gpu --num_processes {asked} train.py` or "
         f"`torchrun --nproc_per_node {asked} train.py`"),
        (crowded, f"note: {fair} thread{'s' * (fair > 1)} per process, not the {chosen} "
         f"Accelerate chose from the machine's cores: this process may use {cores}; --threads "
         "or OMP_NUM_THREADS sets it"),
        (threads and not (cfg.threads or crowded), f"note: the launcher set OMP_NUM_THREADS=1: "
         f"{threads} threads per process instead ({cores} cores, {local} local "
         f"process{'es' * (local > 1)}); --threads or OMP_NUM_THREADS sets it"),
        (cfg.threads > cores, f"note: --threads {cfg.threads} capped at {cores} (CPU cores)")]:
        if shown:
            print0(accelerator, line)
    if threads:
        torch.set_num_threads(min(threads, cores))
    remember_accelerate_answers()
    return accelerator


# ----------------------------------------------------------------------------- streamed shards
# --streaming: parquet or WebDataset .tar shards, found as datasets finds its data files, read
# as training goes. Start-up reads parquet footers (row counts, row groups, columns) and tar
# member headers (with each sample's .cls label), never the images. Rows are (shard, row).

TAR_IMAGES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")  # webdataset's image keys

class Shards:
    """A split's shards, read by row ((shard, row), or a number), by parquet row group or tar index
    (the last few kept). No file stays open: forked loader workers share only this cache."""

    def __init__(self, paths: list[str], counts: list[int], groups: list, features, top: int):
        self.paths, self.counts, self.groups, self.features = paths, counts, groups, features
        self.top, self.starts = top, np.cumsum([0, *counts]).tolist()  # top: largest .cls
        self.columns, self.names, self.keep, self.cache = None, None, 2, {}

    def use(self, image_col: str, label_col: str, names: list[str], window: int) -> None:
        self.columns, self.names = (image_col, label_col), names
        self.keep = 2 + window // max(1, min(b - a for g in self.groups for a, b in zip(g, g[1:])))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i):
        shard, row = i if isinstance(i, tuple) else locate(self.starts, i)
        path, (image_col, label_col) = self.paths[shard], self.columns
        where, (g, offset) = f"{path} row {row}", locate(self.groups[shard], row)
        if (shard, g) not in self.cache:  # the oldest go when there are `keep`
            self.cache[shard, g] = self.read(shard, g)
            while len(self.cache) > self.keep:
                self.cache.pop(next(iter(self.cache)))
        if path.endswith(".tar"):
            image, label = self.tar_row(path, self.cache[shard, g][offset])
        else:
            image, label = (column[offset] for column in self.cache[shard, g])
        if isinstance(label, str) and label in self.names:
            label = self.names.index(label)
        if not image or type(label) is not int or not 0 <= label < len(self.names):
            raise Exit(f"{where}: " + ("no image" if not image else
                       f"label {label!r} is not one of the {len(self.names)} classes"))
        if isinstance(image, str):  # a file path (datasets' to_parquet of an image folder)
            return {image_col: {"path": os.path.join(os.path.dirname(path), image)},
                    label_col: label}
        return {image_col: {"bytes": image, "path": where}, label_col: label}

    def read(self, shard: int, g: int) -> list[dict] | tuple[list, list]:
        """A tar shard's samples (one group), or a parquet row group's images and labels."""
        if self.paths[shard].endswith(".tar"):
            return tar_members(self.paths[shard], False)[0]
        import pyarrow.parquet as pq
        try:
            with fsspec_open(self.paths[shard]) as f:
                table = pq.ParquetFile(f).read_row_group(g, columns=list(self.columns))
        except (OSError, ValueError) as e:  # pyarrow's errors are these
            raise Exit(f"cannot read shard {self.paths[shard]}, row group {g}: "
                       f"{first_line(e)}; replace or remove it") from None
        images, labels = (table.column(c).combine_chunks() for c in self.columns)
        if hasattr(images.type, "get_field_index"):  # datasets' Image: {bytes, path}
            return [b or p for b, p in zip(images.field("bytes").to_pylist(),
                                           images.field("path").to_pylist())], labels.to_pylist()
        return images.to_pylist(), labels.to_pylist()

    def tar_row(self, path: str, members: dict) -> tuple[bytes, int]:
        ext = self.columns[0] if self.columns[0] in members else next(  # .jpg beside .png
            e for e in TAR_IMAGES if e in members)
        with fsspec_open(path) as f:
            f.seek(members[ext][0])
            image = f.read(members[ext][1])
            f.seek(members["cls"][0])
            return image, int(f.read(members["cls"][1]))

def fsspec_open(path: str):
    if "://" not in path:
        return open(path, "rb")
    import fsspec  # hf://, s3://, ...: datasets' own dependency
    return fsspec.open(path, "rb").open()

def locate(starts: list[int], position: int) -> tuple[int, int]:
    """(part, offset) of a position in parts that start at `starts` (cumulative counts)."""
    k = bisect.bisect_right(starts, position) - 1
    return k, position - starts[k]

def tar_members(path: str, labels: bool = True) -> tuple[list[dict], int]:
    """A WebDataset shard's samples in order, each {extension: (offset, size)} (a sample is the
    files that share a name up to the first dot), and its largest .cls label."""
    samples, top = {}, -1
    with fsspec_open(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if not m.isfile() or m.name.startswith("."):
                continue
            folder, name = os.path.split(m.name)
            key, _, ext = name.partition(".")
            samples.setdefault(os.path.join(folder, key), {})[ext.lower()] = (m.offset_data, m.size)
        for key, sample in samples.items():
            if "cls" not in sample or not any(e in sample for e in TAR_IMAGES):
                raise Exit(f"shard {path}: sample {key} has {listing(sample)}: each "
                           f"needs an image ({listing(TAR_IMAGES)}) and a .cls label")
            if not labels:
                continue
            f.seek(sample["cls"][0])
            text = f.read(min(sample["cls"][1], 32)).strip()
            if not text.isdigit() or sample["cls"][1] > 32:
                raise Exit(f"shard {path}: sample {key}.cls holds {text[:20]!r}, not a "
                           "class number")
            top = max(top, int(text))
    return list(samples.values()), top

def open_shards(paths: list[str]) -> Shards:
    """Row counts, row groups and columns of each shard, all the same; none may be empty."""
    import pyarrow.parquet as pq
    counts, groups, columns, top = [], [], None, -1
    for path in paths:
        try:
            if path.endswith(".tar"):
                samples, most = tar_members(path)
                image = next((e for e in TAR_IMAGES if samples and e in samples[0]), "jpg")
                found, top = ["an image", "cls"], max(top, most)  # .jpg, .png, ... may vary
                counts.append(len(samples))
                groups.append([0, len(samples)])
                features = datasets.Features({image: datasets.Image(), "cls": datasets.Value(
                    "int64")})
            else:
                with fsspec_open(path) as f:
                    info = pq.ParquetFile(f).metadata
                    schema = info.schema.to_arrow_schema()
                found = [f"{n} ({t})" for n, t in zip(schema.names, schema.types)]
                features = datasets.Features.from_arrow_schema(schema)
                counts.append(info.num_rows)
                groups.append(np.cumsum([0] + [info.row_group(g).num_rows
                                               for g in range(info.num_row_groups)]).tolist())
        except Exit:
            raise
        except Exception as e:  # pyarrow's, tarfile's, a forged schema's (datasets' features)
            raise Exit(f"cannot read shard {path}: {first_line(e)}; replace or remove it") from None
        if not counts[-1]:
            raise Exit(f"shard {path} holds no examples; remove it")
        if columns is not None and found != columns[1]:
            raise Exit(f"shard {path} has columns {listing(found)}, {columns[0]} has "
                       f"{listing(columns[1])}: the shards of a split need the same columns")
        columns = columns or (path, found, features)
    return Shards(paths, counts, groups, columns[2], top)

def stream_splits(cfg: Config, hub: str | None) -> Splits:
    """Training and validation shards as datasets finds data files (data/train-*.parquet, ...);
    the classes from the features (ClassLabel), --classes, or the largest .cls label."""
    files, kinds = shard_files(cfg, hub)
    train_name = "train" if "train" in files else next(iter(files))
    val_name = next((s for s in VAL_SPLITS if s in files and s != train_name), None)
    if val_name is None:
        raise Exit(f"--streaming needs a validation split beside '{train_name}' in "
                   f"{cfg.dataset} (e.g. data/validation-00000-of-00001.parquet or "
                   "validation/*.tar); its splits are " + listing(files))
    train, val = open_shards(files[train_name]), open_shards(files[val_name])
    image_col, label_col, note = find_columns(train, cfg.image_column, cfg.label_column or (
        "cls" if "cls" in train.features and "tar" in kinds else None))
    if val.features != train.features:
        raise Exit(f"the validation shards' columns ({listing(val.features)}) differ from the "
                   f"training shards' ({listing(train.features)})")
    feature = train.features[label_col]
    if cfg.classes and not Path(cfg.classes).is_file():
        raise Exit(f"--classes {cfg.classes}: no such file (a class name per line)")
    if cfg.classes:
        names = [n.strip() for n in Path(cfg.classes).read_text().splitlines() if n.strip()]
    elif isinstance(feature, datasets.ClassLabel):
        names = feature.names
    elif label_col == "cls":  # tar: every label was read with the headers
        if val.top > train.top:
            raise Exit(f"validation class {val.top} (.cls) has no training examples (their "
                       f"largest is {train.top}); add training examples for it, or --classes FILE")
        names = [str(i) for i in range(train.top + 1)]
        note += f"\nnote: classes 0-{len(names) - 1} from the .cls labels (--classes names them)"
    else:
        raise Exit(f"--label_column {label_col} holds {describe(feature)} without class names: "
                   "pass --classes FILE (a class name per line, in label order)")
    if len(names) < 2:
        raise Exit(f"{cfg.dataset} has {len(names)} class; a classifier needs two or more")
    for split in (train, val):
        split.use(image_col, label_col, names, cfg.shuffle_window)
    shards = (f"streaming: {len(train.paths)} training and {len(val.paths)} validation "
              f"{kinds.pop()} shards, read as training goes")
    return Splits(train, val, image_col, label_col, names, train, [shards, note])

def shard_files(cfg: Config, hub: str | None) -> tuple[dict, set]:
    """Each split's shards, as datasets resolves a folder's or Hub repository's data files; a
    glob keeps those of its folder that it matches (e.g. 'shards/*/part-*.tar')."""
    local = Path(cfg.dataset).expanduser().absolute()  # datasets lists absolute paths
    glob = str(local) if set("*?[") & set(cfg.dataset) else None
    if glob:  # the folder above the first wildcard
        local = Path(*itertools.takewhile(lambda p: not set("*?[") & set(p), local.parts))
    if hub in ("unreachable", "offline"):
        raise Exit(f"--dataset {cfg.dataset}: no local folder of that name, and the Hugging Face "
                   "Hub " + ("cannot be reached from here" if hub == "unreachable" else
                             "is off (HF_HUB_OFFLINE=1)") + ": --streaming reads it from there")
    if hub is None and not local.is_dir():
        raise Exit(f"--dataset {cfg.dataset}: no such directory")
    try:
        builder = datasets.load_dataset_builder(str(local) if hub is None else cfg.dataset,
                                                cfg.dataset_config, revision=cfg.revision)
        files = {str(k): [f for f in v if glob is None or fnmatch.fnmatch(f, glob)]
                 for k, v in (builder.config.data_files or {}).items()}
    except Exception as e:
        raise Exit(f"cannot stream --dataset {cfg.dataset}: {load_error(e)}") from None
    files = {k: v for k, v in files.items() if v}
    kinds = {f.rsplit(".", 1)[-1].lower() for split in files.values() for f in split}
    if not files or len(kinds) != 1 or not kinds <= {"parquet", "tar"}:
        raise Exit(f"--streaming reads parquet or WebDataset .tar shards; {cfg.dataset} holds "
                   f"{listing(sorted(kinds)) or 'no data files'}: leave out --streaming")
    return files, kinds

class StreamSampler:
    """An epoch's (shard, row) pairs from (seed, epoch) alone, so it resumes at any batch: shards in
    random order; process r of P takes full batches from r*(N//P) on, shuffled in windows."""

    def __init__(self, shards: Shards, batch: int, rank: int, processes: int, cfg: Config):
        per, self.shards, self.batch, self.rank, self.seed = (
            len(shards) // processes, shards, batch, rank, cfg.seed)
        self.n, self.first = per // batch * batch, rank * per
        self.window, self.epoch, self.start = max(1, cfg.shuffle_window // batch) * batch, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return self.plan(self.epoch, self.start)

    def plan(self, epoch: int, batch: int):
        gen = torch.Generator().manual_seed(hash((self.seed, epoch)) % 2**62)
        order = torch.randperm(len(self.shards.paths), generator=gen).tolist()
        starts = np.cumsum([0, *(self.shards.counts[s] for s in order)]).tolist()
        p = batch * self.batch
        while p < self.n:
            lo = p // self.window * self.window
            hi = min(lo + self.window, self.n)
            gen.manual_seed(hash((self.seed, epoch, self.rank, lo)) % 2**62)
            for j in torch.randperm(hi - lo, generator=gen)[p - lo:].tolist():
                k, row = locate(starts, self.first + lo + j)
                yield order[k], row
            p = hi

class SkipBad(Decoded):
    """--skip_bad_examples: an unreadable training example is replaced by the next readable one of
    its shard (named in a note), so that the batches, and a resumed run, stay the same."""

    def __getitem__(self, i: tuple[int, int]):
        shard, row = i
        for k in range(self.split.counts[shard]):
            try:
                return (*super().__getitem__((shard, (row + k) % self.split.counts[shard])),
                        k > 0)  # counted by Streamed
            except Exit as e:
                print(f"note: skipped: {e} (--skip_bad_examples)", file=sys.stderr, flush=True)
        raise Exit(f"shard {self.split.paths[shard]}: none of its examples can be read")

class Streamed:
    """The training loader of --streaming: this process's own batches (not Accelerate's
    sharding), moved to the device; an epoch starts at a given batch."""

    def __init__(self, loader, device):
        self.loader, self.device, self.dataset, self.skipped = loader, device, loader.dataset, 0

    def __len__(self) -> int:
        return len(self.loader)

    def from_batch(self, batch: int):
        self.loader.sampler.start = batch
        return self

    def __iter__(self):
        for images, labels, *replaced in self.loader:  # replaced: SkipBad's
            self.skipped += int(replaced[0].sum()) if replaced else 0
            yield images.to(self.device, non_blocking=True), labels.to(self.device)


# ----------------------------------------------------------------------------- decoded cache
# --data_mode cache: each split decoded once, in worker processes, into a file of uint8 rows
# under --cache_dir, named by all it depends on, and read by index.

CACHE_FORMAT = 2  # in every cache key: bump it when decode() changes what it makes

class OnDisk:
    """A split's uint8 C x H x W rows in one file, read with pread: 0.47M random rows/s to a
    memmap's 0.98M, but the pages read never count as RSS (bench/cache.py --section formats)."""

    def __init__(self, folder: Path, shape: tuple[int, ...], labels):
        self.path, self.shape, self.labels = folder / "images.u8", tuple(shape), labels
        self.row, self.fd = math.prod(shape), None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:  # each loader worker opens the file itself
        return {**self.__dict__, "fd": None}

    def __getitems__(self, indices: list[int]):
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        images = np.empty((len(indices), self.row), np.uint8)
        for j, i in enumerate(indices):
            if os.preadv(self.fd, [images[j]], i * self.row) != self.row:
                raise OSError(errno.EIO, "the decoded cache is shorter than its index says; "
                              "delete it to rebuild it", str(self.path))
        return torch.from_numpy(images).view(-1, *self.shape), self.labels[indices]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None

    def digest(self) -> str:
        """sha256 of up to 64 rows spread over the file: a cheap check that it is intact."""
        n = len(self)
        rows = sorted({i * (n - 1) // 63 for i in range(64)}) if n > 64 else list(range(n))
        return hashlib.sha256(self.__getitems__(rows)[0].numpy().tobytes()).hexdigest()

def cache_root(cfg: Config) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser().absolute()
    return Path(datasets.config.HF_DATASETS_CACHE) / "train.py-decoded"

def cache_folder(root: Path, split, image_col: str, label_col: str, meta: dict, train: bool
                 ) -> Path:
    """Named by all the rows depend on: datasets' fingerprint covers a split's rows and how they
    were chosen (held out with which seed, relabelled); an image folder's, its files' too."""
    key = [CACHE_FORMAT, split._fingerprint, image_col, label_col, meta["channels"],
           *stored(meta, train), referenced_files(split, image_col)]
    return root / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]

def referenced_files(split, image_col: str) -> str | None:
    """For images stored as paths, a digest of the files' names, sizes and times, which datasets'
    fingerprint leaves out; None for stored bytes and image folders (their fingerprint has it)."""
    if (split.info.description or "").startswith("image folder ") or not len(split) or (
            split[0][image_col].get("bytes") is not None):
        return None
    files = hashlib.sha256()
    for image in split.select_columns([image_col])[:][image_col]:
        info = None
        with contextlib.suppress(OSError):  # decode() names a missing file
            info = os.stat(image["path"]) if image["bytes"] is None else None
        files.update(f"{image['path']}\0{info and (info.st_size, info.st_mtime_ns)}\n".encode())
    return files.hexdigest()

def cached(root: Path, source: Source, meta: dict, train: bool):
    """The split decoded into root/<key>/ by the first process to take the key's lock, while the
    others (other nodes' too, on a shared file system) wait. `source.part`: see part_of."""
    if source.part is not None:  # cache the data the split was held out of, read its rows
        whole = Source(source.part[0], source.image_col, source.label_col)
        return torch.utils.data.Subset(cached(root, whole, meta, train), source.part[1])
    folder = cache_folder(root, source.split, source.image_col, source.label_col, meta, train)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock, read_only = take_lock(root / f"{folder.name}.lock", wait=True), None
    except OSError as e:  # read-only (a colleague's, a mounted copy): a complete one is read
        lock, read_only = None, e
    with lock or contextlib.nullcontext():  # closing the file lets the lock go
        data, damage = open_cache(folder, source, meta, train) if folder.exists() else (None, "")
        if data is not None:
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:
                print(f"cache: reusing {folder} ({len(data)} images)", flush=True)
            return data
        if read_only:
            raise Exit(f"cannot write to --cache_dir {root} ({read_only.strerror}: "
                       f"{read_only.filename or root}) and no complete cache of this data is "
                       "there: pass --cache_dir on a writable disk, or --data_mode memory or "
                       "stream")
        if damage:
            print(f"note: the decoded cache {folder} is {damage}: building it again", flush=True)
            shutil.rmtree(folder)
        for stale in root.glob(f"{folder.name}.tmp-*") if lock else []:  # killed builds
            shutil.rmtree(stale, ignore_errors=True)
        return build_cache(folder, source, meta, train)

def open_cache(folder: Path, source: Source, meta: dict, train: bool
               ) -> tuple[OnDisk | None, str]:
    """The complete, intact cache in `folder`, or None and what is wrong with it. Every field
    of cache.json must be what the cache's key says, before anything is allocated by it."""
    (size, cover), split = stored(meta, train), source.split
    expect = {"shape": [meta["channels"], *size], "rows": len(split), "cover": cover,
              "fingerprint": split._fingerprint, "format": CACHE_FORMAT}
    try:
        info = read_json(folder / "cache.json")  # written last
        wrong = [k for k, v in expect.items() if info.get(k) != v]
        if wrong:
            return None, f"not what its key says ({listing(wrong)} differ)"
        labels = np.load(folder / "labels.npy", mmap_mode="r")  # the header, nothing allocated
        if labels.shape != (len(split),) or labels.dtype != np.int64:
            return None, f"labelled for another size ({labels.shape} {labels.dtype} labels)"
        labels = np.array(labels)
        data = OnDisk(folder, info["shape"], torch.from_numpy(labels))
        if (folder / "images.u8").stat().st_size != len(data) * data.row:
            return None, "of the wrong size (truncated?)"
        if not np.array_equal(labels, labels_of(split, source.label_col)):
            return None, "labelled differently from the data"
        if data.digest() != info["sample_sha256"]:
            data.close()
            return None, "not what was written (sampled rows differ)"
        return data, ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"unreadable ({first_line(e)})"

def with_slack(need: float) -> float:  # bytes: 2% and 1 MiB left for other writers
    return need * 1.02 + 2**20

def build_cache(folder: Path, source: Source, meta: dict, train: bool) -> OnDisk:
    """Decoded into a temporary folder, renamed when complete: a killed build is never used."""
    (size, _), split = stored(meta, train), source.split
    shape = (meta["channels"], *size)
    need, free = len(split) * (math.prod(shape) + 8), shutil.disk_usage(folder.parent).free
    full = (f"the decoded cache needs {size_text(need)} in {folder.parent}, which has {{}} free "
            f"({size_text(with_slack(need))} are wanted: 2% and 1 MiB are left for other "
            "writers): free some space, pass --cache_dir on a bigger disk, or use --data_mode "
            "stream")
    if with_slack(need) > free:
        raise Exit(full.format(size_text(free)), EXIT_FAILED)
    workers = cpu_count() if len(split) > 500 else 0
    tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    how = f"with {workers} worker processes" if workers else "in this process (few images)"
    print(f"cache: decoding {len(split)} {'training' if train else 'evaluation'} images "
          f"({size_text(need)}) into {folder} {how}", flush=True)
    t0 = time.perf_counter()
    try:
        tmp.mkdir()
        labels = write_cache(tmp, source, meta, train, workers)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "cache.json").exists():
                raise
            shutil.rmtree(tmp)  # an overlapping build (no lock) finished first: use it
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise Exit(full.format(size_text(shutil.disk_usage(folder.parent).free)),
                       EXIT_FAILED) from None
        if isinstance(e, KeyboardInterrupt) and e.args:  # a stop signal (StopFlag)
            raise Exit(f"stopped by {e.args[0]} while building the decoded cache: nothing to "
                       "save (the build starts again next time); exit 75", EXIT_PREEMPTED) \
                from None
        raise
    took = time.perf_counter() - t0
    print(f"cache: built {folder} in {took:.1f} s ({len(split) / took:.0f} images/s)", flush=True)
    return OnDisk(folder, shape, labels)

def write_cache(tmp: Path, source: Source, meta: dict, train: bool, workers: int):
    """images.u8, labels.npy, then cache.json (last: it marks the folder complete)."""
    (size, cover), split = stored(meta, train), source.split
    shape = (meta["channels"], *size)
    loader = torch.utils.data.DataLoader(
        Decoded(split, source.image_col, source.label_col, pil_mode(meta), size, cover),
        batch_size=256, num_workers=workers, worker_init_fn=init_worker)
    with open(tmp / "images.u8", "wb") as f:
        # tqdm.auto's asyncio class calls iter() on an iterable at once, and the for loop
        # again: a DataLoader would start its workers twice. Hand it the one iterator.
        for images, _ in tqdm(iter(loader), total=len(loader), desc="decoding",
                              disable=not sys.stderr.isatty(), leave=False):
            f.write(images.numpy().data)
        f.flush()
        os.fsync(f.fileno())
    labels = labels_of(split, source.label_col).astype(np.int64)
    np.save(tmp / "labels.npy", labels)
    data = OnDisk(tmp, shape, torch.from_numpy(labels))
    write_json(tmp / "cache.json", {"shape": list(shape), "rows": len(data),
                                    "sample_sha256": data.digest(), "cover": cover,
                                    "fingerprint": split._fingerprint, "format": CACHE_FORMAT,
                                    "built": datetime.datetime.now().isoformat()})
    data.close()
    return data.labels


# ----------------------------------------------------------------------------- workarounds
# Each works around a library behaviour (or a fact of the machine) named in its first lines,
# checked with accelerate 1.15, datasets 5.2, torch 2.14 and torchvision 0.29: when that
# behaviour changes, the workaround can go.

def busy_cores(seconds: float = 0.1) -> float:
    """How many of this process's cores others keep busy (/proc/stat over `seconds`), or 0."""
    def sample() -> tuple[int, int]:
        mine = {f"cpu{core}" for core in os.sched_getaffinity(0)}
        with open("/proc/stat") as f:
            ticks = [list(map(int, row[1:9])) for row in map(str.split, f) if row[0] in mine]
        return sum(map(sum, ticks)), sum(t[3] + t[4] for t in ticks)  # all, idle + iowait
    try:
        (all0, idle0), _, (all1, idle1) = sample(), time.sleep(seconds), sample()
    except (OSError, ValueError, AttributeError):  # not Linux
        return 0.0
    return (all1 - all0 - (idle1 - idle0)) / os.sysconf("SC_CLK_TCK") / seconds

def choose_wait_policy() -> str:
    """libgomp's threads spin while they wait: beside a busy process on 2 cores a ~9 s run took
    39-77 s, but passive waiting doubled it on a quiet machine. Call before torch is imported."""
    busy = 0.0 if "OMP_WAIT_POLICY" in os.environ else busy_cores()  # the user's choice stands
    if busy < 0.5:
        return ""
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return (f"note: other processes keep {busy:.1f} of this process's {cpu_count()} cores "
            "busy: OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE)")

def hub_access(dataset: str) -> str | None:
    """huggingface_hub retries an unreachable Hub 5 times (~28 s): then HF_HUB_OFFLINE=1 makes a
    cached copy load at once. For a Hub id (else None), before `datasets` is imported."""
    if dataset == "digits" or Path(dataset).expanduser().exists() or dataset.startswith(
            (".", "/", "~")) or dataset.count("/") > 1 or set("*?[") & set(dataset):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "offline"
    if reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        return "online"
    os.environ["HF_HUB_OFFLINE"] = "1"
    return "unreachable"

def reachable(url: str) -> bool:
    """Whether url's host answers within ~3 s (a stuck DNS lookup included)."""
    host = urllib.parse.urlparse(url)
    reached: list[bool] = []

    def connect() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection((host.hostname, host.port or 443), timeout=3).close()
            reached.append(True)
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(3.5)
    return bool(reached)

def labels_of(split, label_col: str):
    """A label column as one array. datasets formats `split[col]` row by row, and the numpy
    format element by element: 1.5 s and 0.3 s for 40,000 rows, at every start."""
    return np.asarray(split.select_columns([label_col])[:][label_col])

class EpochSampler:
    """A permutation that depends only on (seed, epoch). Accelerate's seedable sampler pickles
    itself, dataset included, into every checkpoint; the epoch is already in our loop state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(epoch_permutation(self.n, self.seed, self.epoch).tolist())

def epoch_permutation(n: int, seed: int, epoch: int):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

def follow_umask(path: Path) -> None:
    """safetensors 0.8 writes its files with mode 0600 whatever the umask."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)

def check_random_states(path: Path) -> None:
    """Accelerate's load_state only logs (at info level) an error restoring the random states,
    and resumes without them: each file is restored into throwaway generators first."""
    try:
        states = accelerate.utils.load(path)
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
        if torch.cuda.is_available():
            for state in states["torch_cuda_manual_seed"]:
                torch.Generator("cuda").set_state(state)
    except Exception as e:
        raise Exit(f"{path.name} does not restore the random states ({first_line(e)})") \
            from None

def pretrained_state(weights) -> tuple[dict, str]:
    """torchvision loads weights via torch.hub with weights_only=False, so a planted file would run
    code: here its sha256 must begin with its name's hash, and it loads with weights_only=True."""
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    expected = torch.hub.HASH_REGEX.search(file.name)
    prefix = expected and expected.group(1)
    try:
        if not file.exists():  # torch.hub's download checks the same hash
            if not reachable(weights.url):
                raise ConnectionError("not there, and no network to download it")
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(file), progress=False,
                                           hash_prefix=prefix)
        digest = file_digest(file)
        if not prefix or digest.startswith(prefix):
            return torch.load(file, map_location="cpu", weights_only=True), f"{weights} ({file})"
    except Exception as e:  # offline, a damaged file, a pickle that is not plain tensors
        raise Exit(f"--pretrained: cannot read {file} ({first_line(e)}); put {weights.url} "
                   "there") from None
    raise Exit(f"--pretrained: {file} is not torchvision's file: its sha256 begins "
               f"{digest[:8]}, its name says {prefix}; delete it, or put {weights.url} there")

def launcher() -> tuple[list[str], bool]:
    """The parent's command line when it is `accelerate launch` or torchrun (not srun, a shell or
    a user's own launcher), and whether OMP_NUM_THREADS was unset in its environment."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            command = f.read().decode(errors="replace").split("\0")
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            unset = not any(v.startswith(b"OMP_NUM_THREADS=") for v in f.read().split(b"\0"))
    except OSError:
        return [], False
    ours = any(n in part for part in command[:3] for n in ("accelerate", "torchrun",
                                                            "distributed.run"))
    return (command, unset) if ours else ([], False)

def launcher_threads(local: int) -> int:
    """accelerate launch and torchrun set OMP_NUM_THREADS=1 where the user set nothing: on 2 cores
    that halved a CPU run's speed. Where they set it: the cores per local process if over 1."""
    if os.environ.get("OMP_NUM_THREADS") != "1" or not launcher()[1]:
        return 0
    threads = cpu_count() // local
    return threads if threads > 1 else 0

def launcher_processes() -> int:
    """The process count the launcher's command line asks for, or 0. Without a GPU, `accelerate
    launch --num_processes 2` starts one, silently (accelerate 1.x sets multi_gpu only on GPUs)."""
    command = launcher()[0]
    for part, following in zip(command, [*command[1:], ""]):
        name, _, value = part.partition("=")
        if name in ("--num_processes", "--nproc_per_node", "--nproc-per-node"):
            value = value or following
            return int(value) if value.isdigit() else 0
    return 0

def remember_accelerate_answers() -> None:
    """accelerate 1.15 asks every step whether lomo_optim is installed (~0.3 ms on a CPU) and for
    zero_grad's signature (~0.1 ms): 6% of a 6 ms digits step. The answers cannot change."""
    module = accelerate.optimizer
    if not hasattr(module.is_lomo_available, "cache_info"):
        module.is_lomo_available = functools.cache(module.is_lomo_available)
        module.inspect = types.SimpleNamespace(signature=functools.lru_cache(maxsize=4)(
            inspect.signature))

def short_socket_dir() -> None:
    """Loader workers send batches through a Unix socket under $TMPDIR, whose path Linux caps at
    107 bytes: past it the run hung (CPython issue 132124, fixed in 3.13). Made under /tmp."""
    import multiprocessing.util
    import tempfile
    if sys.platform != "linux" or len(tempfile.gettempdir()) + len(
            "/pymp-12345678/listener-12345678") <= 107:
        return
    saved, tempfile.tempdir = tempfile.tempdir, "/tmp"
    try:
        multiprocessing.util.get_temp_dir()  # made once per process, removed at its exit
    finally:
        tempfile.tempdir = saved

def quiet_broken_pipes() -> None:
    """Python 3.11's resource_sharer thread reports a BrokenPipeError (a traceback after the one
    line) when an exit ends the loader worker it serves: silenced outside the main thread."""
    hook = sys.excepthook

    def excepthook(kind, value, tb):
        if not (issubclass(kind, (BrokenPipeError, ConnectionResetError))
                and threading.current_thread() is not threading.main_thread()):
            hook(kind, value, tb)
    sys.excepthook = excepthook

def exit_now(code: int) -> None:
    """Teardown took 1.5 s (CPython 3.11, torch 2.x), and loader workers ignore the SIGTERM that
    multiprocessing's exit sends before it waits for them: the parts that touch files run here."""
    import atexit
    for signum in signal_numbers("INT,TERM,USR1,USR2"):  # the run is over: a stop is moot
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's: a killed worker is a failure
    for child in multiprocessing.active_children():  # loader workers left by an error
        child.kill()
        child.join()
    for thread in threading.enumerate():  # not idle pool workers (inductor's): they never end
        if thread is not threading.current_thread() and not thread.daemon and not \
                thread.name.startswith("ThreadPoolExecutor"):
            thread.join()
    atexit._run_exitfuncs()
    with contextlib.suppress(OSError, ValueError):  # a reader that has gone away
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)

if __name__ == "__main__":
    quiet_broken_pipes()
    code = EXIT_FAILED
    try:
        code = main()
    except SystemExit as end:  # argparse's, after --help or a bad flag
        code = end.code if isinstance(end.code, int) else EXIT_OK
    except KeyboardInterrupt:  # a signal just after main() returned, or a Ctrl-C not caught
        code = EXIT_PREEMPTED
    except BaseException:  # a bug: its traceback and exit 1, never a hang on live workers
        with contextlib.suppress(OSError, ValueError):
            traceback.print_exc()
    finally:
        exit_now(code)
