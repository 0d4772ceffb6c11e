"""Token buckets per key (visitor session, client address, expert session)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from flywheel_gateway.settings import Bucket


class RateLimiter:
    """`per_second` sustained, `burst` at once, per key; the least recently seen keys are forgotten."""

    def __init__(self, bucket: Bucket, *, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = bucket.per_second
        self.burst = float(bucket.burst)
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Takes one token from `key`'s bucket: 0 when allowed, else the seconds until one is back."""
        if self.per_second <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_second)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.per_second
        self._buckets[key] = (tokens - 1.0, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return 0.0
