"""ratelimit.clock: slots dated on the server's clock land on ours never early, and late by no
more than the best round trip (plus drift), however late the other replies were read."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluiceway.ratelimit.clock import DRIFT, ServerClock

# One round trip: the gap since the last one, how long it took, where in it the server read its
# clock (0 = as the request left, 1 = as the reply was read).
trips = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=5.0),
        st.floats(min_value=1e-5, max_value=0.2),
        st.floats(min_value=0.0, max_value=1.0),
    ),
    min_size=1,
    max_size=40,
)


@given(
    trips,
    st.floats(min_value=-1e6, max_value=1e6),
    st.floats(min_value=-DRIFT, max_value=DRIFT),
    st.floats(min_value=0.0, max_value=10.0),
)
def test_a_server_time_maps_never_early_and_late_by_at_most_the_width(
    rounds: list[tuple[float, float, float]], offset: float, drift: float, later: float
) -> None:
    clock = ServerClock()
    t = 1000.0
    for gap, rtt, where in rounds:
        sent = t + gap
        received = sent + rtt
        at = sent + where * rtt
        clock.observe(sent, received, at + offset + drift * at)
        t = received
    now = t + later
    for ahead in (0.0, 0.05, 1.0):
        local_time = now + ahead
        server = local_time + offset + drift * local_time
        mapped = clock.local(server, now)
        # Slack for float rounding only: the offset and the times are large, the errors tiny.
        assert mapped >= local_time - 1e-6
        width = clock.width(now)
        assert mapped - local_time <= width + drift_allowance(ahead + width) + 1e-6


def drift_allowance(ahead: float) -> float:
    """A time ``ahead`` of now is mapped with the bounds aged to it: the clocks drift on."""
    return 2 * DRIFT * ahead


def test_one_quick_round_trip_pins_the_offset_however_slow_the_rest() -> None:
    clock = ServerClock()
    offset = 5.0
    clock.observe(10.000, 10.0002, 10.0001 + offset)  # 0.2 ms
    for k in range(1, 20):  # replies read 50 ms late: they cannot widen what is known
        sent = 10.0 + k
        clock.observe(sent, sent + 0.05, sent + 0.0001 + offset)
    now = 29.1
    assert clock.width(now) <= 0.0002 + 2 * DRIFT * 20 + 1e-9
    # The slot the late reply granted for "now" on the server is placed at now, not at the read.
    assert clock.local(29.0001 + offset, now) == pytest.approx(29.0001, abs=0.0002 + DRIFT * 20)


def test_a_stepped_server_clock_starts_again_from_the_newest_round_trip() -> None:
    clock = ServerClock()
    clock.observe(1.0, 1.001, 1.0005 + 100.0)
    clock.observe(2.0, 2.001, 2.0005 + 100.0 + 3.0)  # NTP stepped the server's clock by 3 s
    assert 3.0 <= clock.local(3.0 + 103.0, 2.001) <= 3.0011
    assert clock.width(2.001) == pytest.approx(0.001, abs=1e-5)


def test_mapping_before_any_round_trip_is_a_bug() -> None:
    with pytest.raises(AssertionError):
        ServerClock().local(1.0, 1.0)
