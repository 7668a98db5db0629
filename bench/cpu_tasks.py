"""The CPU-bound task of bench/cpu_bench.py: pure Python, holding the GIL for its whole run."""

from __future__ import annotations

from typing import Any


def burn(n: int = 0, iterations: int = 100_000) -> int:
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def burn_share(count: int, iterations: int) -> None:
    for _ in range(count):
        burn(0, iterations)


def gated_share(ready: Any, go: Any, count: int, iterations: int) -> None:
    """The bench's bare-process reference: say ready, wait for the start, then burn."""
    ready.put(True)
    go.wait()
    burn_share(count, iterations)
