"""A real Apache Kafka broker (KRaft, one combined broker and controller) on free loopback ports.

Apache publishes no Maven distribution artifact, so the broker is assembled from Maven Central: the
core jar ``org.apache.kafka:kafka_2.13`` (which holds ``kafka.Kafka`` and ``kafka.tools.StorageTool``)
plus its runtime dependencies, resolved by ``mvn dependency:copy-dependencies`` from
``scripts/kafka/pom.xml`` on first use and cached per version under
``${XDG_CACHE_HOME:-$HOME/.cache}/sluiceway/kafka/<version>/libs``. A completion stamp marks a
finished resolve (a half-copied directory is never used) and a file lock keeps concurrent test
sessions from resolving at once. Only ``java`` runs the broker; it is never a system service.

Each :class:`KafkaServer` formats its own storage in a private temporary directory, starts on free
ports, and is "ready" only once it serves metadata *and* its group coordinator: for about 0.6 s
after the port opens, group requests answer ``NOT_COORDINATOR`` / ``COORDINATOR_LOAD_IN_PROGRESS``.

``python -m tests.support.kafka_server resolve`` resolves the jars (and prints the timing);
``python -m tests.support.kafka_server run`` runs a broker in the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import ServerProcess, free_port

KAFKA_VERSION = os.environ.get("SLUICEWAY_KAFKA_VERSION", "4.4.0")
# The maven-dependency-plugin version that resolves the classpath (pinned: the CLI default drifts).
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
POM = Path(__file__).resolve().parents[2] / "scripts" / "kafka" / "pom.xml"
# Heap for a loaded 2-core, 24 GiB machine that also runs Redis, a control plane and workers:
# a test broker with a few small topics stays well inside 512 MiB (RSS measured in
# docs/development.md).
# A JVM start on a 2-core machine at load 12 (measured here) took minutes, not seconds.
START_TIMEOUT = 300.0
JVM_HEAP = os.environ.get("SLUICEWAY_KAFKA_HEAP", "-Xms128m -Xmx512m")


class KafkaUnavailableError(RuntimeError):
    """The broker cannot be assembled or started here; the message says what to do."""


def cache_dir(version: str = KAFKA_VERSION) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sluiceway" / "kafka" / version


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()[:16]


def _need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise KafkaUnavailableError(
            f"the Kafka test broker needs `{tool}` on PATH, and it is missing: run `make system-deps` "
            "(installs Debian's openjdk-17-jre-headless and maven)"
        )
    return found


def resolve(version: str = KAFKA_VERSION, log: bool = False) -> Path:
    """The directory of broker jars for ``version``, resolving it from Maven Central on first use."""
    root = cache_dir(version)
    libs = root / "libs"
    stamp = root / "complete"
    want = f"{version} {_pom_digest()}\n"
    if stamp.is_file() and stamp.read_text() == want:
        return libs
    _need("java")  # fail on a missing JRE before a 40 MB download, not after
    mvn = _need("mvn")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be resolving the same version
        if stamp.is_file() and stamp.read_text() == want:
            return libs
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="libs-", dir=root))
        started = time.monotonic()
        proc = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(POM),
                f"-Dkafka.version={version}",
                f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
            ],
            capture_output=True,
            text=True,
        )
        jars = sorted(staging.glob("*.jar"))
        if proc.returncode != 0 or not any(j.name.startswith("kafka_2.13-") for j in jars):
            shutil.rmtree(staging, ignore_errors=True)
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise KafkaUnavailableError(
                f"could not download Kafka {version} from Maven Central with `mvn` "
                f"(exit {proc.returncode}); the last lines it printed:\n{tail}"
            )
        size = sum(j.stat().st_size for j in jars) / 2**20
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        stamp.write_text(want)
        if log:
            print(
                f"[kafka] resolved {len(jars)} jars ({size:.0f} MiB) in {time.monotonic() - started:.1f} s",
                file=sys.stderr,
            )
    return libs


_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, so no broker is ever orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


class KafkaServer(ServerProcess):
    """One KRaft broker+controller, formatted in a private directory and started on free ports."""

    # A controlled shutdown flushes the logs; the JVM runs in its own session (process group).
    stop_grace = 30.0
    own_group = True

    def __init__(self, version: str = KAFKA_VERSION) -> None:
        super().__init__("sluiceway-kafka-")
        self.version = version
        self.port = free_port()
        self.controller_port = free_port()
        self._formatted = False
        self._started_once = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    @property
    def log_file(self) -> Path:
        return self.dir / "server.log"

    def _properties(self) -> str:
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "inter.broker.listener.name=PLAINTEXT",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                f"log.dirs={self.dir / 'data'}",
                # Topics are created on purpose (operator, worker, publisher), never by a typo.
                "auto.create.topics.enable=false",
                "num.partitions=1",
                # One node: every internal topic has one replica; fewer offsets partitions load faster.
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=8",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                # A test group must not wait 3 s for more members before its first assignment.
                "group.initial.rebalance.delay.ms=0",
                "num.io.threads=4",
                "num.network.threads=2",
                "",
            ]
        )

    def _java(self, libs: Path, main: str, *args: str, heap: str = "") -> list[str]:
        return [
            _need("java"),
            *heap.split(),
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def format(self, libs: Path) -> None:
        (self.dir / "server.properties").write_text(self._properties())
        (self.dir / "log4j2.properties").write_text(_LOG4J2.format(log=self.log_file))
        # Kafka's cluster ids are URL-safe base64 of 16 random bytes, without padding.
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        proc = subprocess.run(
            self._java(
                libs,
                "kafka.tools.StorageTool",
                "format",
                # One argument, not two: a random id may start with "-", which argparse4j would
                # read as an option (1 start in 64 failed with "expected one argument").
                f"--cluster-id={cid}",
                "-c",
                str(self.dir / "server.properties"),
                "--ignore-formatted",
                heap="-Xmx256m",
            ),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise KafkaUnavailableError(
                f"kafka-storage format failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        self._formatted = True

    def start(self, timeout: float = START_TIMEOUT) -> None:
        for attempt in range(5):
            try:
                self._start(timeout)
                self._started_once = True
                return
            except KafkaUnavailableError:
                # A free port can be taken by another process before the JVM binds it (a shared
                # machine). Before the first start nothing depends on the ports: pick others.
                if self._started_once or attempt == 4 or "Address already in use" not in self._log_tail():
                    raise
                self.stop()
                self.port, self.controller_port = free_port(), free_port()
                shutil.rmtree(self.dir / "data", ignore_errors=True)
                self._formatted = False

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def _start(self, timeout: float) -> None:
        libs = resolve(self.version)
        if not self._formatted:
            self.format(libs)
        self.proc = subprocess.Popen(
            self._java(libs, "kafka.Kafka", str(self.dir / "server.properties"), heap=JVM_HEAP),
            stdout=open(self.dir / "stdout.log", "ab"),  # noqa: SIM115 - owned by the child
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the broker answers metadata and its group coordinator has loaded."""
        from confluent_kafka import Consumer, KafkaException, TopicPartition
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        while True:
            self._check_alive()
            try:
                md = admin.list_topics(timeout=1.0)
                if md.brokers:
                    break
            except KafkaException:
                pass
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(f"Kafka did not serve metadata; see {self.log_file}")
        probe = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "sluiceway-readiness-probe",
                "enable.auto.commit": False,
                "log_level": 0,
            }
        )
        try:
            while True:
                self._check_alive()
                try:
                    # committed() goes to the group coordinator, which answers NOT_COORDINATOR or
                    # COORDINATOR_LOAD_IN_PROGRESS until the offsets topic is loaded.
                    probe.committed([TopicPartition("sluiceway-readiness-probe", 0)], timeout=2.0)
                    return
                except KafkaException:
                    pass
                if time.monotonic() > deadline:
                    raise KafkaUnavailableError(
                        f"Kafka's group coordinator never loaded; see {self.log_file}"
                    )
                time.sleep(0.1)
        finally:
            probe.close()

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            out = (self.dir / "stdout.log").read_text(errors="replace")[-2000:]
            raise KafkaUnavailableError(f"Kafka exited with {self.proc.returncode} at start: {out}")

    def rss_bytes(self) -> int:
        """The broker JVM's resident memory (for the docs' figures)."""
        if self.proc is None:
            return 0
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


