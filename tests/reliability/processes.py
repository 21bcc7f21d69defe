"""Private servers the fault scenarios stop and start: each on its own free loopback port
and folder, so the machine's own Redis (6379), PostgreSQL (5432) and FHIR servers are
never touched; and a small filesystem to fill up."""

from __future__ import annotations

import errno
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import redis

from fhir_adapter.local_server import FhirServer, free_port
from tests.support.databases import postgres_url

START_TIMEOUT_S = 60.0


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    """Poll ``ready`` until it holds; fail at once if ``process`` exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited at start with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {START_TIMEOUT_S} s")
        time.sleep(0.05)


def restart_fhir_server(server: FhirServer) -> FhirServer:
    """The stopped ``server`` started again from its own folder and settings: the same
    port (so the same base URL) and the same data."""
    with (server.workdir / "server.log").open("ab") as log:
        process = subprocess.Popen(
            server.process.args, cwd=server.workdir, stdout=log, stderr=subprocess.STDOUT
        )

    def answers() -> bool:
        try:
            return httpx.get(f"{server.base_url}/metadata", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    restarted = FhirServer(server.base_url, server.root_url, process, server.workdir)
    try:
        wait_until(answers, process, "the FHIR server")
    except RuntimeError:
        restarted.stop()
        raise
    return restarted


class RedisProcess:
    """A ``redis-server`` without persistence: a kill loses every entry, as a crash of a
    cache-only Redis does."""

    def __init__(self, workdir: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("the Redis scenario needs the redis-server binary on PATH")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.command = [executable, "--port", str(self.port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.answers, self.process, "redis-server")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)

    def answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def keys(self) -> int:
        with self.client() as client:
            return int(client.dbsize())


class PostgresProcess:
    """A PostgreSQL cluster of its own (``initdb`` into a fresh folder, trust auth, TCP on
    loopback only). PostgreSQL refuses to run as root, so under root the cluster belongs to
    and runs as the ``postgres`` user; its folder is outside pytest's root-only tmp folder
    for that reason."""

    def __init__(self) -> None:
        self.bindir = _postgres_bindir()
        self.folder = Path(tempfile.mkdtemp(prefix="ehrmamba-reliability-pg-"))
        self.port = free_port()
        self.url = postgres_url("postgres", port=self.port)
        self.process: subprocess.Popen[bytes] | None = None
        owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self._uid = owner.pw_uid if owner else None
        self._gid = owner.pw_gid if owner else None
        self._groups: list[int] | None = [] if owner else None
        if owner is not None:
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        initdb = [str(self.bindir / "initdb"), "-D", str(self.folder / "data"), "-U", "postgres",
                  "--auth=trust", "--no-sync", "--no-locale", "-E", "UTF8"]  # fmt: skip
        done = subprocess.run(
            initdb, capture_output=True, text=True, cwd=self.folder,
            user=self._uid, group=self._gid, extra_groups=self._groups,
        )  # fmt: skip
        if done.returncode != 0:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise RuntimeError(f"initdb failed: {done.stderr}")

    def start(self) -> None:
        command = [str(self.bindir / "postgres"), "-D", str(self.folder / "data"),
                   "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                   "-c", f"unix_socket_directories={self.folder}", "-c", "fsync=off"]  # fmt: skip
        with (self.folder / "postgres.log").open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                user=self._uid, group=self._gid, extra_groups=self._groups,
            )  # fmt: skip
        wait_until(self.answers, self.process, "postgres")

    def stop(self) -> None:
        """A fast shutdown (SIGINT): sessions are cut off, as in a failover or a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=30)

    def answers(self) -> bool:
        try:
            with psycopg.connect(
                host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                connect_timeout=1,
            ):  # fmt: skip
                return True
        except psycopg.OperationalError:
            return False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _postgres_bindir() -> Path:
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if not versions:
        raise RuntimeError("the PostgreSQL scenario needs initdb and postgres (PostgreSQL server)")
    return Path(versions[-1]).parent


def _version(initdb: str) -> int:
    return int(Path(initdb).parents[1].name)


@contextmanager
def small_filesystem(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``mountpoint`` for the length of the block (needs root, as
    on the CI machine): its space runs out for real, with ENOSPC."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)]
    done = subprocess.run(mount, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the disk-full scenario mounts a tmpfs (run as root): {done.stderr}")
    try:
        yield mountpoint
    finally:
        busy = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
        if busy.returncode != 0:  # a file left open: never leave the mount behind
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)
            raise RuntimeError(f"{mountpoint} was still in use: {busy.stderr}")


def fill(folder: Path) -> Path:
    """Write zeros to a file in ``folder`` until its filesystem has no space left; the
    file (delete it to give the space back)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as sink:
        for chunk in (b"\0" * 65536, b"\0" * 512):
            try:
                while True:
                    sink.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler
