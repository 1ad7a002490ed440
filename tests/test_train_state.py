"""`dsv3 train`'s trainer state and argument checks, in real processes.

The state is safetensors + JSON and nothing is ever unpickled (a planted pickle that would
create a file when loaded is refused, and the file never appears); every bad argument or
--out is refused on one line naming the flag and the accepted range, exit 2, before the
tokenizer is trained, with nothing created on disk; a save cut between its renames is
detected on resume."""

import argparse
import json
import pickle
import re
from pathlib import Path

import pytest
from cli_run import assert_user_error, run_dsv3, tree_digest  # tests/ is on sys.path under pytest

from dsv3 import train_state as tr
from dsv3.cli import train
from dsv3.errors import UsageError

TEXT = "Full fathom five thy father lies; of his bones are coral made. Those are pearls that were his eyes. " * 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (d / f"doc{i}.txt").write_text(TEXT + f"\nPart {i}.\n")
    return d


def train_argv(corpus, out, *extra):
    return ["train", "--out", str(out), "--data", str(corpus), "--vocab-size", "300", "--config", "tiny",
            "--steps", "2", "--batch-size", "2", "--seq-len", "24", "--warmup", "1", "--eval-every", "2",
            "--eval-windows", "2", "--quiet", *extra]


class _Touch:
    """Unpickling this calls open(marker, "w"): the file appears if anyone ever loads the pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------- no pickle
@pytest.mark.parametrize("name", ["trainer_state.pt", "optimizer.pkl"])
def test_a_directory_with_a_pickle_is_refused_and_never_loaded(name, corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "PWNED"
    (out / name).write_bytes(pickle.dumps(_Touch(marker)))
    (out / "config.json").write_text("{}")  # the rest of an old run directory
    before = tree_digest(tmp_path)
    assert_user_error(run_dsv3(*train_argv(corpus, out)), name, "never unpickles")
    assert not marker.exists()
    assert tree_digest(tmp_path) == before


def test_the_package_never_unpickles():
    """No torch.load, pickle or weights_only in dsv3/ (a checkpoint is data: safetensors and JSON only)."""
    root = Path(tr.__file__).parent
    hits = [f"{f.relative_to(root)}:{i}: {line.strip()}" for f in sorted(root.rglob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), 1)
            if re.search(r"torch\.load\(|import pickle|pickle\.load|weights_only|torch\.save\(", line)]
    assert hits == []


def test_state_is_safetensors_and_json(corpus, tmp_path):
    out = tmp_path / "run"
    r = run_dsv3(*train_argv(corpus, out, "--stop-after", "1"))
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / tr.STATE_JSON).read_text())
    assert doc["format"] == tr.STATE_FORMAT and doc["step"] == 1 and doc["steps"] == 2 and len(doc["log"]) == 1
    assert doc["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.95]
    assert "func" not in doc["args"] and doc["args"]["out"] == str(out)
    assert (out / tr.STATE_TENSORS).is_file()
    assert not [f.name for f in out.iterdir() if f.suffix in tr.PICKLE_SUFFIXES or f.name.endswith(".tmp")]
    # resuming finishes the run
    r = run_dsv3(*train_argv(corpus, out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / tr.STATE_JSON).read_text())["step"] == 2


def test_a_save_cut_between_renames_is_detected(corpus, tmp_path):
    """trainer_state.json from another step than the tensor files (a save killed between two renames)."""
    out = tmp_path / "run"
    assert run_dsv3(*train_argv(corpus, out, "--stop-after", "1")).returncode == 0
    doc = json.loads((out / tr.STATE_JSON).read_text())
    (out / tr.STATE_JSON).write_text(json.dumps({**doc, "step": 0}))
    before = tree_digest(out)
    assert_user_error(run_dsv3(*train_argv(corpus, out)), tr.STATE_TENSORS, "from step 1", "step 0", "cut short")
    assert tree_digest(out) == before


# ---------------------------------------------------------------------- bad arguments: one line, nothing on disk
BAD_ARGS = [
    (["--lr", "-1"], ["--lr", "> 0"]),
    (["--lr", "nan"], ["--lr nan", "finite"]),
    (["--lr", "inf"], ["--lr inf", "finite"]),
    (["--min-lr", "-1"], ["--min-lr", ">= 0"]),
    (["--min-lr", "nan"], ["--min-lr nan", "finite"]),
    (["--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    (["--seq-len", "0"], ["--seq-len 0", ">= 1"]),
    (["--seq-len", "100000"], ["--seq-len 100000", "max_seq_len"]),
    (["--steps", "-3"], ["--steps -3", ">= 1"]),
    (["--steps", "0"], ["--steps 0", ">= 1"]),
    (["--steps", "abc"], ["--steps", "invalid int value"]),
    (["--warmup", "-1"], ["--warmup -1", ">= 0"]),
    (["--weight-decay", "-0.1"], ["--weight-decay", ">= 0"]),
    (["--grad-clip", "0"], ["--grad-clip", "> 0"]),
    (["--grad-clip", "-1"], ["--grad-clip", "> 0"]),
    (["--mtp-lambda", "-1"], ["--mtp-lambda", ">= 0"]),
    (["--mtp-lambda", "nan"], ["--mtp-lambda nan", "finite"]),
    (["--bias-gamma", "-0.001"], ["--bias-gamma", ">= 0"]),
    (["--balance-alpha", "-1"], ["--balance-alpha", ">= 0"]),
    (["--eval-every", "0"], ["--eval-every 0", ">= 1"]),
    (["--eval-windows", "0"], ["--eval-windows 0", ">= 1"]),
    (["--save-every", "0"], ["--save-every 0", ">= 1"]),
    (["--threads", "0"], ["--threads 0", ">= 1"]),
    (["--time-limit", "0"], ["--time-limit", "> 0"]),
    (["--time-limit", "-5"], ["--time-limit", "> 0"]),
    (["--stop-after", "0"], ["--stop-after 0", ">= 1"]),
    (["--vocab-size", "100"], ["--vocab-size 100", f"{tr.MIN_VOCAB}..{tr.MAX_VOCAB}"]),
    (["--seed", "-1"], ["--seed -1", f"0..{2**63 - 1}"]),
    (["--seed", str(2**63)], [f"--seed {2**63}", f"0..{2**63 - 1}"]),
    (["--dtype", "fp16"], ["--dtype", "invalid choice"]),
    (["--set", "n_layers=abc"], ["--set n_layers=abc", "n_layers expects an integer"]),
    (["--set", "route_scale=inf"], ["route_scale expects a finite number"]),
    (["--set", "gate_bias=maybe"], ["gate_bias expects a boolean"]),
    (["--set", "score_func=relu"], ["score_func expects one of", "softmax", "sigmoid"]),
    (["--set", "bogus=1"], ["--set bogus", "not a ModelArgs field"]),
    (["--set", "n_layers"], ["--set 'n_layers'", "FIELD=VALUE"]),
    (["--set", "n_heads=0"], ["n_heads must be a positive integer"]),
    (["--data", "/no/such/corpus"], ["--data /no/such/corpus", "not a directory"]),
    (["--config", "/no/such/config.json"], ["/no/such/config.json"]),
]


@pytest.mark.parametrize("extra,needles", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_argument_is_refused_before_any_work(extra, needles, corpus, tmp_path):
    before = tree_digest(tmp_path)
    assert_user_error(run_dsv3(*train_argv(corpus, tmp_path / "run", *extra)), *needles)
    assert tree_digest(tmp_path) == before and not (tmp_path / "run").exists()


def _state_doc(steps):
    return json.dumps({"format": tr.STATE_FORMAT, "step": 1, "steps": steps, "seed": 0, "log": [], "optimizer": {}})


# --out cases: setup(out) plants something, then (needles)
BAD_OUT = {
    "a plain file": (lambda out: out.write_text("x"), ["--out", "exists and is not a directory"]),
    "under a plain file": (lambda out: out.parent.write_text("x"), ["is not a directory"]),
    "someone else's checkpoint": (lambda out: out.mkdir() or (out / "config.json").write_text("{}"),
                                  ["holds a checkpoint but no trainer_state.json"]),
    "someone else's weights": (lambda out: out.mkdir() or (out / "model.safetensors").write_bytes(b"x"),
                               ["holds a checkpoint but no trainer_state.json"]),
    "a state from other --steps": (lambda out: out.mkdir() or (out / tr.STATE_JSON).write_text(_state_doc(9)),
                                   ["--steps 9", "resume with the same values"]),
    "a corrupt trainer_state.json": (lambda out: out.mkdir() or (out / tr.STATE_JSON).write_text("{oops"),
                                     [tr.STATE_JSON, "not a readable trainer state"]),
    "a trainer_state.json of another format": (lambda out: out.mkdir() or (out / tr.STATE_JSON).write_text("[]"),
                                               [tr.STATE_JSON, "not a dsv3 trainer state"]),
    "a state without its tensors": (lambda out: out.mkdir() or (out / tr.STATE_JSON).write_text(_state_doc(2)),
                                    [tr.STATE_TENSORS, "incomplete"]),
}


@pytest.mark.parametrize("case", list(BAD_OUT))
def test_bad_out_is_refused_before_any_work(case, corpus, tmp_path):
    setup, needles = BAD_OUT[case]
    out = tmp_path / "f" / "run" if case == "under a plain file" else tmp_path / "run"
    setup(out)
    before = tree_digest(tmp_path)
    assert_user_error(run_dsv3(*train_argv(corpus, out)), *needles)
    assert tree_digest(tmp_path) == before


def test_check_args_is_callable_and_creates_nothing(corpus, tmp_path):
    p = argparse.ArgumentParser()
    train.add_args(p)
    ns = p.parse_args(train_argv(corpus, tmp_path / "a" / "run")[1:])
    assert tr.check_args(ns) is None  # valid, fresh
    ns.grad_clip = 0.0
    with pytest.raises(UsageError, match="--grad-clip"):
        tr.check_args(ns)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "convert"])
def test_every_option_states_its_default_in_its_own_help(command):
    """The help strings themselves (not only the formatter's suffix) say the default, or that there is none."""
    from dsv3.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.dest}: no help"
        if action.option_strings and action.default not in (None, False) or action.required and action.option_strings:
            assert "default" in action.help, f"{command} {action.option_strings[0]}: {action.help!r}"
        if action.option_strings and action.default not in (None, False, []):
            assert "%(default)s" in action.help or str(action.default) in action.help or "default:" in action.help
