"""What `dsv3 generate` and `dsv3 chat` share: choosing and loading the model and tokenizer,
reading prompts (text, token ids, files), streaming tokens to the terminal, JSON output.

Everything a user can get wrong is checked before the model loads (sampling parameters,
prompt files) or right after (prompt lengths, token ids), and raised as a `Dsv3Error`,
which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dsv3.errors import UsageError
from dsv3.outputs import check_output_path, write_atomic

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


# ---------------------------------------------------------------------- arguments
def device_name(s: str) -> str:
    """argparse type for --device: cpu, cuda or cuda:N (meta and others cannot hold real weights)."""
    import argparse
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {s!r}")
    return s


def add_model_args(p) -> None:
    from dsv3.options import positive

    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="Hugging Face DeepSeek-V3 directory (config.json + safetensors [+ tokenizer]); "
                                    "default: the bundled small model")
    src.add_argument("--preset", help="random weights of a preset config (tiny, ...): for smoke tests")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="dequantise/cast the weights at load (default: as stored; FP8 stays FP8)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--max-seq-len", type=positive, default=None,
                   help="longest prompt + generation, sizes the cache (default: the checkpoint's max_seq_len)")
    p.add_argument("--check-weights", action="store_true", help="scan every tensor for NaN/Inf while loading")


def add_sampling_args(p, max_new_tokens: int = 64) -> None:
    from dsv3.options import non_negative, real, seed

    p.add_argument("--max-new-tokens", type=non_negative, default=max_new_tokens,
                   help="tokens to generate per prompt at most (stops earlier at the end-of-sequence token)")
    p.add_argument("--temperature", type=real(0), default=0.0, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-p", type=real(0, 1, lo_open=True), default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens with this much probability; 1 = off")
    p.add_argument("--top-k", type=non_negative, default=0, help="keep the k most likely tokens; 0 = no top-k")
    p.add_argument("--seed", type=seed, default=None,
                   help="sampling seed in [0, 2^63) (default: a fresh random seed, shared by all ranks)")


def add_generate_args(p) -> None:
    p.add_argument("prompt", nargs="*", help="prompt text(s); each is generated from separately")
    add_model_args(p)
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="a prompt as comma-separated token ids, e.g. 5,17,300 (repeatable)")
    p.add_argument("--input-file", help="prompts, one per line; or JSONL with \"prompt\" or \"prompt_ids\" per line")
    p.add_argument("--output", help="write one JSON object per prompt to this JSONL file (checked before loading)")
    add_sampling_args(p, max_new_tokens=32)
    p.add_argument("--json", action="store_true", help='print one line {"tokens": [[...]], "text": [...]}')
    p.add_argument("--compile", action="store_true", help="decode with the torch.compile'd static step (same tokens)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="decode by replaying the static step as a CUDA graph (CUDA only; with --compile: the compiled step)")
    p.add_argument("--mtp", action="store_true", help="speculative decoding with the model's MTP module as drafter")


def check_sampling_args(ns) -> None:
    from dsv3.generation import check_sampling

    check_sampling(ns.temperature, ns.top_p, ns.top_k, ns.seed)
    if ns.max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {ns.max_new_tokens}")
    if ns.max_seq_len is not None and ns.max_seq_len <= 0:
        raise UsageError(f"--max-seq-len must be positive, got {ns.max_seq_len}")


# ---------------------------------------------------------------------- model + tokenizer
def load(ns):
    """(model, tokenizer or None, eos id or None) for --ckpt / --preset / the bundled model."""
    import torch

    from dsv3 import distributed, parallel
    from dsv3.checkpoint import default_checkpoint, load_model
    from dsv3.config import ModelArgs
    from dsv3.model import Transformer

    dtype = getattr(torch, _DTYPES[ns.dtype]) if ns.dtype else None
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    overrides = {"max_seq_len": ns.max_seq_len} if ns.max_seq_len else {}
    group = distributed.current_group()  # under torchrun: this rank loads only its share
    if group is not None:
        device = distributed.device_for(group)
    if ns.preset:
        from dsv3.memory import check_fits, module_bytes

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
    model = load_model(path, dtype=dtype, device=device, group=group, check_weights=ns.check_weights, **overrides)
    tok = None
    if (path / "tokenizer.json").is_file():
        from dsv3.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(path)
    eos = tok.eos_id if tok is not None else _config_eos(path)
    return model, tok, eos


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _config_eos(path: Path) -> int | None:
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
        return _read_file(Path(ns.input_file))
    raise UsageError('no prompt: give text ("Once upon a time"), --prompt-ids 5,17,300 or --input-file FILE')


def _read_file(f: Path) -> list[tuple[str | None, list[int] | None]]:
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


# ---------------------------------------------------------------------- generate command
def decode_mode(ns) -> str:
    """generate()'s `decode` from --compile / --cuda-graph (see dsv3.decode_step)."""
    on = [m for m, flag in (("compile", ns.compile), ("cuda-graph", ns.cuda_graph)) if flag]
    return "+".join(on) or "readable"


