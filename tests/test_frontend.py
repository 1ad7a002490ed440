"""The helpers `dsv3 generate` and `dsv3 chat` share (dsv3.cli.common, dsv3.cli.generate), called directly: token-id parsing,
prompt sources and files, encoding, the decode mode, the sampling checks, the streaming printer; and
`dsv3 chat` driven by a scripted stdin in a real process, against the library's own replies."""

from __future__ import annotations

import argparse
import json

import pytest

import dsv3
from dsv3.chat_format import chat_format_for
from dsv3.cli import common as fe
from dsv3.cli import generate as gen
from dsv3.errors import UsageError
from dsv3.testing import run_cli
from dsv3.tokenizer import Tokenizer


def _ns(**kw) -> argparse.Namespace:
    """The generate command's namespace with its defaults, then kw."""
    p = argparse.ArgumentParser()
    gen.add_args(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


# ---------------------------------------------------------------------- parse_ids
@pytest.mark.parametrize("text,ids", [("5,17,300", [5, 17, 300]), (" 5, 17 ,300 ", [5, 17, 300]), ("7", [7]),
                                      ("5,6,", [5, 6]), ("0,0", [0, 0]), ("", [])])
def test_parse_ids(text, ids):
    assert fe.parse_ids(text) == ids


@pytest.mark.parametrize("text", ["5;6", "a,b", "1.5", "5 6", "0x10"])
def test_parse_ids_rejects_non_integers_naming_the_flag(text):
    with pytest.raises(UsageError, match=r"--prompt-ids .*expected comma-separated integers"):
        fe.parse_ids(text)
    with pytest.raises(UsageError, match="^line 3 "):
        fe.parse_ids(text, where="line 3")


# ---------------------------------------------------------------------- read_prompts
def test_read_prompts_from_each_source(tmp_path):
    assert fe.read_prompts(_ns(prompt=["Hello", "Bye"])) == [("Hello", None), ("Bye", None)]
    assert fe.read_prompts(_ns(prompt_ids=["1,2", "3"])) == [(None, [1, 2]), (None, [3])]
    txt = tmp_path / "p.txt"
    txt.write_text("first line\n\n  \nsecond, with spaces \n", encoding="utf-8")
    assert fe.read_prompts(_ns(input_file=str(txt))) == [("first line", None), ("second, with spaces ", None)]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "Héllo"}\n\n{"prompt_ids": [4, 5]}\n', encoding="utf-8")
    assert fe.read_prompts(_ns(input_file=str(jl))) == [("Héllo", None), (None, [4, 5])]
    sniffed = tmp_path / "p.txt2"  # not .jsonl, but its first line is a JSON object
    sniffed.write_text('{"prompt_ids": [9]}\n', encoding="utf-8")
    assert fe.read_prompts(_ns(input_file=str(sniffed))) == [(None, [9])]


@pytest.mark.parametrize("kw,match", [
    (dict(prompt=["a"], prompt_ids=["1"]), "give prompts one way"),
    (dict(prompt=["a"], input_file="x"), "give prompts one way"),
    (dict(), "no prompt: give text"),
    (dict(prompt_ids=["1,x"]), "--prompt-ids '1,x'"),
])
def test_read_prompts_errors(kw, match):
    with pytest.raises(UsageError, match=match):
        fe.read_prompts(_ns(**kw))


@pytest.mark.parametrize("content,match", [
    (b'{"prompt": "ok"}\n{"prompt": \n', "line 2: not valid JSON"),
    (b'{"prompt": 5}\n', 'line 1: expected {"prompt": "text"} or {"prompt_ids": \\[ints\\]}'),
    (b'{"prompt_ids": [1, "2"]}\n', "line 1: expected"),
    (b'\n\n  \n', "no prompts in the file"),
    (b'\xff\xfe bad utf-8\n', "cannot read"),
])
def test_read_prompts_bad_files(tmp_path, content, match):
    f = tmp_path / "in.jsonl"
    f.write_bytes(content)
    with pytest.raises(UsageError, match=match) as e:
        fe.read_prompts(_ns(input_file=str(f)))
    assert str(f) in str(e.value)


def test_read_prompts_missing_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        fe.read_prompts(_ns(input_file=str(tmp_path / "absent.txt")))


# ---------------------------------------------------------------------- encode_prompts
def test_encode_prompts(fp8_ckpt):
    tok = Tokenizer.from_dir(fp8_ckpt)
    ids = fe.encode_prompts([("Hello there", None), (None, [3, 4])], tok)
    assert ids == [tok.encode("Hello there"), [3, 4]]
    assert fe.encode_prompts([(None, [1])], None) == [[1]]  # ids need no tokenizer
    with pytest.raises(UsageError, match="no tokenizer.json: give token ids"):
        fe.encode_prompts([("Hello", None)], None)
    with pytest.raises(UsageError, match="prompt 1 is empty"):
        fe.encode_prompts([(None, [1]), ("   ", None)], tok)
    with pytest.raises(UsageError, match="prompt 0 is empty"):
        fe.encode_prompts([(None, [])], tok)


