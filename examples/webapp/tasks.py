"""The blocking function the web app offloads: it would stall an event loop for its whole run."""

from __future__ import annotations

import time


def render_report(customer: int, seconds: float = 0.05) -> dict[str, object]:
    time.sleep(seconds)  # stands in for a blocking library call or a slow query
    return {"customer": customer, "total": customer * 3}
