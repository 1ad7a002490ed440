"""Memory plan: will a config fit on N GPUs of G GB under dsv3's tensor/expert parallelism?

The work behind `dsv3 plan`. What it computes, and why, is the command's description: the
docstring of `dsv3/cli/plan.py` (what `dsv3 plan --help` shows), kept there so that --help needs no torch.
"""

from __future__ import annotations

import json

import torch

from dsv3.config import ModelArgs
from dsv3.errors import UsageError
from dsv3.info import kv_cache_bytes_per_token
from dsv3.model import Block
from dsv3.parallel import check_world_size, shard_block, valid_world_sizes

RESERVE_FRACTION = 0.05  # of each GPU, kept free for fragmentation
RUNTIME_OVERHEAD = 2 * 10**9  # CUDA context + NCCL/gloo buffers + allocator slack per rank


def _bytes(module) -> int:
    """Bytes as the release stores them: FP8 weights 1 B, block scales and the gate bias float32, the rest bf16
    (the model builds some small tensors -- norms, gate weight -- in float32 until a checkpoint assigns them)."""

    def size(name, p):
        if p.dtype == torch.float8_e4m3fn:
            return 1
        return 4 if name.endswith((".scale", "gate.bias")) else 2
    return sum(p.numel() * size(n, p) for n, p in module.named_parameters())


def weights_bytes_per_rank(args, world: int, mtp: bool = False) -> int:
    """Bytes of rank 0's parameters (every rank holds the same amount) under `world`-way parallelism."""

    dtype = torch.bfloat16
    total = 0
    kinds = {}  # layer kind -> bytes of one sharded block, built once (a 671B MoE block is 45k tensors)
    layer_ids = list(range(args.n_layers)) + ([args.n_layers + k for k in range(args.n_mtp_layers)] if mtp else [])
    for i in layer_ids:
        kind = args.is_moe_layer(i)
        if kind not in kinds:
            with torch.device("meta"):
                blk = Block(i, args, dtype)
            if world > 1:
                shard_block(blk, 0, world)
            kinds[kind] = _bytes(blk)
        total += kinds[kind]
    v_local = args.vocab_size // world
    total += 2 * v_local * args.dim * 2 + args.dim * 2  # embedding + head rows (bf16) + final norm
    if mtp:  # per module: enorm, hnorm, shared_head.norm, eh_proj (bf16); embedding and head are shared
        total += args.n_mtp_layers * (3 * args.dim * 2 + 2 * args.dim * args.dim * 2)
    return total


def kv_cache_bytes_per_rank(args, batch: int, max_seq_len: int, mtp: bool = False) -> int:
    """The latent cache of `batch` sequences of `max_seq_len` tokens (replicated on every rank; bf16)."""

    return batch * max_seq_len * kv_cache_bytes_per_token(args, mtp=mtp)


def workspace_bytes_per_rank(args, world: int, batch: int, prefill: int) -> int:
    act = 2  # bf16 activations
    n = batch * prefill  # tokens in the step
    h = args.n_heads // world
    scores = 2 * batch * h * prefill * prefill * 4  # float32 scores + probabilities (b, s, h, t)
    latents = 3 * n * h * args.kv_lora_rank * act  # q_lat, o_lat and the per-head output
    residual = 4 * n * args.dim * act  # x, normed x, attention/ffn outputs in flight
    moe = n * args.n_activated_experts * args.dim * (2 * act + 4)  # gathered tokens, their outputs, float32 sum
    logits = 2 * n * args.vocab_size * 4  # local shards gathered into full float32 logits, then the copy
    absorbed = args.n_layers * h * (args.qk_nope_head_dim + args.v_head_dim) * args.kv_lora_rank * act
    # V3.2: the indexer's per-head logits (scored in chunks of <= 2^26 values), its scores and selection mask
    index = (min(2**26, batch * args.index_n_heads * prefill * prefill) + 2 * batch * prefill * prefill) * 4 \
        if args.index_n_heads else 0
    return scores + latents + residual + moe + logits + absorbed + index + RUNTIME_OVERHEAD


