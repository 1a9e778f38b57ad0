"""The layout of train.py that keeps it readable, as a guard for later changes: the story first
(settings, then the run and its update step near the top), sections in the order data flows,
workarounds last, small functions with few parameters, and a bounded size."""
from __future__ import annotations

import ast
import re

from conftest import ROOT

SOURCE = (ROOT / "train.py").read_text()
TREE = ast.parse(SOURCE)
SECTIONS = ["settings", "the run", "evaluation", "model", "data", "run directory",
            "flags, signals", "libraries", "streamed shards", "decoded cache", "workarounds"]
MAX_LINES = 3120          # grows by at most what a fix or a feature needs
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 6
UPDATE_STEP_BY = 300      # the line of accelerator.backward(


def functions():
    return [n for n in ast.walk(TREE) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_sections_come_in_the_order_data_flows():
    banners = re.findall(r"^# -{20,} (.+)$", SOURCE, re.M)
    assert banners == SECTIONS, banners
    docstring = ast.get_docstring(TREE)
    assert all(name.split(",")[0] in docstring for name in SECTIONS)  # the contents list


def test_the_update_step_is_on_the_first_screens():
    lines = SOURCE.splitlines()
    step = next(i + 1 for i, line in enumerate(lines) if "accelerator.backward(" in line)
    assert step <= UPDATE_STEP_BY, step
    config = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    train = next(n for n in TREE.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert config.lineno < train.lineno < step < train.end_lineno
    # one line of help per setting
    assert all(isinstance(s, ast.AnnAssign) and s.end_lineno - s.lineno <= 1
               for s in config.body), "a Config field's help runs over two lines"


def test_functions_are_short_and_take_few_parameters():
    long = {f.name: f.end_lineno - f.lineno + 1 for f in functions()
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES}
    many = {f.name: n for f in functions() if (n := len([
        a for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs
        if a.arg not in ("self", "cls")])) > MAX_PARAMETERS}
    assert not long and not many, (long, many)


def test_docstrings_are_short():
    long = [n.name for n in ast.walk(TREE) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
            and (doc := ast.get_docstring(n, clean=False)) and doc.count("\n") > 1]
    assert not long, long  # at most 2 lines: the README holds the prose


def test_one_way_to_stop_and_a_bounded_size():
    exceptions = [n.name for n in TREE.body if isinstance(n, ast.ClassDef) and any(
        isinstance(b, ast.Name) and b.id.endswith(("Exception", "Error")) for b in n.bases)]
    assert exceptions == ["Exit"], exceptions
    assert len(SOURCE.splitlines()) <= MAX_LINES
    assert max(len(line) for line in SOURCE.splitlines()) <= 100
