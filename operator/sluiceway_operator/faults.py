"""What a Redis failure may say in status and Events: a class of problem and a redacted target.

The Redis URL comes from a Secret the TaskQueue's author names. Its host, port and credentials are
the Secret owner's, not the TaskQueue author's: echoing redis-py's exception text ("Error 111
connecting to 10.0.3.7:6379") into status or an Event would let anyone who may create a TaskQueue
probe what a Secret points at, and where it is reachable (a confused deputy). So status and Events
get only a fixed phrase for the kind of failure and the Secret's name and key; the operator's own
log keeps the full text for its administrators.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from typing import Final

import redis

# Fixed phrases, never exception text: nothing here can carry a host, a port or a password.
REFUSED: Final = "connection refused"
UNRESOLVED: Final = "host name not resolved"
TIMED_OUT: Final = "timed out"
AUTH: Final = "authentication failed"
TLS: Final = "TLS handshake failed"
RESET: Final = "connection lost"
UNREACHABLE: Final = "network unreachable"
REJECTED: Final = "the server rejected a command"
INVALID_URL: Final = "not a valid Redis URL"
FAILED: Final = "connection failed"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def redis_problem(exc: BaseException) -> str:
    """The kind of failure ``exc`` is, as one fixed phrase (see the module docstring)."""
    for e in _chain(exc):
        if isinstance(e, redis.AuthenticationError):
            return AUTH
        if isinstance(e, redis.ResponseError):
            # NOAUTH / WRONGPASS arrive as plain error replies when the server wants a password.
            first = str(e).split(" ", 1)[0]
            return AUTH if first in ("NOAUTH", "WRONGPASS", "NOPERM") else REJECTED
        if isinstance(e, socket.gaierror):
            return UNRESOLVED
        if isinstance(e, ssl.SSLError):
            return TLS
        if isinstance(e, ConnectionRefusedError):
            return REFUSED
        if isinstance(e, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
            return RESET
        if isinstance(e, redis.TimeoutError | socket.timeout | TimeoutError):
            return TIMED_OUT
        if isinstance(e, OSError) and e.errno in (101, 113):  # ENETUNREACH, EHOSTUNREACH
            return UNREACHABLE
    if isinstance(exc, ValueError):
        return INVALID_URL
    return FAILED


def secret_target(namespace: str, secret: str, key: str) -> str:
    """Where the URL came from, named without its content."""
    return f"the URL in Secret {namespace}/{secret}, key {key}"
