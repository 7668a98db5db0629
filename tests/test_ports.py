"""The harness's servers get ports outside the kernel's ephemeral range, so a stopped server's
port cannot be taken by an outgoing connection before the server restarts on it."""

from __future__ import annotations

import socket

from localcluster.procs import _ephemeral_range, free_ports


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    low, high = _ephemeral_range()
    assert low < high
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        assert port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # still free: nothing kept it
