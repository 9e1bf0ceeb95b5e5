"""Resident-memory readings of this process, shared by the memory benchmarks (Linux only)."""

from __future__ import annotations

from pathlib import Path


def status_kib(field: str) -> int:
    """A memory line of ``/proc/self/status`` in KiB: ``VmRSS`` now, ``VmHWM`` the peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")
