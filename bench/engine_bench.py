"""The worker engine alone: one ``Worker`` on an in-memory link that hands out no-op messages and
counts acks, so the figure is worker.py's CPU per message with no broker in it.

``python -m bench.engine_bench MESSAGES CONCURRENCY`` prints ``CPU-µs-per-message msg/s``. For an
A/B, run it alternately with ``PYTHONPATH=<other tree>/worker-image`` ahead of this tree's install.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence

from sluiceway import codec
from sluiceway.settings import WorkerSettings
from sluiceway.transports.base import (
    Batch,
    Delivery,
    Done,
    Exchanged,
    Outcomes,
    PendingExchange,
    SlotLease,
    Token,
    WorkerSide,
)
from sluiceway.worker import Worker


class _Link:
    outage_errors: tuple[type[BaseException], ...] = (ConnectionError,)

    def __init__(self, messages: int) -> None:
        self.left = messages
        self.total = messages
        self.acked = 0
        self.all_acked = threading.Event()
        self.next_token = 0
        self.payload = codec.encode({"x": 1})

    def begin_exchange(self, outcomes: Outcomes, wanted: int) -> PendingExchange:
        self.acked += len(outcomes.acks)
        if self.acked >= self.total:
            self.all_acked.set()
        n = min(wanted, self.left)
        self.left -= n
        first = self.next_token
        self.next_token += n
        return Done(Exchanged(Batch([Delivery(self.payload, first + i) for i in range(n)])))

    def give_back(
        self,
        tokens: Sequence[Token],
        slots: SlotLease | None,
        unused_slots: int,
        *,
        redelivered: bool = False,
    ) -> int:
        return 0

    def acquire_slot(self) -> float:
        return 0.0

    def renew(self, tokens: Sequence[Token]) -> int:
        return 0

    def recover(self) -> int:
        return 0

    def adopt_orphans(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _Coordinator:
    def write_heartbeat(self, hb: object, ttl_seconds: float) -> None:
        pass

    def deregister(self) -> None:
        pass


def noop(x: int) -> None:
    return None


def main() -> None:
    messages, concurrency = int(sys.argv[1]), int(sys.argv[2])
    link = _Link(messages)
    settings = WorkerSettings(function="bench:noop", queue="q", concurrency=concurrency, log_level="WARNING")
    side = WorkerSide(link, _Coordinator(), link.outage_errors, lambda: 0, lambda: None)  # type: ignore[arg-type]
    worker = Worker(settings, noop, side, install_signals=False)
    thread = threading.Thread(target=worker.run, daemon=True)
    cpu, wall = time.process_time(), time.monotonic()
    thread.start()
    if not link.all_acked.wait(120):
        raise SystemExit("not every message was acked within 120 s")
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    worker.request_stop()
    thread.join(10)
    print(f"{cpu / messages * 1e6:.2f} {messages / wall:.0f}", flush=True)


if __name__ == "__main__":
    main()
