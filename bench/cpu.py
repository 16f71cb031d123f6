"""CPU time of a server and all its processes (its process group), read from ``/proc``.

The harness starts each server in a session of its own (``bench/servers.py``), so the group holds
the server, its workers and nothing else: the load generator is outside it.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int, proc: Path = Path("/proc")) -> float:
    """User + system CPU seconds of every live process in process group ``pgid``."""
    total = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended between the listing and the read
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        # After the name: state, ppid, pgrp, ... utime is field 14 of stat, stime field 15.
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS_PER_S
