"""safetensors files read by hand: header checks, a memory-mapped shard reader, the one dtype table.

Parsing the header ourselves lets every check (names, shapes, dtypes, truncation) run
before a single tensor byte is read, and lets the loader drop each tensor's pages from
the process as soon as it has been copied (the bound on resident memory). `ST_DTYPES`
(safetensors dtype name -> torch dtype) and its inverse `ST_NAMES` are the one table that
both the reader here and `dsv3.convert`'s streaming writer use; `write_shard` / `write_index` write
whole shards (save_model, the test checkpoints).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv3.errors import CheckpointError

ST_DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}  # torch dtype -> safetensors name


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one .safetensors file, validated against the file size (no data read)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{file}: corrupted safetensors header (says {n} header bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        raise CheckpointError(f"{file}: corrupted safetensors header (not a JSON object)") from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[h["dtype"]]
            shape = tuple(int(d) for d in h["shape"])
            lo, hi = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupted safetensors header entry for {name} ({h!r:.80})") from None
        want = math.prod(shape) * dtype.itemsize
        if hi - lo != want:
            raise CheckpointError(f"{file}: tensor {name} has {hi - lo} bytes, expected {want} for "
                                  f"{h['dtype']} {list(shape)} (corrupted header)")
        if base + hi > size:
            raise CheckpointError(f"{file}: truncated: tensor {name} ends at byte {base + hi}, file has {size} bytes")
        out[name] = TensorInfo(name, file, dtype, shape, base + lo, base + hi)
    return out


class ShardReader:
    """One memory-mapped shard; `read` copies a tensor out and releases its pages again."""

    def __init__(self, file: Path):
        self.file = file
        self._f = open(file, "rb")
        # ACCESS_COPY: a private mapping is writable, so torch.frombuffer needs no copy or warning;
        # nothing is ever written, so no page is ever duplicated.
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY)

    def read(self, info: TensorInfo, fn=None):
        """fn(view) on a zero-copy view of the tensor (default: a copy of it); fn must not keep the view.

        Giving fn the mapped bytes directly (cast, move to a GPU, compare, dequantise) means no
        intermediate copy is ever allocated: resident memory grows by the result only.
        """
        if info.nbytes == 0:
            view = torch.empty(info.shape, dtype=info.dtype)
            return fn(view) if fn else view
        view = torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=info.start)
        view = view.view(info.dtype).reshape(info.shape)
        try:
            return fn(view) if fn else view.clone()
        finally:
            del view
            if hasattr(self._mm, "madvise"):
                # Drop the file pages from our resident set (the page cache keeps them). The kernel's
                # fault-around maps up to 64 KiB of neighbours too, hence the margin.
                margin = 1 << 18
                lo = max(0, info.start - margin)
                lo -= lo % mmap.PAGESIZE
                self._mm.madvise(mmap.MADV_DONTNEED, lo, min(len(self._mm), info.end + margin) - lo)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # a view still alive somewhere; the GC unmaps it later
            pass
        self._f.close()


def by_file(infos) -> list[tuple[Path, list[TensorInfo]]]:
    """TensorInfos grouped by shard file (sorted), each group in file order: every shard's pages read once, in order."""
    by: dict[Path, list[TensorInfo]] = {}
    for i in infos:
        by.setdefault(i.file, []).append(i)
    return [(f, sorted(v, key=lambda i: i.start)) for f, v in sorted(by.items())]


def write_shard(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One .safetensors file (contiguous copies where needed; metadata format "pt" plus `metadata`)."""
    from safetensors.torch import save_file  # the writer: only the commands that write need it

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt", **(metadata or {})})


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: tensor name -> shard file, sorted, with the total byte size."""
    (Path(path) / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
