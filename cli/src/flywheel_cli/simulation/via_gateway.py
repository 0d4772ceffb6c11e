"""Simulated visitors through the gateway's HTTP API, as the widget does it, and the gateway's overhead."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import urlsplit

import httpx

from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc

_RETRY_STATUS = (429, 502, 503, 504)


class GatewayError(RuntimeError):
    """The gateway refused a call (`status`), or ended an answer with an error (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GatewayAnswer:
    """A streamed answer as the widget receives it, and what rating it needs (cookie, ticket)."""

    query_id: str
    model_version: str
    answer: str
    ticket: str
    cookie: str


class GatewayVisitor:
    """Asks and rates through `/api/v1/answers` and `/api/v1/feedback`, one visitor session per answer.

    Calls come from the gateway's own origin (always allowed), so no site needs configuring; each
    visitor keeps the session cookie its answer set and sends it with its rating.
    """

    def __init__(self, base_url: str, *, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        # No cookie jar: each answer starts a session of its own, and its rating sends that cookie back.
        no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout_s, cookies=no_cookies)

    async def close(self) -> None:
        await self._client.aclose()

    async def ask(self, page: inference_pb2.Page, question: str) -> GatewayAnswer:
        """One question in a new session; the answer read from its Server-Sent Events."""
        content = {"html": page.html} if page.HasField("html") else {"text": page.text}
        body = {"question": question, "page": {"url": page.url, "title": page.title, **content}}
        async with self._client.stream(
            "POST", "/api/v1/answers", json=body, headers={"origin": self.origin}
        ) as response:
            if response.status_code != 200:
                await response.aread()
                raise GatewayError(response.status_code, f"gateway answered {response.status_code}")
            cookie = response.headers.get("set-cookie", "").split(";", 1)[0]
            meta: dict[str, Any] = {}
            text: list[str] = []
            event = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "meta":
                        meta = data
                    elif event == "delta":
                        text.append(data["text"])
                    elif event == "error":
                        raise GatewayError(0, f"the answer failed: {data['error']}")
        return GatewayAnswer(meta["query_id"], meta["model_version"], "".join(text), meta["ticket"], cookie)

    async def rate(self, answer: GatewayAnswer, *, rating: int | None, key: str) -> None:
        """The visitor's rating, or "ignored" when `rating` is None."""
        signal: dict[str, Any] = {"ignored": True} if rating is None else {"rating": rating}
        body = {"query_id": answer.query_id, "ticket": answer.ticket, "idempotency_key": key, **signal}
        response = await self._client.post(
            "/api/v1/feedback", json=body, headers={"origin": self.origin, "cookie": answer.cookie}
        )
        if response.status_code != 200:
            raise GatewayError(response.status_code, f"gateway refused the rating ({response.status_code})")


def retryable(error: Exception) -> bool:
    """Whether a gateway call may be tried again (overload, a service not ready)."""
    return isinstance(error, httpx.TransportError) or (
        isinstance(error, GatewayError) and error.status in _RETRY_STATUS
    )


async def _grpc_stream_s(
    stub: inference_pb2_grpc.InferenceServiceStub, request: Any, timeout_s: float
) -> float:
    started = time.perf_counter()
    async for _ in stub.StreamAnswer(request, timeout=timeout_s):
        pass
    return time.perf_counter() - started


async def measure_overhead(
    visitor: GatewayVisitor,
    stub: inference_pb2_grpc.InferenceServiceStub,
    requests: list[inference_pb2.AnswerRequest],
    *,
    timeout_s: float,
) -> dict[str, float]:
    """The same questions streamed over gRPC and through the gateway, alternately (greedy decoding
    gives the same answer both ways); the median of the paired differences is the gateway's cost."""
    direct: list[float] = []
    through: list[float] = []
    for request in requests:
        direct.append(await _grpc_stream_s(stub, request, timeout_s))
        started = time.perf_counter()
        await visitor.ask(request.page, request.question)
        through.append(time.perf_counter() - started)
    differences = [1000 * (b - a) for a, b in zip(direct, through, strict=True)]
    return {
        "answers": len(requests),
        "grpc_median_ms": 1000 * statistics.median(direct),
        "gateway_median_ms": 1000 * statistics.median(through),
        "overhead_median_ms": statistics.median(differences),
    }
