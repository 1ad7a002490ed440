"""What every decoding loop shares: request checks, the sampling distributions, the lockstep token buffer.

`dsv3.generation` (plain decoding) and `dsv3.speculative` (MTP drafts) both build on this module, and
the command line checks its sampling options with `check_sampling` before loading a model.

Axes: b batch, v vocab.
"""

from __future__ import annotations

import math

import torch

from dsv3.errors import NumericalError, UsageError
from dsv3.memory import check_cache_fits

SEED_RANGE = (0, 2**63)


def check_sampling(temperature: float, top_p: float, top_k: int, seed: int | None = None) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UsageError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UsageError(f"top_k must be >= 0, got {top_k}")
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise UsageError(f"seed must be in [0, 2^63), got {seed}")


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """The distribution a step draws from, (b, v) float32: temperature, then top-k, then top-p (the smallest
    prefix of the sorted probabilities with mass >= top_p), renormalised; one-hot on the argmax when greedy."""
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of logits (b, v): argmax when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_p, top_k), 1, generator=generator).squeeze(-1)


def check_request(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                  top_k: int, seed: int | None = None, mtp: bool = False) -> int:
    """Validate a generation request before any work, its cache's memory included (`mtp`: with the MTP
    module's cache); return the positions it needs (longest prompt + new)."""
    check_sampling(temperature, top_p, top_k, seed)
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    vocab = model.args.vocab_size
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise UsageError(f"prompt {i}: token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    longest = max(len(p) for p in prompts)
    total = longest + max_new_tokens
    if total > model.args.max_seq_len:
        raise UsageError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"max_seq_len {model.args.max_seq_len} by {total - model.args.max_seq_len}")
    check_cache_fits(model, len(prompts), total, mtp)
    return total


def check_finite(logits: torch.Tensor, pos: int) -> None:
    """Raise NumericalError when a step's logits (b, [s,] v) hold NaN/Inf: one reduction per step, no sync per row."""
    if not bool(torch.isfinite(logits).all()):
        rows = (~torch.isfinite(logits)).flatten(1).any(-1).nonzero().flatten().tolist()
        raise NumericalError(f"non-finite logits (NaN/Inf) at position {pos}, sequence(s) {rows[:8]}: the weights "
                             "or activations are not finite (scan the weights with --check-weights)")


def lockstep_tokens(prompts: list[list[int]], total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (b, total) token buffer holding each prompt at its start, and the (b, total) mask of prompt positions."""
    tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    return tokens, torch.arange(total, device=device)[None, :] < lens[:, None]
