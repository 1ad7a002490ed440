"""Kimi K2's tokenizer format (tiktoken.model + tokenization_kimi.py) through dsv3.Tokenizer.

We cannot download Kimi's files, so the test writes a small tiktoken BPE file of the same format
(256 byte tokens + a few merges), a tokenization_kimi.py holding Moonshot's pre-tokenizer regex
(written the way Moonshot writes it: `"|".join([...])` in the class body) and a tokenizer_config.json
with added_tokens_decoder. The reference is tiktoken itself, given the same ranks, regex and specials.
"""

from __future__ import annotations

import base64
import json
import sys

import pytest

tiktoken = pytest.importorskip("tiktoken")

from dsv3.errors import CheckpointError  # noqa: E402
from dsv3.tokenizer import Tokenizer  # noqa: E402

# Moonshot's pre-tokenizer (tokenization_kimi.py of Kimi K2 / Moonlight): Han runs, cased words, 1-3 digits, ...
KIMI_PATTERNS = [
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
]
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"12", b"123"]
N_RESERVED = 8
NAMED = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>"}  # offsets from the first special id

CLASS_FILE = '''raise SystemExit("dsv3 must not run this file")  # tokenizer code from the internet: read, never run
import tiktoken


class TikTokenTokenizer:
    special_tokens: dict
    num_reserved_special_tokens = {n}
    pat_str = "|".join(
        [
{patterns}
        ]
    )
'''


def _ranks() -> dict[bytes, int]:
    ranks = {bytes([i]): i for i in range(256)}
    for m in MERGES:
        ranks[m] = len(ranks)
    return ranks


def write_kimi_style(path, *, class_file: str | None = None, with_class_file: bool = True, model_config: bool = True):
    path.mkdir(parents=True, exist_ok=True)
    ranks = _ranks()
    (path / "tiktoken.model").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    if with_class_file:
        patterns = "\n".join(f'            r"""{p}""",' for p in KIMI_PATTERNS)
        (path / "tokenization_kimi.py").write_text(class_file or CLASS_FILE.format(n=N_RESERVED, patterns=patterns))
    base = len(ranks)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(base + k): {"content": v, "special": True} for k, v in NAMED.items()},
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "tokenizer_class": "TikTokenTokenizer",
        "chat_template": "{% for m in messages %}<|im_user|>{{ m['content'] }}<|im_end|>{% endfor %}",
    }))
    if model_config:
        (path / "config.json").write_text(json.dumps({"bos_token_id": base, "eos_token_id": base + 1}))
    return path


def _reference():
    ranks = _ranks()
    base = len(ranks)
    special = {NAMED.get(i, f"<|reserved_token_{base + i}|>"): base + i for i in range(N_RESERVED)}
    return tiktoken.Encoding(name="ref", pat_str="|".join(KIMI_PATTERNS), mergeable_ranks=ranks,
                             special_tokens=special), base


TEXTS = ["hello world", "Hello, world! 12345 hello", "中文 and ünïcödé\n\n  spaces", "don't hello's WORLD"]


def test_encode_decode_match_tiktoken(tmp_path):
    tok = Tokenizer.from_dir(write_kimi_style(tmp_path))
    ref, base = _reference()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text
    r = _ranks()
    assert tok.encode("hello world") == [r[b"hello"], r[b" world"]]  # by hand: two merges
    assert tok.encode("1234") == [r[b"123"], r[b"4"]]  # digits split in runs of at most 3
    assert tok.vocab_size == base + N_RESERVED == ref.n_vocab


def test_special_tokens_and_ids(tmp_path):
    tok = Tokenizer.from_dir(write_kimi_style(tmp_path))
    _, base = _reference()
    assert (tok.bos_id, tok.eos_id, tok.bos_token, tok.eos_token) == (base, base + 1, "[BOS]", "[EOS]")
    ids = tok.encode("[BOS]hello<|im_end|>")
    assert ids == [base, _ranks()[b"hello"], base + 2]
    assert tok.decode(ids) == "hello"
    assert tok.decode(ids, skip_special_tokens=False) == "[BOS]hello<|im_end|>"
    assert tok.encode(f"<|reserved_token_{base + 7}|>") == [base + 7]  # unnamed reserved ids keep tiktoken's names
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True) == \
        [base + 3, _ranks()[b"hello"], base + 2]


