"""synpref.core.host_memory: a freed block of 1 MiB or more leaves the process's resident memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# A 16 MiB block freed first raises glibc's own threshold to 16 MiB; a 4 MiB block then comes from the
# heap and, with a small block allocated after it, stays resident once freed. The child prints how
# much resident memory that freed block still holds.
PROBE = """
import os, sys
{setup}
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * PAGE
big = bytearray(16 << 20); del big
before = rss()
block = bytearray(4 << 20)
after_small = bytearray(64)
del block
print((rss() - before) >> 20)
"""


def kept_mib(setup: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_block_leaves_resident_memory():
    assert kept_mib("") >= 3  # glibc's defaults: the freed 4 MiB stay in the heap
    setup = "from synpref.core.host_memory import release_freed_memory\nassert release_freed_memory()"
    assert kept_mib(setup) <= 1


def test_the_users_own_threshold_wins(monkeypatch):
    from synpref.core.host_memory import release_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert release_freed_memory() is False


def test_the_command_asks_torch_for_huge_pages_before_torch_is_imported():
    """torch reads THP_MEM_ALLOC_ENABLE once: importing the command line module must set it first."""
    probe = (
        "import os, sys; os.environ.pop('THP_MEM_ALLOC_ENABLE', None)\n"
        "import synpref.cli, torch\n"
        "x = torch.empty(64 << 20, dtype=torch.uint8); x.fill_(1)\n"
        "print(os.environ['THP_MEM_ALLOC_ENABLE'], [l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0])"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    flag, huge_kb = done.stdout.split()[-2:]
    assert flag == "1"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert int(huge_kb) > 0  # the 64 MiB block sits on huge pages


def test_the_users_own_huge_page_setting_wins(monkeypatch):
    from synpref.core.host_memory import prefer_huge_pages

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    prefer_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