# ---------------------------------------------------------------------- decode mode, sampling checks
@pytest.mark.parametrize("compile_,graph,mode", [(False, False, "readable"), (True, False, "compile"),
                                                 (False, True, "cuda-graph"), (True, True, "compile+cuda-graph")])
def test_decode_mode(compile_, graph, mode):
    assert gen.decode_mode(_ns(compile=compile_, cuda_graph=graph)) == mode
    from dsv3.decode_step import DecodeRunner

    assert mode == "readable" or mode in DecodeRunner.MODES  # every mode it names exists


@pytest.mark.parametrize("kw,match", [(dict(temperature=-0.1), "temperature must be a finite number >= 0"),
                                      (dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"),
                                      (dict(top_k=-1), "top_k must be >= 0"),
                                      (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
                                      (dict(max_seq_len=0), "--max-seq-len must be positive")])
def test_check_sampling_args(kw, match):
    fe.check_sampling_args(_ns())  # the defaults pass
    with pytest.raises(UsageError, match=match):
        fe.check_sampling_args(_ns(**kw))


# ---------------------------------------------------------------------- the streaming printer
def test_printer_writes_generated_tokens_of_row_0_only(capsys):
    import torch

    p = fe.Printer(None)  # no tokenizer: ids, space-separated
    p(0, torch.tensor([5, 9]), torch.tensor([False, True]))  # row 0 still in its prompt: nothing
    p(1, torch.tensor([7, 9]), torch.tensor([True, True]))
    assert capsys.readouterr().out == "7"  # written at once, not at the end
    p(2, torch.tensor([8, 1]), torch.tensor([True, False]))
    p.finish()
    assert capsys.readouterr().out == " 8\n"


# ---------------------------------------------------------------------- dsv3 chat in a real process
def test_chat_script_blank_lines_eof_and_a_full_conversation(fp8_ckpt):
    """Blank lines are skipped, end of input ends the chat (exit 0, no /exit), and a turn that no longer fits
    max_seq_len is refused with a notice on stderr while the conversation so far is kept."""
    tok = Tokenizer.from_dir(fp8_ckpt)
    model = dsv3.load_model(fp8_ckpt)
    fmt = chat_format_for(tok)
    first = [{"role": "user", "content": "Hi"}]
    r1 = chat_reply(tok, model, first, 3)
    long = " ".join(["word"] * 200)
    convo = first + [{"role": "assistant", "content": r1}, {"role": "user", "content": long}]
    assert len(tok.encode(fmt.render(convo), add_bos=False)) > 64
    max_len = 64
    msgs = first + [{"role": "assistant", "content": r1}, {"role": "user", "content": "Ok"}]
    ids3 = tok.encode(fmt.render(msgs), add_bos=False)
    assert len(ids3) < max_len
    r3 = chat_reply(tok, model, msgs, min(3, max_len - len(ids3)))

    r = run_cli("chat", "--ckpt", fp8_ckpt, "--max-new-tokens", "3", "--max-seq-len", str(max_len),
                input=f"\nHi\n   \n{long}\nOk\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{r1}\n{r3}\n"  # the long turn got no reply, and was dropped from the history
    assert "max_seq_len is 64: /clear to start over" in r.stderr
    assert "Traceback" not in r.stderr


def test_chat_sampled_replies_are_the_library_s(fp8_ckpt):
    tok = Tokenizer.from_dir(fp8_ckpt)
    want = chat_reply(tok, dsv3.load_model(fp8_ckpt), [{"role": "user", "content": "Tell me"}], 5, temperature=0.9,
                      top_k=20, seed=4)
    r = run_cli("chat", "--ckpt", fp8_ckpt, "--max-new-tokens", "5", "--temperature", "0.9", "--top-k", "20",
                "--seed", "4", input="Tell me\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_generate_output_file_round_trips(fp8_ckpt, tmp_path):
    """--output writes one JSON object per prompt: the prompt, its ids, the tokens and the text, as the library."""
    out = tmp_path / "o.jsonl"
    r = run_cli("generate", "--ckpt", fp8_ckpt, "Hello", "--max-new-tokens", "4", "--output", out)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.from_dir(fp8_ckpt)
    ids = tok.encode("Hello")
    new = dsv3.generate(dsv3.load_model(fp8_ckpt), [ids], 4, eos_id=tok.eos_id)[0]
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        {"prompt": "Hello", "prompt_ids": ids, "tokens": new, "text": tok.decode(new)}]


def chat_reply(tok, model, messages, n, **sampling):
    """What `dsv3 chat` prints for one turn: the library's tokens for the chat format's prompt, parsed."""
    fmt = chat_format_for(tok)
    ids = tok.encode(fmt.render(messages), add_bos=False)
    new = dsv3.generate(model, [ids], n, eos_id=tok.eos_id, **sampling)[0]
    return fmt.parse(tok.decode(new, skip_special_tokens=False)).content
