"""What the worker and broker benchmarks report the same way: QPS precision from task start
times, and its table. One owner of the window rule and the line format."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from tests.support.starts import RECORD_LAG

from sluiceway.ratelimit import max_in_window

RATES = (10, 100, 1000)
# Skip the first second: workers are still starting (on Kafka, joining the group) and the
# bucket fills from empty.
SETTLE_SECONDS = 1.0


def window_figures(starts: Sequence[float], qps: int, seconds: float) -> tuple[float, int]:
    """From task start times: (achieved / target, most starts in any 1-s window) over
    ``seconds`` from one second after the first start."""
    return _figures(starts, qps, seconds)[:2]


def _figures(starts: Sequence[float], qps: int, seconds: float) -> tuple[float, int, int]:
    ordered = sorted(starts)
    if not ordered:
        return 0.0, 0, 0
    t0 = ordered[0] + SETTLE_SECONDS
    window = [s for s in ordered if t0 <= s < t0 + seconds]
    # Also the most recorded starts in any (1 s - RECORD_LAG) window: those were truly started
    # within one 1-s window even if each timestamp trails its start by up to RECORD_LAG.
    return len(window) / seconds / qps, max_in_window(window, 1.0), max_in_window(window, 1.0 - RECORD_LAG)


def lag_tolerant(starts: Sequence[float], qps: int, seconds: float) -> int:
    return _figures(starts, qps, seconds)[2]


def qps_table(
    measure: Callable[[int, int], tuple[float, int]],
    fleets: Iterable[int],
    seconds: float,
    rates: Iterable[int] = RATES,
) -> list[tuple[int, int, float, int]]:
    """Runs ``measure(qps, workers)`` for every rate and fleet size, printing one line each;
    returns the rows (qps, workers, achieved ratio, worst window)."""
    print(f"QPS precision over {seconds:.0f} s (achieved/target, worst 1-s window vs target):", flush=True)
    fleets = tuple(fleets)
    rows = []
    for qps in rates:
        for workers in fleets:
            ratio, worst = measure(qps, workers)
            print(
                f"  qps {qps:>4} x {workers} workers: achieved {ratio:.4f}, worst window {worst} ({worst / qps:.3f})",
                flush=True,
            )
            rows.append((qps, workers, ratio, worst))
    return rows
