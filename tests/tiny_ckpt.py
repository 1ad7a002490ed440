"""Tiny random Hugging Face-layout DeepSeek-V3 checkpoints for the parallel tests (float32 or FP8).

Sized so that 1, 2 and 4 ranks split everything: 4 heads, 8 experts, vocabulary 256, and
with FP8 a block size of 8 (quantization_config.weight_block_size) so sharded rows and
columns stay whole blocks. Tensors are spread over three shards: everything but the
routed experts, experts 0-3 (rank 0's at world size 2) and experts 4-7 (rank 1's), so a
test can break a shard that only one rank reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv3.checkpoint import MTP_SHARED_COPIES, dsv3_to_hf
from dsv3.config import ModelArgs
from dsv3.model import Transformer
from dsv3.moe import Gate

TINY_TP = dict(
    max_seq_len=64, vocab_size=256, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1,
    n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2,
    n_limited_groups=1, score_func="sigmoid", route_scale=2.5, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, original_seq_len=32, rope_factor=4.0,
    n_mtp_layers=1,
)


def tiny_args(fp8: bool = False) -> ModelArgs:
    return ModelArgs(**TINY_TP, **(dict(dtype="fp8", block_size=8) if fp8 else {}))


def write_tiny_checkpoint(path: Path, fp8: bool = False, seed: int = 0) -> Path:
    args = tiny_args(fp8)
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, Gate) and mod.bias is not None:
                mod.bias.normal_(0, 0.05)  # non-zero correction bias: selection differs from weighting
            if mod.__class__.__name__ == "RMSNorm":
                mod.weight.normal_(1.0, 0.1)
    names = dsv3_to_hf(args)
    state = {names[k]: v.contiguous() for k, v in model.state_dict().items()}
    mtp_layer = f"model.layers.{args.n_layers}."
    for hf_suffix, ours in MTP_SHARED_COPIES.items():
        state[mtp_layer + hf_suffix] = model.state_dict()[ours].clone()
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = re.search(r"\.experts\.(\d+)\.", name)
        i = 1 if m is None else (2 if int(m.group(1)) < 4 else 3)
        shards.setdefault(f"model-0000{i}-of-00003.safetensors", {})[name] = t
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, path / fname)
        weight_map.update(dict.fromkeys(tensors, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(args.to_hf_config()))
    return path
