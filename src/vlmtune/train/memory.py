"""Host memory of the training process: large freed tensors go back to the system instead of fragmenting.

glibc's malloc serves blocks above its mmap threshold with their own mapping, returned to the system when
freed; the threshold adapts upwards (to 32 MiB) to the largest block freed so far. After the first step
of training every activation-sized tensor therefore comes from the heap, where tensors of many sizes
and lifetimes (saved activations, their gradients, temporaries) leave holes that a later tensor of
another size cannot reuse, while the pages stay resident. On the CPU benchmark (bench/compare.py) that
fragmentation is a quarter of the training process's peak RSS. A fixed threshold (`--malloc_mmap_threshold_mb`,
default 2 MiB) gives each tensor at least that large its own mapping: the peak is what live tensors
need; the price is the page faults of mapping fresh memory for those tensors on every step.

Only glibc (Linux) has this knob; elsewhere, or when the user set glibc's own environment variables for
it, nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
# Free memory at the top of the heap kept for reuse rather than returned at once: small blocks then do
# not fault fresh pages every step (peak unchanged: the heap's high-water mark is the same).
TRIM_THRESHOLD = 128 * 2**20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def user_set_malloc() -> bool:
    """Whether the environment already tunes glibc's thresholds (the user's choice wins)."""
    return any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def glibc():
    """The process's C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def release_large_frees(threshold_mb: float) -> bool:
    """Give tensors of at least `threshold_mb` MiB their own mapping, returned when freed (0: glibc's
    adaptive default). Returns whether the setting was applied."""
    if threshold_mb <= 0 or user_set_malloc():
        return False
    libc = glibc()
    if libc is None:
        return False
    applied = libc.mallopt(M_MMAP_THRESHOLD, int(threshold_mb * 2**20)) == 1
    applied = applied and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if applied:
        logger.info("Host tensors of %g MiB or more are returned to the system when freed.", threshold_mb)
    return applied
