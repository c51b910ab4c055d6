"""Memory of a process, read from /proc (Linux): resident, proportional and private bytes.

RSS counts shared library pages (torch's alone are ~250 MiB) in every process that maps
them; PSS splits shared pages among the processes sharing them, so the PSS of several
workers adds up to the memory they really take together.
"""

from __future__ import annotations

import ctypes
import os
import sys


def memory_breakdown(pid: int | None = None) -> dict[str, int]:
    """Returns {"rss_bytes", "pss_bytes", "uss_bytes"} of `pid` from /proc/PID/smaps_rollup."""
    fields = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    with open(f"/proc/{pid or os.getpid()}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                fields[key] = int(rest.split()[0]) * 1024
    return {
        "rss_bytes": fields["Rss"],
        "pss_bytes": fields["Pss"],
        "uss_bytes": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def release_free_heap() -> None:
    """Hands freed heap pages back to the OS (glibc keeps them after large loads)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
