"""The bad-input matrix: every command, in a real process, given ordinary mistakes and hostile files.

Each case asserts the exit code, exactly one line on stderr naming the flag / file / tensor,
no traceback, and that the files involved are unchanged afterwards (the bundled model and
every input byte-identical, nothing left behind). Cases for convert, train and torchrun
live beside their commands' other tests (test_convert.py, test_train*.py, test_parallel*.py),
with the same helpers (tests/cli_run.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_run import assert_user_error, cli_env, run_dsv3, tree_digest
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.testing import tiny_hf_args, write_checkpoint

BUNDLED = Path(dsv3.__file__).resolve().parent / "assets" / "dsv3-tiny"
SEED_TOO_BIG = str(2**63)

# (argv, stdin or None, needles in the one stderr line); "{tmp}" is a fresh empty directory per case
MATRIX: dict[str, tuple[list[str], str | bytes | None, tuple[str, ...]]] = {
    # generate: sampling and model options
    "generate seed 2^63": (["generate", "x", "--seed", SEED_TOO_BIG], None, ("--seed", "[0, 2^63)")),
    "generate seed < 0": (["generate", "x", "--seed", "-1"], None, ("--seed", "[0, 2^63)")),
    "generate seed not int": (["generate", "x", "--seed", "abc"], None, ("--seed", "integer")),
    "generate temperature inf": (["generate", "x", "--temperature", "inf"], None, ("--temperature", "finite")),
    "generate temperature nan": (["generate", "x", "--temperature", "nan"], None, ("--temperature", "finite")),
    "generate temperature < 0": (["generate", "x", "--temperature", "-1"], None, ("--temperature", ">= 0")),
    "generate top-p 0": (["generate", "x", "--top-p", "0"], None, ("--top-p", "(0, 1]")),
    "generate top-p nan": (["generate", "x", "--top-p", "nan"], None, ("--top-p", "(0, 1]")),
    "generate top-k < 0": (["generate", "x", "--top-k", "-1"], None, ("--top-k", ">= 0")),
    "generate max-new-tokens < 0": (["generate", "x", "--max-new-tokens", "-1"], None, ("--max-new-tokens",)),
    "generate max-seq-len 0": (["generate", "x", "--max-seq-len", "0"], None, ("--max-seq-len", ">= 1")),
    "generate device meta": (["generate", "x", "--device", "meta"], None, ("--device", "cpu, cuda or cuda:N")),
    "generate device gpu": (["generate", "x", "--device", "gpu"], None, ("--device",)),
    "generate dtype fp16": (["generate", "x", "--dtype", "fp16"], None, ("--dtype", "invalid choice")),
    "generate unknown flag": (["generate", "x", "--temprature", "1"], None, ("unrecognized arguments", "--temprature")),
    "generate cuda-graph on cpu": (["generate", "x", "--cuda-graph", "--device", "cpu"], None, ("--cuda-graph", "CUDA")),
    "generate mtp + compile": (["generate", "x", "--mtp", "--compile"], None, ("--mtp", "--compile")),
    # generate: prompts
    "generate no prompt": (["generate"], None, ("no prompt",)),
    "generate two prompt sources": (["generate", "x", "--prompt-ids", "1,2"], None, ("one way",)),
    "generate bad prompt ids": (["generate", "--prompt-ids", "1,x"], None, ("--prompt-ids", "integers")),
    "generate id outside vocab": (["generate", "--prompt-ids", "1,999999"], None, ("outside the vocabulary",)),
    "generate blank prompt": (["generate", "   "], None, ("prompt 0 is empty",)),
    "generate prompt too long": (["generate", "x", "--max-new-tokens", "100000"], None, ("max_seq_len",)),
    "generate input-file missing": (["generate", "--input-file", "{tmp}/none.txt"], None, ("--input-file", "no such file")),
    "generate input-file binary": (["generate", "--input-file", "{tmp}/binary.txt"], None, ("--input-file", "utf-8")),
    "generate input-file bad jsonl": (["generate", "--input-file", "{tmp}/bad.jsonl"], None, ("line 2", "expected")),
    # generate: outputs (checked before the model loads)
    "generate output dir missing": (["generate", "x", "--output", "{tmp}/no/out.jsonl"], None,
                                    ("--output", "does not exist")),
    "generate output is a dir": (["generate", "x", "--output", "{tmp}"], None, ("--output", "is a directory")),
    "generate output parent is a file": (["generate", "x", "--output", "{tmp}/binary.txt/o.jsonl"], None,
                                         ("--output", "not a directory")),
    # generate: checkpoints and memory
    "generate ckpt missing": (["generate", "x", "--ckpt", "{tmp}/nothing"], None, ("nothing", "no such directory")),
    "generate ckpt is a file": (["generate", "x", "--ckpt", "{tmp}/binary.txt"], None, ("not a directory",)),
    "generate ckpt empty dir": (["generate", "x", "--ckpt", "{tmp}"], None, ("no config.json",)),
    "generate preset unknown": (["generate", "--preset", "huge", "--prompt-ids", "1"], None, ("unknown preset",)),
    "generate preset 671B too big": (["generate", "--preset", "671B", "--prompt-ids", "1"], None,
                                     ("--preset 671B needs", "GB available")),
    "generate cache too big": (["generate", "x", "--max-seq-len", "900000000", "--max-new-tokens", "800000000"], None,
                               ("the cache", "GB available")),
    # chat
    "chat binary stdin": (["chat", "--max-new-tokens", "2"], b"\xff\xfe\x00\n", ("line 1", "UTF-8")),
    "chat preset": (["chat", "--preset", "tiny"], "hi\n", ("chat needs a tokenizer",)),
    "chat seed 2^64": (["chat", "--seed", str(2**64)], "hi\n", ("--seed",)),
    "chat top-p 2": (["chat", "--top-p", "2"], "hi\n", ("--top-p",)),
    "chat ckpt missing": (["chat", "--ckpt", "{tmp}/nothing"], "hi\n", ("no such directory",)),
    # bench
    "bench mtp new 0": (["bench", "mtp", "--new", "0"], None, ("--new", ">= 1")),
    "bench mtp prompts 0": (["bench", "mtp", "--prompts", "0"], None, ("--prompts", "[1, 8]")),
    "bench mtp prompts 9": (["bench", "mtp", "--prompts", "9"], None, ("--prompts", "[1, 8]")),
    "bench mtp batch 0": (["bench", "mtp", "--batch", "0"], None, ("--batch",)),
    "bench mtp repeats 0": (["bench", "mtp", "--repeats", "0"], None, ("--repeats",)),
    "bench mtp threads 0": (["bench", "mtp", "--threads", "0"], None, ("--threads",)),
    "bench mtp ckpt missing": (["bench", "mtp", "--ckpt", "{tmp}/nothing"], None, ("no config.json",)),
    "bench decode batch 0": (["bench", "decode", "--batch", "0"], None, ("--batch", ">= 1")),
    "bench decode batch list": (["bench", "decode", "--batch", "1,x"], None, ("--batch",)),
    "bench decode new -1": (["bench", "decode", "--new", "-1"], None, ("--new",)),
    "bench decode repeats 0": (["bench", "decode", "--repeats", "0"], None, ("--repeats",)),
    "bench decode attn": (["bench", "decode", "--attn", "flash"], None, ("--attn",)),
    "bench decode plot dir missing": (["bench", "decode", "--plot", "{tmp}/no/p.png"], None, ("--plot", "does not exist")),
    "bench decode hbm inf": (["bench", "decode", "--hbm-gb-s", "inf"], None, ("--hbm-gb-s", "finite")),
    "bench kernels json-out dir missing": (["bench", "kernels", "--quick", "--json-out", "{tmp}/no/k.json"], None,
                                           ("--json-out", "does not exist")),
    "bench kernels m 0": (["bench", "kernels", "--quick", "--m", "0"], None, ("--m",)),
    "bench kernels rep-ms nan": (["bench", "kernels", "--rep-ms", "nan"], None, ("--rep-ms",)),
    "bench serve concurrency 0": (["bench", "serve", "--concurrency", "1,0"], None, ("--concurrency", ">= 1")),
    "bench serve engines twice": (["bench", "serve", "--engines", "dsv3,dsv3"], None, ("--engines",)),
    "bench serve cache-gb 0": (["bench", "serve", "--cache-gb", "0"], None, ("--cache-gb",)),
    "bench serve ckpt missing": (["bench", "serve", "--ckpt", "{tmp}/nothing"], None, ("--ckpt", "no config.json")),
    "bench unknown": (["bench", "speed"], None, ("invalid choice", "speed")),
    # plan, info, top level
    "plan gpus 0": (["plan", "671B", "--gpus", "0", "--gpu-mem-gb", "80"], None, ("--gpus", ">= 1")),
    "plan gpu-mem inf": (["plan", "671B", "--gpus", "8", "--gpu-mem-gb", "inf"], None, ("--gpu-mem-gb", "finite")),
    "plan gpu-mem < 0": (["plan", "671B", "--gpus", "8", "--gpu-mem-gb", "-80"], None, ("--gpu-mem-gb", "> 0")),
    "plan batch 0": (["plan", "671B", "--gpus", "8", "--gpu-mem-gb", "80", "--batch", "0"], None, ("--batch",)),
    "plan missing gpus": (["plan", "671B", "--gpu-mem-gb", "80"], None, ("--gpus", "required")),
    "plan unknown config": (["plan", "huge", "--gpus", "8", "--gpu-mem-gb", "80"], None, ("huge",)),
    "info unknown": (["info", "huge"], None, ("neither a preset",)),
    "info malformed json": (["info", "{tmp}/bad.json"], None, ("bad.json",)),
    "info binary file": (["info", "{tmp}/binary.txt"], None, ("binary.txt",)),
    "no command": ([], None, ("COMMAND", "required")),
    "unknown command": (["serve-me"], None, ("invalid choice",)),
    "non-UTF-8 argument": (["generate", "caf\udce9"], None, ("not valid UTF-8",)),
}


def _inputs(tmp: Path) -> None:
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text\n")
    (tmp / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    (tmp / "bad.json").write_text('{"hidden_size": 7168,')


@pytest.fixture(scope="module")
def bundled_digest():
    return tree_digest(BUNDLED)


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_input(case, tmp_path, bundled_digest):
    argv, stdin, needles = MATRIX[case]
    _inputs(tmp_path)
    before = tree_digest(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    p = run_dsv3(*argv, stdin=stdin)
    assert_user_error(p, *needles)
    assert p.stdout == "", p.stdout
    assert tree_digest(tmp_path) == before, "the command left files behind or changed its inputs"
    assert tree_digest(BUNDLED) == bundled_digest


def test_the_matrix_is_large():
    assert len(MATRIX) >= 60


# ---------------------------------------------------------------------- streams
def test_closed_stdout_from_the_shell():
    p = subprocess.run(f"'{sys.executable}' -m dsv3.cli info tiny >&-", shell=True, stderr=subprocess.PIPE, text=True,
                       env=cli_env(), timeout=120)
    assert p.returncode == 2 and "standard output is closed" in p.stderr and "Traceback" not in p.stderr


def test_full_stdout():
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "dsv3.cli", "generate", "ROMEO:", "--max-new-tokens", "4"], stdout=full,
                           stderr=subprocess.PIPE, text=True, env=cli_env(), timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
    assert p.stderr.strip() == "dsv3 generate: error: cannot write to standard output (No space left on device)"


def test_pipe_closed_by_reader_is_quiet():
    p = subprocess.run(f"'{sys.executable}' -m dsv3.cli generate ROMEO: --max-new-tokens 100 | head -c 3", shell=True,
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_closed_stdin_for_chat():
    p = subprocess.run(f"'{sys.executable}' -m dsv3.cli chat <&-", shell=True, capture_output=True, text=True,
                       env=cli_env(), timeout=120)
    assert_user_error(p, "standard input is closed")


def test_output_full_device_keeps_the_result():
    p = run_dsv3("generate", "ROMEO:", "--max-new-tokens", "4", "--output", "/dev/full")
    assert_user_error(p, "--output /dev/full", "No space left", "written to standard output instead")
    row = json.loads(p.stdout)
    assert row["prompt"] == "ROMEO:" and len(row["tokens"]) == 4


# ---------------------------------------------------------------------- hostile weights
def _rewrite(ckpt: Path, name: str, fn) -> None:
    """Apply fn to tensor `name` in its shard (the index says which)."""
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def bf16_tok(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bad") / "bf16", tiny_hf_args(dtype="bf16"), tokenizer=True, seed=3)


def _nan_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def test_nan_weights_stop_generation_naming_the_position(bf16_tok, copy_ckpt):
    ckpt = copy_ckpt(bf16_tok)
    _rewrite(ckpt, "model.norm.weight", _nan_at)
    before = tree_digest(ckpt)
    p = run_dsv3("generate", "--ckpt", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "4")
    assert_user_error(p, "non-finite logits", "position 3", "--check-weights")
    p = run_dsv3("generate", "--ckpt", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--mtp")
    assert_user_error(p, "non-finite logits")
    p = run_dsv3("generate", "--ckpt", str(ckpt), "--prompt-ids", "1,2,3", "--check-weights")
    assert_user_error(p, "model.norm.weight", "NaN/Inf")
    assert tree_digest(ckpt) == before


def test_nan_in_both_embedding_copies_names_the_tensor(bf16_tok, copy_ckpt):
    ckpt = copy_ckpt(bf16_tok)
    args = tiny_hf_args(dtype="bf16")
    _rewrite(ckpt, "model.embed_tokens.weight", _nan_at)
    _rewrite(ckpt, f"model.layers.{args.n_layers}.embed_tokens.weight", _nan_at)
    p = run_dsv3("generate", "--ckpt", str(ckpt), "--prompt-ids", "1,2,3")
    line = assert_user_error(p, "model.embed_tokens.weight holds NaN/Inf")
    assert "differs" not in line


@pytest.mark.parametrize("odd", [torch.float16, torch.float32, torch.float64])
def test_a_stray_float_dtype_is_cast_at_load(odd, bf16_tok, copy_ckpt):
    """One tensor stored in another float dtype loads into the model's one compute dtype and gives the same logits
    (bf16 values are exact in float16/32/64, so the round trip is exact)."""
    ckpt = copy_ckpt(bf16_tok)
    for name in ("model.norm.weight", "model.layers.1.self_attn.kv_a_layernorm.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        _rewrite(ckpt, name, lambda t: t.to(odd))
    ref = dsv3.load_model(bf16_tok)
    got = dsv3.load_model(ckpt)
    assert {p.dtype for n, p in got.named_parameters() if not n.endswith(("gate.bias", ".scale"))} == {torch.bfloat16}
    x = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(got(x), ref(x))


@pytest.mark.distributed
@pytest.mark.slow
def test_a_stray_float_dtype_under_torchrun_is_cast_too(bf16_tok, copy_ckpt):
    """Under torchrun each rank casts the stray tensor back to bf16 (an exact round trip), so 2 ranks give what
    2 ranks give on the all-bf16 checkpoint (bf16 partial sums make 2 ranks differ from 1 process slightly)."""
    ckpt = copy_ckpt(bf16_tok)
    _rewrite(ckpt, "model.layers.0.mlp.down_proj.weight", lambda t: t.to(torch.float32))  # a sharded tensor

    def two_ranks(path: Path) -> dict:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "dsv3.generate", "--ckpt", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                            "--json"], capture_output=True, text=True, timeout=300,
                           env=cli_env(DSV3_DIST_BACKEND="gloo", DSV3_DIST_TIMEOUT="60"))
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    assert two_ranks(ckpt) == two_ranks(bf16_tok)
