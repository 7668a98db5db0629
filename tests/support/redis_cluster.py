"""A real Redis Cluster of three masters (no replicas) on free loopback ports, owned by a test
session, and its pytest fixtures (loaded as a plugin by the root ``conftest.py``).

Built from the same Debian ``redis-server`` binary as :mod:`tests.support.redis_server`, each node
with its own data directory, cluster config file and an explicit bus port (so neither port may
collide with another test's server). The slots are split by ``redis-cli --cluster create``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.processes import free_ports

MASTERS = 3


def _node(port: int) -> Any:
    """A plain client of one node, for the CLUSTER commands redis-py leaves untyped."""
    return redis.Redis(port=port, socket_connect_timeout=0.5)


class RedisClusterServer:
    """Three ``redis-server --cluster-enabled yes`` processes joined into one cluster."""

    def __init__(self) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise RuntimeError(
                "redis-server/redis-cli are not installed: run `make system-deps` (Debian package redis-server)"
            )
        self.binary, self.cli = binary, cli
        ports = free_ports(2 * MASTERS)
        self.ports, self.bus_ports = ports[:MASTERS], ports[MASTERS:]
        self.dir = Path(tempfile.mkdtemp(prefix="sluiceway-redis-cluster-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.created = False

    @property
    def url(self) -> str:
        """The client URL: ``redis+cluster://`` selects :class:`redis.RedisCluster` (see
        :mod:`sluiceway.connection`); one seed node is enough, the rest come from CLUSTER SLOTS."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node_dir(self, i: int) -> Path:
        return self.dir / f"node{i}"

    def start(self) -> None:
        for i, (port, bus) in enumerate(zip(self.ports, self.bus_ports, strict=True)):
            d = self.node_dir(i)
            d.mkdir(exist_ok=True)
            self.procs.append(
                subprocess.Popen(
                    [
                        self.binary,
                        "--port",
                        str(port),
                        "--cluster-port",
                        str(bus),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(d / "nodes.conf"),
                        "--cluster-node-timeout",
                        "5000",
                        "--dir",
                        str(d),
                        "--appendonly",
                        "yes",
                        "--appendfsync",
                        "always",
                        "--save",
                        "",
                        "--logfile",
                        str(d / "redis.log"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for i, port in enumerate(self.ports):
            self._wait_ping(i, port)
        if not self.created:
            # A fresh cluster: split the slots. A restarted one keeps its nodes.conf and rejoins.
            subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            self.created = True
        self._wait_ok()

    def _wait_ping(self, i: int, port: int) -> None:
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {self.node_dir(i) / 'redis.log'}")
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {port}")

    def _state(self, port: int) -> str:
        info: dict[str, str] = _node(port).execute_command("CLUSTER INFO")
        return str(info.get("cluster_state", "unknown"))

    def _wait_ok(self) -> None:
        """Every node reports ``cluster_state:ok`` and knows all masters (gossip has converged)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if all(self._state(p) == "ok" and self._masters_known(p) == MASTERS for p in self.ports):
                    return
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the Redis Cluster on ports {self.ports} did not reach cluster_state:ok")

    def _masters_known(self, port: int) -> int:
        nodes: dict[str, dict[str, object]] = _node(port).execute_command("CLUSTER NODES")
        return sum(1 for n in nodes.values() if "master" in str(n["flags"]) and "fail" not in str(n["flags"]))

    def owner(self, slot: int) -> int:
        """The port of the master that owns ``slot``, as the first node sees it."""
        for start, end, master, *_ in _node(self.ports[0]).execute_command("CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise LookupError(f"slot {slot} is not covered")

    def move_slot(self, slot: int, to_port: int, *, finish: bool = True) -> None:
        """Reshard one slot with its keys to the master on ``to_port``, the way ``redis-cli
        --cluster reshard`` does it (IMPORTING/MIGRATING, MIGRATE, then SETSLOT NODE everywhere),
        and wait until every node agrees. Clients with the old slot map get MOVED afterwards.
        With ``finish=False`` it stops after moving the keys, the slot still migrating: the old
        owner then answers ASK for them (call :meth:`finish_move` later)."""
        src, dst = _node(self.owner(slot)), _node(to_port)
        src_id, dst_id = (n.execute_command("CLUSTER MYID") for n in (src, dst))
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
        if finish:
            self.finish_move(slot, to_port)

    def finish_move(self, slot: int, to_port: int) -> None:
        dst_id = _node(to_port).execute_command("CLUSTER MYID")
        for port in self.ports:
            _node(port).execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        deadline = time.monotonic() + 30
        while self.owner(slot) != to_port or any(self._state(p) != "ok" for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"slot {slot} did not move to port {to_port}")
            time.sleep(0.05)

    def flush(self) -> None:
        for port in self.ports:
            redis.Redis(port=port).flushall()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def restart(self, down_for: float = 0.0) -> None:
        """Stop every node, wait, start them again: each reloads its AOF and nodes.conf."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    server = RedisClusterServer()
    started = time.monotonic()
    server.start()
    print(f"[figures] redis cluster of {MASTERS} masters started in {time.monotonic() - started:.1f} s")
    yield server
    server.close()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServer) -> str:
    """The cluster's URL, every node flushed for this test (restarted if a test stopped it)."""
    if not redis_cluster.procs or any(p.poll() is not None for p in redis_cluster.procs):
        redis_cluster.stop()
        redis_cluster.start()
    redis_cluster.flush()
    return redis_cluster.url
