"""The `dsv3` command: user mistakes exit 2 with one line on stderr and no traceback; generate works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.cli import build_parser, main
from dsv3.config import ModelArgs
from dsv3.model import Transformer

ROOT = Path(__file__).resolve().parents[1]

BAD = [
    (["info", "huge"], "neither a preset"),
    (["info", "/no/such/config.json"], "neither a preset"),
    (["generate", "--preset", "huge", "--prompt-ids", "1,2"], "unknown preset 'huge'"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,x,3"], "--prompt-ids '1,x,3'"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,-2"], "outside the vocabulary"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,2", "--temperature", "-1"], "--temperature"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,2", "--top-p", "0"], "--top-p"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,2", "--top-k", "-3"], "--top-k"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,2", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,2", "--max-new-tokens", "1000"], "max_seq_len"),
    (["generate", "--preset", "tiny"], "no prompt"),
    (["generate", "--ckpt", "/no/such/dir", "--prompt-ids", "1,2"], "/no/such/dir"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_user_errors_exit_2_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dsv3 {argv[0]}: error: "), err
    assert needle in err


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "dsv3.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def test_error_in_a_real_process_has_no_traceback():
    r = _run("generate", "--preset", "tiny", "--prompt-ids", "1,2", "--temperature", "-0.5")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "argument --temperature: expected a finite number >= 0" in r.stderr


def test_generate_json_matches_the_library():
    r = _run("generate", "--preset", "tiny", "--prompt-ids", "1,2,3", "--prompt-ids", "7",
             "--max-new-tokens", "5", "--json", "--seed", "3")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["tokens"]
    torch.manual_seed(3)  # what `--preset` does: random weights from the seed
    model = Transformer(ModelArgs.preset("tiny")).eval()
    assert got == dsv3.generate(model, [[1, 2, 3], [7]], 5, seed=3)
    assert [len(t) for t in got] == [5, 5]


def test_generate_from_checkpoint(tmp_path, capsys):
    """`--ckpt` goes through load_model: a transformers-saved tiny checkpoint generates the library's tokens."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(**ModelArgs.preset("tiny").to_hf_config(), attn_implementation="eager",
                                        experts_implementation="eager")
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(tmp_path)
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt-ids", "4,5,6", "--max-new-tokens", "3",
                 "--json", "--dtype", "float32"]) == 0
    got = json.loads(capsys.readouterr().out)["tokens"]
    assert got == dsv3.generate(dsv3.load_model(tmp_path, dtype=torch.float32), [[4, 5, 6]], 3)


def _commands(parser, path=()):
    """(argv path, parser) for every command and sub-benchmark."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = [path for path, _ in _commands(build_parser()) if path]


def test_every_command_is_offered():
    assert {p[0] for p in COMMANDS} == {"info", "generate", "chat", "convert", "plan", "train", "bench", "serve"}
    assert {p[1] for p in COMMANDS if len(p) == 2} == {"kernels", "decode", "mtp", "serve", "slice"}


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_for_every_command(path, capsys):
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dsv3 " + " ".join(path))
    assert "Notes:" not in out  # developer notes stay in the docstring


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_option_has_help_and_its_default(path):
    import argparse

    parser = dict(_commands(build_parser()))[path]
    fmt = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"dsv3 {' '.join(path)} {action.dest}: no help text"
        shown = fmt._expand_help(action)
        if action.option_strings and action.default not in (None, False, "", (), []) and not action.required:
            assert "default" in shown, f"dsv3 {' '.join(path)} {action.option_strings[0]}: help does not give the default"