def check_generate_args(ns, lead: bool = True):
    """Every check `dsv3 generate` can make before loading; returns the prompts (read by rank 0 only)."""
    check_sampling_args(ns)
    if ns.mtp and (ns.compile or ns.cuda_graph):
        raise UsageError("--mtp (speculative decoding) runs on the readable path: drop --compile/--cuda-graph")
    if ns.cuda_graph and (ns.device or ("cuda" if _cuda_available() else "cpu")) == "cpu":
        raise UsageError("--cuda-graph needs a CUDA device (this run is on the CPU)")
    if not lead:
        return None  # rank 0 owns the inputs and the output file; the others get the prompts by broadcast
    if ns.output:
        check_output_path(ns.output, "--output")  # before the work: a long run must not fail at its last line
    prompts = read_prompts(ns)
    if any(t is not None for t, _ in prompts) and not ns.preset and ns.ckpt:
        if not (Path(ns.ckpt) / "tokenizer.json").is_file() and (Path(ns.ckpt) / "config.json").is_file():
            raise UsageError(f"{ns.ckpt} has no tokenizer.json: give token ids with --prompt-ids 5,17,300")
    return prompts


def main_generate(ns) -> int:
    from dsv3 import distributed
    from dsv3.generation import generate

    group = distributed.current_group()
    lead = distributed.rank_of(group) == 0
    # before loading, a bad argument or file fails fast; under torchrun every rank learns of a failed
    # check, so none waits in a collective for the others
    prompts = distributed.checked_on_every_rank(lambda: check_generate_args(ns, lead), group)
    model, tok, eos = load(ns)
    # rank 0 owns the inputs: every rank generates from rank 0's prompts and, when sampling, its seed
    prompts = distributed.broadcast_object(prompts, group)
    ids = encode_prompts(prompts, tok)
    seed = ns.seed if ns.temperature == 0 else distributed.shared_seed(ns.seed, group)
    stream = len(ids) == 1 and not ns.json and not ns.output
    printer = Printer(tok) if stream else None
    out = generate(model, ids, ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                   eos_id=eos, seed=seed, on_token=printer, decode=decode_mode(ns),
                   speculative="mtp" if ns.mtp else None)
    texts = [tok.decode(o) if tok is not None else None for o in out]
    if ns.output and distributed.rank_of(group) == 0:
        lines = "".join(json.dumps({"prompt": text, "prompt_ids": p, "tokens": o, "text": t}, ensure_ascii=False) + "\n"
                        for (text, _), p, o, t in zip(prompts, ids, out, texts))
        try:
            write_atomic(ns.output, lines, "--output")
        except UsageError as e:  # e.g. the disk filled up meanwhile: keep the work, on stdout
            sys.stdout.write(lines)
            raise UsageError(f"{e}; the completions were written to standard output instead") from None
        print(f"wrote {len(out)} completion(s) to {ns.output}", file=sys.stderr)
    if ns.json:
        print(json.dumps({"tokens": out, "text": texts}, ensure_ascii=False))
    elif stream:
        printer.finish()
    elif not ns.output:
        for i, (o, t) in enumerate(zip(out, texts)):
            print(f"[{i}] {t if t is not None else ' '.join(map(str, o))}")
    return 0


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
