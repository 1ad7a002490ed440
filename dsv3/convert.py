"""Convert a DeepSeek-V3 checkpoint between FP8 (the release format), BF16 and FP32, on CPU.

FP8 -> BF16/FP32 needs no FP8-capable GPU (the official cast script does); BF16/FP32 -> FP8
quantises exactly the tensors the release quantises (128×128 e4m3 blocks, float32
`weight_scale_inv`), so our own models ship in the real format. Shard by shard, tensor
by tensor: each output shard's header is known in advance, so tensors are written as
they are produced and memory stays around one tensor. The output goes to a temporary
directory next to DST, renamed at the end: an interrupted run leaves nothing that looks
complete. Tokenizer and other side files are copied; `quantization_config` is removed or
added in config.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from pathlib import Path

from dsv3.errors import CheckpointError, UsageError

DTYPES = ("bf16", "fp32", "fp8")


def add_args(p) -> None:
    p.add_argument("src", help="Hugging Face DeepSeek-V3 checkpoint directory")
    p.add_argument("dst", help="output directory (must not exist, unless --force)")
    p.add_argument("--dtype", required=True, choices=DTYPES,
                   help="bf16/fp32: dequantise FP8 weights; fp8: quantise to DeepSeek's 128×128 block format")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--check-weights", action="store_true", help="scan every tensor for NaN/Inf while converting")


def run(ns) -> int:
    stats = convert(ns.src, ns.dst, ns.dtype, force=ns.force, check_weights=ns.check_weights)
    print(f"wrote {ns.dst}: {stats['tensors']} tensors in {stats['shards']} shard(s), "
          f"{stats['src_bytes'] / 1e9:.3f} GB -> {stats['dst_bytes'] / 1e9:.3f} GB in {stats['seconds']:.1f} s")
    return 0


def convert(src, dst, dtype: str, *, force: bool = False, check_weights: bool = False,
            progress: bool | None = None) -> dict:
    """Write `src` to `dst` with Linear weights in `dtype` ("bf16", "fp32" or "fp8"); returns sizes and time."""
    import torch

    from dsv3.checkpoint import ShardReader, _by_file, _check_finite, _progress, check_checkpoint, is_quantized_in_release
    from dsv3.fp8 import weight_dequant, weight_quant

    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    plan = check_checkpoint(src)  # every check before any tensor is read
    if dst.resolve() == src.resolve():
        raise UsageError(f"{dst}: destination is the source checkpoint")
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists (use --force to replace it)")
    block = plan.ckpt_args.block_size
    floating = torch.float32 if dtype == "fp32" else torch.bfloat16
    tensors = plan.tensors  # HF name -> TensorInfo

    # ---- decide every output tensor (name, dtype, shape, producer) per output shard
    def out_entries(infos):
        entries = []
        for info in infos:
            name = info.name
            if name.endswith(".weight_scale_inv"):
                if dtype == "fp8":
                    entries.append((name, torch.float32, info.shape, ("copy", info, None)))
                continue
            if info.dtype == torch.float8_e4m3fn:
                scale = tensors[name + "_scale_inv"]
                if dtype == "fp8":
                    entries.append((name, info.dtype, info.shape, ("copy", info, None)))
                else:
                    entries.append((name, floating, info.shape, ("dequant", info, scale)))
            elif dtype == "fp8" and is_quantized_in_release(name) and len(info.shape) == 2:
                sshape = tuple(math.ceil(d / block) for d in info.shape)
                entries.append((name, torch.float8_e4m3fn, info.shape, ("quant", info, 0)))
                entries.append((name + "_scale_inv", torch.float32, sshape, ("quant", info, 1)))
            elif info.dtype.is_floating_point and not name.endswith("e_score_correction_bias"):
                entries.append((name, floating, info.shape, ("cast", info, None)))
            else:
                entries.append((name, info.dtype, info.shape, ("copy", info, None)))
        return entries

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    readers: dict[Path, ShardReader] = {}

    def reader(file: Path) -> ShardReader:
        if file not in readers:
            readers[file] = ShardReader(file)
        return readers[file]

    def read(info, fn):
        def checked(view):
            if check_weights:
                _check_finite(view, info)
            return fn(view)
        return reader(info.file).read(info, checked)

    quant_cache: dict[str, tuple] = {}

    def produce(kind, info, extra):
        if kind == "copy":
            return read(info, lambda v: v.clone())
        if kind == "cast":
            return read(info, lambda v: v.to(floating, copy=True))
        if kind == "dequant":
            s = read(extra, lambda v: v.clone())
            return read(info, lambda v: weight_dequant(v, s, block, floating))
        # quant: weight (extra == 0) computed first, its scale kept for the next entry
        if extra == 0:
            q, s = read(info, lambda v: weight_quant(v, block))
            quant_cache[info.name] = s
            return q
        return quant_cache.pop(info.name)

    weight_map: dict[str, str] = {}
    total = 0
    n_tensors = 0
    bar = _progress(sum(i.nbytes for i in tensors.values()), progress)
    bar.set_description("converting")
    try:
        for file, infos in _by_file(tensors.values()):
            entries = out_entries(infos)
            total += _write_shard(tmp / file.name, entries, produce)
            for name, *_ in entries:
                weight_map[name] = file.name
            n_tensors += len(entries)
            bar.update(sum(i.nbytes for i in infos))
        bar.close()
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        cfg = json.loads((src / "config.json").read_text())
        if dtype == "fp8":
            cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [block, block]}
            cfg["torch_dtype"] = "bfloat16"
        else:
            cfg.pop("quantization_config", None)
            cfg["torch_dtype"] = "float32" if dtype == "fp32" else "bfloat16"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in sorted(src.iterdir()):  # tokenizer, generation config, README, ...
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",
                                                                             "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dst)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for r in readers.values():
            r.close()
    return {"tensors": n_tensors, "shards": len({*weight_map.values()}),
            "src_bytes": sum(i.nbytes for i in tensors.values()), "dst_bytes": total,
            "seconds": time.perf_counter() - t0}


_ST_NAMES = {"float8_e4m3fn": "F8_E4M3", "bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64",
             "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _write_shard(file: Path, entries, produce) -> int:
    """Write a .safetensors file whose tensors are produced one at a time; returns the data bytes."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dt, shape, _ in entries:
        n = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_NAMES[str(dt).replace("torch.", "")], "shape": list(shape),
                        "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dt, shape, how in entries:
            t = produce(*how)
            if t.dtype != dt or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"convert produced {t.dtype} {tuple(t.shape)} for {name}, planned {dt} {shape}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
    return off
