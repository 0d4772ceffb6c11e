"""Gateway overhead benchmark: one streamed answer through the gateway's HTTP API against gRPC directly.

    uv run python bench/gateway.py [--answers 200] [--concurrency 1,8] [--chunks 32] [--json PATH]

The model is taken out of the measurement: a stand-in InferenceService (its own process) streams
a fixed answer of `--chunks` text chunks at once, so what differs between the two paths is only
the gateway: HTTP and JSON in, a second gRPC hop, Server-Sent Events out, the session cookie, the
origin check and the rate limiters (off here). The gateway runs as its own process
(`python -m flywheel_gateway`), as deployed. For each path and concurrency: answers/s, p50/p99
latency to the first text and to the end, and the gateway's CPU milliseconds per answer. An answer
that fails (an HTTP status other than 200, an `error` event, a stream that ends without `done`, a
gRPC error or a stream without a finish reason) is counted in `failed` and left out of the rates
and latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx

from flywheel_cli.local.kafka_broker import free_port
from flywheel_common.grpc_server import GrpcServer
from flywheel_common.settings import GrpcSettings
from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc

SITE = "http://site.bench.test"
PAGE_TEXT = "Flywheel answers questions about the page a visitor reads. " * 40


class StandIn(inference_pb2_grpc.InferenceServiceServicer):
    """Streams a fixed answer as the real service shapes it: passages first, then text, then the end."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    async def StreamAnswer(
        self, request: inference_pb2.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.AnswerChunk]:
        passages = [inference_pb2.Passage(index=i, text=PAGE_TEXT[:300], score=1.0) for i in range(4)]
        yield inference_pb2.AnswerChunk(query_id="fw1.bench", model_version="v1", passages=passages)
        for i in range(self.chunks - 1):
            yield inference_pb2.AnswerChunk(delta=f" word{i}")
        yield inference_pb2.AnswerChunk(delta=" end.", finish_reason="eos")


async def _serve_stand_in(port: int, chunks: int) -> None:
    server = GrpcServer(GrpcSettings(port=port), "inference")
    servicer = StandIn(chunks)
    server.add_service(
        "flywheel.inference.v1.InferenceService",
        lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, s),
    )
    await server.start()
    await server.set_serving(True)
    await asyncio.Event().wait()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class AnswerFailed(Exception):
    """An answer that came back as a failure, however it was delivered."""


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _request() -> inference_pb2.AnswerRequest:
    return inference_pb2.AnswerRequest(
        page=inference_pb2.Page(url=f"{SITE}/page", title="Page", text=PAGE_TEXT),
        question="What does Flywheel answer?",
        session_id="bench-session",
    )


async def _grpc_answer(stub: inference_pb2_grpc.InferenceServiceStub) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    finished = False
    try:
        async for chunk in stub.StreamAnswer(_request()):
            if chunk.delta and not first:
                first = time.perf_counter() - started
            finished = finished or bool(chunk.finish_reason)
    except grpc.aio.AioRpcError as error:
        raise AnswerFailed(f"grpc {error.code().name}") from error
    if not finished:
        raise AnswerFailed("grpc stream without a finish reason")
    return first, time.perf_counter() - started


async def _http_answer(client: httpx.AsyncClient) -> tuple[float, float]:
    body = {
        "question": "What does Flywheel answer?",
        "page": {"url": f"{SITE}/page", "title": "Page", "text": PAGE_TEXT},
    }
    started = time.perf_counter()
    first = 0.0
    done = False
    async with client.stream("POST", "/api/v1/answers", json=body, headers={"origin": SITE}) as response:
        if response.status_code != 200:
            raise AnswerFailed(f"http {response.status_code}")
        async for line in response.aiter_lines():
            if line == "event: delta" and not first:
                first = time.perf_counter() - started
            elif line == "event: error":
                # The gateway reports a failure after its 200 as an event in the stream.
                raise AnswerFailed("sse error event")
            elif line == "event: done":
                done = True
            elif (
                done
                and line.startswith("data: ")
                and not json.loads(line.removeprefix("data: ")).get("finish_reason")
            ):
                # The gateway ends a stream that stopped without a finish reason with an empty one.
                raise AnswerFailed("sse done without a finish reason")
    if not done:
        raise AnswerFailed("sse stream without done")
    return first, time.perf_counter() - started


