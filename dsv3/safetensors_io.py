"""safetensors files read by hand: header checks, a memory-mapped shard reader, the one dtype table.

Also a checkpoint directory's tensors (`weight_map`, `scan`: index and headers cross-checked), the NaN/Inf
scan of a tensor (`check_finite`) and `group_names`, which keeps long lists of tensor names readable.

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
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

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
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt", **(metadata or {})})


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: tensor name -> shard file, sorted, with the total byte size."""
    (Path(path) / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


# ---------------------------------------------------------------------- the official repository's layout
OFFICIAL_SHARD = re.compile(r"model(\d+)-mp(\d+)\.safetensors")  # deepseek-ai/DeepSeek-V3 inference/convert.py


def official_shards(path: Path) -> dict[int, Path]:
    """rank -> file of the `model{i}-mp{n}.safetensors` files in `path` (empty: not that layout)."""
    found = {}
    for f in sorted(Path(path).glob("model*-mp*.safetensors")):
        m = OFFICIAL_SHARD.fullmatch(f.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = f
    mps = sorted({mp for _, mp in found})
    if len(mps) > 1:
        raise CheckpointError(f"{path}: official-layout shards for several model-parallel sizes ({mps}); keep one set")
    if not mps:
        return {}
    mp = mps[0]
    missing = [f"model{i}-mp{mp}.safetensors" for i in range(mp) if (i, mp) not in found]
    if missing or any(i >= mp for i, _ in found):
        raise CheckpointError(f"{path}: incomplete official-layout set for mp={mp}: missing {group_names(missing)}")
    return {i: f for (i, _), f in sorted(found.items())}


def official_layout_hint(path: Path) -> str | None:
    """The sentence telling a user that `path` is the official inference layout, or None."""
    files = sorted(Path(path).glob("model*-mp*.safetensors"))
    m = next((OFFICIAL_SHARD.fullmatch(f.name) for f in files if OFFICIAL_SHARD.fullmatch(f.name)), None)
    if m is None:
        return None
    return (f"{path} holds {m.group(0)}: the official DeepSeek-V3 inference layout (inference/convert.py: official "
            f"tensor names, split for {m.group(2)} model-parallel ranks), not a Hugging Face checkpoint; convert it "
            f"back with: dsv3 convert --from-official {path} DST --config CONFIG")


# ---------------------------------------------------------------------- a checkpoint directory's tensors
def weight_map(path: Path) -> dict[str, str]:
    """HF tensor name -> shard file name, from the index or the single model.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            assert isinstance(wm, dict) and all(isinstance(v, str) for v in wm.values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: not a valid safetensors index (expected {{\"weight_map\": "
                                  "{tensor name: shard file}}})") from None
        missing = sorted({f for f in wm.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: shard file(s) listed in the index are missing: {group_names(missing)}")
        return wm
    single = path / "model.safetensors"
    if single.is_file():
        return {k: single.name for k in read_header(single)}
    raise CheckpointError(official_layout_hint(path) or f"{path}: no model.safetensors or model.safetensors.index.json")


def scan(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint with its location, index and shard headers cross-checked."""
    path = Path(path)
    wm = weight_map(path)
    headers = {f: read_header(path / f) for f in sorted(set(wm.values()))}
    out: dict[str, TensorInfo] = {}
    absent = []
    for name, f in wm.items():
        info = headers[f].get(name)
        if info is None:
            absent.append(f"{name} (in {f})")
        else:
            out[name] = info
    if absent:
        raise CheckpointError(f"{path}: the index lists tensor(s) their shard does not contain: {group_names(absent)}")
    return out


def group_names(names: list[str], limit: int = 12) -> str:
    """Collapse indices so long lists stay readable: model.layers.{3..60}.mlp.experts.{0..255}.up_proj.weight (×14848)."""
    groups: dict[str, list[list[int]]] = {}
    for n in names:
        key = re.sub(r"(?<=\.)\d+(?=\.)", "#", n)
        groups.setdefault(key, []).append([int(x) for x in re.findall(r"(?<=\.)\d+(?=\.)", n)])
    shown = []
    for key, idx in groups.items():
        parts = key.split("#")
        out = parts[0]
        for j, rest in enumerate(parts[1:]):
            vals = sorted({i[j] for i in idx})
            if len(vals) == 1:
                out += str(vals[0])
            elif vals == list(range(vals[0], vals[-1] + 1)):
                out += f"{{{vals[0]}..{vals[-1]}}}"
            else:
                out += "{" + ",".join(map(str, vals)) + "}" if len(vals) <= 6 else "*"
            out += rest
        shown.append(f"{out} (×{len(idx)})" if len(idx) > 1 else out)
    more = f" (+{len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def check_finite(t: torch.Tensor, file, name: str, where: str = "") -> None:
    """Raise CheckpointError naming `file` and tensor `name` if `t` holds a NaN/Inf.

    `where` qualifies the flat index when `t` is a slice (a parallel rank's share).
    """
    flat = t.reshape(-1)
    step = 1 << 22
    for i in range(0, flat.numel(), step):
        chunk = flat[i: i + step]
        if chunk.dtype == torch.float8_e4m3fn:
            bad = (chunk.view(torch.uint8) & 0x7F) == 0x7F  # e4m3fn has NaN only, no Inf
        elif chunk.is_floating_point():
            bad = ~torch.isfinite(chunk)
        else:
            return
        if bad.any():
            j = i + int(bad.nonzero()[0, 0])
            raise CheckpointError(f"{file}: tensor {name} holds NaN/Inf ({int(bad.sum())}+ value(s), "
                                  f"first at flat index {j}{where}); expected finite weights")


class SliceReader:
    """`read(hf_name, fn, dim, n)`: fn (default: a copy) on the tensor's mapped bytes -- this rank's `n` rows
    (dim 0) or columns (dim 1) when `dim` is given -- scanned for NaN/Inf first when `check_weights`;
    each shard is opened on first use, all closed by `close()`."""

    def __init__(self, tensors: dict[str, TensorInfo], check_weights: bool = False, rank: int = 0):
        self.tensors, self.check_weights, self.rank = tensors, check_weights, rank
        self.readers: dict[Path, ShardReader] = {}

    def __call__(self, hf_name: str, fn=None, dim: int | None = None, n: int = 0):
        info, r = self.tensors[hf_name], self.rank

        def checked(view):
            where = ""
            if dim is not None:  # this rank's slice only: together the ranks cover every value once
                view = view.narrow(dim, r * n, n)
                where = f" of rank {r}'s slice (dim {dim}, {r * n}..{(r + 1) * n - 1})"
            if self.check_weights:
                check_finite(view, info.file, info.name, where)
            return fn(view) if fn else view.clone()

        if info.file not in self.readers:
            self.readers[info.file] = ShardReader(info.file)
        return self.readers[info.file].read(info, checked)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def iter_tensors(path: Path, names: dict[str, str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) shard by shard in file order, one tensor at a time (memory-mapped reads).

    `names` (HF name -> shard file) restricts the set; default: the whole checkpoint.
    """
    infos = scan(path)
    if names is not None:
        infos = {n: infos[n] for n in names}
    for file, group in by_file(infos.values()):
        reader = ShardReader(file)
        try:
            for info in group:
                yield info.name, reader.read(info)
        finally:
            reader.close()
