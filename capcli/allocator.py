"""Keep freed tensor memory in the process instead of handing it back to the OS (glibc Linux).

glibc's malloc serves every block above its mmap threshold (128 KB, raised on the fly up to 32 MB)
with a fresh ``mmap`` and returns it with ``munmap`` when freed; the top of the heap is trimmed
back to the OS likewise. A CPU forward pass allocates and frees activations of a few MB to a few
tens of MB at every layer, so each one is page-faulted in again, 4 KB at a time (what that costs
is in docs/performance.md).
Fixing the threshold at its maximum and not trimming lets freed blocks be reused, as the
caching allocators of jemalloc or tcmalloc (and CUDA's) do.

The command line calls :func:`keep_freed_memory` once at start. A library user may call it too;
it changes the whole process. ``CAPCLI_SYSTEM_MALLOC=1``, or any ``MALLOC_*_`` tuning variable of
one's own, leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit): bigger blocks are still mmapped
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before trimming (a C int: below 2 GB)
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (once per process); True if they are set now."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("CAPCLI_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):  # the user's own tuning
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: other C libraries have other knobs
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
