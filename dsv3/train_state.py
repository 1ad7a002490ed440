"""What `dsv3 train` is given and what it keeps: its argument checks, and the trainer state in --out.

Arguments: `check_args` checks every flag and --out before any data is read, anything written
or torch imported, and raises a one-line `UsageError` naming the flag and the accepted range;
`model_args` builds the ModelArgs from --config (default: the bundled model's shape, the tiny-lm config)
and the --set overrides.

State: a checkpoint directory is an ordinary Hugging Face DeepSeek-V3 directory (config.json +
model.safetensors, float32, `save_checkpoint`) plus the trainer state -- `trainer_state.safetensors`
(optimizer moments, sampler RNG) and `trainer_state.json` (step, log, arguments, optimizer
hyperparameters). Data only: nothing in a checkpoint directory is ever unpickled, and a directory
that holds a pickle is refused (`check_out_dir`). Every file of a save is written to `*.tmp` and
renamed, trainer_state.json last; a save cut between two renames is refused on resume
(`check_trainer_state`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3.config import ModelArgs
from dsv3.errors import CheckpointError, UsageError
from dsv3.names import Kind, classify, hf_state
from dsv3.safetensors_io import write_shard

MIN_VOCAB = 256 + 5  # the byte-level BPE's 256 byte tokens + DeepSeek's special tokens (dsv3.data.SPECIAL_TOKENS)
MAX_VOCAB = 1 << 20

# The resumable state is data only: tensors in safetensors, everything else in JSON. Nothing in a
# checkpoint directory is ever unpickled (a pickle can run any code when loaded), and a directory that
# holds a pickle is refused rather than read (`check_out_dir`).
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_FORMAT = "dsv3-trainer-state/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")  # torch.save / pickle.dump files


# ---------------------------------------------------------------------- argument checks
def _parse_field(name: str, raw: str, hint):
    """`--set FIELD=VALUE`: VALUE as the ModelArgs field's annotated type, or UsageError naming both."""

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


def model_args(ns, vocab_size: int):
    """The ModelArgs of a fresh run: --config (default: ModelArgs.tiny("tiny-lm")) with --set and the tokenizer's vocabulary."""
    args = ModelArgs.load(ns.config) if ns.config else ModelArgs.tiny("tiny-lm", vocab_size=vocab_size)
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
        model_args(ns, ns.vocab_size)  # --config, --set and --seq-len, with the requested vocabulary
        return None
    doc = read_trainer_state_json(out)
    if doc["steps"] != ns.steps or doc["seed"] != ns.seed:
        raise UsageError(f"{out} was trained with --steps {doc['steps']} --seed {doc['seed']}; "
                         "resume with the same values or choose another --out")
    check_trainer_state(out)
    args = ModelArgs.from_hf_config(out)
    if ns.seq_len > args.max_seq_len:
        raise UsageError(f"--seq-len {ns.seq_len} exceeds max_seq_len {args.max_seq_len} of {out / 'config.json'}")
    return doc



# ---------------------------------------------------------------------- checkpoints
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

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.args.to_hf_config()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    cfg["bos_token_id"], cfg["eos_token_id"] = 0, 1
    meta = {}
    if trainer_state is not None:
        meta["dsv3_train_step"] = str(trainer_state["step"])
    tmp = out_dir / "model.safetensors.tmp"
    write_shard(tmp, hf_state(model), meta)
    staged = [tmp] if trainer_state is None else [tmp, *_stage_trainer_state(trainer_state, out_dir)]
    for f in staged:
        f.replace(f.with_name(f.name.removesuffix(".tmp")))
    _replace_text(out_dir / "config.json", json.dumps(cfg, indent=2) + "\n")
    _replace_text(out_dir / "generation_config.json", json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n")


# ---------------------------------------------------------------------- trainer state (no pickle)
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

    state = {}
    for hf, t in load_file(str(ckpt_dir / "model.safetensors")).items():
        n = classify(hf, model.args)
        if n is not None and n.kind in (Kind.WEIGHT, Kind.SCALE):
            state[n.ours] = t
    model.load_state_dict(state, strict=True)
