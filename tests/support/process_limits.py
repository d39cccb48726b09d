"""How close this test process is to the limits that end it: memory mappings (each
compiled XLA CPU executable holds ~20) against vm.max_map_count, and resident memory."""

from __future__ import annotations

import os
from pathlib import Path

# Clear compiled programs past half the kernel's mapping limit (a module can compile a few
# hundred programs, ~20 mappings each) or past 6 GiB resident.
MAP_SHARE = 0.5
RSS_LIMIT_BYTES = 6 * 2**30
CLEARED: list[str] = []  # modules after which the caches were dropped


def max_map_count() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530


def mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def near_limit() -> bool:
    return mappings() > MAP_SHARE * max_map_count() or rss_bytes() > RSS_LIMIT_BYTES


def summary() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return (
        f"test process {worker}: peak RSS {peak_rss_bytes() / 2**30:.2f} GiB, "
        f"{mappings()} memory mappings at the end (limit {max_map_count()}), "
        f"compiled programs dropped after {len(CLEARED)} module(s) {CLEARED}"
    )
