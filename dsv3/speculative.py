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
    if stats is not None:
        stats.update(drafted=0, accepted=0, forwards=0, trace=[])
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    run = MtpRequest(model, prompts, total, (temperature, top_p, top_k), eos_id, seed, on_token, stats)
    cur, draft_logits = run.prefill(min(len(p) for p in prompts))
    while cur < total and not run.finished.all():
        cur, draft_logits = run.step(cur, draft_logits)
    return run.new_tokens(prompts, cur, max_new_tokens)


class MtpRequest:
    """One speculative request in flight: the lockstep token buffer, the main and MTP caches, the sampling
    rule (temperature, top_p, top_k) and the optional stats; `prefill` then `step` until done."""

    def __init__(self, model, prompts: list[list[int]], total: int, sampling: tuple[float, float, int],
                 eos_id: int | None, seed: int | None, on_token, stats: dict | None):
        self.model, self.total, self.sampling = model, total, sampling
        self.greedy = sampling[0] == 0
        self.eos_id, self.on_token, self.stats = eos_id, on_token, stats
        self.device = device = model.device
        self.gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.tokens, self.in_prompt = lockstep_tokens(prompts, total, device)
        self.finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self.cache = model.new_cache(len(prompts), total, mtp=True)
        self.mtp = model.mtp[0]

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(logits, *self.sampling)

    def main_forward(self, start: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Main model over positions start.. of x (b, s): hidden states (b, s, m) and float32 logits (b, s, v)."""
        h = self.model.hidden(x, start, self.cache)
        if self.stats is not None:
            self.stats["forwards"] += 1
        logits = self.model.head(h).float()
        check_finite(logits, start + x.shape[1] - 1)
        return h, logits

    def mtp_forward(self, start: int, h: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """MTP positions start.. with main hidden states h and the tokens one ahead -> draft logits of the last."""
        model = self.model
        cos, sin = model.rotary(start, h.shape[1], self.device)
        out = self.mtp(h, model.embed(nxt), start, cos, sin, self.cache.mtp[0])
        return model.head(out[:, -1]).float()

    def emit(self, pos: int, tok: torch.Tensor) -> None:
        self.tokens[:, pos] = tok
        generated = ~self.in_prompt[:, pos]
        if self.on_token is not None:
            self.on_token(pos, tok, generated & ~self.finished)
        if self.eos_id is not None:
            self.finished = self.finished | (generated & (tok == self.eos_id))

    def choose(self, pos: int, probs: torch.Tensor) -> torch.Tensor:
        """A token drawn from probs (b, v) for position pos, or the prompt's own token where pos is in the prompt."""
        return torch.where(self.in_prompt[:, pos], self.tokens[:, pos], _draw(probs, self.greedy, self.gen))

    def prefill(self, cur: int) -> tuple[int, torch.Tensor]:
        """Main over [0, cur), pick token cur, then MTP over [0, cur) drafts token cur + 1: (cur + 1, draft logits)."""
        h, logits = self.main_forward(0, self.tokens[:, :cur])
        self.emit(cur, self.choose(cur, self.probs(logits[:, -1])))
        cur += 1
        return cur, self.mtp_forward(0, h, self.tokens[:, 1:cur])

    def step(self, cur: int, draft_logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Draft token cur, verify it with one main forward over (cur - 1, cur), keep the token after it when
        every row accepted; return the next position to fill and the MTP's draft logits for it."""
        tokens, in_prompt = self.tokens, self.in_prompt
        q = self.probs(draft_logits)
        draft = self.choose(cur, q)
        h, logits = self.main_forward(cur - 1, torch.stack([tokens[:, cur - 1], draft], dim=1))
        tok, accepted = verify(self.probs(logits[:, 0]), q, draft, self.greedy, self.gen)
        tok = torch.where(in_prompt[:, cur], tokens[:, cur], tok)
        accepted = accepted | in_prompt[:, cur]
        if self.stats is not None:
            self.record(cur, draft, tok, accepted)
        self.emit(cur, tok)
        if bool(accepted.all()) and cur + 1 < self.total and not self.finished.all():
            self.emit(cur + 1, self.choose(cur + 1, self.probs(logits[:, 1])))
            return cur + 2, self.mtp_forward(cur - 1, h, tokens[:, cur: cur + 2])
        return cur + 1, self.mtp_forward(cur - 1, h[:, :1], tokens[:, cur: cur + 1])

    def record(self, cur: int, draft: torch.Tensor, tok: torch.Tensor, accepted: torch.Tensor) -> None:
        live = ~self.in_prompt[:, cur] & ~self.finished
        self.stats["drafted"] += int(live.sum())
        self.stats["accepted"] += int((accepted & live & (tok == draft)).sum())
        self.stats["trace"].append((cur, int(draft[0]), bool(accepted[0] and tok[0] == draft[0])))

    def new_tokens(self, prompts: list[list[int]], cur: int, max_new_tokens: int) -> list[list[int]]:
        """Each prompt's new tokens, cut after eos_id (included) or at max_new_tokens."""
        out = []
        for i, p in enumerate(prompts):
            new = self.tokens[i, len(p): min(cur, self.total)].tolist()[:max_new_tokens]
            if self.eos_id is not None and self.eos_id in new:
                new = new[: new.index(self.eos_id) + 1]
            out.append(new)
        return out
