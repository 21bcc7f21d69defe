"""The /proc readers on real processes: a child that opens files, fills memory, starts a
grandchild and burns CPU on request."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from bench import procfs

MIB = 1024 * 1024

# Reads one command per line and answers "ok" when done with it.
CHILD = """
import os, subprocess, sys, time
held = []
for line in sys.stdin:
    what = line.strip()
    if what == "files":
        held += [open(os.devnull) for _ in range(10)]
    elif what == "memory":
        held.append(b"x" * (64 << 20))
    elif what == "grandchild":
        # Waits for the grandchild to say it is up: while Python starts it opens and closes
        # files, and a count taken then would race with the test's second count.
        grandchild = subprocess.Popen(
            [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE,
        )
        grandchild.stdout.readline()
        held.append(grandchild)
    print("ok", flush=True)
"""

# Uses 0.3 s of CPU and prints the CPU time it used in all.
BURN = """
import os, time
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
times = os.times()
print(times.user + times.system)
"""


class Child:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.process.pid

    def do(self, what: str) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "ok"


@pytest.fixture
def child() -> Iterator[Child]:
    made = Child()
    yield made
    for pid in procfs.children(made.pid):
        os.kill(pid, 9)
    made.process.kill()
    made.process.wait(timeout=10)


def test_open_fds_counts_the_files_a_process_opens(child: Child) -> None:
    child.do("ready")
    before = procfs.open_fds(child.pid)
    child.do("files")
    assert procfs.open_fds(child.pid) == before + 10


def test_rss_grows_with_memory_a_process_writes(child: Child) -> None:
    child.do("ready")
    before = procfs.rss_bytes(child.pid)
    child.do("memory")
    assert procfs.rss_bytes(child.pid) - before >= 60 * MIB


def test_a_footprint_sums_the_whole_tree(child: Child) -> None:
    child.do("grandchild")
    (grandchild,) = procfs.children(child.pid)
    assert procfs.children(os.getpid()).count(grandchild) == 1  # found two levels down
    whole = procfs.footprint(child.pid)
    assert whole.processes == 2
    parts = [(procfs.rss_bytes(p), procfs.open_fds(p)) for p in (child.pid, grandchild)]
    assert whole.rss_bytes == pytest.approx(sum(r for r, _ in parts), rel=0.05)
    assert whole.open_fds == sum(f for _, f in parts)


def test_tree_cpu_keeps_the_time_of_children_already_reaped() -> None:
    before = procfs.tree_cpu_seconds(os.getpid())
    used = float(subprocess.run([sys.executable, "-c", BURN], capture_output=True, text=True,
                                check=True).stdout)  # fmt: skip
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert procfs.tree_cpu_seconds(os.getpid()) - before >= used - 2 * tick


def test_cpu_shares_split_the_machine_between_us_and_the_rest() -> None:
    share = procfs.CpuShare()
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    ours, others = share.shares()
    assert ours > 0
    assert 0 <= others <= 1
    assert ours + others <= 1.05  # tick rounding
