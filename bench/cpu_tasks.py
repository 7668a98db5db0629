"""The CPU-bound task of bench/cpu_bench.py: pure Python, holding the GIL for its whole run."""

from __future__ import annotations


def burn(n: int = 0, iterations: int = 100_000) -> int:
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total
