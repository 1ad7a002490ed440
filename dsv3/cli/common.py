"""What `dsv3 generate` and `dsv3 chat` share at run time: loading the model and tokenizer,
reading prompts (text, token ids, files), the checks made before loading, streaming tokens to the terminal.

Everything a user can get wrong is checked before the model loads (sampling parameters,
prompt files) or right after (prompt lengths, token ids), and raised as a `Dsv3Error`,
which the CLI prints as one line with exit code 2. The flags themselves are defined in
`dsv3.cli.args` (no torch there); this module is imported only when a command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dsv3 import distributed, parallel
from dsv3.checkpoint import compute_dtype, default_checkpoint, load_model
from dsv3.cli.args import DTYPES
from dsv3.config import ModelArgs
from dsv3.errors import Dsv3Error, UsageError
from dsv3.memory import check_fits, keep_freed_memory, module_bytes
from dsv3.model import Transformer
from dsv3.safetensors_io import scan
from dsv3.sampling import check_sampling
from dsv3.tokenizer import Tokenizer


# ---------------------------------------------------------------------- checks before loading
def check_sampling_args(ns) -> None:
    check_sampling(ns.temperature, ns.top_p, ns.top_k, ns.seed)
    if ns.max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {ns.max_new_tokens}")
    if ns.max_seq_len is not None and ns.max_seq_len <= 0:
        raise UsageError(f"--max-seq-len must be positive, got {ns.max_seq_len}")


# ---------------------------------------------------------------------- model + tokenizer
def load(ns):
    """(model, tokenizer or None, eos id or None) for --ckpt / --preset / the bundled model."""
    dtype = getattr(torch, DTYPES[ns.dtype]) if ns.dtype in DTYPES else None
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cpu":
        keep_freed_memory()
    overrides = {"max_seq_len": ns.max_seq_len} if ns.max_seq_len else {}
    group = distributed.current_group()  # under torchrun: this rank loads only its share
    if group is not None:
        device = distributed.device_for(group)
    if ns.preset:
        args = ModelArgs.preset(ns.preset, **overrides)
        with torch.device("meta"):
            need = module_bytes(Transformer(args, dtype=dtype))
        check_fits(need, device, f"--preset {ns.preset}")
        torch.manual_seed(0 if ns.seed is None else ns.seed)
        with torch.device(device):
            model = Transformer(args, dtype=dtype).eval()
        if group is not None:  # every rank built the same random model: keep this rank's share
            model = parallel.parallelize(model, group)
        return model, None, None
    path = Path(ns.ckpt) if ns.ckpt else default_checkpoint()
    if ns.dtype is None and torch.device(device).type == "cpu":
        dtype = _fp8_dequantised_dtype(path)  # see --dtype's help: FP8 on a CPU is a storage format, not an arithmetic
    model = load_model(path, dtype=dtype, device=device, group=group, check_weights=ns.check_weights, **overrides)
    tok = None
    if (path / "tokenizer.json").is_file() or (path / "tiktoken.model").is_file():  # tiktoken: Kimi K2
        tok = Tokenizer.from_dir(path)
    eos = tok.eos_id if tok is not None else config_eos(path)
    return model, tok, eos


def _fp8_dequantised_dtype(path: Path) -> torch.dtype | None:
    """For an FP8 checkpoint: the dtype its other tensors are stored in (bf16 in the release), which the FP8
    weights are then dequantised into -- what the FP8 path computes in anyway, so the tokens do not change.
    None for any other checkpoint, and for one whose config or headers cannot be read (`load_model` then
    reports what is wrong with it). Reads config.json and the shards' headers only."""
    try:
        if ModelArgs.from_hf_config(path).dtype != "fp8":
            return None
        return compute_dtype(scan(path).values())
    except (Dsv3Error, OSError, ValueError):
        return None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def config_eos(path: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            try:
                v = json.loads(f.read_text()).get("eos_token_id")
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            v = v[0] if isinstance(v, list) and v else v
            if isinstance(v, int):
                return v
    return None


# ---------------------------------------------------------------------- prompts
def parse_ids(s: str, where: str = "--prompt-ids") -> list[int]:
    try:
        return [int(t) for t in s.split(",") if t.strip()]  # int() allows the spaces around a number, not inside
    except ValueError:
        raise UsageError(f"{where} {s!r}: expected comma-separated integers like 5,17,300") from None


def read_prompts(ns) -> list[tuple[str | None, list[int] | None]]:
    """[(text, None) or (None, ids)] from exactly one source: positional texts, --prompt-ids, --input-file."""
    given = [bool(ns.prompt), bool(ns.prompt_ids), bool(ns.input_file)]
    if sum(given) > 1:
        raise UsageError("give prompts one way: text arguments, --prompt-ids or --input-file")
    if ns.prompt:
        return [(t, None) for t in ns.prompt]
    if ns.prompt_ids:
        return [(None, parse_ids(s)) for s in ns.prompt_ids]
    if ns.input_file:
        return read_prompt_file(Path(ns.input_file))
    raise UsageError('no prompt: give text ("Once upon a time"), --prompt-ids 5,17,300 or --input-file FILE')


def read_prompt_file(f: Path) -> list[tuple[str | None, list[int] | None]]:
    try:
        lines = f.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"--input-file {f}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--input-file {f}: cannot read ({e})") from None
    first = next((ln for ln in lines if ln.strip()), "")
    jsonl = f.suffix == ".jsonl" or first.lstrip().startswith("{")
    out: list[tuple[str | None, list[int] | None]] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            out.append((line, None))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"--input-file {f}, line {no}: not valid JSON ({e.msg})") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            out.append((obj["prompt"], None))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt_ids"), list) \
                and all(isinstance(t, int) for t in obj["prompt_ids"]):
            out.append((None, obj["prompt_ids"]))
        else:
            raise UsageError(f'--input-file {f}, line {no}: expected {{"prompt": "text"}} or {{"prompt_ids": [ints]}}')
    if not out:
        raise UsageError(f"--input-file {f}: no prompts in the file")
    return out


def encode_prompts(prompts, tok) -> list[list[int]]:
    ids = []
    for i, (text, pids) in enumerate(prompts):
        if text is not None:
            if not text.strip():
                raise UsageError(f"prompt {i} is empty")
            if tok is None:
                raise UsageError("this checkpoint has no tokenizer.json: give token ids with --prompt-ids 5,17,300")
            pids = tok.encode(text)
        if not pids:
            raise UsageError(f"prompt {i} is empty")
        ids.append(pids)
    return ids


class Printer:
    """on_token callback: writes row 0's new tokens to stdout as they come (text, or ids without a tokenizer)."""

    def __init__(self, tok):
        self.dec = tok.stream() if tok is not None else None
        self.any = False

    def __call__(self, step, tokens, generated) -> None:
        if not bool(generated[0]):
            return
        t = int(tokens[0])
        piece = self.dec.push(t) if self.dec is not None else f"{' ' if self.any else ''}{t}"
        self.any = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    def finish(self) -> None:
        if self.dec is not None:
            sys.stdout.write(self.dec.flush())
        sys.stdout.write("\n")
        sys.stdout.flush()
