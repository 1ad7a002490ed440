"""A static-shape decode step: what `torch.compile` and CUDA-graph capture need.

The readable path, `model(tokens, start_pos, cache)`, takes the position as a Python
int, attends over a cache slice that grows by one every step, and dispatches MoE
experts with data-dependent shapes (`bincount(...).tolist()`). Each of those makes a
compiler re-specialise or break the graph, and a CUDA graph impossible. This module
runs one decode step of a lockstep batch in a form in which nothing
depends on a value on the host:

- the position is a 0-d long *tensor*; rope cos/sin are gathered from a table of all
  `max_len` positions built once;
- the cache is the model's own preallocated `Cache` (b, t = max_len, ...): the new
  latent is written with `index_copy_` at the position, attention runs over the whole
  fixed-length cache and keys beyond the position get -inf (their softmax weight is
  exactly 0; the cache starts zeroed and only ever holds finite values, so 0·x = 0);
- routed experts are applied by gathering the chosen experts' rows from weights
  stacked as (e, f, m) (`MoE.stacked_experts`, `experts_stacked` in dsv3.moe: each
  expert's Linear weight becomes a view of that one buffer, so stacking costs no second
  copy of the experts; FP8 experts are gathered as FP8 with their block scales and
  dequantised after the gather) -- or, once the batch's n·k choices would gather more
  copies than there are experts (`gathering_pays`), by running every
  expert on every token through its own Linear, weighted 0 where it was not chosen
  (`experts_all`: each expert read once; the FP8 GEMM for FP8 experts). Which one is a
  function of the shapes only, fixed for a given batch.

Nothing here re-implements the model: attention is `MLA.forward_static`, which shares
its projections and its absorbed attention with the readable path (dsv3.mla), and the
experts are the MoE's own stacked path. This module composes them over the layers and
runs them.

Axes: b batch, s query positions (1 here), t key positions (cache slots), m model dim,
r rope dim, v vocab.

`DecodeRunner` wraps it: prefill (s > 1) goes through the readable path into the same
cache, decode steps (s = 1) through the static step -- eager, `torch.compile`d
(fullgraph), and/or replayed as a captured CUDA graph. Tests hold the static step
equal to the readable path (logits and greedy tokens).

Limits: absorbed attention only (`attn_impl="absorb"`); all experts local (no expert
parallelism); MTP modules are not used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3.errors import UsageError
from dsv3.moe import MoE
from dsv3.rope import rope_cos_sin


# ---------------------------------------------------------------------- the step
class StaticDecodeStep:
    """step(tokens (b, 1) long, pos () long tensor) -> logits (b, v) float32, writing the cache at pos.

    Every tensor it touches has a shape fixed at construction, and no value goes back to
    the host: it can be compiled with fullgraph=True and captured as a CUDA graph.
    """

    def __init__(self, model, cache):
        args = model.args
        if args.attn_impl != "absorb":
            raise UsageError(f"the static decode step implements absorbed attention; got attn_impl={args.attn_impl!r}")
        self.model, self.cache = model, cache
        device = model.device
        max_len = cache.max_len
        cos, sin = rope_cos_sin(args, torch.arange(max_len, device=device))  # (t, r/2) each
        self.cos, self.sin = cos, sin
        self.key_pos = torch.arange(max_len, device=device)  # (t,)
        dtype = model.dtype
        self.wkv_b = [blk.attn.absorbed_wkv_b(dtype) for blk in model.layers]  # (h, d + d_v, c), prepared once
        self.experts = [blk.ffn.stacked_experts() if isinstance(blk.ffn, MoE) else None for blk in model.layers]

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        model = self.model
        where = pos.reshape(1)
        cos, sin = self.cos.index_select(0, where), self.sin.index_select(0, where)  # (1, r/2)
        # additive mask over all cache slots, shared by every layer: keys after pos are not there yet
        mask = torch.zeros_like(self.key_pos, dtype=torch.float32).masked_fill(self.key_pos > pos, float("-inf"))
        mask = mask[None]  # (s = 1, t)
        x = model.embed(tokens)  # (b, 1, m)
        for i, blk in enumerate(model.layers):
            x = x + blk.attn.forward_static(blk.attn_norm(x), where, cos, sin, mask, self.cache.layers[i],
                                            self.wkv_b[i])
            h = blk.ffn_norm(x)
            x = x + (blk.ffn(h) if self.experts[i] is None else blk.ffn(h, self.experts[i]))
        return model.head(model.norm(x))[:, -1].float()


# ---------------------------------------------------------------------- the runner
class DecodeRunner:
    """Prefill with the readable path, decode with the static step, both into one preallocated cache.

    runner(tokens (b, s), start_pos: int) -> logits (b, 1, v) float32 of the last position, like
    model(tokens, start_pos, cache, last_only=True).
    `mode` (one of MODES) chooses how decode steps (s = 1) run:
      "static"            the static step, eagerly;
      "compile"           `torch.compile(fullgraph=True, dynamic=False)` of it: one graph, compiled on first use;
      "cuda-graph"        (CUDA) the eager static step captured once into a `torch.cuda.CUDAGraph` over
                          static token/position buffers and replayed per token;
      "compile+cuda-graph" the compiled step, captured the same way (what gpt-fast's reduce-overhead does).
    """

    MODES = ("static", "compile", "cuda-graph", "compile+cuda-graph")

    def __init__(self, model, batch: int, max_len: int, mode: str = "static"):
        if mode not in self.MODES:
            raise UsageError(f"decode mode {mode!r}: expected one of {', '.join(self.MODES)}")
        self.cuda_graph = mode.endswith("cuda-graph")
        if self.cuda_graph and model.device.type != "cuda":
            raise UsageError(f"decode mode {mode!r} needs the model on a CUDA device; it is on {model.device}")
        self.model, self.mode = model, mode
        self.cache = model.new_cache(batch, max_len)
        self.static = StaticDecodeStep(model, self.cache)
        compiled = mode.startswith("compile")
        self.fn: Callable = torch.compile(self.static, fullgraph=True, dynamic=False) if compiled else self.static
        self._graph = None

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        if tokens.shape[1] != 1:
            return self.model(tokens, start_pos, self.cache, last_only=True)
        return self.step(tokens, start_pos)[:, None]

    def step(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Logits (b, v) for tokens (b, 1) at position pos."""
        if not 0 <= int(pos) < self.cache.max_len:
            raise UsageError(f"position {int(pos)} outside the cache's {self.cache.max_len} slots")
        if not self.cuda_graph:
            return self.fn(tokens, torch.as_tensor(pos, device=tokens.device))
        if self._graph is None:
            self._capture(tokens)
        self._tok.copy_(tokens)
        self._pos.fill_(int(pos))
        self._graph.replay()
        return self._out.clone()

    def _capture(self, tokens: torch.Tensor) -> None:
        # Warm-up runs write the cache at the last slot, which stays masked until it is
        # written for real; capture itself records kernels without running them.
        self._tok = torch.zeros_like(tokens)
        self._pos = torch.full((), self.cache.max_len - 1, dtype=torch.long, device=tokens.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.fn(self._tok, self._pos)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = self.fn(self._tok, self._pos)
