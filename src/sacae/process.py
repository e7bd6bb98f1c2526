"""How a training process uses the machine: its compute threads, memory that it frees and allocates again, and the
machine described in words for status.json and reports.

A pixel update allocates and frees dozens of image-batch tensors (128 x 9 x 84 x 84 float32: 31 MiB each). glibc's
malloc hands blocks that large back to the kernel when they are freed (munmap, or trimming the heap's free top once
it exceeds a threshold), so the next update faults the same amount in again, page by page: 25,000-70,000 page faults
and ~10% of a CPU update's time. Told to keep
freed memory (no mmap for large blocks, no trimming of the heap's top), the same update makes a few hundred faults.
The process's resident size then stays at its peak instead of shrinking between updates, which it does not do in a
useful way anyway: the next update needs the same memory again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import platform
import socket
import sys
from typing import Any

import torch

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

KEEP_FREED_MEMORY_VARIABLE = "SACAE_KEEP_FREED_MEMORY"
"""Set to 0 to leave glibc's allocator as it is."""

_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (once per process); False where it cannot (another C library,
    another system) or where SACAE_KEEP_FREED_MEMORY=0."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux") or os.environ.get(KEEP_FREED_MEMORY_VARIABLE, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Large blocks from the heap rather than from mmap; a heap whose free top is never handed back to the kernel.
    # Both only change where memory comes from: no result depends on them.
    _kept = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept


def configure_process(num_threads: int | None) -> None:
    """What every training process does first: its thread count (None: torch's default) and the allocator."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    keep_freed_memory()


def processor_name() -> str:
    """The CPU's model name as the kernel reports it (e.g. "AMD EPYC 9B45"), else what Python's platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def describe_session(device: torch.device) -> dict[str, Any]:
    """Where and on what this process trains: the record of one session of a run in its status.json (and the
    machine a report prints beside the run's hours)."""
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": socket.gethostname(),
        "processor": processor_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": str(torch.__version__),  # a plain string: TorchVersion does not load with weights_only
    }
