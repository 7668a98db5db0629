"""Task functions that meet text which is not valid Unicode (lone surrogates), for the tests of
what the worker does with it. Recorded in Redis like ``tests.tasks``."""

from __future__ import annotations

from tests.tasks import _r


def _attempt(n: int, text: str, surrogate_error: bool) -> None:
    attempts = _r().hincrby("test:attempts", str(n), 1)
    _r().hset("test:text", str(n), ascii(text))  # ascii(): a lone surrogate cannot go to Redis raw
    if attempts == 1:
        raise ValueError("bad \ud800 text" if surrogate_error else "the first attempt fails")
    _r().hincrby("test:done", str(n), 1)


def flaky_text(n: int, text: str = "", surrogate_error: bool = False) -> None:
    _attempt(n, text, surrogate_error)


async def flaky_text_async(n: int, text: str = "", surrogate_error: bool = False) -> None:
    _attempt(n, text, surrogate_error)


def always_fails_with_surrogate(n: int) -> None:
    _r().hincrby("test:attempts", str(n), 1)
    raise ValueError("never \udcff works")
