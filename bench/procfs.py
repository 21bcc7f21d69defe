"""What /proc says about the benchmark's processes and the machine around them.

The benchmarks start every server they measure as descendants of their own process (the
FHIR server, the service with its uvicorn workers, Redis, wrk), so one process tree holds
all of "ours": its memory and descriptors show leaks, and the machine's CPU time outside it
says how much other work shared the cores while a number was taken. Linux only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Footprint:
    """Resident memory and open descriptors of a process tree at one moment."""

    processes: int
    rss_bytes: int
    open_fds: int


def children(pid: int, proc: Path = PROC) -> list[int]:
    """Every live descendant of ``pid`` (not ``pid`` itself), found by parent id."""
    parents: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        parents.setdefault(_stat_fields(stat)[1], []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def rss_bytes(pid: int, proc: Path = PROC) -> int:
    """Resident set size from ``/proc/<pid>/status`` (``VmRSS``, in kB there)."""
    for line in (proc / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie or a kernel thread has no VmRSS line


def open_fds(pid: int, proc: Path = PROC) -> int:
    """Open file descriptors: the entries of ``/proc/<pid>/fd``."""
    return len(os.listdir(proc / str(pid) / "fd"))


def footprint(pid: int, proc: Path = PROC) -> Footprint:
    """``pid`` and its descendants summed: uvicorn's supervisor and every worker."""
    rss = fds = count = 0
    for member in (pid, *children(pid, proc)):
        try:
            rss += rss_bytes(member, proc)
            fds += open_fds(member, proc)
        except OSError:  # exited between the listing and the read
            continue
        count += 1
    return Footprint(count, rss, fds)


def tree_cpu_seconds(pid: int, proc: Path = PROC) -> float:
    """CPU seconds used by ``pid``'s tree: each live member's own time, plus the time of
    children already reaped (``cutime``/``cstime``), so an exited wrk still counts once."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in (pid, *children(pid, proc)):
        try:
            fields = _stat_fields((proc / str(member) / "stat").read_text())
        except OSError:
            continue
        total += sum(fields[11:15])  # utime stime cutime cstime
    return total / tick


def machine_busy_seconds(proc: Path = PROC) -> float:
    """CPU seconds every process has used since boot (idle and iowait left out)."""
    ticks = [int(v) for v in (proc / "stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """How much of the machine's cores this process tree and everything else used since
    it was made: on a shared machine a timing means little without the second figure."""

    def __init__(self, root: int | None = None) -> None:
        self.root = os.getpid() if root is None else root
        self._start = self._now()

    def _now(self) -> tuple[float, float, float]:
        return time.perf_counter(), machine_busy_seconds(), tree_cpu_seconds(self.root)

    def shares(self) -> tuple[float, float]:
        """(ours, others): shares of all cores since the start, each from 0 to 1."""
        now = self._now()
        wall, busy, ours = (now[i] - self._start[i] for i in range(3))
        cores = wall * (os.cpu_count() or 1)
        return max(ours, 0.0) / cores, max(busy - ours, 0.0) / cores


def _stat_fields(stat: str) -> list[int]:
    """The numeric fields of a ``stat`` line after the parenthesised command name (which
    may itself hold spaces and parentheses), numbered from the state field as 0; field 1
    is the parent id. The state letter is kept as 0."""
    rest = stat.rsplit(")", 1)[1].split()
    return [0, *(int(v) for v in rest[1:])]
