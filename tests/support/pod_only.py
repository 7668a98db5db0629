"""A task module that imports in the pod but not in a process-mode child: its start must fail."""

from __future__ import annotations

import multiprocessing

if multiprocessing.parent_process() is not None:
    raise ImportError("this module imports only in the pod")


def task(n: int = 0) -> None:
    return None
