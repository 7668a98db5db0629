"""A real RabbitMQ node on free loopback ports, owned by the test session (or by `make services`).

Everything is private to one run: the node name, the Erlang cookie (``HOME``), the mnesia and
log directories, the config and enabled-plugins files, and the epmd daemon, which runs on its own
port (``ERL_EPMD_PORT``) as a child of this process, so stopping the node stops everything this
run started and nothing else. The management plugin is enabled offline (the enabled-plugins file
is written before the start) on its own free port, for tests that compare with the HTTP API.

Run as a script (``python -m tests.support.rabbitmq_server up|down DIR``) for ``make services``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from tests.support.processes import free_port

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
START_TIMEOUT = 240.0  # 8 s on an idle 2-core machine, 20-85 s measured with 8 test runs beside it


def _erts_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/erlang").glob(f"erts-*/bin/{name}")):
        return str(candidate)
    raise RuntimeError(f"{name} not found: run `make system-deps` (Debian package rabbitmq-server)")


class RabbitMQServer:
    def __init__(self, base: Path | None = None, *, amqp_port: int | None = None) -> None:
        if not SERVER.exists():
            raise RuntimeError(
                "rabbitmq-server is not installed: run `make system-deps` (Debian package rabbitmq-server)"
            )
        self.dir = base or Path(tempfile.mkdtemp(prefix="sluiceway-rabbitmq-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = amqp_port or free_port()
        self.management_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"sluiceway-{uuid.uuid4().hex[:8]}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0  # how long the last start took until AMQP answered
        self._write_files()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def vhost_url(self, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{urllib.parse.quote(vhost, safe='')}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def _write_files(self) -> None:
        (self.dir / "home").mkdir(exist_ok=True)
        (self.dir / "log").mkdir(exist_ok=True)
        (self.dir / "mnesia").mkdir(exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.1 = 127.0.0.1:{self.port}",
                    "management.tcp.ip = 127.0.0.1",
                    f"management.tcp.port = {self.management_port}",
                    # guest may log in only from loopback, which is where everything runs.
                    "loopback_users.guest = true",
                    # A test machine's disk is often nearly full; the default 50 MB alarm would
                    # block publishers for reasons that have nothing to do with the test.
                    "disk_free_limit.absolute = 1MB",
                    "vm_memory_high_watermark.relative = 0.8",
                    "log.console = false",
                    "log.file.level = warning",
                    "",
                ]
            )
        )
        (self.dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.dir / "home"),  # the Erlang cookie lives here: private to this node
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbitmq.pid"),
            RABBITMQ_ALLOW_INPUT="",
        )
        return env

    def start(self) -> None:
        began = time.monotonic()
        env = self.env()
        if self.epmd is None or self.epmd.poll() is not None:
            # In the foreground (no -daemon): it is our child, and stopping it is ours to do.
            self.epmd = subprocess.Popen(
                [_erts_bin("epmd"), "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                start_new_session=True,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        log = (self.dir / "log" / "server.out").open("ab")
        self.proc = subprocess.Popen(
            [str(SERVER)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the test run must not kill the node mid-test
        )
        log.close()
        deadline = began + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.dir / "log" / "server.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"rabbitmq-server exited at start with {self.proc.returncode}:\n{tail}")
            if self._amqp_answers():
                self.start_seconds = time.monotonic() - began
                return
            time.sleep(0.1)
        self.stop()
        tail = (self.dir / "log" / "server.out").read_text(errors="replace")[-2000:]
        raise RuntimeError(
            f"rabbitmq-server did not accept AMQP on port {self.port} within {START_TIMEOUT} s:\n{tail}"
        )

    def _amqp_answers(self) -> bool:
        # A full AMQP handshake, not only an open port: the listener opens before the node is
        # ready to serve, and the boot steps after it (definitions, plugins) can take seconds.
        import pika  # the rabbitmq extra; only what talks to RabbitMQ imports it

        try:
            conn = pika.BlockingConnection(
                pika.URLParameters(
                    self.url + "?connection_attempts=1&socket_timeout=1&blocked_connection_timeout=2"
                )
            )
        except Exception:
            return False
        with contextlib.suppress(Exception):
            conn.close()
        return True

    def stop(self) -> None:
        """Stop the node (SIGTERM: Erlang shuts down cleanly and flushes its queues)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # The script execs into beam.smp, so this pid is the VM itself.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def kill(self) -> None:
        """Kill the node without a clean shutdown (the broker crashes)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds (the outage a fault test injects), start again."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop()
        epmd, self.epmd = self.epmd, None
        if epmd is not None and epmd.poll() is None:
            epmd.terminate()
            try:
                epmd.wait(10)
            except subprocess.TimeoutExpired:
                epmd.kill()
                epmd.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- the management API, for vhosts (one per test keeps tests apart without a restart) ----

    def _http(self, method: str, path: str, body: object | None = None, *, timeout: float = 60) -> object:
        req = urllib.request.Request(
            self.management_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
                "Content-Type": "application/json",
            },
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    data = resp.read()
                    return json.loads(data) if data else None
            except urllib.error.URLError:
                # The management listener comes up a moment after AMQP.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def create_vhost(self, vhost: str) -> str:
        quoted = urllib.parse.quote(vhost, safe="")
        self._http("PUT", f"/api/vhosts/{quoted}", {})
        self._http(
            "PUT", f"/api/permissions/{quoted}/guest", {"configure": ".*", "write": ".*", "read": ".*"}
        )
        return self.vhost_url(vhost)

    def delete_vhost(self, vhost: str) -> None:
        """Best effort: a vhost left behind costs the session node a little memory, nothing more
        (deleting quorum queues on a loaded machine can take longer than any timeout)."""
        try:
            self._http("DELETE", f"/api/vhosts/{urllib.parse.quote(vhost, safe='')}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        except OSError:
            pass

    def queue_info(self, vhost: str, queue: str) -> dict[str, object]:
        path = f"/api/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue, safe='')}"
        info = self._http("GET", path)
        assert isinstance(info, dict)
        return info


def _main(argv: list[str]) -> int:
    """``up DIR PORT``: start a node in DIR and leave it running; ``down DIR``: stop it."""
    if len(argv) < 2 or argv[0] not in ("up", "down"):
        print("usage: rabbitmq_server.py up DIR PORT | down DIR", file=sys.stderr)
        return 2
    base = Path(argv[1]).resolve()
    state = base / "state.json"
    if argv[0] == "up":
        server = RabbitMQServer(base, amqp_port=int(argv[2]))
        server.start()
        assert server.proc is not None and server.epmd is not None
        state.write_text(
            json.dumps(
                {
                    "pid": server.proc.pid,
                    "epmd_pid": server.epmd.pid,
                    "url": server.url,
                    "management_url": server.management_url,
                }
            )
        )
        print(
            f"rabbitmq up: {server.url} (management {server.management_url}, started in {server.start_seconds:.1f} s)"
        )
        return 0
    if not state.exists():
        return 0
    info = json.loads(state.read_text())
    for key in ("pid", "epmd_pid"):
        try:
            os.kill(int(info[key]), signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(600):
            try:
                os.kill(int(info[key]), 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    state.unlink()
    print("rabbitmq stopped")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
