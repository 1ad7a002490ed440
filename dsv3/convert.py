"""Convert a DeepSeek-V3 checkpoint between FP8 (the release format), BF16 and FP32, on CPU.

The work behind `dsv3 convert`. What it computes, and why, is the command's description: the
docstring of `dsv3/cli/convert.py` (what `dsv3 convert --help` shows), kept there so that --help needs no torch.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import torch

from dsv3.checkpoint import check_checkpoint, progress_bar
from dsv3.errors import Interrupted, UsageError
from dsv3.fp8 import weight_dequant, weight_quant
from dsv3.names import is_quantized_in_release
from dsv3.safetensors_io import ST_NAMES, ShardReader, by_file, check_finite

DTYPES = ("bf16", "fp32", "fp8")
MARKER = "dsv3-convert.json"  # written into every output: what --force may replace
MARKER_FORMAT = "dsv3-convert/1"
_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # the ones a user or a scheduler sends to stop a job


# ---------------------------------------------------------------------- output paths
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier call in this process: not a concurrent writer
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _leftovers(dst: Path) -> list[tuple[Path, str, int]]:
    """(path, "partial" | "old", pid) for every `.DST.partial-PID` / `.DST.old-PID` beside DST."""
    out = []
    if not dst.parent.is_dir():
        return out
    prefix = f".{dst.name}."  # compared as a string: DST's name may hold glob characters
    for p in sorted(dst.parent.iterdir()):
        if not p.name.startswith(prefix):
            continue
        kind, _, pid = p.name[len(prefix):].partition("-")
        if kind in ("partial", "old") and pid.isdigit() and p.is_dir() and not p.is_symlink():
            out.append((p, kind, int(pid)))
    return out


def _is_convert_output(d: Path) -> bool:
    try:
        return json.loads((d / MARKER).read_text()).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(src, dst, *, force: bool = False) -> tuple[Path, list[Path]]:
    """Every check of DST against SRC and the filesystem, touching nothing; raises UsageError (one line).

    Returns (DST as an absolute path with its parent's symlinks resolved, the missing parent directories
    that the conversion will create, deepest first)."""
    src, dst = Path(src), Path(dst)
    if dst.is_symlink():
        raise UsageError(f"{dst}: is a symbolic link; give the directory itself as DST")
    src_r = src.resolve()
    dst_r = dst.resolve()  # non-strict: resolves the symlinks of the part that exists
    if not dst_r.name:
        raise UsageError(f"{dst}: not a directory name that can be written")
    if dst_r == src_r:
        raise UsageError(f"{dst}: is the source checkpoint {src}; choose another DST")
    if src_r in dst_r.parents:
        raise UsageError(f"{dst}: is inside the source checkpoint {src}; choose a DST outside it")
    if dst_r in src_r.parents:
        raise UsageError(f"{dst}: contains the source checkpoint {src} (replacing it would delete the source); "
                         "choose a DST outside it")
    if dst_r.exists():
        if not dst_r.is_dir():
            raise UsageError(f"{dst}: exists and is not a directory; choose another DST")
        if not force:
            raise UsageError(f"{dst}: already exists (use --force to replace an earlier dsv3 convert output)")
        if not _is_convert_output(dst_r):
            raise UsageError(f"{dst}: was not written by dsv3 convert (no {MARKER}); --force replaces only "
                             "dsv3 convert's own output: remove it yourself")
    missing = []
    parent = dst_r.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{dst}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{dst}: cannot write in {parent} (permission denied)")
    for p, kind, pid in _leftovers(dst_r):
        if kind == "partial" and _pid_alive(pid):
            raise UsageError(f"{dst}: another dsv3 convert (pid {pid}) is writing it ({p}); wait for it, or remove "
                             f"{p} yourself if no such conversion is running")
    return dst_r, missing


def _remove_stale(dst: Path) -> None:
    """Leftovers of a killed run (SIGKILL cannot be caught): partial outputs whose process is gone are
    removed; a previous output that was moved aside for --force is put back if DST is missing."""
    for p, kind, pid in _leftovers(dst):
        if _pid_alive(pid):
            continue
        if kind == "old" and not dst.exists() and _is_convert_output(p):
            p.rename(dst)  # killed between the two renames of a --force swap: the old output is still whole
        else:
            shutil.rmtree(p)


def _remove_created(missing: list[Path]) -> None:
    for p in missing:  # deepest first; only if still empty
        try:
            p.rmdir()
        except OSError:
            break


# ---------------------------------------------------------------------- conversion
def convert(src, dst, dtype: str, *, force: bool = False, check_weights: bool = False,
            progress: bool | None = None, scale_fmt: str | None = None) -> dict:
    """Write `src` to `dst` with Linear weights in `dtype` ("bf16", "fp32" or "fp8"); returns sizes and time.

    scale_fmt (fp8 only): "ue8m0" quantises with power-of-two weight scales and records scale_fmt in config.json
    (V3.1's format: its activation scales are rounded so too); default: the FP8 source's own scale_fmt."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if scale_fmt not in (None, "ue8m0") or (scale_fmt and dtype != "fp8"):
        raise UsageError(f"--scale-fmt {scale_fmt}: only 'ue8m0', and only with --dtype fp8")
    t0 = time.perf_counter()
    src = Path(src)
    dst, missing = check_destination(src, dst, force=force)  # paths only: before torch is even imported

    plan = check_checkpoint(src)  # every source check before any tensor is read
    src_fmt = plan.ckpt_args.scale_fmt if plan.ckpt_args.dtype == "fp8" else None
    if plan.ckpt_args.dtype == "fp8" and scale_fmt and scale_fmt != src_fmt:
        raise UsageError(f"--scale-fmt {scale_fmt}: {src} is FP8 with scale_fmt {src_fmt}, and FP8 weights are "
                         "copied as they are; convert it to bf16 first, then to fp8 with --scale-fmt")
    scale_fmt = (scale_fmt or src_fmt) if dtype == "fp8" else None
    shards = _plan_shards(plan, dtype)
    _check_free_space(dst, shards)
    producer = _Producer(plan, dtype, check_weights, scale_fmt)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    guard = _SignalGuard(tmp, dst)
    bar = None
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"  # where --force moves the previous output aside
    try:
        _remove_stale(dst)
        tmp.mkdir(parents=True)
        bar = progress_bar(sum(i.nbytes for i in plan.tensors.values()), progress)
        bar.set_description("converting")
        n_tensors, total, weight_map = _write_shards(tmp, shards, producer, bar)
        bar.close()
        _write_side_files(src, tmp, dtype, plan.ckpt_args.block_size, total, weight_map, scale_fmt)
        _move_into_place(tmp, dst, old, force=force, guard=guard)
    except BaseException:
        guard.pending = guard.pending or -1  # from here on a signal only waits for the cleanup to finish
        if bar is not None:
            bar.close()
        producer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not dst.exists():  # failed between the two renames of a --force swap
            old.rename(dst)
        _remove_created(missing)
        raise
    finally:
        producer.close()
        guard.restore()
    return {"tensors": n_tensors, "shards": len({*weight_map.values()}),
            "src_bytes": sum(i.nbytes for i in plan.tensors.values()), "dst_bytes": total,
            "seconds": time.perf_counter() - t0}


def _plan_shards(plan, dtype: str) -> list[tuple[Path, list, list]]:
    """(source shard, its tensors, output entries) per shard; an entry is (name, dtype, shape, producer),
    the producer (kind, info, extra) one of copy / cast / dequant (extra: the scale) / quant (extra:
    0 for the FP8 weight, 1 for its scale)."""

    block = plan.ckpt_args.block_size
    floating = torch.float32 if dtype == "fp32" else torch.bfloat16
    tensors = plan.tensors  # HF name -> TensorInfo

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

    return [(file, infos, out_entries(infos)) for file, infos in by_file(tensors.values())]


def _check_free_space(dst: Path, shards) -> None:
    need = sum(math.prod(shape) * dt.itemsize for *_, entries in shards for _, dt, shape, _ in entries)
    existing = next(p for p in (dst.parent, *dst.parent.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise UsageError(f"{dst}: the output needs {need / 1e9:.2f} GB but {existing} has {free / 1e9:.2f} GB free")


class _Producer:
    """Makes each planned output tensor from the memory-mapped source shards, one tensor at a time."""

    def __init__(self, plan, dtype: str, check_weights: bool, scale_fmt: str | None = None):
        self.block, self.scale_fmt = plan.ckpt_args.block_size, scale_fmt
        self.floating = torch.float32 if dtype == "fp32" else torch.bfloat16
        self.check_weights = check_weights
        self.readers: dict = {}  # shard file -> ShardReader
        self.quant_cache: dict[str, tuple] = {}

    def read(self, info, fn):
        def checked(view):
            if self.check_weights:
                check_finite(view, info.file, info.name)
            return fn(view)
        if info.file not in self.readers:
            self.readers[info.file] = ShardReader(info.file)
        return self.readers[info.file].read(info, checked)

    def produce(self, kind, info, extra):
        read, floating, block = self.read, self.floating, self.block
        if kind == "copy":
            return read(info, lambda v: v.clone())
        if kind == "cast":
            return read(info, lambda v: v.to(floating, copy=True))
        if kind == "dequant":
            s = read(extra, lambda v: v.clone())
            return read(info, lambda v: weight_dequant(v, s, block, floating))
        # quant: weight (extra == 0) computed first, its scale kept for the next entry
        if extra == 0:
            q, s = read(info, lambda v: weight_quant(v, block, self.scale_fmt))
            self.quant_cache[info.name] = s
            return q
        return self.quant_cache.pop(info.name)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()


class _SignalGuard:
    """SIGINT/SIGTERM/SIGHUP become an exception (unwinding runs convert's cleanup), except while the
    finished output is being renamed into place: then the signal waits (`deferred`), so DST is never
    left half swapped. `restore()` puts the previous handlers back."""

    def __init__(self, tmp: Path, dst: Path):
        self.tmp, self.dst = tmp, dst
        self.deferred, self.pending = False, None
        self.previous = {}
        try:
            for name in _SIGNALS:
                if hasattr(signal, name):
                    self.previous[name] = signal.signal(getattr(signal, name), self._on_signal)
        except ValueError:  # not the main thread: signals stay with whoever owns them
            pass

    def interrupted(self, signum) -> Interrupted:
        return Interrupted(f"interrupted by {signal.Signals(signum).name}: removed the partial output {self.tmp}; "
                           f"{self.dst} was not written", signum)

    def _on_signal(self, signum, frame):
        if self.pending is not None:
            return  # already unwinding from one signal: let the cleanup finish
        self.pending = signum
        if not self.deferred:
            raise self.interrupted(signum)

    def restore(self) -> None:
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)


def _write_shards(tmp: Path, shards, producer: _Producer, bar) -> tuple[int, int, dict[str, str]]:
    """Every output shard into `tmp`; (tensors written, data bytes, weight map)."""
    weight_map: dict[str, str] = {}
    total = 0
    n_tensors = 0
    # Test hook: hold the run this many seconds after each shard, so that a test can signal or kill it
    # at a known point (a test-sized conversion is over in a fraction of a second).
    try:
        hold = float(os.environ.get("DSV3_TEST_CONVERT_SHARD_DELAY", "0"))
    except ValueError:
        hold = 0.0
    for file, infos, entries in shards:
        total += _write_shard(tmp / file.name, entries, producer.produce)
        if hold > 0:
            time.sleep(hold)
        for name, *_ in entries:
            weight_map[name] = file.name
        n_tensors += len(entries)
        bar.update(sum(i.nbytes for i in infos))
    return n_tensors, total, weight_map


def _write_side_files(src: Path, tmp: Path, dtype: str, block: int, total: int, weight_map: dict[str, str],
                      scale_fmt: str | None = None) -> None:
    """The index, config.json (quantization_config added or removed), the copied side files, the marker."""
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    if dtype == "fp8":
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [block, block]}
        if scale_fmt:
            cfg["quantization_config"]["scale_fmt"] = scale_fmt
        cfg["torch_dtype"] = "bfloat16"
    else:
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = "float32" if dtype == "fp32" else "bfloat16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in sorted(src.iterdir()):  # tokenizer, generation config, README, logs, ...
        if f.is_file() and f.suffix != ".safetensors" and not f.name.startswith("trainer_state.") \
                and f.name not in ("config.json", "model.safetensors.index.json", MARKER):
            shutil.copy2(f, tmp / f.name)
    (tmp / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "source": str(src.resolve()),
                                          "dtype": dtype}, indent=2) + "\n")


