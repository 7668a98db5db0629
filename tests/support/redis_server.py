"""A real redis-server on a free loopback port, owned by the test session."""

from __future__ import annotations

import shutil
import subprocess
import time

import redis

from tests.support.processes import ServerProcess, free_port

__all__ = ["RedisServer", "free_port"]


class RedisServer(ServerProcess):
    """Runs ``redis-server`` with AOF on, so a restart keeps every acknowledged write."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: run `make system-deps` (Debian package redis-server)"
            )
        super().__init__("sluiceway-redis-")
        self.binary = binary
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {self.dir / 'redis.log'}")
            try:
                if client.ping():
                    # Wait for the AOF to be loaded too: LOADING errors count as not ready.
                    client.dbsize()
                    return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")
