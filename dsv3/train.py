"""Train a small DeepSeek-V3 from scratch on CPU (next-token + MTP loss, aux-loss-free balancing).

The work behind `dsv3 train`. What it computes, and why, is the command's description: the
docstring of `dsv3/cli/train.py` (what `dsv3 train --help` shows), kept there so that --help needs no torch.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from dsv3 import data
from dsv3.config import ModelArgs
from dsv3.model import Transformer
from dsv3.train_state import (
    check_args,
    load_weights_into,
    model_args,
    read_trainer_state,
    save_checkpoint,
)

LOG_FIELDS = ["step", "lr", "loss", "mtp_loss", "balance_loss", "grad_norm", "tokens_per_s", "elapsed_s",
              "val_loss", "val_mtp_loss", "val_mtp_acc"]


# ---------------------------------------------------------------------- pieces
def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


class RouterStats:
    """Forward hooks on every Gate: per-expert token counts for the step, and the
    sequence-wise balance loss when α > 0 (needs the gate's scores with grad)."""

    def __init__(self, model, alpha: float = 0.0):
        self.alpha = alpha
        self.batch = 1
        self.active = True
        self.gates = {name.removesuffix(".gate"): mod for name, mod in model.named_modules()
                      if name.endswith("ffn.gate")}
        self.counts = {name: None for name in self.gates}
        self.balance_loss = None
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in self.gates.items()]

    def _hook(self, name):
        def hook(gate, inputs, outputs):
            if not self.active:
                return

            indices = outputs[1]  # (n, k)
            e = gate.weight.shape[0]
            c = torch.bincount(indices.flatten(), minlength=e).to(torch.float64)
            self.counts[name] = c if self.counts[name] is None else self.counts[name] + c
            if self.alpha > 0 and gate.training:
                x = inputs[0]
                scores = gate.scores(x)  # (n, e), with grad
                b = self.batch
                s = scores.shape[0] // b
                k = indices.shape[1]
                probs = (scores / scores.sum(-1, keepdim=True)).view(b, s, e)
                chosen = torch.zeros_like(scores).scatter_(1, indices, 1.0).view(b, s, e)
                f = chosen.sum(1) * (e / (k * s))  # (b, e)
                p = probs.mean(1)  # (b, e)
                loss = self.alpha * (f * p).sum(-1).mean()
                self.balance_loss = loss if self.balance_loss is None else self.balance_loss + loss
        return hook

    def reset(self) -> None:
        self.counts = {name: None for name in self.gates}
        self.balance_loss = None

    def update_bias(self, gamma: float) -> None:
        """b_e += γ · sign(mean load − load_e) for every MoE layer (the aux-loss-free rule)."""

        if gamma == 0:
            return
        with torch.no_grad():
            for name, gate in self.gates.items():
                c = self.counts[name]
                if c is None or gate.bias is None:
                    continue
                gate.bias += gamma * torch.sign(c.mean() - c).to(gate.bias.dtype)

    def load_summary(self) -> dict[str, float]:
        """max/mean tokens per expert, per MoE layer (1.0 = perfectly balanced)."""
        return {name: float(c.max() / c.mean()) for name, c in self.counts.items() if c is not None and c.sum() > 0}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def losses(model, tokens, mtp_lambda: float):
    """tokens (b, s + 1) -> (total, main CE, MTP CE or None). Positions predicting beyond the window are dropped."""

    x, y = tokens[:, :-1], tokens[:, 1:]
    if not model.mtp:
        logits = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return ce, ce, None
    logits, mtp = model.forward_mtp(x)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    mtp = [mtp] if not isinstance(mtp, list) else mtp
    mtp_ces = []
    for k, lg in enumerate(mtp, start=1):
        # depth k at position i predicts token i + k + 1 = y[:, i + k]
        mtp_ces.append(F.cross_entropy(lg.flatten(0, 1), y[:, k:].flatten()))
    mtp_ce = sum(mtp_ces) / len(mtp_ces)
    return ce + mtp_lambda * mtp_ce, ce, mtp_ce


def train_step(model, opt, stats: RouterStats, batch: torch.Tensor, *, mtp_lambda: float, grad_clip: float,
               bias_gamma: float, autocast=None):
    """One optimizer step on `batch` (b, s + 1): loss (+ the balance loss when α > 0), backward, clip, AdamW,
    then the aux-loss-free bias update from this step's expert counts. Returns (main CE, MTP CE or None, grad norm).
    `autocast` (a context manager) wraps the forward only."""

    stats.reset()
    with autocast or contextlib.nullcontext():
        total, ce, mtp_ce = losses(model, batch, mtp_lambda)
        if stats.balance_loss is not None:
            total = total + stats.balance_loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    opt.step()
    stats.update_bias(bias_gamma)
    return ce, mtp_ce, gnorm


