"""The codec alone: ``codec.decode`` per message, against the stdlib's parse in the same run.

Each payload is parsed three ways, best of 7 turns: the stdlib's JSON decode that ``decode``
used alone before orjson (``codec._decode_stdlib``: the UTF-8 check and json's scanner), orjson
with the guard ``decode`` puts in front of it (the 19-digit check, whose pass also counts the
opening brackets for the nesting bound), and the whole ``decode`` (parse, the object check,
metadata, the Message); then ``encode`` of the decoded message, what the publish path pays.
CPU-bound and single-threaded, so the ratios hold on a loaded machine better than the
nanoseconds do. To compare two versions of the codec, run this file with ``PYTHONPATH``
pointing at each one's ``worker-image`` in turn.

``python -m bench.codec_bench [--number N]``
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sluiceway import codec

PAYLOADS: dict[str, bytes] = {
    "bench record {n}": b'{"n": 12345}',
    "3 kwargs + metadata": codec.encode(
        {"user": "u-123", "amount": 12.5, "items": [1, 2, 3]},
        codec.Meta(id="3f2a9c71e8b04d5f9a6c2e1b7d4f8a03", published_at=1.7e9),
    ),
    "1 KB of text": json.dumps({"text": "x" * 900, "tags": ["a", "b"], "n": 5}).encode(),
    "nested, 10 lines": json.dumps(
        {"order": {"lines": [{"sku": f"s{i}", "q": i, "p": 1.5 * i} for i in range(10)]}}
    ).encode(),
}


def _ns(fns: list[Callable[[], object]], number: int, repeat: int = 7) -> list[float]:
    """Best time per call of each of ``fns``, measured in turns (a, b, c, a, b, c, ...) so that a
    drifting load weighs on each alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timeit.timeit(fn, number=number) * 1e9 / number)
    return best


# The guard's translate also deletes the opening brackets the nesting bound counts; a codec from
# before that has none to delete.
_OPENERS: bytes = getattr(codec, "_OPENERS", b"")


def _fast_parse(payload: bytes) -> object:
    # decode()'s own first step, without the object check and the Message around it.
    if len(payload) < codec._DIGIT_RUN or codec._RUN not in payload.translate(codec._DIGITS, _OPENERS):
        return codec._orjson_loads(payload)
    return codec._decode_stdlib(payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.codec_bench")
    parser.add_argument("--number", type=int, default=100_000, help="calls per repeat")
    args = parser.parse_args(argv)
    for name, payload in PAYLOADS.items():
        n = args.number if len(payload) < 500 else args.number // 4
        message = codec.decode(payload)
        stdlib, fast, whole, enc = _ns(
            [
                lambda p=payload: codec._decode_stdlib(p),  # type: ignore[misc]
                lambda p=payload: _fast_parse(p),  # type: ignore[misc]
                lambda p=payload: codec.decode(p),  # type: ignore[misc]
                lambda m=message: codec.encode(m.kwargs, m.meta),  # type: ignore[misc]
            ],
            n,
        )
        print(
            f"{name:22s} ({len(payload):4d} B): parse stdlib {stdlib:6.0f} ns, orjson + guard {fast:6.0f} ns "
            f"= {100 * fast / stdlib:.0f}%; decode() {whole:6.0f} ns; encode() {enc:6.0f} ns",
            flush=True,
        )


if __name__ == "__main__":
    main()
