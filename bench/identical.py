"""Proof that a change to train.py leaves the trained weights bit-identical: the base's
train.py (`git show REV:train.py`, written into a temporary folder) and the working tree's
train.py each train the same runs, as real processes with the same environment, in this one
invocation on this machine; then their outputs are compared.

    python bench/identical.py                 # base 3cd1482 against the working tree
    python bench/identical.py --base HEAD~3   # any commit, tag or branch
    python bench/identical.py --keep          # keep the run directories (printed) to inspect

Cases: `default` (`python train.py`: digits, 8 epochs) and `2 processes` (torchrun
--nproc_per_node 2, --epochs 3 --batch_size 32). For each: model.safetensors tensor by tensor
(torch.equal: same dtype, shape and bits) and byte for byte (the metadata too), and
results.json's val_acc, val_loss and steps. Also the set of --flag names in `train.py --help`.
Prints a table; exit 0 when everything is identical, 1 when anything differs (or a run failed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "3cd1482"
CASES = {  # name: (launcher arguments before train.py, train.py flags)
    "default": ([], []),
    "2 processes": (["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     "PORT"], ["--epochs", "3", "--batch_size", "32"]),
}
RESULT_KEYS = ("val_acc", "val_loss", "steps")
CHILDREN: list[subprocess.Popen] = []  # the runs in flight, ended on Ctrl-C


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process under pid (torchrun's workers run in sessions of their own, so a
    process-group kill would miss them), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_children() -> None:
    for proc in CHILDREN:
        if proc.poll() is None:
            for pid in [proc.pid, *descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[int, str, float]:
    """A real process, its own session (a Ctrl-C here is not also a stop signal to it)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    CHILDREN.append(proc)
    out, _ = proc.communicate()
    CHILDREN.remove(proc)
    return proc.returncode, out, time.perf_counter() - t


def help_flags(script: Path, cwd: Path, env: dict) -> set[str] | str:
    """The --flag names that argparse's --help lists (its option lines are indented by two
    spaces; wrapped help text, which may name flags too, by more), or the failure."""
    code, out, _ = run([sys.executable, str(script), "--help"], cwd, env)
    if code != 0:
        return f"--help failed (exit {code}): {out.strip().splitlines()[-1:]}"
    return {flag for line in out.splitlines() if re.match(r"  -", line)
            for flag in re.findall(r"--[A-Za-z][\w-]*", line.split("  ")[1])}


