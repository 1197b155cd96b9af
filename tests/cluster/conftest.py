"""A real ``redis-server`` for the cluster tests: one per test, on a free port, in a temp dir.

The server runs with persistence off (no RDB snapshots, no AOF), so a kill loses everything, as
a store lost for good would. Tests can :meth:`RedisServer.kill` it (SIGKILL), :meth:`pause` it
(SIGSTOP: connections hang rather than fail, the case that needs client timeouts) and
:meth:`restart` it on the same port (empty).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process this test started (and only it ever signals)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: scripts/setup.sh installs Debian's redis-server")
        self.binary = binary
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> None:
        """Start on ``port`` (a free one when None), retrying on a port lost to a race."""
        assert self.proc is None, "already running"
        for _ in range(5):
            self.port = port if port is not None else _free_port()
            log = open(self.workdir / f"redis-{self.starts}.log", "wb")
            self.starts += 1
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
                 "--protected-mode", "no", "--loglevel", "warning"],
                stdout=log, stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if _ping(self.port):
                    return
                time.sleep(0.005)
            self._reap()
            if port is not None:
                time.sleep(0.1)  # the same port: give the old socket time to close
        raise RuntimeError(f"redis-server did not start; see the logs in {self.workdir}")

    def _reap(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: the store is lost, with everything in it (no persistence)."""
        assert self.proc is not None, "not running"
        self.proc.send_signal(signal.SIGKILL)
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps its connections open."""
        assert self.proc is not None, "not running"
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None, "not running"
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Kill, then start an empty server on the same port."""
        if self.proc is not None:
            self.kill()
        self.start(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
