"""A key is stored once; concurrent and later retries are duplicates; failures are retried."""

from __future__ import annotations

import asyncio

import pytest

from flywheel_feedback.idempotency import IdempotencyCache, feedback_id


def test_feedback_id_is_stable_per_scope_and_key() -> None:
    assert feedback_id(b"k" * 16, "a|q|1") == feedback_id(b"k" * 16, "a|q|1")
    assert feedback_id(b"k" * 16, "a|q|1") != feedback_id(b"k" * 16, "a|q|2")
    assert feedback_id(b"k" * 16, "a|q|1") != feedback_id(b"j" * 16, "a|q|1")
    assert feedback_id(b"k" * 16, "") != feedback_id(b"k" * 16, "")


async def test_second_submission_is_a_duplicate() -> None:
    cache = IdempotencyCache(10, 60)
    stored: list[int] = []

    async def store() -> None:
        stored.append(1)

    assert await cache.once("s", store) is False
    assert await cache.once("s", store) is True
    assert stored == [1]


async def test_concurrent_duplicates_wait_for_the_first() -> None:
    cache = IdempotencyCache(10, 60)
    release = asyncio.Event()
    stored: list[int] = []

    async def store() -> None:
        await release.wait()
        stored.append(1)

    calls = [asyncio.create_task(cache.once("s", store)) for _ in range(5)]
    await asyncio.sleep(0.01)
    release.set()
    assert sorted(await asyncio.gather(*calls)) == [False, True, True, True, True]
    assert stored == [1]


async def test_a_failed_store_is_not_remembered() -> None:
    cache = IdempotencyCache(10, 60)
    attempts: list[int] = []

    async def failing() -> None:
        attempts.append(1)
        raise RuntimeError("broker down")

    async def working() -> None:
        attempts.append(2)

    with pytest.raises(RuntimeError):
        await cache.once("s", failing)
    assert await cache.once("s", working) is False
    assert attempts == [1, 2]


async def test_waiters_retry_when_the_first_fails() -> None:
    cache = IdempotencyCache(10, 60)
    release = asyncio.Event()
    calls: list[str] = []

    async def first() -> None:
        calls.append("first")
        await release.wait()
        raise RuntimeError("broker down")

    async def second() -> None:
        calls.append("second")

    a = asyncio.create_task(cache.once("s", first))
    await asyncio.sleep(0.01)
    b = asyncio.create_task(cache.once("s", second))
    await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(RuntimeError):
        await a
    assert await b is False
    assert calls == ["first", "second"]


async def test_expiry_and_size_bound() -> None:
    now = [0.0]
    cache = IdempotencyCache(2, 10, clock=lambda: now[0])

    async def store() -> None:
        return None

    for scope in ("a", "b", "c"):
        await cache.once(scope, store)
    assert len(cache) == 2
    assert await cache.once("a", store) is False  # evicted by size
    now[0] = 11
    assert await cache.once("c", store) is False  # expired
