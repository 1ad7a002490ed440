"""DeepSeekMoE: a gate that picks k of e fine-grained routed experts per token, plus shared experts.

Axes: n tokens (flattened b·s), m model dim, e experts, k chosen experts per token,
g expert groups.

Gate (as in the released model):
  scores = sigmoid(x Wgᵀ) (V3) or softmax (V2 shapes), in float32.
  The correction bias (HF `e_score_correction_bias`) is added *only to choose*
  experts -- it is what aux-loss-free balancing trains.
  With groups: a group's score is the sum of its top-2 biased scores (the max
  without a bias); only the best `n_limited_groups` groups stay eligible.
  Weights are the *unbiased* scores of the chosen experts, renormalised to sum 1
  for sigmoid, then × route_scale.

Two expert paths compute the same sum:
  - `experts_loop`: one expert at a time, `torch.where` for its tokens (the official code's shape);
  - `experts_grouped`: sort the (token, slot) pairs by expert once, run each expert on
    one contiguous slice, scatter back with one `index_add_` -- no per-token Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelArgs
from dsv3.layers import MLP


class Gate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        # float32 always: small increments from aux-loss-free balancing must not round away
        self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32),
                                 requires_grad=False) if args.gate_bias else None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Unbiased affinity of each token for each expert, (n, e) float32."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, m) -> routing weights (n, k) in x's dtype and expert indices (n, k)."""
        scores = self.scores(x)
        choice = scores if self.bias is None else scores + self.bias
        if self.n_groups > 1:
            grouped = choice.unflatten(-1, (self.n_groups, -1))  # (n, g, e/g)
            group_scores = grouped.amax(-1) if self.bias is None else grouped.topk(2, dim=-1)[0].sum(-1)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]  # (n, topk_groups)
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.topk, dim=-1)[1]  # (n, k)
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).to(x.dtype), indices


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, **linear_kw):
        super().__init__()
        self.n_routed_experts = args.n_routed_experts
        self.gate = Gate(args)
        # ModuleList indexed by global expert id; under expert parallelism a rank holds
        # only its own experts and the others are None (see dsv3.parallel).
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_inter_dim, **linear_kw)
                                     for _ in range(args.n_routed_experts))
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, **linear_kw) \
            if args.n_shared_experts > 0 else None
        self.dispatch = experts_grouped if args.moe_impl == "grouped" else experts_loop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (n, m)
        weights, indices = self.gate(x)
        routed = self.dispatch(self.experts, x, weights, indices)
        out = routed if self.shared_experts is None else routed + self.shared_experts(x)
        return out.view(shape)


def experts_loop(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor,
                 indices: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[n, k] · expert_{indices[n, k]}(x[n]): one expert at a time."""
    y = torch.zeros_like(x, dtype=torch.float32)
    counts = torch.bincount(indices.flatten(), minlength=len(experts)).tolist()
    for i, expert in enumerate(experts):
        if counts[i] == 0 or expert is None:
            continue
        tok, slot = torch.where(indices == i)
        y[tok] += (expert(x[tok]) * weights[tok, slot, None]).float()
    return y.to(x.dtype)


def experts_grouped(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor,
                    indices: torch.Tensor) -> torch.Tensor:
    """The same sum with the (token, slot) pairs sorted by expert once: contiguous slices, one scatter."""
    k = indices.shape[1]
    flat = indices.flatten()  # (n·k,)
    order = flat.argsort(stable=True)
    tokens = order // k  # which token each sorted pair came from
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    xs = x[tokens]  # (n·k, m) grouped by expert
    ws = weights.flatten()[order, None]
    ys = torch.empty_like(xs)
    start = 0
    for i, c in enumerate(counts):
        if c:
            expert = experts[i]
            ys[start:start + c] = 0 if expert is None else expert(xs[start:start + c])
            start += c
    y = torch.zeros_like(x, dtype=torch.float32)
    y.index_add_(0, tokens, (ys * ws).float())
    return y.to(x.dtype)


def experts_dense_reference(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor,
                            indices: torch.Tensor) -> torch.Tensor:
    """Run every expert on every token and mask: the slow, obviously right oracle for tests."""
    mask = torch.zeros(x.shape[0], len(experts), dtype=torch.float32, device=x.device)
    mask.scatter_add_(1, indices, weights.float())  # (n, e) routing weight, 0 where not chosen
    outs = torch.stack([e(x).float() for e in experts], dim=1)  # (n, e, m)
    return torch.einsum("ne,nem->nm", mask, outs).to(x.dtype)