async def _level(call: Any, concurrency: int, answers: int) -> dict[str, Any]:
    """Answers/s and latencies of the answers that succeeded; failures counted by reason."""
    results: list[tuple[float, float]] = []
    failures: Counter[str] = Counter()
    remaining = answers

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                results.append(await call())
            except AnswerFailed as failed:
                failures[str(failed)] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    firsts, totals = [r[0] for r in results], [r[1] for r in results]
    return {
        "answered": len(results),
        "failed": sum(failures.values()),
        "failure_reasons": dict(failures),
        "answers_per_s": len(results) / wall,
        "first_p50_ms": 1000 * _percentile(firsts, 0.5),
        "first_p99_ms": 1000 * _percentile(firsts, 0.99),
        "total_p50_ms": 1000 * _percentile(totals, 0.5),
        "total_p99_ms": 1000 * _percentile(totals, 0.99),
    }


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    inference_port, http_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    # Started before the event loop has work to do; the processes only run beside it.
    stand_in = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, __file__, "--serve-stand-in", str(inference_port), "--chunks", str(args.chunks)]
    )
    env = {
        **os.environ,
        "FLYWHEEL_GATEWAY_HTTP__PORT": str(http_port),
        "FLYWHEEL_GATEWAY_METRICS__PORT": "0",
        "FLYWHEEL_GATEWAY_SERVICES__INFERENCE": f"127.0.0.1:{inference_port}",
        "FLYWHEEL_GATEWAY_SITES": json.dumps([SITE]),
        "FLYWHEEL_GATEWAY_LOGGING__LEVEL": "WARNING",
        # Plain http here: the client keeps its session cookie only if it is not Secure.
        "FLYWHEEL_GATEWAY_SESSION__SECURE_COOKIES": "false",
        "FLYWHEEL_GATEWAY_RATE_LIMIT__SESSION_ASKS__PER_SECOND": "0",
        "FLYWHEEL_GATEWAY_RATE_LIMIT__ADDRESS__PER_SECOND": "0",
    }
    gateway = subprocess.Popen([sys.executable, "-m", "flywheel_gateway"], env=env)  # noqa: ASYNC220
    rows: list[dict[str, Any]] = []
    try:
        target = f"127.0.0.1:{inference_port}"
        async with (
            grpc.aio.insecure_channel(target) as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client,
        ):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    await _grpc_answer(stub)
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except (AnswerFailed, httpx.TransportError):  # not up yet
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.3)
            for _ in range(20):  # warm both paths (connections, the visitor's cookie)
                await _grpc_answer(stub)
                await _http_answer(client)
            for concurrency in args.concurrency:
                for path, call in (
                    ("grpc", lambda: _grpc_answer(stub)),
                    ("gateway", lambda: _http_answer(client)),
                ):
                    cpu = _cpu_s(gateway.pid)
                    measured = await _level(call, concurrency, args.answers)
                    cpu_ms = 1000 * (_cpu_s(gateway.pid) - cpu) / args.answers
                    rows.append(
                        {
                            "path": path,
                            "concurrency": concurrency,
                            **measured,
                            "gateway_cpu_ms_per_answer": cpu_ms,
                        }
                    )
    finally:
        for process in (gateway, stand_in):
            process.terminate()
            process.wait(timeout=30)
    return {
        "answers": args.answers,
        "chunks": args.chunks,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--answers", type=int, default=200)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--chunks", type=int, default=32, help="text chunks per answer")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-stand-in", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stand_in:
        asyncio.run(_serve_stand_in(args.serve_stand_in, args.chunks))
        return
    result = asyncio.run(_bench(args))
    print(f"{result['answers']} answers of {result['chunks']} chunks per row; {result['machine']}")
    print(
        "| path | concurrency | failed | answers/s | first text p50 / p99 ms | end p50 / p99 ms "
        "| gateway CPU ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rows"]:
        print(
            f"| {r['path']} | {r['concurrency']} | {r['failed']} | {r['answers_per_s']:.0f} | "
            f"{r['first_p50_ms']:.1f} / {r['first_p99_ms']:.1f} | "
            f"{r['total_p50_ms']:.1f} / {r['total_p99_ms']:.1f} | "
            f"{r['gateway_cpu_ms_per_answer']:.2f} |"
        )
    for r in result["rows"]:
        if r["failed"]:
            print(
                f"{r['path']} at {r['concurrency']}: {r['failed']} of {result['answers']} answers failed "
                f"{r['failure_reasons']}; the rates and latencies are over the {r['answered']} others"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
