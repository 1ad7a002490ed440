"""Tokenizers shipped as tiktoken files (Kimi K2, Moonlight): `tiktoken.model` + a `tokenization_*.py`.

Moonshot's checkpoints have no tokenizer.json. The vocabulary is a tiktoken BPE file (one
`base64(token bytes) rank` per line); the pre-tokenizer regex (`pat_str`) and the number of reserved
special-token ids (`num_reserved_special_tokens`) sit in the Python tokenizer class that
transformers would import with trust_remote_code. That file is code from the internet, so it is
never executed here: its two class attributes are read from the syntax tree, and only literal
forms are accepted (a string, or `"|".join([...strings])`, as Moonshot writes it). The special
tokens follow that class: ids from `len(ranks)` on, `num_reserved_special_tokens` of them, named by
tokenizer_config.json's `added_tokens_decoder` or `<|reserved_token_{id}|>`.

`TiktokenModel` offers the part of the `tokenizers.Tokenizer` interface that `dsv3.tokenizer`
uses, so one `Tokenizer` class serves both formats. tiktoken is an optional dependency
(`pip install 'dsv3[tiktoken]'`), imported only when such a directory is loaded.
"""

from __future__ import annotations

import ast
import base64
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dsv3.errors import CheckpointError

VOCAB_FILE = "tiktoken.model"
DEFAULT_MODULE = "tokenization_kimi.py"
# Kimi's encode cuts text into pieces before tiktoken sees it (tiktoken can fail on very long runs,
# openai/tiktoken#195): at most this many characters, and runs of whitespace / non-whitespace at most this long
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def is_tiktoken_dir(path: Path) -> bool:
    return (path / VOCAB_FILE).is_file()


def tokenizer_module(path: Path, tokenizer_config: dict[str, Any]) -> Path:
    """The tokenizer class's file: auto_map.AutoTokenizer's module, else tokenization_kimi.py."""
    auto = (tokenizer_config.get("auto_map") or {}).get("AutoTokenizer")
    ref = auto[0] if isinstance(auto, list) and auto else auto
    name = ref.rsplit(".", 1)[0].split("--")[-1] + ".py" if isinstance(ref, str) and "." in ref else DEFAULT_MODULE
    return path / name


def read_class_attributes(file: Path) -> dict[str, Any]:
    """`pat_str` and `num_reserved_special_tokens` of the tokenizer class in `file`, without running it."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a {VOCAB_FILE} tokenizer needs the tokenizer class file that "
                              "holds its pre-tokenizer regex (pat_str)")
    try:
        tree = ast.parse(file.read_text(), filename=str(file))
    except (SyntaxError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{file}: not readable Python ({e})") from None
    found: dict[str, Any] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for stmt in cls.body:
            target, value = _assignment(stmt)
            if target in ("pat_str", "num_reserved_special_tokens") and target not in found:
                found[target] = _literal(value, file, target)
    if not isinstance(found.get("pat_str"), str):
        raise CheckpointError(f"{file}: no class attribute pat_str (the pre-tokenizer regex) as a string or "
                              "'|'.join([...strings])")
    n = found.setdefault("num_reserved_special_tokens", 256)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise CheckpointError(f"{file}: num_reserved_special_tokens must be a non-negative integer, got {n!r}")
    return found


def _assignment(stmt: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id, stmt.value
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
        return stmt.target.id, stmt.value
    return None, None


def _literal(node: ast.expr, file: Path, name: str) -> Any:
    """A literal, or `"sep".join([literal strings])`; anything else is refused (we never evaluate code)."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords):
        parts = _literal(node.args[0], file, name)
        if isinstance(parts, (list, tuple)) and all(isinstance(p, str) for p in parts):
            return node.func.value.value.join(parts)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise CheckpointError(f"{file}: {name} is not a literal (line {node.lineno}); dsv3 reads it without "
                              "running the file") from None


def load_ranks(file: Path) -> dict[bytes, int]:
    """The tiktoken BPE file: token bytes -> rank."""
    ranks: dict[bytes, int] = {}
    try:
        lines = file.read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (IndexError, ValueError):
            raise CheckpointError(f"{file}: line {i} is not 'base64-token rank'") from None
        ranks[token] = rank
    if not ranks:
        raise CheckpointError(f"{file}: no tokens")
    return ranks


def split_runs(s: str, limit: int) -> list[str]:
    """`s` cut so that no piece holds more than `limit` consecutive whitespace or non-whitespace characters
    (where Kimi's tokenizer cuts: a cut inside a run, counted from the run's start)."""
    pieces, start, run, space = [], 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != space:
            run, space = 1, ch.isspace()
        else:
            run += 1
            if run > limit:
                pieces.append(s[start:i])
                start, run = i, 1
    pieces.append(s[start:])
    return pieces


class TiktokenModel:
    """A tiktoken Encoding behind the `tokenizers.Tokenizer` calls dsv3.tokenizer makes."""

    def __init__(self, encoding, special: dict[str, int], ranks: dict[bytes, int]):
        self.enc = encoding
        self.special = special
        self.special_ids = {i: s for s, i in special.items()}
        self.known = set(ranks.values()) | set(special.values())

    def encode(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        # special-token strings in the text become their ids, as Kimi's tokenizer does (allowed_special="all")
        ids: list[int] = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in split_runs(text[i:i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids += self.enc.encode(piece, allowed_special="all")
        return SimpleNamespace(ids=ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # ids past the tokenizer's vocabulary (a model's padded embedding rows) decode to nothing, as in `tokenizers`
        ids = [i for i in ids if i in self.known and not (skip_special_tokens and i in self.special_ids)]
        return self.enc.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        try:
            return self.enc.encode_single_token(token.encode())
        except KeyError:
            return None

    def id_to_token(self, i: int) -> str | None:
        if i in self.special_ids:
            return self.special_ids[i]
        try:
            return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")
        except KeyError:
            return None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.enc.n_vocab if with_added_tokens else self.enc.n_vocab - len(self.special)


def load_tiktoken_dir(path: Path, tokenizer_config: dict[str, Any]) -> TiktokenModel:
    """The tokenizer of a directory holding `tiktoken.model` (see the module docstring)."""
    try:
        import tiktoken
    except ImportError:
        raise CheckpointError(f"{path}: its tokenizer is a {VOCAB_FILE} file, read through the tiktoken package, "
                              "which is not installed: pip install 'dsv3[tiktoken]'") from None
    attrs = read_class_attributes(tokenizer_module(path, tokenizer_config))
    ranks = load_ranks(path / VOCAB_FILE)
    base = len(ranks)
    named = {}
    for k, v in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        content = v.get("content") if isinstance(v, dict) else None
        if not (str(k).isdigit() and isinstance(content, str)):
            raise CheckpointError(f"{path / 'tokenizer_config.json'}: added_tokens_decoder entry {k!r} is not "
                                  "an id with a 'content' string")
        named[int(k)] = content
    ids = set(range(base, base + attrs["num_reserved_special_tokens"])) | {i for i in named if i >= base}
    special = {named.get(i, f"<|reserved_token_{i}|>"): i for i in sorted(ids)}
    try:
        enc = tiktoken.Encoding(name=str(path), pat_str=attrs["pat_str"], mergeable_ranks=ranks,
                                special_tokens=special)
    except ValueError as e:  # tiktoken's checks: regex syntax, duplicate ids
        raise CheckpointError(f"{path}: tiktoken refuses this tokenizer ({e})") from None
    return TiktokenModel(enc, special, ranks)