def comm_bytes_per_token(args, world: int, act_bytes: int = 2) -> dict[str, float]:
    """Bytes each rank sends per generated token (batch 1) under dsv3's layout, ring collectives.

    A ring all-reduce of S bytes sends 2(N-1)/N·S per rank; a ring all-gather of N pieces of S/N
    sends (N-1)/N·S. dsv3 does two all-reduces of the (m) activation per block (attention output,
    FFN/MoE output: routed experts need nothing extra, since every rank sees every token), one for
    the embedding, and an all-gather of the logits. For comparison, all-to-all expert parallelism
    (DeepEP-style: tokens are sent to the ranks owning their experts) moves k·m bytes to dispatch
    (FP8) and k·m·act_bytes to combine per MoE layer, of which (N-1)/N leave the rank.
    """
    f = (world - 1) / world
    blocks = args.n_layers
    moe_layers = args.n_layers - args.n_dense_layers
    out = {
        "attention_all_reduce": 2 * f * blocks * args.dim * act_bytes,
        "ffn_all_reduce": 2 * f * blocks * args.dim * act_bytes,
        "embedding_all_reduce": 2 * f * args.dim * act_bytes,
        "logits_all_gather": f * args.vocab_size * act_bytes,
    }
    out["total"] = sum(out.values())
    out["all_to_all_ep_moe"] = f * moe_layers * args.n_activated_experts * args.dim * (1 + act_bytes)
    return out


def plan(args, gpus: int, gpu_mem_gb: float, *, batch: int = 1, max_seq_len: int | None = None,
         prefill_tokens: int | None = None, mtp: bool = False, search: bool = True) -> dict:
    """The per-rank budget of `gpus` GPUs of `gpu_mem_gb` GB each (see the module docstring)."""

    check_world_size(args, gpus)
    max_seq_len = max_seq_len or args.max_seq_len
    prefill = min(prefill_tokens or 4096, max_seq_len)
    cap = int(gpu_mem_gb * 1e9)
    w = weights_bytes_per_rank(args, gpus, mtp)
    kv = kv_cache_bytes_per_rank(args, batch, max_seq_len, mtp)
    ws = workspace_bytes_per_rank(args, gpus, batch, prefill)
    used = w + kv + ws
    out = {
        "gpus": gpus, "gpu_mem_bytes": cap, "dtype": args.dtype, "batch": batch, "max_seq_len": max_seq_len,
        "prefill_tokens": prefill, "mtp": mtp,
        "weights_bytes_per_gpu": w, "kv_cache_bytes_per_gpu": kv, "workspace_bytes_per_gpu": ws,
        "used_bytes_per_gpu": used, "headroom_bytes_per_gpu": cap - used,
        "fits": cap - used >= RESERVE_FRACTION * cap,
        "valid_gpu_counts": valid_world_sizes(args),
    }
    if search:
        fitting = [n for n in out["valid_gpu_counts"] if plan(args, n, gpu_mem_gb, batch=batch, max_seq_len=max_seq_len,
                                                            prefill_tokens=prefill, mtp=mtp, search=False)["fits"]]
        out["smallest_gpus_that_fit"] = fitting[0] if fitting else None
    return out


def run(ns) -> int:
    args = ModelArgs.load(ns.config)
    if ns.dtype:
        args = args.replace(dtype=ns.dtype)
    for name in ("batch", "max_seq_len", "prefill_tokens"):
        v = getattr(ns, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not ns.gpu_mem_gb > 0:
        raise UsageError(f"--gpu-mem-gb must be positive, got {ns.gpu_mem_gb}")
    out = plan(args, ns.gpus, ns.gpu_mem_gb, batch=ns.batch, max_seq_len=ns.max_seq_len,
               prefill_tokens=ns.prefill_tokens, mtp=ns.mtp)
    if ns.json:
        print(json.dumps(out))
        return 0
    gb = lambda b: f"{b / 1e9:10.2f} GB"
    print(f"{ns.config}: {args.dtype} weights on {ns.gpus} GPU(s) of {ns.gpu_mem_gb:g} GB, batch {out['batch']}, "
          f"max_seq_len {out['max_seq_len']}, prefill {out['prefill_tokens']} tokens"
          + (", with MTP" if ns.mtp else ", without the MTP module"))
    print(f"  weights (+ FP8 scales)  {gb(out['weights_bytes_per_gpu'])} per GPU")
    print(f"  KV cache (replicated)   {gb(out['kv_cache_bytes_per_gpu'])} per GPU")
    print(f"  activations/workspace   {gb(out['workspace_bytes_per_gpu'])} per GPU")
    print(f"  headroom                {gb(out['headroom_bytes_per_gpu'])} per GPU "
          f"(needs >= {RESERVE_FRACTION:.0%} of the GPU)")
    if out["fits"]:
        print(f"fits on {ns.gpus} x {ns.gpu_mem_gb:g} GB")
    else:
        n = out["smallest_gpus_that_fit"]
        where = f"the smallest GPU count that fits is {n}" if n else \
            f"no valid GPU count of this size fits (valid counts: {out['valid_gpu_counts']})"
        print(f"does NOT fit on {ns.gpus} x {ns.gpu_mem_gb:g} GB; {where}")
    return 0
