"""A task module whose import never finishes: its worker process runs but can never heartbeat.

The operator must notice such a pod and replace it (tests of heartbeat liveness use it).
"""

from __future__ import annotations

import time


def never(n: int = 0) -> None:  # pragma: no cover - the import below never returns
    return None


while True:  # Python-level sleep steps, so SIGTERM still ends the process at once
    time.sleep(0.1)
