"""`dsv3 bench decode --sparse-layer CONFIG`: one V3.2 attention layer's decode step against context, with and
without its lightning indexer (what the command's description in dsv3/cli/bench/decode.py explains)."""

from __future__ import annotations

import json
import statistics
import time

import torch

from dsv3.bench.decode import machine_info
from dsv3.config import ModelArgs
from dsv3.errors import UsageError
from dsv3.mla import MLA
from dsv3.rope import rope_cos_sin


def sparse_layer_curves(args: ModelArgs, contexts: list[int], steps: int = 12, warmup: int = 3) -> dict:
    """Decode-step time of one attention layer of `args` (a V3.2 config) against context, dense (the same layer
    without its indexer) and sparse alternating step by step in one process: {"dense"|"sparse": [(ctx, min s,
    median s)]}. The caches are filled with random values (a step's cost does not depend on them), so no prefill."""
    layers = {}
    for name, a in (("dense", args.replace(index_n_heads=0)), ("sparse", args)):
        torch.manual_seed(0)
        layers[name] = MLA(a.replace(max_seq_len=max(contexts) + steps + warmup)).eval()
        with torch.no_grad():
            for p in layers[name].parameters():
                p.normal_(0, 0.02)
    out: dict[str, list] = {n: [] for n in layers}
    for ctx in contexts:
        n_pos = ctx + steps + warmup
        caches = {n: attn.new_cache(1, n_pos, torch.float32, "cpu") for n, attn in layers.items()}
        for c in caches.values():
            for t in c.tensors.values():
                t.normal_()
        cos, sin = rope_cos_sin(args, torch.arange(n_pos))
        times: dict[str, list[float]] = {n: [] for n in layers}
        with torch.inference_mode():
            for i in range(warmup + steps):
                for n, attn in layers.items():
                    x, p = torch.randn(1, 1, args.dim), ctx + i
                    t = time.perf_counter()
                    attn(x, p, cos[p:p + 1], sin[p:p + 1], caches[n])
                    if i >= warmup:
                        times[n].append(time.perf_counter() - t)
        for n, ts in times.items():
            out[n].append((ctx, min(ts), statistics.median(ts)))
    return out


def run_sparse_layer(ns) -> int:
    args = ModelArgs.load(ns.sparse_layer)
    if not args.index_n_heads:
        raise UsageError(f"--sparse-layer {ns.sparse_layer}: not a V3.2 config (index_n_heads is 0)")
    contexts = sorted(ns.contexts) or [2048, 4096, 8192, 16384, 32000]
    torch.set_num_threads(ns.threads)
    curves = sparse_layer_curves(args.replace(dtype="bf16"), contexts)
    if ns.json:
        print(json.dumps(dict(config=ns.sparse_layer, index_topk=args.index_topk, threads=ns.threads, curves=curves,
                              machine=machine_info())))
        return 0
    print(f"one attention layer of {ns.sparse_layer} (index_topk {args.index_topk}), float32, {ns.threads} thread(s): "
          "decode step ms, min / median")
    for (ctx, dmin, dmed), (_, smin, smed) in zip(curves["dense"], curves["sparse"]):
        print(f"  context {ctx:>6}: dense {1e3 * dmin:8.1f} / {1e3 * dmed:8.1f}   sparse {1e3 * smin:8.1f} / {1e3 * smed:8.1f}")
    return 0
