"""``train.retain_host_memory``: keep freed host memory in the process for the next step to reuse.

glibc's ``malloc`` serves every block above a (dynamic, at most 32 MiB) threshold with a fresh ``mmap``
and unmaps it on ``free``; it also trims the top of the heap back to the OS. A training step allocates
and frees the same large tensors every step (the caption head's logits and their gradient, MLP
activations, the optimizer's temporaries), so on a CPU each step faulted hundreds of MB of new pages in
again: 70-80 thousand page faults and a quarter of a second of kernel time per bf16 ``bench-tiny`` CoCa
step on the project's 2-core machine (docs/performance.md). Telling glibc never to ``mmap`` and never to
trim (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, huge)``) makes freed blocks stay in the heap
and be reused, as the ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables would from
process start.

The price: the process keeps its high-water mark of host memory until it exits (peak memory is what a
run needs anyway). Only glibc is tuned; on other C libraries (macOS, musl) this does nothing. If the user
set any ``MALLOC_*`` tuning variable themselves, their choice is left alone.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("finealign")

__all__ = ["retain_freed_memory"]

M_TRIM_THRESHOLD = -1            # glibc <malloc.h>
M_MMAP_MAX = -4
NEVER_TRIM = 2 ** 31 - 1         # mallopt takes an int: 2 GiB of free heap top before any trim
USER_TUNING = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied = False


def _glibc():
    """The process's C library if it is glibc (it exports ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Stop glibc from unmapping large freed blocks and trimming the heap (process-wide, idempotent).

    Returns True when the setting is in force (now or from an earlier call), False when it does not
    apply: not glibc, or the user tuned ``malloc`` through the environment (logged)."""
    global _applied
    if _applied:
        return True
    user = [k for k in USER_TUNING if k in os.environ]
    if user:
        log.info("train.retain_host_memory: %s set in the environment; malloc left as configured there",
                 ", ".join(user))
        return False
    libc = _glibc()
    if libc is None:
        log.debug("train.retain_host_memory: not glibc, nothing to tune")
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if not ok:
        log.warning("train.retain_host_memory: glibc refused mallopt; freed host memory is returned as usual")
    _applied = ok
    return ok
