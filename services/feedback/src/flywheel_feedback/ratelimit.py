"""A token bucket per caller: RESOURCE_EXHAUSTED once a caller exceeds its rate."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from flywheel_common.errors import ResourceExhausted


class RateLimiter:
    """`per_second` sustained, `burst` at once, per key; the least recently seen keys are forgotten."""

    def __init__(
        self,
        per_second: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second = per_second
        self.burst = float(burst)
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, key: str) -> None:
        """Takes one token from `key`'s bucket; ResourceExhausted when it is empty."""
        if self.per_second <= 0:
            return
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_second)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            retry_s = (1.0 - tokens) / self.per_second
            raise ResourceExhausted(f"rate limit exceeded; retry in {retry_s:.1f} s")
        self._buckets[key] = (tokens - 1.0, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