def _move_into_place(tmp: Path, dst: Path, old: Path, *, force: bool, guard: _SignalGuard) -> None:
    """Rename the finished output to DST (with --force: the previous output aside first, deleted after);
    a signal that comes now waits until the renames are done."""
    guard.deferred = True
    if guard.pending is not None:  # a signal came between the last write and the rename
        raise guard.interrupted(guard.pending)
    if dst.exists() or dst.is_symlink():
        if not (force and dst.is_dir() and not dst.is_symlink() and _is_convert_output(dst)):
            # it appeared while we converted (checked absent, or convert's own, at the start)
            raise UsageError(f"{dst}: appeared while converting and is not an earlier dsv3 convert output "
                             "that --force may replace; nothing was written")
        # --force: move the old output aside, the new one in, then delete the old one
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)


def _write_shard(file: Path, entries, produce) -> int:
    """Write a .safetensors file whose tensors are produced one at a time; returns the data bytes."""

    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dt, shape, _ in entries:
        n = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": ST_NAMES[dt], "shape": list(shape),
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
            t = t.contiguous().reshape(-1).view(torch.uint8)
            if t.numel():
                # the tensor's own bytes, without a copy and without numpy (torch has no buffer protocol);
                # `t` stays referenced until the write returns
                f.write(memoryview((ctypes.c_ubyte * t.numel()).from_address(t.data_ptr())))
            del t
    return off
