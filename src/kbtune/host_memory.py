"""Keep the memory a training step frees for the next step, instead of handing it back to the kernel.

glibc's malloc gives large freed blocks back at once: a block above its mmap threshold is unmapped on
free, and free memory at the top of the heap is trimmed once it exceeds twice that threshold (64 MB at
most). A training step frees its activations and gradients, so the next step faults the same pages
back in, and the kernel zeroes every one of them. On a 2-core AMD EPYC VM, a fresh process training
model=small in bf16-mixed for 30 steps took ~950,000 page faults that way and ~230,000 with the
settings below (the rest: building the model, validating), at 1.34x the tokens/s
(`python benchmarks/run.py --only profile`, "Reusing freed memory"). Intel's
CPU tuning guide for PyTorch gets the same effect by preloading jemalloc or tcmalloc; these are
glibc's own knobs, set from inside the process, so `python scripts/train.py` needs no launcher.

The cost: the training process holds up to TRIM_THRESHOLD of freed memory instead of returning it,
so its resident size stays near its peak. `trainer.reuse_freed_memory=false` turns this off."""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# glibc's largest allowed mmap threshold on 64-bit: blocks up to it come from the heap and are reused.
# Setting it also stops glibc from adjusting it (and the trim threshold) as blocks are freed.
MMAP_THRESHOLD = 32 << 20
# Freed memory at the heap's top is kept up to this much: a step's working set at the sizes kbtune
# trains on CPU (~100M parameters at batch 8 x 256 holds a few hundred MB of activations).
TRIM_THRESHOLD = 1 << 30
# Grow the heap in steps of this much, so that larger requests find room at its top.
TOP_PAD = 64 << 20

_applied = False


def reuse_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (once per process). False where the C library is not
    glibc (macOS, musl): nothing is changed there."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    if not all(mallopt(option, value) == 1 for option, value in settings):
        logger.warning("glibc refused a malloc setting: freed memory is returned to the kernel as before")
        return False
    _applied = True
    logger.info("malloc keeps up to %d MB of freed memory for reuse", TRIM_THRESHOLD >> 20)
    return True
