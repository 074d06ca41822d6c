"""Processes a test started, found and stopped by what their command lines hold (never
`ray stop`, which stops every Ray process on the machine, other clusters included)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def cluster_processes(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


def children_of(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc/*/stat's parent field)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def stop_processes(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL after 10 s, each of `pids` (ours: found by a marker of this test)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.1)
        pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def ray_cluster_processes(gcs_address: str) -> list[int]:
    """A Ray cluster's processes: found by its GCS address ("host:port") or port in their
    command lines, with their children (the agents Ray renames are children of its raylets)."""
    port = gcs_address.rsplit(":", 1)[1]
    pids = set(cluster_processes(gcs_address)) | set(cluster_processes(f"--gcs_server_port={port}"))
    pids |= {child for pid in list(pids) for child in children_of(pid)}
    return sorted(pids)