def test_streaming_decode_holds_back_partial_utf8(tmp_path):
    tok = Tokenizer.from_dir(write_kimi_style(tmp_path))
    ids = tok.encode("中文 hello")
    s = tok.stream()
    assert "".join(s.push(i) for i in ids) + s.flush() == "中文 hello"
    s = tok.stream()
    assert s.push(ids[0]) == ""  # the first byte of a 3-byte character


def test_class_file_is_not_executed_and_must_be_literal(tmp_path):
    bad = 'class T:\n    pat_str = make_pattern()\n'
    with pytest.raises(CheckpointError, match=r"tokenization_kimi.py: pat_str is not a literal \(line 2\)"):
        Tokenizer.from_dir(write_kimi_style(tmp_path / "a", class_file=bad))
    with pytest.raises(CheckpointError, match="no class attribute pat_str"):
        Tokenizer.from_dir(write_kimi_style(tmp_path / "b", class_file="class T:\n    x = 1\n"))
    with pytest.raises(CheckpointError, match=r"tokenization_kimi.py: missing; .* pre-tokenizer regex"):
        Tokenizer.from_dir(write_kimi_style(tmp_path / "c", with_class_file=False))


def test_bad_vocabulary_file(tmp_path):
    d = write_kimi_style(tmp_path)
    (d / "tiktoken.model").write_bytes(b"aGVsbG8= 0\nnot-base64!! 1\n")
    with pytest.raises(CheckpointError, match=r"tiktoken.model: line 2 is not 'base64-token rank'"):
        Tokenizer.from_dir(d)


def test_missing_tiktoken_names_the_extra(tmp_path, monkeypatch):
    d = write_kimi_style(tmp_path)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken now raises ImportError
    with pytest.raises(CheckpointError, match=r"tiktoken package, which is not installed: pip install 'dsv3\[tiktoken\]'"):
        Tokenizer.from_dir(d)


def test_neither_tokenizer_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no tokenizer.json nor tiktoken.model"):
        Tokenizer.from_dir(tmp_path)


def test_generate_command_reads_a_tiktoken_checkpoint(tmp_path, capsys):
    """`dsv3 generate --ckpt DIR "text"` on a checkpoint whose tokenizer is tiktoken.model (the CLI's loading path)."""
    import torch

    import dsv3
    from dsv3.cli import main
    from dsv3.testing import tiny_hf_args, write_checkpoint

    d = write_checkpoint(tmp_path / "ckpt", tiny_hf_args(), n_shards=1)  # vocabulary 320 >= 256 + 11 + 8
    write_kimi_style(d, model_config=False)
    assert not (d / "tokenizer.json").exists()
    assert main(["generate", "--ckpt", str(d), "hello world", "--max-new-tokens", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref, base = _reference()
    prompt = ref.encode("hello world")
    want = dsv3.generate(dsv3.load_model(d, dtype=torch.bfloat16), [prompt], 4, eos_id=base + 1)
    assert got["tokens"] == want
    assert got["text"] == [ref.decode([i for i in want[0] if i < base])]
    tok = Tokenizer.from_dir(d)
    assert tok.decode([_ranks()[b"hello"], 300, 319]) == "hello"  # ids the model has and the tokenizer has not


def test_long_runs_are_cut_as_kimi_cuts_them(tmp_path):
    """Kimi's encode cuts runs of more than 25,000 (non-)whitespace characters before tiktoken sees them."""
    tok = Tokenizer.from_dir(write_kimi_style(tmp_path))
    ref, _ = _reference()
    text = "hi " + "x" * 24_999 + "hello"  # a non-whitespace run of 25,004 characters
    pieces = ["hi " + "x" * 24_999 + "h", "ello"]  # by hand: the cut comes after 25,000 characters of the run
    assert tok.encode(text) == [i for p in pieces for i in ref.encode(p)]
    assert _ranks()[b"hello"] not in tok.encode(text)  # the cut splits "hello": it shows in the ids
    assert _ranks()[b"hello"] in ref.encode(text)
    assert tok.decode(tok.encode(text)) == text
