"""Task functions for the call tests (tests/test_results.py), run inside real worker processes."""

from __future__ import annotations

import asyncio
import time
from typing import Any


def echo(value: Any) -> Any:
    return value


def noop() -> None:
    return None


def boom(text: str) -> None:
    raise ValueError(text)


def unserialisable() -> object:
    return object()


def slow_echo(value: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return value


async def echo_async(value: Any) -> Any:
    await asyncio.sleep(0)
    return value
