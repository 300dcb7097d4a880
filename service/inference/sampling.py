"""Which batches feed the drift window: a rule whose cost is known in advance, with nothing timed."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

IDLE_GAP = 0.010  # seconds without a forward pass after which a batch is monitored: spare time is free
SHARE_HORIZON = 4096  # images: the monitored share is measured over about this many of the latest served images


class DriftSampler:
    """Monitor a batch when the window is not full, when the worker was idle before it, or while the monitored share
    of recently served images is below `share`. Under saturating load the drift work so costs at most `share` × (a
    monitored pass's cost over a plain one's); the window is refreshed every window / (share × images per second).
    A share of 1 monitors every batch.

    >>> sampler = DriftSampler(0.05)
    >>> monitored = sampler.decide(images=32, window_full=True)
    >>> ...  # the forward pass, monitored or not
    >>> sampler.done(images=32, monitored=monitored)
    """

    def __init__(self, share: float, *, clock: Callable[[], float] = time.perf_counter) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError("the drift sample share must be in (0, 1]")
        self.share = share
        self._clock = clock
        self._last_pass_ended = -math.inf
        self._served = 0.0  # images served lately, decayed by age in images (SHARE_HORIZON)
        self._monitored = 0.0  # of which the window saw these

    def decide(self, images: int, *, window_full: bool) -> bool:
        """Whether the next batch of `images` feeds the drift window."""
        if self.share >= 1.0 or not window_full:
            return True
        if self._clock() - self._last_pass_ended >= IDLE_GAP:
            return True
        return self._monitored + images / 2 <= self.share * (self._served + images)

    def done(self, images: int, *, monitored: bool) -> None:
        """A batch of `images` was answered (after its forward pass)."""
        self._last_pass_ended = self._clock()
        decay = math.exp(-images / SHARE_HORIZON)
        self._served = self._served * decay + images
        self._monitored = self._monitored * decay + (images if monitored else 0)
