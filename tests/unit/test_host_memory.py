"""trainer.reuse_freed_memory: a step's freed memory is reused by the next step, not faulted back in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kbtune.training_loop import TrainerSettings

# A training step's pattern: tensors of a few MB to 24 MB allocated, then all freed, step after step.
# Prints the page faults of steps 2 and 3: the first faults everything in either way, and from the third
# or fourth glibc's own dynamic mmap threshold has grown past these blocks (it never grows past 32 MB,
# so bigger blocks are faulted in at every step without the settings).
STEPS = """
import json, resource, sys, torch
from kbtune.host_memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "on" else False
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.empty(mb << 18).fill_(1.0) for mb in (4, 8, 12, 24) * 5]
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sum(faults[1:3])}))
"""


def run_steps(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_memory_is_reused_instead_of_faulted_back_in():
    off, on = run_steps("off"), run_steps("on")
    assert on["applied"] is True and off["applied"] is False
    # 2 steps of 240 MB each: glibc's defaults fault 67,000-113,000 pages (260-440 MB) back in, the
    # settings 2,000-22,000 (a 24 MB block that found no room at the heap's top).
    assert off["faults"] > 60_000, off
    assert on["faults"] < off["faults"] / 2, (on, off)


def test_it_is_on_by_default_and_can_be_turned_off():
    assert TrainerSettings().reuse_freed_memory is True
    assert TrainerSettings(reuse_freed_memory=False).validate() == []
