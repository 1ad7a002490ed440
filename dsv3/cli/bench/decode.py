"""Prefill and decode speed of dsv3 (optionally beside transformers and llama.cpp) against the memory-bandwidth floor.

Every measurement runs in a fresh process (`--worker`), implementations alternate
run by run, and the table reports medians and ratios. The floor is the time to
read, once, the weights a decode step must touch -- the activated parameters
without the embedding table (a lookup reads one row) -- at this machine's measured
single-stream read bandwidth (an fp32 matrix-vector product over 256 MB).
For batch B, the routed experts touched per step are the expected number of
distinct experts under uniform routing, e·(1 − (1 − k/e)^B) per layer.
Every engine computes what generation needs: the last position's logits
(dsv3 `last_only=True`, transformers `logits_to_keep=1`, as their generate() does; llama.cpp
asks for the last position's logits only). `--compare llama.cpp` converts the checkpoint
with llama.cpp's own converter (cached beside it); batch B runs as B sequences of one llama.cpp
context (its low-level API). Before timing, every peer's teacher-forced logits must agree with
dsv3's (median relative L2 <= 1e-4 in float32, 0.1 in bf16) and, in float32, its 16 greedy tokens too.
`--dtype fp8` converts the preset to the FP8 release format (`dsv3 convert`) and times it kept FP8 (row
`dsv3-fp8`) beside the same checkpoint dequantised to bf16 at load (the other rows: what `dsv3 generate` does
on a CPU); the floor is then bf16's.
`--sparse TOPK` adds rows for the same preset with V3.2's lightning indexer (4 heads x 64; its keys cached
beside the latents), attending to TOPK gathered tokens per query: with `--contexts` the dense step grows
with the context, the sparse one's attention stops growing beyond TOPK (the indexer still scores every key).
`--sparse-layer CONFIG` times one attention layer of a V3.2 config alone (671B-v3.2: 128 heads, the indexer's
64 x 128, index_topk 2048), with and without its indexer, its cache filled with random values (default contexts
2048..32000): where attention, not the weights, is the step's cost.
"""

from __future__ import annotations

import argparse

from dsv3.options import choice_list, integer_list, positive, real

HELP = "Prefill and decode speed of dsv3 (optionally beside transformers and llama.cpp) against the memory-bandwidth floor."


def add_args(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="a Hugging Face DeepSeek-V3 directory")
    src.add_argument("--preset", default="bench", help="write a random checkpoint of this preset once (default: bench)")
    p.add_argument("--batch", type=integer_list(1), default=(1, 8), help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt", type=integer_list(1), default=(512, 2048),
                   help="comma-separated prompt lengths (default 512,2048)")
    p.add_argument("--new", type=positive, default=64, help="decode steps timed per run (default 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "fp8"],
                   help="weights and activations; fp8: the preset in the FP8 release format (dsv3 convert), timed "
                        "as stored (row dsv3-fp8) and dequantised to bf16 at load (what dsv3 generate does with it on a CPU)")
    p.add_argument("--threads", type=positive, default=1, help="torch threads per worker process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (on CUDA the floor uses --hbm-gb-s)")
    p.add_argument("--hbm-gb-s", type=real(0, lo_open=True), default=4800.0,
                   help="GPU memory bandwidth for the floor in GB/s (H200: 4800)")
    p.add_argument("--attn", default="absorb", help="dsv3 attention implementations, comma-separated (absorb,naive)")
    p.add_argument("--compare", type=choice_list(("transformers", "llama.cpp")), default=(),
                   help="peer engines timed on the same checkpoint, comma-separated: transformers, llama.cpp "
                        "(default: none)")
    p.add_argument("--llama-cpp-src", default=None, metavar="DIR",
                   help="llama.cpp source directory whose convert_hf_to_gguf.py makes the GGUF for --compare llama.cpp "
                        "(default: $DSV3_LLAMA_CPP_SRC)")
    p.add_argument("--static", action="store_true", help="also time dsv3's static decode step, eager")
    p.add_argument("--compile", action="store_true",
                   help="also time dsv3's static decode step under torch.compile (fullgraph; compile time excluded)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time the static step replayed as a CUDA graph (with --compile: the compiled step)")
    p.add_argument("--sparse", type=positive, default=0, metavar="TOPK",
                   help="also time the preset as DeepSeek-V3.2 (+ a lightning indexer keeping TOPK keys per query)")
    p.add_argument("--sparse-layer", default=None, metavar="CONFIG",
                   help="instead: one attention layer of a V3.2 config (e.g. 671B-v3.2), dense vs sparse, vs --contexts")
    p.add_argument("--repeats", type=positive, default=3, help="fresh-process runs per cell (median reported)")
    p.add_argument("--contexts", type=integer_list(1), default=(),
                   help="e.g. 256,512,1024,2048: decode step time vs context (plot data)")
    p.add_argument("--plot", default=None, help="write the step-time-vs-context plot to this PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def run(ns) -> int:
    if ns.sparse_layer and not ns.worker:
        from dsv3.bench import sparse_layer

        return sparse_layer.run_sparse_layer(ns)
    from dsv3.bench import decode

    return decode.run(ns)
