"""The official repository's converted layout back to a Hugging Face checkpoint (`dsv3 convert --from-official`).

deepseek-ai/DeepSeek-V3 `inference/convert.py` turns the Hugging Face release into `model{i}-mp{n}.safetensors`,
one file per model-parallel rank, for its own `inference/model.py`: tensor names become the official ones
(`embed`, `layers.{l}.attn.wq_b`, `ffn.experts.{e}.w1`, `.scale` for `weight_scale_inv`, `ffn.gate.bias` for
`e_score_correction_bias`: the names dsv3's own modules carry), the MTP layer (`model.layers.61`) is dropped,
FP8 weights and their scales stay as they are, and each rank keeps
- routed experts e with i·E/n <= e < (i+1)·E/n, whole;
- the embedding, head and the column/row-parallel projections (wq, wq_b, wkv_b, w1, w3 along dim 0;
  wo, w2 along dim 1; their block scales likewise) as its 1/n slice;
- everything else (norms, wq_a, wkv_a, the gate) replicated.
So the inverse is: an expert from the one rank that has it, a sliced tensor concatenated over the ranks
in order, a replicated one from rank 0 (checked the same shape everywhere). The layout carries no
config.json (the official code takes `--config configs/config_671B.json`): `--config` gives one, an
official or Hugging Face config file or a preset. The output is checked as a checkpoint before it is
renamed into place; a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from dsv3.checkpoint import check_checkpoint
from dsv3.config import ModelArgs
from dsv3.convert import MARKER, MARKER_FORMAT, check_destination
from dsv3.errors import CheckpointError, UsageError
from dsv3.names import classify, dsv3_name_to_hf
from dsv3.safetensors_io import ShardReader, group_names, official_shards, read_header, write_index, write_shard


def official_to_hf(src, dst, config=None, *, force: bool = False) -> dict:
    """Merge `src`'s `model{i}-mp{n}.safetensors` into a Hugging Face checkpoint at `dst`; returns counts and time."""
    t0 = time.perf_counter()
    src = Path(src)
    shards = official_shards(src) if src.is_dir() else {}
    if not shards:
        raise CheckpointError(f"{src}: no model{{i}}-mp{{n}}.safetensors files (the official inference layout "
                              "written by deepseek-ai/DeepSeek-V3 inference/convert.py)")
    if config is None and not (src / "config.json").is_file():
        raise UsageError(f"{src}: the official layout carries no config.json; give --config (the official "
                         "configs/config_*.json the shards were made for, a Hugging Face config.json, or a preset)")
    args = ModelArgs.load(config if config is not None else src / "config.json").replace(n_mtp_layers=0)
    dst, missing = check_destination(src, dst, force=force)
    headers = {i: read_header(f) for i, f in shards.items()}
    layout = _merge_plan(headers, args, src)
    fp8 = any(have[0][1].dtype == torch.float8_e4m3fn for have, _ in layout.values())
    args = args.replace(dtype="fp8" if fp8 else "bf16")
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        weight_map, total = _write(tmp, layout, headers, args)
        _side_files(src, tmp, args, layout, total, weight_map)
        check_checkpoint(tmp)  # the result is a checkpoint dsv3 (and transformers' names) load, before it is DST
        if dst.exists():  # --force over an earlier dsv3 convert output (check_destination made sure)
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in missing:  # parent directories this call created, deepest first, if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return {"tensors": len(layout), "ranks": len(shards), "shards": len(set(weight_map.values())),
            "dst_bytes": total, "seconds": time.perf_counter() - t0}


def _merge_plan(headers: dict, args: ModelArgs, src: Path) -> dict[str, tuple[list, int | None]]:
    """HF name -> ([(rank, TensorInfo), ...], dim): concatenated along dim in rank order, or (one entry, None)
    taken as it is."""
    n = len(headers)
    names = sorted({name for h in headers.values() for name in h})
    out: dict[str, list] = {}
    unknown = []
    for name in names:
        try:
            hf = dsv3_name_to_hf(name, args)
        except KeyError:
            unknown.append(name)
            continue
        kind = classify(hf, args)
        have = [(i, h[name]) for i, h in headers.items() if name in h]
        if "ffn.experts." in name:
            if len(have) != 1:
                raise CheckpointError(f"{src}: routed expert tensor {name} is in {len(have)} rank files "
                                      "(the official layout puts each expert in exactly one)")
            out[hf] = (have, None)
            continue
        if len(have) != n:
            raise CheckpointError(f"{src}: {name} is in {len(have)} of the {n} rank files (expected every one)")
        dim = kind.shard_dim if kind is not None else None
        shapes = {tuple(info.shape) for _, info in have}
        if dim is None and len(shapes) != 1:
            raise CheckpointError(f"{src}: replicated tensor {name} has different shapes on different ranks: "
                                  f"{sorted(shapes)}")
        out[hf] = (have, dim) if dim is not None and n > 1 else (have[:1], None)
    if unknown:
        raise CheckpointError(f"{src}: tensor name(s) the official DeepSeek-V3 model does not have (for this "
                              f"config): {group_names(unknown)}")
    return out


def _write(tmp: Path, layout: dict, headers: dict, args: ModelArgs) -> tuple[dict[str, str], int]:
    """One output shard per decoder layer (+ one for embedding, norm and head), each merged in memory."""
    readers = {}
    groups: dict[str, list[str]] = {}
    for hf in layout:
        key = hf.split(".")[2] if hf.startswith("model.layers.") else "top"
        groups.setdefault(key, []).append(hf)
    order = ["top"] + sorted((k for k in groups if k != "top"), key=int)
    weight_map, total = {}, 0
    try:
        for idx, key in enumerate(order):
            fname = f"model-{idx + 1:05d}-of-{len(order):05d}.safetensors"
            tensors = {}
            for hf in groups[key]:
                infos, dim = layout[hf]
                parts = []
                for _, info in infos:
                    reader = readers.setdefault(info.file, ShardReader(info.file))
                    parts.append(reader.read(info))
                tensors[hf] = parts[0] if dim is None else torch.cat(parts, dim=dim)
                weight_map[hf] = fname
                total += tensors[hf].numel() * tensors[hf].element_size()
            write_shard(tmp / fname, tensors)
    finally:
        for r in readers.values():
            r.close()
    return weight_map, total


def _side_files(src: Path, tmp: Path, args: ModelArgs, layout: dict, total: int, weight_map: dict[str, str]) -> None:
    write_index(tmp, weight_map, total)
    cfg = args.to_hf_config()
    floating = {have[0][1].dtype for have, _ in layout.values() if have[0][1].dtype.is_floating_point}
    floating -= {torch.float8_e4m3fn}
    cfg["torch_dtype"] = "float32" if floating == {torch.float32} else "bfloat16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in sorted(src.iterdir()):  # the tokenizer files the official script copied, and any other side file
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", MARKER):
            shutil.copy2(f, tmp / f.name)
    (tmp / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "source": str(src.resolve()),
                                          "from": "official-layout"}, indent=2) + "\n")
