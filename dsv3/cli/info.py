"""Total / activated / MTP parameters and KV-cache bytes per token."""

from __future__ import annotations

import json

HELP = "parameter counts and KV-cache size of a config"


def add_args(p) -> None:
    p.add_argument("config", help="preset (tiny, 16B, 236B, 671B, 671B-v3.2), official config JSON, or HF directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(ns) -> int:
    from dsv3.config import ModelArgs
    from dsv3.info import info

    args = ModelArgs.load(ns.config)
    out = info(args)
    if ns.json:
        print(json.dumps(out))
        return 0
    print(f"config                          {ns.config}")
    print(f"total parameters (main model)   {out['total_params']:>20,}")
    print(f"activated per token             {out['active_params']:>20,}  (incl. embedding and head)")
    print(f"  without the embedding         {out['active_params_without_embedding']:>20,}  "
          "(the model cards' convention: V3 37B, V2-Lite 2.4B)")
    print(f"  without embedding and head    {out['active_params_without_embedding_and_head']:>20,}")
    print(f"MTP modules ({args.n_mtp_layers})                 {out['mtp_params']:>20,}  (unique parameters)")
    print(f"KV cache per token, absorbed    {out['kv_cache_bytes_per_token']:>20,} B  (bf16)")
    print(f"KV cache per token, naive       {out['kv_cache_bytes_per_token_naive']:>20,} B  (bf16)")
    if "index_params_per_layer" in out:  # V3.2
        print(f"indexer parameters per layer    {out['index_params_per_layer']:>20,}  (in the counts above)")
        print(f"indexer keys per token          {out['index_cache_bytes_per_token']:>20,} B  (bf16; in the KV cache above)")
        print(f"indexer keys per token, FP8     {out['index_cache_bytes_per_token_fp8']:>20,} B  "
              "(e4m3 + a float32 scale per 128 values: DeepSeek's serving layout)")
    return 0
