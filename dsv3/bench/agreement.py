"""Before `dsv3 bench decode` times a peer engine beside dsv3, it checks that both compute the same model.

On the same checkpoint, batch 1, a random 32-token prompt and 16 positions: the peer's teacher-forced logits
(every engine fed the same tokens) within AGREE_TOL of dsv3's readable path, as the median over positions of
the relative L2 error, and in float32 its 16 greedy tokens identical.

Measured on the bench preset: transformers and llama.cpp float32 ~1e-6 (summation order) -- llama.cpp checked
with its flash attention off, which on this CPU rounds to float16 inside (4-6e-3, enough to flip a near-tied
greedy token after 12 steps on a 3-layer model); it is timed with its defaults, flash attention on. bf16 engines
differ by 2-4e-2 from where each rounds, with single positions up to 0.2 where bf16 flips an expert choice --
hence the median, and hence greedy tokens required identical in float32 only (bf16 flips a random model's
near-tied tokens within a few steps). A misread tensor (a halved, transposed or swapped projection) gives
errors of order 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3.errors import Dsv3Error

AGREE_PROMPT, AGREE_NEW = 32, 16
AGREE_TOL = {"float32": 1e-4, "bfloat16": 0.1}


class CheckFailed(Dsv3Error):
    """A peer engine disagrees with dsv3 on the same checkpoint: timing it beside dsv3 would compare two models."""


def check_agreement(specs: dict[str, dict], spawn: Callable[[dict], dict], dtype: str) -> dict[str, dict]:
    """specs: worker specs, dsv3's reference first, then each peer's; spawn runs one in a fresh process (its
    "agree" mode returns {"greedy": ids, "logits": rows}). Returns {peer: {"rel_err", "greedy_same"}} (greedy_same:
    the steps before the first differing token); raises CheckFailed on the first peer outside the tolerance."""
    got = {impl: spawn(spec | dict(batch=1, prompt=AGREE_PROMPT, new=AGREE_NEW, agree=AGREE_NEW))
           for impl, spec in specs.items()}
    ref, *peers = got
    out = {}
    for peer in peers:
        a, b = torch.tensor(got[peer]["logits"]), torch.tensor(got[ref]["logits"])  # (position, vocab)
        rel = float(((a - b).norm(dim=-1) / b.norm(dim=-1)).median())
        pairs = zip(got[peer]["greedy"], got[ref]["greedy"])
        same = next((j for j, (x, y) in enumerate(pairs) if x != y), AGREE_NEW)
        out[peer] = {"rel_err": rel, "greedy_same": same}
        if rel > AGREE_TOL[dtype] or (dtype == "float32" and same < AGREE_NEW):
            raise CheckFailed(f"{peer} does not compute the same model as {ref} on {specs[peer]['ckpt']}: teacher-forced "
                              f"logits differ by {rel:.2e} (median relative L2; allowed {AGREE_TOL[dtype]:g} in "
                              f"{dtype}), greedy tokens equal for {same} of {AGREE_NEW} steps; no timing reported")
    return out
