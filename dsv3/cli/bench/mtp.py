"""MTP speculative decoding against plain decoding: acceptance rate, tokens/s, speedup (bundled model).

Both decoders run side by side in one process on the same prompts (alternating, best
of --repeats), greedy, batch 1 by default; `identical_greedy` says whether every
speculative output equalled the plain one. Acceptance = accepted drafts / drafts
made for generated positions. The prompts are fixed English lines encoded with the
checkpoint's tokenizer (or random ids when it has none).
"""

from __future__ import annotations

from dsv3.options import integer, positive

HELP = "MTP speculative decoding against plain decoding: acceptance rate, tokens/s, speedup (bundled model)."
N_PROMPTS = 8  # = len(dsv3.bench.mtp.PROMPTS) (not imported: --help stays free of the work's imports)


def add_args(p) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--new", type=positive, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--prompts", type=integer(1, N_PROMPTS), default=8,
                   help=f"how many of the {N_PROMPTS} built-in prompts (default 8)")
    p.add_argument("--batch", type=positive, default=1, help="prompts decoded together (default 1)")
    p.add_argument("--repeats", type=positive, default=3, help="timed passes per decoder, best kept (default 3)")
    p.add_argument("--threads", type=positive, default=1, help="torch threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(ns) -> int:
    from dsv3.bench import mtp

    return mtp.run(ns)
