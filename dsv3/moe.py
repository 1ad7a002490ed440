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

Three expert paths compute the same sum:
  - `experts_loop`: one expert at a time, `torch.where` for its tokens (the official code's shape);
  - `experts_grouped`: sort the (token, slot) pairs by expert once, run each expert on
    one contiguous slice, scatter back with one `index_add_` -- no per-token Python;
  - `experts_stacked`: gather each token's k experts' rows from weights stacked as (e, f, m)
    and contract them: no data-dependent shape, no value read on the host (what
    `torch.compile` and CUDA graphs need: dsv3.decode_step). `MoE.stacked_experts` builds
    the stacks by re-pointing each expert's weight to a slice of one buffer per projection,
    so stacking costs no second copy of the experts. FP8 experts are gathered as FP8 with
    their block scales and dequantised after the gather (only the chosen experts' blocks).
  - `experts_all`: every expert on every token, weighted by the routing (0 where not chosen):
    also static, and what the static step uses once the batch's n·k choices outnumber the experts
    (`gathering_pays`): each expert's weights are read once, through its own Linear (the FP8
    GEMM for FP8 experts), instead of one gathered copy per (token, slot).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import fp8
from dsv3.config import ModelArgs
from dsv3.errors import UsageError
from dsv3.layers import MLP

PROJECTIONS = ("w1", "w2", "w3")  # an expert MLP's Linears


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
        self.block_size, self.gemm_impl = args.block_size, args.gemm_impl  # for stacked FP8 experts

    def forward(self, x: torch.Tensor, stacked: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x (..., m) -> (..., m). `stacked` (from `stacked_experts`): a static path instead of the configured
        dispatch (the static decode step's): `experts_stacked` while `gathering_pays`, else `experts_all`."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (n, m)
        weights, indices = self.gate(x)
        if stacked is None:
            routed = self.dispatch(self.experts, x, weights, indices)
        elif gathering_pays(*indices.shape, self.n_routed_experts):
            routed = experts_stacked(stacked, x, weights, indices, self.block_size, self.gemm_impl)
        else:
            routed = experts_all(self.experts, x, weights, indices)
        out = routed if self.shared_experts is None else routed + self.shared_experts(x)
        return out.view(shape)

    def stacked_experts(self) -> dict[str, torch.Tensor]:
        """{"w1": (e, f, m), "w2": (e, m, f), "w3": (e, f, m)} views over one buffer per projection; FP8 experts
        add their block scales, {"w1.scale": (e, ⌈f/bs⌉, ⌈m/bs⌉), ...}, stacked the same way.

        If the experts' weights already lie back to back in one storage (a previous call
        stacked them), the stack is that storage; otherwise one buffer is allocated, each
        expert's weight copied in and re-pointed to its slice (the old tensors are freed
        when nothing else holds them: peak extra memory is one projection of one layer).
        The Parameters stay the same objects, so the model, its state_dict and saving are unchanged.
        """
        experts = list(self.experts)
        if any(e is None for e in experts):
            raise UsageError("the static decode step needs every routed expert on this device (no expert parallelism)")
        out = {}
        for name in PROJECTIONS:
            linears = [getattr(e, name) for e in experts]
            for key, ws in ((name, [lin.weight for lin in linears]), (f"{name}.scale", [lin.scale for lin in linears])):
                if ws[0] is None:  # no scale: a bf16/fp32 expert
                    continue
                stack = _contiguous_stack(ws)
                out[key] = _restack(ws) if stack is None else stack
        return out


def _contiguous_stack(ws: list[torch.Tensor]) -> torch.Tensor | None:
    """The (e, ...) view over ws if they are contiguous, equal-shaped and back to back in one storage."""
    w0 = ws[0]
    step = w0.numel()
    if not all(w.is_contiguous() and w.shape == w0.shape and w.dtype == w0.dtype for w in ws):
        return None
    if not all(w.untyped_storage().data_ptr() == w0.untyped_storage().data_ptr()
               and w.storage_offset() == w0.storage_offset() + i * step for i, w in enumerate(ws)):
        return None
    return w0.detach().as_strided((len(ws), *w0.shape), (step, *w0.stride()), w0.storage_offset())


def _restack(ws: list[torch.Tensor]) -> torch.Tensor:
    """One (e, ...) buffer holding ws, each w re-pointed to its slice (an ordinary tensor, even under inference_mode)."""
    with torch.inference_mode(False), torch.no_grad():
        stack = torch.empty((len(ws), *ws[0].shape), dtype=ws[0].dtype, device=ws[0].device)
        for i, w in enumerate(ws):
            stack[i].copy_(w)
            w.data = stack[i]  # the Parameter object stays; its storage is now the stack's slice
    return stack


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


def gathering_pays(n: int, k: int, e: int) -> bool:
    """Whether the static step gathers each (token, slot)'s expert weights (n·k copies, repeats included)
    rather than running all e experts on every token: while the copies are no larger than the experts.

    Compiled, the gather fuses into the contraction and costs only the chosen experts' FLOPs: on one CPU
    thread, bench preset, batch 8 (n·k = e = 32), it was 1.9x faster than running all experts (one run: 56 vs 106
    ms/step). Past n·k = e the copies outgrow the weights -- at 671B width, batch 64 would gather 512 expert
    copies, ~45 GB per layer in bf16 -- while running every expert reads each once (`experts_all`)."""
    return n * k <= e


def experts_stacked(stacked: dict[str, torch.Tensor], x: torch.Tensor, weights: torch.Tensor,
                    indices: torch.Tensor, block_size: int = 128, gemm_impl: str = "bf16") -> torch.Tensor:
    """The same sum from the stacked weights (`MoE.stacked_experts`): each token's k experts' rows gathered
    and contracted, every shape fixed by (n, k); summed over k in float32 as the loop does.

    FP8 stacks: the gathered blocks are dequantised into x's dtype, as `fp8_linear` dequantises a weight;
    with gemm_impl "fp8" the activations are also rounded through `act_quant` first, so the products are
    those of the block-scaled FP8 GEMM (up to summation order)."""

    def gathered(name: str) -> torch.Tensor:
        w = stacked[name][indices]  # (n, k, rows, cols)
        s = stacked.get(f"{name}.scale")
        return w if s is None else fp8.weight_dequant(w, s[indices], block_size, x.dtype)

    def operand(a: torch.Tensor) -> torch.Tensor:
        if gemm_impl != "fp8" or "w1.scale" not in stacked:
            return a
        return fp8.act_dequant(*fp8.act_quant(a, block_size), block_size, a.dtype)

    w1, w2, w3 = (gathered(name) for name in PROJECTIONS)  # (n k f m), (n k m f), (n k f m)
    xq = operand(x)
    act = F.silu(torch.einsum("nm,nkfm->nkf", xq, w1)) * torch.einsum("nm,nkfm->nkf", xq, w3)
    y = torch.einsum("nkf,nkmf->nkm", operand(act), w2)
    return (y * weights[..., None]).float().sum(1).to(x.dtype)  # (n, m)


def experts_all(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The same sum with every expert run on every token, weighted by its routing weight (0 if not chosen):
    static shapes, each expert's weights read once through its own Linear."""
    routing = torch.zeros(x.shape[0], len(experts), dtype=torch.float32, device=x.device)
    routing.scatter_add_(1, indices, weights.float())  # (n, e)
    y = torch.zeros_like(x, dtype=torch.float32)
    for i, expert in enumerate(experts):
        y += expert(x).float() * routing[:, i, None]
    return y.to(x.dtype)


def experts_dense_reference(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor,
                            indices: torch.Tensor) -> torch.Tensor:
    """Run every expert on every token and mask: the slow, obviously right oracle for tests."""
    mask = torch.zeros(x.shape[0], len(experts), dtype=torch.float32, device=x.device)
    mask.scatter_add_(1, indices, weights.float())  # (n, e) routing weight, 0 where not chosen
    outs = torch.stack([e(x).float() for e in experts], dim=1)  # (n, e, m)
    return torch.einsum("ne,nem->nm", mask, outs).to(x.dtype)
