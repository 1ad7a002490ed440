"""Will it fit? Bytes a model or cache needs, checked against what the device has, before allocating.

Allocating a model or cache that cannot fit ends in the allocator, with a traceback, or
worse, in the kernel's OOM killer halfway through. Both sizes are known in advance
(parameters and cache tensors can be built on the meta device at no cost), so dsv3 counts
them first and refuses with "needs X GB, Y GB available".

Available memory: on CUDA, the free bytes the driver reports; on CPU, MemAvailable from
/proc/meminfo, capped by the cgroup's limit when there is one (containers). Where neither
can be read the check is skipped rather than guessed.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from dsv3.errors import ResourceError


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on `device`, or None when the system does not say."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        avail = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (works on the meta device)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def check_fits(need: int, device: torch.device | str, what: str) -> None:
    """Raise ResourceError when `need` bytes for `what` exceed what `device` has free."""
    have = available_bytes(device)
    if have is not None and need > have:
        raise ResourceError(f"{what} needs {need / 1e9:.2f} GB, {have / 1e9:.2f} GB available on {device}")


def check_cache_fits(model, batch: int, max_len: int, mtp: bool = False) -> None:
    """Refuse a generation whose latent cache would not fit (sized on the meta device first)."""
    need = model.new_cache(batch, max_len, mtp=mtp, device="meta").nbytes()
    check_fits(need, model.device, f"the cache for {batch} sequence(s) × {max_len} positions")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse instead of handing them back to the kernel.

    PyTorch's CPU allocator is malloc. By default glibc serves blocks above a (dynamic, up to 32 MB)
    threshold with fresh mmap pages and unmaps them on free, so every forward's activations -- a few MB
    each in a prefill -- are new pages the kernel must fault in and zero: measured on the bench preset, 9%
    of a 512-token prefill. Keeping them (what llama.cpp's own arena and tcmalloc/jemalloc do) leaves the
    peak about where it was; resident memory just is not lowered between forwards. Called by the
    commands that run a model (generate, chat, serve, bench), never on import. False where not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 2**31 - 1))
