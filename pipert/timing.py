"""Timings a flow measures for each of its routines: histograms fed in batches.

A routine's thread only appends a float to a list per measurement (the age of
each message it receives, the duration of each ``main_logic`` call): that is
all the hot path pays. At every counter report the flow's main thread takes
the list and folds it into cumulative bucket counts (for Prometheus
histograms) and a short window of recent values (for p50/p99 in ``status()``),
with numpy, off the routine's thread.

Source times are wall-clock (``time.time()``) so that they mean the same in
every process and on every host (as far as their clocks agree). A routine
reads ``time.perf_counter()`` around each ``main_logic`` call anyway; adding
``wall_offset()`` (refreshed at every report) turns those readings into wall
time, so stamping a message and taking its age cost no clock reads of their own.
"""
from __future__ import annotations

import collections
import time
from typing import Dict, List, Optional

import numpy as np

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0)
"""Upper bounds (seconds) of the histogram buckets of latencies, main_logic durations and event acks."""

RECENT_REPORTS = 10  # reports kept for the recent quantiles (10 x 0.5 s = the last 5 s)
_RECENT_SAMPLES = 500  # values kept per report for the quantiles (evenly strided)
LAST = 64  # how many of the latest values ``last`` keeps


def wall_offset() -> float:
    """What to add to a ``time.perf_counter()`` reading to get the ``time.time()`` of that moment."""
    return time.time() - time.perf_counter()


class Histogram:
    """Cumulative bucket counts and sum of one quantity, plus its values of the last few reports.

    ``samples`` is the list the measuring thread appends to (it may keep its
    bound ``append``); ``fold``, on another thread, takes the values there
    are and deletes them from the front of the list. Under the GIL both are
    atomic list operations, so no value is lost or counted twice.
    """

    def __init__(self, bounds: tuple = BUCKETS) -> None:
        self.bounds = np.asarray(bounds, dtype=float)
        self.samples: List[float] = []
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # per bucket; the last one is +Inf
        self.sum = 0.0
        self.last: collections.deque = collections.deque(maxlen=LAST)  # the latest values, oldest first
        self._recent: collections.deque = collections.deque(maxlen=RECENT_REPORTS)

    def fold(self) -> None:
        """Count the values appended since the last fold."""
        taken = self.samples[:]
        del self.samples[:len(taken)]
        values = np.fromiter(taken, dtype=float, count=len(taken))
        if len(values):
            self.counts += np.bincount(np.searchsorted(self.bounds, values, side="left"),
                                       minlength=len(self.counts))
            self.sum += float(values.sum())
            self.last.extend(taken[-LAST:])
        self._recent.append(values[::max(1, len(values) // _RECENT_SAMPLES)].copy())

    def quantiles(self, *qs: float) -> Optional[List[float]]:
        """The ``qs`` quantiles (0-1) of the values of the last few reports, or None if there were none."""
        recent = np.concatenate(list(self._recent)) if self._recent else np.empty(0)
        if not len(recent):
            return None
        return [float(v) for v in np.quantile(recent, qs)]

    def report(self) -> Dict[str, object]:
        """Cumulative bucket counts (one per bound, then +Inf), count and sum, as plain JSON."""
        cumulative = np.cumsum(self.counts)
        return {"buckets": [int(v) for v in cumulative], "count": int(cumulative[-1]), "sum": self.sum}
