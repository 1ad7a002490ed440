"""Speculative decoding with the model's own MTP module as the drafter (self-speculation).

The depth-1 MTP module predicts token i+2 from the main model's hidden state at i
and the embedding of token i+1, so after each main step it offers one *draft* for
the position after the token just chosen. The next main forward runs over two
positions at once -- the last confirmed token and the draft -- which both checks
the draft and, when it is accepted, yields the token after it: up to two tokens per
main forward.

Verification:
- greedy: the draft is accepted iff it equals the main model's argmax, so the output
  is exactly plain greedy decoding;
- sampling: the standard rule (Leviathan et al. 2023, Chen et al. 2023): accept a
  draft d ~ q with probability min(1, p(d)/q(d)), else resample from
  norm(max(0, p − q)); the output distribution is exactly that of sampling from p
  (p and q both after temperature / top-k / top-p).

Rows of a batch move in lockstep (one start_pos for the whole batch, as in
`dsv3.generation`; the shared pieces are `dsv3.sampling`): a step advances every row by two tokens only if every row
accepted its draft, else by one. Rejected positions are simply written again by the
next forward -- the caches are indexed by absolute position, so that is the
rollback. Prompts of different lengths work as in `generate`: while a row is
still inside its prompt, its prompt token is both the "draft" and the truth.

Caches: the main model's cache holds positions < cur - 1 (everything but the last
confirmed token); the MTP module's cache holds MTP positions < cur - 1 (position i
combines h_i with token i + 1).
"""

from __future__ import annotations

import torch

from dsv3.errors import UsageError
from dsv3.sampling import check_finite, check_request, lockstep_tokens, sampling_probs


def _draw(probs: torch.Tensor, greedy: bool, gen: torch.Generator | None) -> torch.Tensor:
    if greedy:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def verify(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, greedy: bool,
           gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept or replace each row's draft token.

    p, q (b, v): target and draft distributions; draft (b,). Returns (token (b,), accepted (b,) bool):
    the draft where accepted, otherwise a token drawn from norm(max(0, p − q)) (greedy: argmax p).
    """
    rows = torch.arange(draft.shape[0], device=draft.device)
    if greedy:
        target = p.argmax(-1)
        return target, target == draft
    pd, qd = p[rows, draft], q[rows, draft]
    u = torch.rand(draft.shape, generator=gen, device=draft.device)
    accepted = u * qd <= pd  # u < p/q without dividing by a zero q
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    # when p == q the residual is empty, but then every draft is accepted; keep multinomial well-defined
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
    fallback = torch.multinomial(residual, 1, generator=gen).squeeze(-1)
    return torch.where(accepted, draft, fallback), accepted


@torch.inference_mode()
def generate_mtp(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, eos_id: int | None = None, seed: int | None = None,
                 on_token=None, stats: dict | None = None) -> list[list[int]]:
    """Same contract as `dsv3.generate` (new tokens per prompt), decoded with MTP drafts.

    `stats`, if given, receives drafted / accepted counts (generated positions only), main-model
    forwards, and per-step acceptance as `trace` (a list of (position, drafted, accepted) for row 0).
    """
    if not model.mtp:
        raise UsageError("speculative='mtp' needs a model with an MTP module (n_mtp_layers >= 1)")
    total = check_request(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, mtp=True)
    lens = [len(p) for p in prompts]
    if stats is not None:
        stats.update(drafted=0, accepted=0, forwards=0, trace=[])
    if max_new_tokens == 0:
        return [[] for _ in prompts]

    greedy = temperature == 0
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    b = len(prompts)
    tokens, in_prompt = lockstep_tokens(prompts, total, device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    cache = model.new_cache(b, total, mtp=True)
    mtp = model.mtp[0]

    def main_forward(start: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = model.hidden(x, start, cache)
        if stats is not None:
            stats["forwards"] += 1
        logits = model.head(h).float()
        check_finite(logits, start + x.shape[1] - 1)
        return h, logits

    def mtp_forward(start: int, h: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """MTP positions start.. with main hidden states h and the tokens one ahead -> draft logits of the last."""
        cos, sin = model.rotary(start, h.shape[1], device)
        out = mtp(h, model.embed(nxt), start, cos, sin, cache.mtp[0])
        return model.head(out[:, -1]).float()

    def emit(pos: int, tok: torch.Tensor) -> None:
        nonlocal finished
        tokens[:, pos] = tok
        generated = ~in_prompt[:, pos]
        if on_token is not None:
            on_token(pos, tok, generated & ~finished)
        if eos_id is not None:
            finished = finished | (generated & (tok == eos_id))

    def choose(pos: int, probs: torch.Tensor) -> torch.Tensor:
        return torch.where(in_prompt[:, pos], tokens[:, pos], _draw(probs, greedy, gen))

    # prefill: main over [0, cur), pick token cur, then MTP over [0, cur) drafts token cur + 1
    cur = min(lens)
    h, logits = main_forward(0, tokens[:, :cur])
    emit(cur, choose(cur, sampling_probs(logits[:, -1], temperature, top_p, top_k)))
    cur += 1
    draft_logits = mtp_forward(0, h, tokens[:, 1:cur])
    while cur < total and not finished.all():
        q = sampling_probs(draft_logits, temperature, top_p, top_k)
        draft = torch.where(in_prompt[:, cur], tokens[:, cur], _draw(q, greedy, gen))
        h, logits = main_forward(cur - 1, torch.stack([tokens[:, cur - 1], draft], dim=1))
        p0 = sampling_probs(logits[:, 0], temperature, top_p, top_k)
        tok, accepted = verify(p0, q, draft, greedy, gen)
        tok = torch.where(in_prompt[:, cur], tokens[:, cur], tok)
        accepted = accepted | in_prompt[:, cur]
        if stats is not None:
            live = ~in_prompt[:, cur] & ~finished
            stats["drafted"] += int(live.sum())
            stats["accepted"] += int((accepted & live & (tok == draft)).sum())
            stats["trace"].append((cur, int(draft[0]), bool(accepted[0] and tok[0] == draft[0])))
        emit(cur, tok)
        both = bool(accepted.all()) and cur + 1 < total and not finished.all()
        if both:
            emit(cur + 1, choose(cur + 1, sampling_probs(logits[:, 1], temperature, top_p, top_k)))
            draft_logits = mtp_forward(cur - 1, h, tokens[:, cur: cur + 2])
            cur += 2
        else:
            draft_logits = mtp_forward(cur - 1, h[:, :1], tokens[:, cur: cur + 1])
            cur += 1
    out = []
    for i, p in enumerate(prompts):
        new = tokens[i, len(p): min(cur, total)].tolist()[:max_new_tokens]
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        out.append(new)
    return out
