"""Memory plan: will a config fit on N GPUs of G GB under dsv3's tensor/expert parallelism?

Per rank (GB = 10⁹ bytes, as GPU vendors count):

  weights     the bytes of this rank's parameters (+ FP8 block scales), counted on the
              model itself after `dsv3.parallel.shard_model` on the meta device: sharded
              tensors /N, routed experts E/N whole, replicated tensors (wq_a, wkv_a, norms,
              gate) in full. The MTP layer is left out unless --mtp (plain generation does
              not run it; the official inference does not load it either).
  kv cache    the absorbed latent cache, batch × max_seq_len × (kv_lora_rank + rope) × 2 B
              per layer -- replicated on every rank (as in the official code).
  workspace   one forward step of `prefill_tokens` tokens per sequence: attention scores and
              probabilities in float32 for the local heads, the MoE's gathered tokens, the
              residual stream, full gathered float32 logits, the dequantised absorbed wkv_b
              kept per layer, plus a fixed runtime overhead (CUDA context, NCCL buffers).
  headroom    capacity - the three above; the plan fits when it keeps >= 5 % of the GPU
              free (allocator fragmentation).

It is arithmetic, not a measurement: `dsv3 bench` measures.
"""

from __future__ import annotations

from dsv3.options import positive, real

HELP = "Memory plan: will a config fit on N GPUs of G GB under dsv3's tensor/expert parallelism?"


def add_args(p) -> None:
    p.add_argument("config", help="preset (tiny, 16B, 236B, 671B), official config JSON, or HF directory")
    p.add_argument("--gpus", type=positive, required=True, help="number of GPUs (= ranks), across all nodes")
    p.add_argument("--gpu-mem-gb", type=real(0, lo_open=True), required=True,
                   help="memory of one GPU in GB (10^9 bytes)")
    p.add_argument("--dtype", choices=["fp8", "bf16"], default=None,
                   help="weight storage (default: the config's, fp8 for 671B)")
    p.add_argument("--max-seq-len", type=positive, default=None, help="tokens per sequence the cache holds "
                   "(default: the config's max_seq_len)")
    p.add_argument("--batch", type=positive, default=1, help="sequences decoded together")
    p.add_argument("--prefill-tokens", type=positive, default=None,
                   help="longest prompt processed in one step (default: min(4096, max_seq_len))")
    p.add_argument("--mtp", action="store_true", help="also hold the MTP module (speculative decoding)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(ns) -> int:
    from dsv3 import plan

    return plan.run(ns)
