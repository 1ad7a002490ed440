"""Run under torchrun by tests/test_parallel.py: load tiny checkpoints sharded, save what each rank computed.

usage: torchrun --nproc-per-node N tests/parallel_worker.py OUT_DIR NAME=CKPT_DIR [NAME=CKPT_DIR ...]
Writes OUT_DIR/rank{r}.pt: {"NAME/impl": {"logits", "mtp_logits", "tokens"}, "state/NAME": this rank's
state_dict}; impl is absorb, naive, or (FP8 only) dequant: FP8 blocks dequantised to float32 at load.
"""

import sys
from pathlib import Path

import torch

from dsv3.checkpoint import load_model
from dsv3.distributed import maybe_init_distributed, rank_of, shutdown
from dsv3.generation import generate

PROMPTS = [[5, 17, 200, 3, 99, 42, 7], [250, 1, 64, 128]]


def main(out: str, *ckpts: str) -> None:
    group = maybe_init_distributed()
    rank = rank_of(group)
    tokens = torch.tensor([PROMPTS[0]])
    res = {}
    for spec in ckpts:
        name, path = spec.split("=", 1)
        for impl, dtype in [("absorb", None), ("naive", None)] + ([("dequant", torch.float32)] if name == "fp8" else []):
            model = load_model(path, group=group, dtype=dtype, attn_impl="naive" if impl == "naive" else "absorb")
            with torch.inference_mode():
                logits, mtp_logits = model.forward_mtp(tokens)
            res[f"{name}/{impl}"] = {"logits": logits, "mtp_logits": mtp_logits,
                                     "tokens": generate(model, PROMPTS, 8)}
            if impl == "absorb":
                res[f"state/{name}"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(res, Path(out) / f"rank{rank}.pt")
    shutdown(group)


if __name__ == "__main__":
    main(*sys.argv[1:])
