"""A real redis-server for the tests: started on a free loopback port, no persistence, killed at the end.

Never a mock: the point of the Redis store is what the real server guarantees (Lua scripts run
atomically, GETDEL hands a value to one caller, TTLs expire keys). Without `redis-server` the
tests skip with the reason, unless ASIRRA_REQUIRE_REDIS=1 (as in CI), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_SECONDS = 10.0  # a redis-server that has not answered PING by then has failed to start


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def installed_or_skip(binary: str, variable: str, reason: str, where: tuple[str, ...] = ()) -> str:
    """The path of `binary` (on PATH or at one of `where`), else a skip with `reason`, or a failure when the
    environment `variable` is 1 (as CI sets it)."""
    found = shutil.which(binary) or next((path for path in where if os.access(path, os.X_OK)), None)
    if found is None:
        if os.environ.get(variable) == "1":
            pytest.fail(f"{reason}, and {variable}=1 says these tests must run")
        pytest.skip(reason)
    return found


def redis_binary() -> str:
    """The redis-server executable, or skip (fail when ASIRRA_REQUIRE_REDIS=1)."""
    return installed_or_skip("redis-server", "ASIRRA_REQUIRE_REDIS", "redis-server is not installed (apt-get install "
                             "redis-server; `make redis-server` does it as root)")


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`; stop() and start() again keep the port (an outage)."""

    def __init__(self, binary: str, folder: Path, port: int | None = None):
        self.binary, self.folder, self.port = binary, folder, port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        log = open(self.folder / f"redis-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                output = (self.folder / f"redis-{self.port}.log").read_text(errors="replace")[-500:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {output}")
            try:
                client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
                if client.ping():
                    client.close()
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {START_SECONDS:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


@pytest.fixture
def redis_server(tmp_path):
    """A fresh, empty redis-server for one test (`.url`, `.stop()`, `.start()`); always killed afterwards."""
    server = RedisServer(redis_binary(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
