"""Execution profiles: how many device seconds a slice's batch takes, by batch size.

A profile starts from what the worker measured when the model loaded and is kept current
by the dispatcher, which reports every completed batch (``observe``). The scheduler asks it
two questions: how long would a batch of ``rows`` take (``predict``), and how many rows fit
in a time quantum (``max_rows_within``).

Prediction works on the *upper envelope* of the measurements: the value used for a size is
the largest average seen at that size or any smaller one, so noise never makes a bigger
batch look cheaper than a smaller one and ``predict`` is non-decreasing in ``rows``:

- at a measured size: its (enveloped) average;
- between two measured sizes: linear interpolation;
- above the largest: linear extrapolation with the per-row slope of the two largest sizes,
  or proportional to rows when only one size is known or that slope is flat (a flat slope
  would promise unlimited rows for free: proportional is the safe guess);
- below the smallest: linear extrapolation with the slope of the two smallest sizes, but
  never below the proportional share of the smallest (``v_min * rows / k_min``) and never
  above ``v_min``;
- no measurement at all: 0.0 (and ``max_rows_within`` answers 1, so an unprofiled slice
  runs one-row batches until its first batch has been measured).

A load-time figure can be far off (measured while other slices loaded beside it), and one
for a size the scheduler never grants would never be measured again: so each batch served
also bounds the sizes not yet measured online: a smaller batch costs no more than it did, a
larger one of ``s`` rows no more than ``s / rows`` times it (per-row cost does not grow with
the batch). A size measured online keeps its own average.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping

__all__ = ["ExecutionProfile"]


class ExecutionProfile:
    """Predicted device seconds per batch, by batch size (rows): measured at load, kept current."""

    __slots__ = ("_alpha", "_envelope", "_means", "_online", "_sizes")

    def __init__(self, measured: Mapping[int, float] | None = None, alpha: float = 0.2) -> None:
        if not (0.0 < alpha <= 1.0):
            raise ValueError(
                f"profile smoothing alpha must be in (0, 1], got {alpha}: "
                "1 keeps only the latest measurement, small values average over many"
            )
        self._alpha = alpha
        self._means: dict[int, float] = {}
        self._online: set[int] = set()  # sizes measured since the load
        self._sizes: list[int] = []
        self._envelope: list[float] = []
        for rows, seconds in (measured or {}).items():
            _check(rows, seconds)
            self._means[rows] = float(seconds)
        self._rebuild()

    # ---- measurements -----------------------------------------------------------------

    def observe(self, rows: int, seconds: float) -> None:
        """Fold one batch's measured device time into the average for its size (EWMA).

        Raises ValueError for ``rows < 1`` or a negative or non-finite ``seconds``.
        """
        _check(rows, seconds)
        old = self._means.get(rows)
        if old is None:
            self._means[rows] = float(seconds)
        else:
            self._means[rows] = old + self._alpha * (seconds - old)
        self._online.add(rows)
        mean = self._means[rows]
        for size, value in self._means.items():
            if size in self._online:
                continue
            bound = mean if size < rows else mean * size / rows
            if value > bound:
                self._means[size] = bound
        self._rebuild()

    @property
    def known(self) -> bool:
        """Whether any measurement has been recorded yet."""
        return bool(self._means)

    def snapshot(self) -> dict[int, float]:
        """Return the current average device seconds per measured batch size."""
        return dict(sorted(self._means.items()))

    # ---- predictions ------------------------------------------------------------------

    def predict(self, rows: int) -> float:
        """Return the predicted device seconds of a batch of ``rows`` (0.0 with no data)."""
        if rows < 1:
            raise ValueError(f"a batch holds at least one row, got rows={rows}")
        sizes, values = self._sizes, self._envelope
        if not sizes:
            return 0.0
        i = bisect_left(sizes, rows)
        if i < len(sizes) and sizes[i] == rows:
            return values[i]
        if i == len(sizes):  # above the largest measured size
            k_hi, v_hi = sizes[-1], values[-1]
            proportional = v_hi * rows / k_hi
            if len(sizes) == 1:
                return proportional
            slope = (v_hi - values[-2]) / (k_hi - sizes[-2])
            return v_hi + slope * (rows - k_hi) if slope > 0 else proportional
        if i == 0:  # below the smallest measured size
            k_lo, v_lo = sizes[0], values[0]
            floor = v_lo * rows / k_lo
            if len(sizes) == 1:
                return floor
            slope = (values[1] - v_lo) / (sizes[1] - k_lo)
            return min(v_lo, max(floor, v_lo - slope * (k_lo - rows)))
        k0, k1 = sizes[i - 1], sizes[i]
        v0, v1 = values[i - 1], values[i]
        return v0 + (v1 - v0) * (rows - k0) / (k1 - k0)

    def max_rows_within(self, budget: float, limit: int) -> int:
        """Return the largest ``r`` in ``[1, limit]`` with ``predict(r) <= budget``.

        Always at least 1 (a batch holds one row whatever it costs); 1 with no data.
        """
        if limit < 1:
            raise ValueError(f"the row limit must be at least 1, got {limit}")
        if not self._sizes:
            return 1
        # predict is non-decreasing, so the rows that fit form a prefix: binary search it.
        lo, hi = 1, limit
        if self.predict(hi) <= budget:
            return hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _rebuild(self) -> None:
        self._sizes = sorted(self._means)
        envelope: list[float] = []
        running = 0.0
        for rows in self._sizes:
            running = max(running, self._means[rows])
            envelope.append(running)
        self._envelope = envelope

    def __repr__(self) -> str:
        return f"ExecutionProfile({self.snapshot()!r}, alpha={self._alpha})"


def _check(rows: int, seconds: float) -> None:
    if rows < 1:
        raise ValueError(f"a batch holds at least one row, got rows={rows}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"device seconds must be a finite number >= 0, got {seconds} for {rows} rows"
        )
