"""Which offset of a Kafka partition may be committed, when tasks finish out of order. Pure.

Kafka acknowledges by offset: committing N says "every record below N is done". A worker runs
several records of one partition at once, and they finish in any order, so it may commit only up
to the lowest record still unfinished. :class:`PartitionTrack` keeps, per assigned partition, the
offsets handed to tasks and not finished; the committable offset is the lowest of them, or one past
the highest offset handed out when none is unfinished. It also tells whether a re-fetched record
is one this worker already holds (after a seek back to give a record back), so a running or
finished record is never run twice by the same worker.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left


class PartitionTrack:
    """The offsets of one partition that this consumer handed out, for one assignment of it."""

    __slots__ = ("_done", "_heap", "_open", "_order", "_returned", "committed", "next_offset")

    def __init__(self, committed: int) -> None:
        self.committed = committed  # what was committed last (or where the assignment started)
        self.next_offset = committed  # one past the highest offset handed out
        self._open: set[int] = set()  # handed out, not finished
        # The same offsets, lazily pruned, to find the lowest fast: new records (started at or
        # above next_offset, so in increasing order) in a sorted list, which is searched in C;
        # records fetched again after a give-back (below next_offset) in a heap.
        self._order: list[int] = []
        self._heap: list[int] = []
        self._done: set[int] = set()  # finished at or above the lowest open one (not committable yet)
        self._returned: set[int] = set()  # given back unrun and not fetched again yet

    def holds(self, offset: int) -> bool:
        """True when a fetched ``offset`` must not run again here: it is running, or it finished
        (committed or not). Only records given back, and records never handed out, run."""
        if offset >= self.next_offset:
            return False  # the common case, a new record: every held offset is below next_offset
        if offset in self._returned:
            return False
        return offset in self._open or offset in self._done or offset < self.committed

    def start(self, offset: int) -> None:
        """A task took ``offset``. Offsets of one partition start in increasing order, except
        records given back and fetched again, which are below ``next_offset`` and not held."""
        self._returned.discard(offset)
        self._open.add(offset)
        if offset >= self.next_offset:
            self._order.append(offset)
            self.next_offset = offset + 1
        else:
            heapq.heappush(self._heap, offset)

    def start_new(self, offsets: list[int]) -> None:
        """:meth:`start` for a run of new records, in C: ``offsets`` increase and are all at or
        above ``next_offset`` (what one consume() returns for a partition)."""
        if not offsets:
            return
        self._open.update(offsets)
        self._order.extend(offsets)
        self.next_offset = offsets[-1] + 1

    def finish_open(self, offsets: list[int]) -> None:
        """:meth:`finish` for offsets known to be open (the caller held their deliveries)."""
        self._open.difference_update(offsets)
        self._done.update(offsets)

    def finish(self, offset: int) -> bool:
        """The task of ``offset`` finished; False when it was not open (already settled, gone)."""
        if offset not in self._open:
            return False
        self._open.discard(offset)
        self._done.add(offset)
        return True

    def give_back(self, offset: int) -> bool:
        """``offset`` goes back unrun: it stays uncommitted until fetched and finished again."""
        if offset not in self._open:
            return False
        self._open.discard(offset)
        self._returned.add(offset)
        return True

    @property
    def unfinished(self) -> int:
        return len(self._open)

    def lowest_open(self) -> int | None:
        order, is_open = self._order, self._open.__contains__
        # The first open one, found by filter() in C rather than a Python loop per finished
        # record; everything before it is finished or given back, and is cut off.
        low = next(filter(is_open, order), None)
        if low is None:
            order.clear()
        elif order[0] != low:
            del order[: bisect_left(order, low)]
        heap = self._heap
        while heap and heap[0] not in self._open:
            heapq.heappop(heap)
        if heap and (low is None or heap[0] < low):
            return heap[0]
        return low

    def committable(self) -> int:
        """The offset that may be committed now: every record below it finished."""
        low = self.lowest_open()
        point = self.next_offset if low is None else low
        if self._returned:
            point = min(point, min(self._returned))
        return max(point, self.committed)

    def mark_committed(self, offset: int) -> None:
        if offset > self.committed:
            self.committed = offset
            self._done = {o for o in self._done if o >= offset}
            self._returned = {o for o in self._returned if o >= offset}
