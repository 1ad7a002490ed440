"""Generate from a Hugging Face DeepSeek-V3 checkpoint (or a random preset).

Notes: `run` is the torchrun wrapper: under torchrun (WORLD_SIZE > 1) every rank loads its
shard and generates, rank 0 reads the prompts and prints. `python -m dsv3.generate` (what
torchrun launches) is this command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dsv3.cli.args import add_model_args, add_sampling_args
from dsv3.errors import UsageError
from dsv3.outputs import check_output_path, write_atomic

HELP = "generate text or tokens from a checkpoint or preset"


def add_args(p) -> None:
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


def run(ns) -> int:
    """`dsv3 generate`; under torchrun (WORLD_SIZE > 1) every rank loads its shard, rank 0 prints."""
    from dsv3.distributed import run_distributed

    return run_distributed(main_generate, ns)


def decode_mode(ns) -> str:
    """generate()'s `decode` from --compile / --cuda-graph (see dsv3.decode_step)."""
    on = [m for m, flag in (("compile", ns.compile), ("cuda-graph", ns.cuda_graph)) if flag]
    return "+".join(on) or "readable"


def check_generate_args(ns, lead: bool = True):
    """Every check `dsv3 generate` can make before loading; returns the prompts (read by rank 0 only)."""
    from dsv3.cli.common import check_sampling_args, cuda_available, read_prompts

    check_sampling_args(ns)
    if ns.mtp and (ns.compile or ns.cuda_graph):
        raise UsageError("--mtp (speculative decoding) runs on the readable path: drop --compile/--cuda-graph")
    if ns.cuda_graph and (ns.device or ("cuda" if cuda_available() else "cpu")) == "cpu":
        raise UsageError("--cuda-graph needs a CUDA device (this run is on the CPU)")
    if not lead:
        return None  # rank 0 owns the inputs and the output file; the others get the prompts by broadcast
    if ns.output:
        check_output_path(ns.output, "--output")  # before the work: a long run must not fail at its last line
    prompts = read_prompts(ns)
    if any(t is not None for t, _ in prompts) and not ns.preset and ns.ckpt:
        has_tok = any((Path(ns.ckpt) / f).is_file() for f in ("tokenizer.json", "tiktoken.model"))
        if not has_tok and (Path(ns.ckpt) / "config.json").is_file():
            raise UsageError(f"{ns.ckpt} has no tokenizer.json: give token ids with --prompt-ids 5,17,300")
    return prompts


def main_generate(ns) -> int:
    from dsv3 import distributed
    from dsv3.cli.common import Printer, encode_prompts, load
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