def compare_weights(a: Path, b: Path) -> tuple[bool, bool, str]:
    """(tensors identical, bytes identical, what differs)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    import torch
    wa, wb = load_file(str(a)), load_file(str(b))
    notes = []
    if wa.keys() != wb.keys():
        notes.append(f"tensor names differ: only base {sorted(wa.keys() - wb.keys())}, only "
                     f"current {sorted(wb.keys() - wa.keys())}")
    different = [k for k in sorted(wa.keys() & wb.keys()) if not torch.equal(wa[k], wb[k])
                 or wa[k].dtype != wb[k].dtype]
    if different:
        notes.append(f"{len(different)} tensors differ: {', '.join(different[:6])}"
                     + (" ..." if len(different) > 6 else ""))
    tensors = wa.keys() == wb.keys() and not different
    same_bytes = a.read_bytes() == b.read_bytes()
    if not same_bytes and tensors:
        meta = []
        for path in (a, b):
            with safe_open(str(path), "pt") as f:
                meta.append(f.metadata() or {})
        notes.append("metadata differs: " + ", ".join(
            k for k in sorted(meta[0].keys() | meta[1].keys()) if meta[0].get(k) != meta[1].get(k))
            if meta[0] != meta[1] else "same tensors and metadata, other byte layout")
    return tensors, same_bytes, "; ".join(notes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=BASE, help=f"the git revision to compare with (default "
                                                f"{BASE})")
    p.add_argument("--current", type=Path, default=ROOT / "train.py",
                   help="the train.py to compare with the base (default: the working tree's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()

    t0 = time.perf_counter()
    rev = subprocess.run(["git", "rev-parse", "--short", "--verify", f"{args.base}^{{commit}}"],
                         cwd=ROOT, capture_output=True, text=True)
    if rev.returncode != 0:
        raise SystemExit(f"unknown revision {args.base!r}: {rev.stderr.strip()}")
    source = subprocess.run(["git", "show", f"{args.base}:train.py"], cwd=ROOT,
                            capture_output=True)
    if source.returncode != 0:
        raise SystemExit(source.stderr.decode().strip())
    tmp = Path(tempfile.mkdtemp(prefix="identical-"))
    # TMPDIR: torchrun leaves a torchelastic_* folder in it per run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(tmp / "tmp")}
    failed = False
    try:
        (tmp / "tmp").mkdir()
        (tmp / "base").mkdir()
        (tmp / "base" / "train.py").write_bytes(source.stdout)
        scripts = {"base": tmp / "base" / "train.py", "current": args.current.resolve()}
        current = scripts["current"].read_bytes()  # to notice an edit during the runs
        print(f"base {rev.stdout.strip()} ({args.base}) against {scripts['current']}"
              f"{' (the same file)' if source.stdout == current else ''}; {sys.executable}, "
              f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs",
              flush=True)

        rows = []
        for case, (launcher, train_flags) in CASES.items():
            out_dirs = {}
            for who, script in scripts.items():
                work = tmp / f"{case.replace(' ', '-')}-{who}"
                work.mkdir()
                out_dirs[who] = work / "run"
                cmd = [sys.executable, *[free_port() if a == "PORT" else a for a in launcher],
                       str(script), *train_flags, "--output_dir", str(out_dirs[who])]
                code, out, seconds = run([str(c) for c in cmd], work, env)
                print(f"  {case:12s} {who:8s} exit {code}, {seconds:5.1f} s", flush=True)
                if code != 0:
                    print(f"    {' '.join(map(str, cmd))}\n" + "\n".join(
                        "    " + line for line in out[-3000:].splitlines()), flush=True)
                    failed = True
            if failed:
                break
            res = {w: json.loads((d / "results.json").read_text()) for w, d in out_dirs.items()}
            tensors, same_bytes, notes = compare_weights(out_dirs["base"] / "model.safetensors",
                                                         out_dirs["current"] / "model.safetensors")
            diff = [k for k in RESULT_KEYS if res["base"].get(k) != res["current"].get(k)]
            if diff:
                notes = "; ".join(filter(None, [notes, "results.json differs in " + ", ".join(
                    f"{k} ({res['base'].get(k)!r} vs {res['current'].get(k)!r})" for k in diff)]))
            rows.append((case, tensors, same_bytes, res["base"]["val_acc"],
                         res["current"]["val_acc"], not diff, notes))

        flags = {w: help_flags(s, tmp, env) for w, s in scripts.items()}
        edited = scripts["current"].read_bytes() != current
    except KeyboardInterrupt:
        kill_children()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        kill_children()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if failed:
        print("a run failed: nothing compared")
        return 1
    yes = {True: "yes", False: "NO"}
    print(f"\n{'case':12s}  {'identical tensors':17s}  {'identical bytes':15s}  "
          f"{'val_acc base':12s}  {'val_acc current':15s}  {'results':7s}")
    for case, tensors, same_bytes, acc_base, acc_cur, same_res, _ in rows:
        print(f"{case:12s}  {yes[tensors]:17s}  {yes[same_bytes]:15s}  {acc_base:<12.6f}  "
              f"{acc_cur:<15.6f}  {'same' if same_res else 'DIFFER':7s}")
    for case, *_, notes in rows:
        if notes:
            print(f"  {case}: {notes}")
    if isinstance(flags["base"], str) or isinstance(flags["current"], str):
        flags_differ = True
        print(f"--help: base {flags['base'] if isinstance(flags['base'], str) else 'ok'}; "
              f"current {flags['current'] if isinstance(flags['current'], str) else 'ok'}")
    else:
        removed, added = (sorted(flags["base"] - flags["current"]),
                          sorted(flags["current"] - flags["base"]))
        flags_differ = bool(removed or added)
        print(f"--help flags: {len(flags['base'])} in the base, {len(flags['current'])} now"
              + (f"; removed: {' '.join(removed) or '-'}; added: {' '.join(added) or '-'}"
                 if flags_differ else "; the same set"))
    if edited:
        print(f"warning: {scripts['current']} changed during this comparison: run it again")
    differs = edited or flags_differ or not all(t and b and r for _, t, b, _, _, r, _ in rows)
    print(("DIFFERENT" if differs else "IDENTICAL") + f" ({time.perf_counter() - t0:.0f} s)")
    return 1 if differs else 0


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM too: end the runs and remove the temporary folder


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupt)
    sys.exit(main())
