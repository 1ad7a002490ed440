"""`dsv3 generate` / `dsv3 chat` / `python -m dsv3.generate` on synthetic checkpoints: outputs equal the
library's, streaming, files and JSON, the bundled default, and one test per bad input (exit 2, one line)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import checkpoint as ck
from dsv3.chat_format import chat_format_for
from dsv3.cli import main
from dsv3.testing import run_cli
from dsv3.tokenizer import Tokenizer


def _expected(ckpt, prompts, n, **kw):
    """What the library generates (greedy unless kw says otherwise), decoded."""
    tok = Tokenizer.from_dir(ckpt)
    model = dsv3.load_model(ckpt)
    ids = [tok.encode(p) if isinstance(p, str) else p for p in prompts]
    out = dsv3.generate(model, ids, n, eos_id=tok.eos_id, **kw)
    return out, [tok.decode(o) for o in out]


def test_text_prompt_streams_the_library_output(fp8_ckpt):
    r = run_cli("generate", "--ckpt", fp8_ckpt, "Hello, how are", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    _, text = _expected(fp8_ckpt, ["Hello, how are"], 12)
    assert r.stdout == text[0] + "\n"
    assert r.stderr == ""  # no progress bar when stderr is not a terminal


def test_streaming_writes_tokens_as_they_come(fp8_ckpt, capsys, monkeypatch):
    """Each piece is written while generation is still running: every write is tagged with the number of
    model forwards done so far, and the text arrives spread over the decode steps, not in one final print."""
    import sys

    from dsv3.model import Transformer

    forwards, writes = [0], []
    real_forward = Transformer.forward

    def counting_forward(self, *a, **kw):
        forwards[0] += 1
        return real_forward(self, *a, **kw)

    monkeypatch.setattr(Transformer, "forward", counting_forward)
    monkeypatch.setattr(sys.stdout, "write", lambda s: writes.append((forwards[0], s)) or len(s))
    assert main(["generate", "--ckpt", str(fp8_ckpt), "Once upon a time", "--max-new-tokens", "8"]) == 0
    total = forwards[0]
    out, text = _expected(fp8_ckpt, ["Once upon a time"], 8)
    assert "".join(s for _, s in writes) == text[0] + "\n"
    assert len(out[0]) == 8 and total == 8  # prefill + 7 decode steps (the last token needs no forward)
    steps = {n for n, s in writes if s.strip()}
    assert len(steps) >= 4, writes  # text written after at least 4 different steps
    assert min(steps) < total / 2, writes  # the first words came out early


def test_json_two_prompts_and_sampling(fp8_ckpt, capsys):
    assert main(["generate", "--ckpt", str(fp8_ckpt), "Hello", "What is the capital", "--max-new-tokens", "6", "--json",
                 "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "7"]) == 0
    stdout = capsys.readouterr().out
    got = json.loads(stdout)
    tokens, text = _expected(fp8_ckpt, ["Hello", "What is the capital"], 6, temperature=0.8, top_p=0.9, top_k=20,
                             seed=7)
    assert got == {"tokens": tokens, "text": text}
    assert stdout.count("\n") == 1


@pytest.mark.slow
def test_python_m_dsv3_generate_is_the_same_command(fp8_ckpt):
    args = ["--ckpt", fp8_ckpt, "Hello", "--max-new-tokens", "5", "--json"]
    a = run_cli(*args, module="dsv3.generate")
    b = run_cli("generate", *args)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and json.loads(a.stdout)["tokens"]


def test_input_file_text_and_jsonl_with_output(fp8_ckpt, tmp_path, capsys):
    txt = tmp_path / "p.txt"
    txt.write_text("Hello\n\nTell me a story\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--ckpt", str(fp8_ckpt), "--input-file", str(txt), "--output", str(out),
                 "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokens, text = _expected(fp8_ckpt, ["Hello", "Tell me a story"], 5)
    assert [r["prompt"] for r in rows] == ["Hello", "Tell me a story"]
    assert [r["tokens"] for r in rows] == tokens and [r["text"] for r in rows] == text
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps({"prompt_ids": [5, 17, 300]}) + "\n")
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(fp8_ckpt), "--input-file", str(jl), "--json", "--max-new-tokens", "5"]) == 0
    tok = Tokenizer.from_dir(fp8_ckpt)
    tokens, _ = _expected(fp8_ckpt, [tok.encode("Hello"), [5, 17, 300]], 5)
    assert json.loads(capsys.readouterr().out)["tokens"] == tokens


def test_prompt_ids_without_tokenizer(fp8_ckpt, tmp_path, capsys):
    p = tmp_path / "notok"
    shutil.copytree(fp8_ckpt, p)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (p / f).unlink()
    assert main(["generate", "--ckpt", str(p), "--prompt-ids", "5,17,300", "--max-new-tokens", "4"]) == 0
    want = dsv3.generate(dsv3.load_model(p), [[5, 17, 300]], 4, eos_id=1)  # eos from generation_config.json
    assert capsys.readouterr().out.split() == [str(t) for t in want[0]]
    assert main(["generate", "--ckpt", str(p), "--prompt-ids", "5,17,300", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tokens": want, "text": [None]}


def test_dtype_device_max_seq_len(fp8_ckpt, capsys):
    assert main(["generate", "--ckpt", str(fp8_ckpt), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json",
                 "--dtype", "fp32", "--device", "cpu", "--max-seq-len", "7"]) == 0
    got = json.loads(capsys.readouterr().out)["tokens"]
    model = dsv3.load_model(fp8_ckpt, dtype=torch.float32, max_seq_len=7)
    assert got == dsv3.generate(model, [[5, 6, 7]], 4, eos_id=1)


def test_bundled_model_is_the_default(fp8_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ck, "BUNDLED_MODEL_DIR", tmp_path / "absent")
    assert main(["generate", "Hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no --ckpt given and the bundled model" in err and str(tmp_path / "absent") in err
    monkeypatch.setattr(ck, "BUNDLED_MODEL_DIR", fp8_ckpt)
    assert main(["generate", "Hello", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == _expected(fp8_ckpt, ["Hello"], 3)[0]


def test_preset_still_works(capsys):
    assert main(["generate", "--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"][0]) == 3


# ---------------------------------------------------------------------- chat
def test_chat_multi_turn_clear_exit(fp8_ckpt):
    r = run_cli("chat", "--ckpt", fp8_ckpt, "--max-new-tokens", "6",
                input="Hello, how are you?\nTell me a story\n/clear\nHello, how are you?\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.from_dir(fp8_ckpt)
    model = dsv3.load_model(fp8_ckpt)

    def reply(messages):
        return chat_reply(tok, model, messages, 6)

    m = [{"role": "user", "content": "Hello, how are you?"}]
    r1 = reply(m)
    m += [{"role": "assistant", "content": r1}, {"role": "user", "content": "Tell me a story"}]
    r2 = reply(m)
    assert r.stdout == f"{r1}\n{r2}\n{r1}\n"  # after /clear the first turn again; nothing after /exit
    assert "[conversation cleared]" in r.stderr


def test_chat_with_system_prompt(fp8_ckpt):
    r = run_cli("chat", "--ckpt", fp8_ckpt, "--max-new-tokens", "4", "--system", "Be brief.", input="Hi\n")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.from_dir(fp8_ckpt)
    want = chat_reply(tok, dsv3.load_model(fp8_ckpt),
                      [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], 4)
    assert r.stdout == want + "\n"


def chat_reply(tok, model, messages, n, **sampling):
    """What `dsv3 chat` prints for one turn: the library's tokens for the chat format's prompt, parsed."""
    fmt = chat_format_for(tok)
    ids = tok.encode(fmt.render(messages), add_bos=False)
    new = dsv3.generate(model, [ids], n, eos_id=tok.eos_id, **sampling)[0]
    return fmt.parse(tok.decode(new, skip_special_tokens=False)).content


def test_chat_needs_a_tokenizer(capsys):
    assert main(["chat", "--preset", "tiny"]) == 2
    assert "chat needs a tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------- bad input: exit 2, one line
def _corrupt(fp8_ckpt, tmp_path, how):
    p = tmp_path / "c"
    shutil.copytree(fp8_ckpt, p)
    index = json.loads((p / "model.safetensors.index.json").read_text())["weight_map"]
    if how == "missing shard":
        (p / "model-00002-of-00003.safetensors").unlink()
    elif how == "truncated":
        f = p / "model-00003-of-00003.safetensors"
        f.write_bytes(f.read_bytes()[:-500])
    elif how == "corrupted":
        f = p / "model-00001-of-00003.safetensors"
        b = bytearray(f.read_bytes())
        b[8:16] = b"\x00\xff\x00\xff\x00\xff\x00\xff"
        f.write_bytes(bytes(b))
    elif how in ("shape", "dtype"):
        n = "model.layers.0.self_attn.kv_b_proj.weight"
        f = p / index[n]
        d = load_file(f)
        d[n] = d[n][:-1].clone() if how == "shape" else d[n].bfloat16()
        save_file(d, f, metadata={"format": "pt"})
    elif how == "malformed config":
        (p / "config.json").write_text("{oops")
    elif how == "unsupported config":
        cfg = json.loads((p / "config.json").read_text())
        cfg["hidden_act"] = "gelu"
        (p / "config.json").write_text(json.dumps(cfg))
    return p


BAD_CKPT = {
    "missing shard": "shard file(s) listed in the index are missing: model-00002-of-00003.safetensors",
    "truncated": "model-00003-of-00003.safetensors: truncated",
    "corrupted": "model-00001-of-00003.safetensors: corrupted safetensors header",
    "shape": "kv_b_proj.weight in model-00001-of-00003.safetensors has shape [127, 144], expected [128, 144]",
    "dtype": "kv_b_proj.weight in model-00001-of-00003.safetensors is bfloat16, expected float8_e4m3fn",
    "malformed config": "config.json: not valid JSON",
    "unsupported config": "hidden_act 'gelu' unsupported",
}


def _one_line_error(argv, capsys, needle):
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith(f"dsv3 {argv[0]}: error: "), err
    assert needle in err, err
    assert "Traceback" not in err and captured.out == ""


@pytest.mark.parametrize("how", list(BAD_CKPT))
def test_bad_checkpoint(how, fp8_ckpt, tmp_path, capsys):
    p = _corrupt(fp8_ckpt, tmp_path, how)
    _one_line_error(["generate", "--ckpt", p, "Hello"], capsys, BAD_CKPT[how])


def test_missing_directory(tmp_path, capsys):
    _one_line_error(["generate", "--ckpt", tmp_path / "nope", "Hello"], capsys, f"{tmp_path / 'nope'}: no such directory")


def test_file_instead_of_directory(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    _one_line_error(["generate", "--ckpt", tmp_path / "f", "Hello"], capsys, "not a directory")


def test_unreadable_directory(fp8_ckpt, tmp_path, capsys, monkeypatch):
    """Permissions are not enforced for root (the CI user here), so the OS answer is simulated."""
    import os

    real = os.access
    monkeypatch.setattr(ck.os, "access", lambda p, mode: False if str(p) == str(fp8_ckpt) else real(p, mode))
    _one_line_error(["generate", "--ckpt", fp8_ckpt, "Hello"], capsys, f"{fp8_ckpt}: directory is not readable")


def test_cuda_device_without_cuda(fp8_ckpt, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _one_line_error(["generate", "--ckpt", fp8_ckpt, "Hello", "--device", "cuda"], capsys,
                    "--device cuda: CUDA is not available")


BAD_ARGS = {
    "prompt too long": (["--max-seq-len", "10", "--prompt-ids", "1,2,3,4,5,6,7,8", "--max-new-tokens", "5"],
                        "exceeds max_seq_len 10 by 3"),
    "token id outside vocabulary": (["--prompt-ids", "5,320"], "token id(s) [320] outside the vocabulary [0, 320)"),
    "negative token id": (["--prompt-ids", "5,-1"], "outside the vocabulary"),
    "empty prompt": ([""], "prompt 0 is empty"),
    "blank prompt": (["   "], "prompt 0 is empty"),
    "temperature < 0": (["Hello", "--temperature", "-0.1"], "argument --temperature: expected a finite number >= 0, got -0.1"),
    "top-p 0": (["Hello", "--top-p", "0"], "argument --top-p: expected a finite number in (0, 1], got 0"),
    "top-p > 1": (["Hello", "--top-p", "1.5"], "argument --top-p: expected a finite number in (0, 1], got 1.5"),
    "top-k < 0": (["Hello", "--top-k", "-1"], "argument --top-k: expected an integer >= 0, got -1"),
    "bad prompt ids": (["--prompt-ids", "1,a"], "--prompt-ids '1,a': expected comma-separated integers"),
    "two prompt sources": (["Hello", "--prompt-ids", "1,2"], "give prompts one way"),
    "no prompt": ([], "no prompt"),
    "missing input file": (["--input-file", "/no/such/prompts.txt"], "--input-file /no/such/prompts.txt: no such file"),
    "negative max-new-tokens": (["Hello", "--max-new-tokens", "-2"], "argument --max-new-tokens: expected an integer >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments(case, fp8_ckpt, capsys):
    extra, needle = BAD_ARGS[case]
    _one_line_error(["generate", "--ckpt", fp8_ckpt, *extra], capsys, needle)


def test_bad_jsonl_line(fp8_ckpt, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    _one_line_error(["generate", "--ckpt", fp8_ckpt, "--input-file", f], capsys, "p.jsonl, line 2: expected")


def test_text_prompt_without_tokenizer(fp8_ckpt, tmp_path, capsys):
    p = tmp_path / "notok"
    shutil.copytree(fp8_ckpt, p)
    (p / "tokenizer.json").unlink()
    _one_line_error(["generate", "--ckpt", p, "Hello"], capsys, "no tokenizer.json: give token ids with --prompt-ids")


def test_bad_input_in_a_real_process(fp8_ckpt, tmp_path):
    p = _corrupt(fp8_ckpt, tmp_path, "truncated")
    for argv in (["generate", "--ckpt", p, "Hello"], ["chat", "--ckpt", p]):
        r = run_cli(*argv, input="hi\n")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert "truncated" in r.stderr


def test_help_for_chat_and_convert(capsys):
    for cmd in ("chat", "convert", "generate"):
        assert main([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: dsv3 {cmd}")
    main_help = run_cli("--help").stdout
    assert "chat" in main_help and "convert" in main_help


def test_check_weights_flag(fp8_ckpt, tmp_path, capsys):
    p = tmp_path / "nan"
    shutil.copytree(fp8_ckpt, p)
    n = "model.norm.weight"
    f = p / json.loads((p / "model.safetensors.index.json").read_text())["weight_map"][n]
    d = load_file(f)
    d[n][3] = float("inf")
    save_file(d, f, metadata={"format": "pt"})
    # not scanned by default: the first non-finite logits stop generation instead of emitting garbage
    _one_line_error(["generate", "--ckpt", p, "Hello", "--max-new-tokens", "1"], capsys, "non-finite logits")
    _one_line_error(["generate", "--ckpt", p, "Hello", "--check-weights"], capsys,
                    "tensor model.norm.weight holds NaN/Inf (1+ value(s), first at flat index 3)")


def test_fp8_checkpoint_on_cpu_is_dequantised_unless_stored(fp8_ckpt, fp8_ckpt_f32):
    """On a CPU the command line dequantises FP8 weights at load (no FP8 arithmetic there) into the dtype of the
    checkpoint's other tensors (bf16 or float32 here); `--dtype stored` keeps them FP8, `--dtype fp32` still
    wins; the tokens are the library's FP8 model's either way."""
    from dsv3.cli import build_parser
    from dsv3.cli.common import load

    def dtypes(ckpt, *flags):
        ns = build_parser().parse_args(["generate", "--ckpt", str(ckpt), "--device", "cpu", *flags, "x"])
        model = load(ns)[0]
        expert = next(blk.ffn.experts[0].w1.weight for blk in model.layers if hasattr(blk.ffn, "experts"))
        return expert.dtype, model.embed.weight.dtype

    assert dtypes(fp8_ckpt) == (torch.bfloat16, torch.bfloat16)
    assert dtypes(fp8_ckpt_f32) == (torch.float32, torch.float32)
    assert dtypes(fp8_ckpt, "--dtype", "stored") == (torch.float8_e4m3fn, torch.bfloat16)
    assert dtypes(fp8_ckpt, "--dtype", "fp32") == (torch.float32, torch.float32)
    for ckpt in (fp8_ckpt, fp8_ckpt_f32):
        expected = dsv3.generate(dsv3.load_model(ckpt), [[5, 17, 300, 2]], 8)  # the library, FP8 as stored
        for flags in ([], ["--dtype", "stored"]):
            r = run_cli("generate", "--ckpt", ckpt, "--device", "cpu", "--prompt-ids", "5,17,300,2",
                        "--max-new-tokens", "8", "--json", *flags)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout.strip().splitlines()[-1])["tokens"] == expected, (ckpt, flags)
