"""MTP speculative decoding against plain decoding: acceptance rate, tokens/s, speedup (bundled model).

The work behind `dsv3 bench mtp`. What it computes, and why, is the command's description: the
docstring of `dsv3/cli/bench/mtp.py` (what `dsv3 bench mtp --help` shows), kept there so that --help needs no torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from dsv3.checkpoint import load_model
from dsv3.errors import CheckpointError
from dsv3.generation import generate
from dsv3.speculative import generate_mtp

PROMPTS = [
    "To be, or not to be, that is the question:",
    "KING. My lords, what news from France?",
    "O Romeo, Romeo! wherefore art thou Romeo?",
    "Now is the winter of our discontent",
    "Friends, Romans, countrymen, lend me your ears;",
    "The quality of mercy is not strain'd,",
    "All the world's a stage,",
    "What light through yonder window breaks?",
]


def bundled_dir():
    return Path(__file__).resolve().parent.parent / "assets" / "dsv3-tiny"


def encode_prompts(path, n: int, vocab: int) -> list[list[int]]:
    tok_file = path / "tokenizer.json"
    if tok_file.is_file():

        tok = Tokenizer.from_file(str(tok_file))
        return [[0] + tok.encode(t).ids for t in (PROMPTS * (n // len(PROMPTS) + 1))[:n]]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (12,), generator=g).tolist() for _ in range(n)]


def measure(model, prompts: list[list[int]], new: int, batch: int, repeats: int) -> dict:
    chunks = [prompts[i: i + batch] for i in range(0, len(prompts), batch)]
    n_tokens = sum(len(c) for c in chunks) * new
    best = {"plain": float("inf"), "mtp": float("inf")}
    outs: dict = {}
    drafted = accepted = 0
    generate(model, chunks[0], 4)  # warm-up
    for r in range(repeats):
        for kind in ("plain", "mtp") if r % 2 == 0 else ("mtp", "plain"):
            t = time.perf_counter()
            res = []
            for c in chunks:
                if kind == "plain":
                    res += generate(model, c, new)
                else:
                    st: dict = {}
                    res += generate_mtp(model, c, new, stats=st)
                    if r == 0:
                        drafted += st["drafted"]
                        accepted += st["accepted"]
            best[kind] = min(best[kind], time.perf_counter() - t)
            outs[kind] = res
    tps_plain, tps_mtp = n_tokens / best["plain"], n_tokens / best["mtp"]
    return {
        "acceptance_rate": accepted / max(drafted, 1),
        "tokens_per_s_plain": tps_plain,
        "tokens_per_s_mtp": tps_mtp,
        "speedup": tps_mtp / tps_plain,
        "identical_greedy": outs["plain"] == outs["mtp"],
        "prompts": len(prompts), "new_tokens": new, "batch": batch,
    }


def run(ns) -> int:
    torch.set_num_threads(ns.threads)
    path = Path(ns.ckpt) if ns.ckpt else bundled_dir()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (give --ckpt DIR)")
    model = load_model(path, dtype=getattr(torch, ns.dtype))
    prompts = encode_prompts(path, ns.prompts, model.args.vocab_size)
    res = measure(model, prompts, ns.new, ns.batch, ns.repeats)
    res.update(threads=ns.threads, dtype=ns.dtype, checkpoint=str(path))
    if ns.json:
        print(json.dumps(res))
    else:
        print(f"checkpoint        {path}")
        print(f"acceptance rate   {res['acceptance_rate']:.3f}  (accepted MTP drafts / drafts)")
        print(f"plain decoding    {res['tokens_per_s_plain']:8.1f} tokens/s")
        print(f"MTP speculative   {res['tokens_per_s_mtp']:8.1f} tokens/s")
        print(f"speedup           {res['speedup']:.2f}x   identical greedy output: {res['identical_greedy']}")
    return 0
