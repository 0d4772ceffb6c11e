"""Idempotency keys: the first submission is stored, retries answer `duplicate` and store nothing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable


def feedback_id(key: bytes, scope: str) -> str:
    """A stable feedback id for an idempotency scope, so consumers can drop duplicates by id.

    Keyed (HMAC) so ids reveal nothing about the submitter; random when there is no scope.
    """
    if not scope:
        return str(uuid.uuid4())
    digest = hmac.new(key, f"feedback:{scope}".encode(), hashlib.sha256).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


class IdempotencyCache:
    """Remembers recently stored scopes; concurrent submissions of one scope wait for the first."""

    def __init__(self, max_size: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_size = max_size
        self._ttl_s = ttl_s
        self._clock = clock
        self._stored: OrderedDict[str, float] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._stored)

    def _seen(self, scope: str) -> bool:
        stored_at = self._stored.get(scope)
        if stored_at is None:
            return False
        if self._clock() - stored_at > self._ttl_s:
            del self._stored[scope]
            return False
        return True

    async def once(self, scope: str, store: Callable[[], Awaitable[None]]) -> bool:
        """Runs `store` unless `scope` was stored already; True when it was (a duplicate).

        When `store` fails, nothing is remembered and the error propagates, so a retry stores.
        """
        while True:
            if self._seen(scope):
                return True
            pending = self._in_flight.get(scope)
            if pending is None:
                break
            # Another call with the same key is storing it: its outcome decides.
            try:
                await asyncio.shield(pending)
            except Exception:
                continue  # it failed; this call tries itself
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight[scope] = done
        try:
            await store()
        except BaseException as exc:
            done.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            done.exception()  # marks it retrieved when no one waits
            raise
        else:
            self._stored[scope] = self._clock()
            self._stored.move_to_end(scope)
            while len(self._stored) > self._max_size:
                self._stored.popitem(last=False)
            done.set_result(None)
        finally:
            del self._in_flight[scope]
        return False