def evaluate(model, windows, batch_size: int = 8) -> dict[str, float]:
    """Held-out next-token loss/perplexity/accuracy and MTP depth-1 loss/accuracy over (n, s + 1) windows."""

    was_training = model.training
    model.eval()
    tot = {"loss": 0.0, "acc": 0.0, "mtp_loss": 0.0, "mtp_acc": 0.0}
    n_main = n_mtp = 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            w = windows[i: i + batch_size]
            x, y = w[:, :-1], w[:, 1:]
            if model.mtp:
                logits, mtp = model.forward_mtp(x)
                mtp = mtp[0] if isinstance(mtp, list) else mtp
                ym = y[:, 1:]
                tot["mtp_loss"] += float(F.cross_entropy(mtp.flatten(0, 1), ym.flatten(), reduction="sum"))
                tot["mtp_acc"] += float((mtp.argmax(-1) == ym).sum())
                n_mtp += ym.numel()
            else:
                logits = model(x)
            tot["loss"] += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            tot["acc"] += float((logits.argmax(-1) == y).sum())
            n_main += y.numel()
    model.train(was_training)
    out = {"loss": tot["loss"] / n_main, "acc": tot["acc"] / n_main}
    out["ppl"] = math.exp(out["loss"])
    if n_mtp:
        out["mtp_loss"] = tot["mtp_loss"] / n_mtp
        out["mtp_acc"] = tot["mtp_acc"] / n_mtp
    return out


def build_model(args, seed: int):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.train()


def make_optimizer(model, lr: float, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)


# ---------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """Everything a training run holds between steps (built by `_setup`)."""

    out: Path
    model: object
    opt: object
    gen: object  # the batch sampler's torch.Generator
    log: list[dict]
    start: int  # the step this run starts from (0, or the resumed step)
    train_ids: object
    val_ids: object
    vocab: int
    val_windows: object
    stats: RouterStats
    autocast: object


