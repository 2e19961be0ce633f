"""Large freed host tensors go back to the system (--malloc_mmap_threshold_mb), so training's peak RSS is
what its live tensors need rather than that plus heap fragmentation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlmtune.train.memory import glibc, release_large_frees

# Frees every other one of twenty 8 MiB tensors after a 16 MiB one raised glibc's adaptive threshold (the
# ones kept hold the heap around the holes); prints how much resident memory the frees gave back.
SCRIPT = """
import sys, torch
from vlmtune.train.memory import release_large_frees
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) // 1024
release_large_frees(float(sys.argv[1]))
t = torch.ones(4 * 2**20)  # 16 MiB, freed at once: glibc now keeps blocks up to 16 MiB in its heap
del t
tensors = [torch.ones(2 * 2**20) for _ in range(20)]
before = rss()
del tensors[::2]  # 80 MiB
print(before - rss())
"""


def freed_mib(threshold_mb: float) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(threshold_mb)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(glibc() is None, reason="glibc only")
def test_freed_tensors_leave_the_process():
    assert freed_mib(2) >= 75  # all 80 MiB returned
    assert freed_mib(0) < 10  # glibc's default keeps them resident in the heap


def test_user_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert release_large_frees(2) is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert release_large_frees(0) is False
