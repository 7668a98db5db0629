"""A consumer process for the Kafka fault tests: runs one KafkaTransport, 'processes' each record
by appending its payload to a file (one line, flushed) and then acknowledging it.

``python -m tests.support.kafka_child URL NAMESPACE QUEUE WORKER_ID OUT_FILE [TASK_SECONDS]``
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from sluiceway.transports.base import Outcomes
from sluiceway.transports.kafka import KafkaTransport


def main() -> None:
    url, namespace, queue, worker_id, out_file = sys.argv[1:6]
    task_seconds = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    t = KafkaTransport(url, namespace, queue, worker_id, drain_seconds=10.0, create_topics=False)
    with open(out_file, "ab", buffering=0) as out:
        while not stop.is_set():
            batch = t.fetch(8, 0.2)
            for d in batch:
                time.sleep(task_seconds)
                out.write(d.payload + b"\n")
            if batch:
                t.settle(Outcomes(acks=[d.token for d in batch]))
    t.close()


if __name__ == "__main__":
    main()
