"""keep_freed_memory: a freed block is reused by the next allocation instead of new pages."""

import platform
import subprocess
import sys

import pytest

# Allocate a 3 MiB array (below NumPy's 4 MiB huge-page advice, so each page faults on its own),
# free it, allocate it again, and count the page faults of the second allocation's first touch.
CHILD = """
import resource, sys
import numpy as np
from numgpt.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 3 * 2**20 // 4
a = np.ones(n, dtype=np.float32); del a
before = faults()
a = np.ones(n, dtype=np.float32)
print(faults() - before)
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")


def second_allocation_faults(mode):
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    kept = second_allocation_faults("keep")
    default = second_allocation_faults("default")   # the control: glibc's own policy faults again
    bound = 3 * 2**20 // 4096 // 20   # 5% of the block's pages
    # the control proves the bound tells reuse from fresh pages (with transparent huge pages set to
    # "always" a fresh block faults less, but at least the 1 MiB no huge page can cover: 256 faults)
    assert default > bound, f"the control should fault in fresh pages, saw {default} faults"
    assert kept < bound, f"{kept} page faults re-allocating a freed 3 MiB block"