def _setup(ns, resume: bool) -> _Run:
    """Corpus, tokenizer, model and optimizer: fresh, or resumed from --out's trainer state."""

    if ns.threads:
        torch.set_num_threads(ns.threads)
    out = Path(ns.out)

    texts = data.load_corpus(ns.data)
    train_docs, val_docs = data.split_corpus(texts)
    if resume and (out / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    else:
        tok = data.train_tokenizer(train_docs, ns.vocab_size)
    train_ids = data.encode_docs(tok, train_docs)
    val_ids = data.encode_docs(tok, val_docs)
    vocab = tok.get_vocab_size()

    args = ModelArgs.from_hf_config(out) if resume else model_args(ns, vocab)
    model = build_model(args, ns.seed)
    opt = make_optimizer(model, ns.lr, ns.weight_decay)
    gen = torch.Generator().manual_seed(ns.seed)
    log: list[dict] = []
    start = 0
    if resume:
        doc, opt_state = read_trainer_state(out, opt)  # checks that model.safetensors is from the same step
        load_weights_into(model, out)
        gen.set_state(opt_state.pop("generator"))
        opt.load_state_dict(opt_state)
        log, start = doc["log"], doc["step"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        data.save_tokenizer(tok, out, args.max_seq_len)

    val_windows = data.eval_windows(val_ids, ns.seq_len + 1, ns.eval_windows)
    stats = RouterStats(model, ns.balance_alpha)
    stats.batch = ns.batch_size
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=ns.dtype == "bf16")
    return _Run(out, model, opt, gen, log, start, train_ids, val_ids, vocab, val_windows, stats, autocast)


def _step(ns, run: _Run, step: int, t_begin: float) -> dict:
    """One optimizer step from `step` (bias update and, when due, the held-out evaluation); its log row."""

    model, opt, stats = run.model, run.opt, run.stats
    t0 = time.perf_counter()
    lr = lr_at(step, lr=ns.lr, min_lr=ns.min_lr, warmup=ns.warmup, steps=ns.steps)
    for g in opt.param_groups:
        g["lr"] = lr
    batch = data.random_windows(run.train_ids, ns.batch_size, ns.seq_len + 1, run.gen)
    ce, mtp_ce, gnorm = train_step(model, opt, stats, batch, mtp_lambda=ns.mtp_lambda, grad_clip=ns.grad_clip,
                                   bias_gamma=ns.bias_gamma, autocast=run.autocast)
    step += 1
    dt = time.perf_counter() - t0
    bal = stats.balance_loss
    row = {"step": step, "lr": lr, "loss": float(ce.detach()),
           "mtp_loss": float(mtp_ce.detach()) if mtp_ce is not None else None,
           "balance_loss": float(bal.detach()) if bal is not None else 0.0,
           "grad_norm": float(gnorm), "tokens_per_s": ns.batch_size * ns.seq_len / dt,
           "elapsed_s": time.perf_counter() - t_begin,
           "load_max_over_mean": stats.load_summary(),
           "expert_counts": {k: [int(x) for x in v.tolist()] for k, v in stats.counts.items() if v is not None},
           "gate_bias": {k: [round(float(x), 5) for x in g.bias.tolist()] for k, g in stats.gates.items()
                         if g.bias is not None}}
    if step % ns.eval_every == 0 or step == ns.steps:
        stats.active = False
        ev = evaluate(model, run.val_windows)
        stats.active = True
        row.update(val_loss=ev["loss"], val_mtp_loss=ev.get("mtp_loss"), val_mtp_acc=ev.get("mtp_acc"))
    return row


def _checkpoint(ns, run: _Run, step: int) -> None:
    """Save the model, the trainer state and the log into --out (see `save_checkpoint`)."""
    save_checkpoint(run.model, run.out, {"step": step, "steps": ns.steps, "seed": ns.seed,
                                         "optimizer": run.opt.state_dict(), "generator": run.gen.get_state(),
                                         "log": run.log, "args": vars(ns)})
    write_log(run.log, run.out)


def _catch_sigint(stop: dict):
    """Ctrl-C sets stop["flag"]: the loop finishes the step, then saves (a consistent, resumable state).
    Returns the previous handler, or None where signals cannot be caught (not the main thread)."""
    old_handler = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        stop["flag"] = True

    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        old_handler = None
    return old_handler


def train(ns) -> dict:
    """Run (or resume) training as described by the parsed arguments; returns the final held-out metrics."""
    # every argument and --out, before any data is read or anything written (and before torch is imported,
    # so that a mistake is reported at once)
    resume = check_args(ns) is not None

    run = _setup(ns, resume)
    stop = {"flag": False}
    old_handler = _catch_sigint(stop)
    bar = None
    if not ns.quiet:

        bar = tqdm(total=ns.steps, initial=run.start, desc="train", dynamic_ncols=True, mininterval=1.0)
    t_begin = time.perf_counter()
    step = run.start
    try:
        while step < ns.steps:
            row = _step(ns, run, step, t_begin)
            step += 1
            run.log.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", mtp=f"{row['mtp_loss'] or 0:.3f}",
                                tok_s=f"{row['tokens_per_s']:.0f}")
            out_of_time = (ns.time_limit is not None and (time.perf_counter() - t_begin) > 60 * ns.time_limit) or \
                (ns.stop_after is not None and step - run.start >= ns.stop_after)
            if step % ns.save_every == 0 or step == ns.steps or stop["flag"] or out_of_time:
                _checkpoint(ns, run, step)
            if stop["flag"] or out_of_time:
                break
    finally:
        if bar is not None:
            bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        run.stats.close()
    if stop["flag"]:
        raise KeyboardInterrupt
    final = evaluate(run.model, run.val_windows)
    final["unigram_loss"] = data.unigram_loss(run.train_ids, run.val_ids, run.vocab)
    final["unigram_ppl"] = math.exp(final["unigram_loss"])
    final["step"] = step
    (run.out / "eval.json").write_text(json.dumps(final, indent=2) + "\n")
    return final


def write_log(log: list[dict], out: Path) -> None:
    """train_log.json (everything, per step) and train_log.csv (scalars + per-layer max/mean load)."""
    (out / "train_log.json").write_text(json.dumps(log))
    layers = sorted({k for r in log for k in r.get("load_max_over_mean", {})})
    with open(out / "train_log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LOG_FIELDS + [f"load_max_over_mean/{name}" for name in layers])
        for r in log:
            w.writerow([r.get(k) if r.get(k) is not None else "" for k in LOG_FIELDS]
                       + [r.get("load_max_over_mean", {}).get(name, "") for name in layers])


def run(ns) -> int:
    final = train(ns)
    print(json.dumps(final))
    return 0
