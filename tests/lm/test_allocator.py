"""Freed tensors go back to the system once the allocator's mmap threshold is fixed (`spearfl.lm.allocator`).

Each case runs in a fresh interpreter, since the threshold is process-wide and glibc adjusts it as blocks are freed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spearfl.lm import allocator

# After one 1 MiB tensor is freed, glibc's adjusted threshold serves the next 1 MiB tensors from its heap; all but
# the last of 100 are freed, and the last, at the heap's top, keeps the heap from shrinking.
SCRIPT = """
import sys, torch
from spearfl.lm.allocator import return_large_blocks_when_freed
from spearfl.lm.memory import resident_mb
if sys.argv[1] == "fixed":
    assert return_large_blocks_when_freed()
first = torch.ones(2**18)
del first
before = resident_mb()
tensors = [torch.ones(2**18) for _ in range(100)]
held = resident_mb()
del tensors[:-1]
print(held - before, resident_mb() - before)
"""


def retained_mb(mode: str) -> tuple[float, float]:
    output = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=120).stdout
    allocated, retained = map(float, output.split())
    return allocated, retained


@pytest.mark.skipif(not allocator.CAN_RELEASE, reason="the C library is not glibc")
def test_freed_tensors_go_back_to_the_system_with_the_threshold_fixed():
    allocated, retained = retained_mb("fixed")
    assert allocated > 90  # 100 MiB of tensors were resident
    assert retained < 10  # 99 of them went back; one MiB and page-table slack stay


@pytest.mark.skipif(not allocator.CAN_RELEASE, reason="the C library is not glibc")
def test_without_the_fixed_threshold_the_freed_tensors_stay_resident():
    """The same run with glibc's adjusted threshold: the check above would fail without the setting."""
    allocated, retained = retained_mb("adjusted")
    assert allocated > 90
    assert retained > 90
