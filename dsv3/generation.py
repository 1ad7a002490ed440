"""Batched generation with the latent cache: greedy or sampled (temperature, top-k, top-p).

Prompts of different lengths run in lockstep: every sequence starts decoding at the
shortest prompt's length, and while a sequence is still inside its prompt, its own
prompt token replaces the sampled one. No padding token ever enters attention, so
each sequence sees exactly what it would see alone (greedy tokens match one-by-one
decoding; tests hold them equal).
"""

from __future__ import annotations

import torch

from dsv3 import speculative as spec
from dsv3.decode_step import DecodeRunner
from dsv3.errors import UsageError
from dsv3.sampling import check_finite, check_request, lockstep_tokens, sample


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_id: int | None = None, seed: int | None = None,
             on_token=None, decode: str = "readable", speculative: str | None = None) -> list[list[int]]:
    """New tokens for each prompt (stopping at eos_id, which is included, or max_new_tokens).

    `on_token(step, tokens)` is called with the (b,) tokens of each step (for streaming).
    `decode`: "readable" runs every step through `model(...)`; "static", "compile", "cuda-graph"
    or "compile+cuda-graph" run decode steps through `dsv3.decode_step.DecodeRunner` (same tokens).
    `speculative="mtp"` drafts with the model's MTP module (`dsv3.speculative`): same output
    for greedy decoding, same distribution when sampling.
    """
    if speculative is not None:
        if speculative != "mtp":
            raise UsageError(f"speculative must be None or 'mtp', got {speculative!r}")
        if decode != "readable":
            raise UsageError(f"speculative decoding runs on the readable path; it cannot be combined with decode={decode!r}")
        return spec.generate_mtp(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 eos_id=eos_id, seed=seed, on_token=on_token)
    total = check_request(model, prompts, max_new_tokens, temperature, top_p, top_k, seed)
    lens = [len(p) for p in prompts]
    if decode != "readable" and decode not in DecodeRunner.MODES:
        raise UsageError(f"decode={decode!r}: expected 'readable' or one of {', '.join(DecodeRunner.MODES)}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]

    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    b = len(prompts)
    tokens, in_prompt = lockstep_tokens(prompts, total, device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    runner = None if decode == "readable" else DecodeRunner(model, b, total, decode)
    cache = model.new_cache(b, total) if runner is None else runner.cache

    prev = 0
    start = min(lens)
    for cur in range(start, total):
        chunk = tokens[:, prev:cur]
        logits = (model(chunk, prev, cache, last_only=True) if runner is None else runner(chunk, prev))[:, -1]
        check_finite(logits, cur)
        nxt = sample(logits, temperature, top_p, top_k, gen)
        nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
        tokens[:, cur] = nxt
        generated = ~in_prompt[:, cur]
        if on_token is not None:
            on_token(cur, nxt, generated & ~finished)
        if eos_id is not None:
            finished |= generated & (nxt == eos_id)
        prev = cur
        if finished.all():
            break
    out = []
    for i, p in enumerate(prompts):
        new = tokens[i, len(p): len(p) + max_new_tokens].tolist()[: max(0, prev + 1 - len(p))]
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        out.append(new)
    return out
