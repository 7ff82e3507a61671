"""Resident memory that follows the live tensors: glibc keeps freed blocks of up to 32 MB in its heap (its
mmap threshold rises to the largest block freed), so a stage that frees many such temporaries stays resident
at its high-water mark unless the heap is trimmed."""

from __future__ import annotations

import ctypes
import sys


def trim_heap() -> None:
    """Return the heap's free memory to the system (glibc malloc_trim; nothing to do elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).malloc_trim(0)