@contextlib.contextmanager
def running(version: str = KAFKA_VERSION) -> Iterator[KafkaServer]:
    server = KafkaServer(version)
    try:
        server.start()
        yield server
    finally:
        server.close()


# --- pytest: registered as a plugin by the root conftest.py ---------------------------------------


@pytest.fixture(scope="session")
def kafka_server() -> Iterator[KafkaServer]:
    """One broker for the test session (about 5 s to start warm; the first run also resolves the
    jars, see docs/development.md)."""
    server = KafkaServer()
    try:
        server.start()
    except KafkaUnavailableError as exc:
        server.close()
        pytest.fail(f"the Kafka test broker is unavailable: {exc}", pytrace=False)
    yield server
    server.close()


@pytest.fixture
def kafka_url(kafka_server: KafkaServer) -> str:
    """The session broker's URL, started again if a previous test stopped it."""
    kafka_server.ensure_running()
    return kafka_server.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.kafka_server")
    parser.add_argument("command", choices=["resolve", "run"])
    parser.add_argument("--version", default=KAFKA_VERSION)
    args = parser.parse_args(argv)
    try:
        if args.command == "resolve":
            print(resolve(args.version, log=True))
            return 0
        started = time.monotonic()
        resolve(args.version, log=True)
        server = KafkaServer(args.version)
        t0 = time.monotonic()
        server.format(resolve(args.version))
        t1 = time.monotonic()
        server.start()
        t2 = time.monotonic()
        print(
            f"[kafka] {server.bootstrap} ready: format {t1 - t0:.1f} s, start to ready {t2 - t1:.1f} s, "
            f"total {t2 - started:.1f} s, RSS {server.rss_bytes() / 2**20:.0f} MiB (Ctrl-C stops it)",
            flush=True,
        )
        try:
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        server.close()
        return 0
    except KafkaUnavailableError as exc:
        print(f"kafka: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
