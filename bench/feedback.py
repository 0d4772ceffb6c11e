"""Feedback ingestion benchmark: acknowledged feedback/s and p50/p99 latency at concurrency 1, 16, 64.

    uv run python bench/feedback.py [--concurrency 1,16,64] [--duration 10] [--json PATH]
    uv run python bench/feedback.py --workers 1,2        # each worker count in turn, one table
    uv run python bench/feedback.py --baseline-python ../old/.venv/bin/python --workers 1,2
    uv run python bench/feedback.py --target 127.0.0.1:50052 --token TOKEN   # a running service

Without --target it starts a real Kafka broker (flywheel_cli.local.kafka_broker.LocalBroker) and the
feedback service as its own process (`python -m flywheel_feedback`, rate limit off, dev keys), once
per entry of --workers (FLYWHEEL_FEEDBACK_WORKERS), plus first, with --baseline-python, the service
of another checkout (that interpreter, its defaults) to compare code versions in the same run.
It drives SubmitFeedback from this process with that many concurrent RPCs spread over --channels
connections (SO_REUSEPORT spreads connections, not calls, over the workers).
Every RPC counted as acknowledged returned OK, i.e. the broker acknowledged its event (acks=all).
The mix is ratings and thumbs with `--comment-share` of comments (which run PII redaction).
Service CPU counts the supervisor and all its workers. The load average is printed with the
numbers, since every core counts on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel_cli.local.kafka_broker import LocalBroker, free_port
from flywheel_common.dev_secrets import DEV_QUERY_ID_KEY
from flywheel_common.query_ids import QueryIdSigner
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2, feedback_pb2_grpc

COMMENTS = [
    "The answer missed the second paragraph of the page.",
    "Wrong price; the page says 49 euros. Mail me at someone@example.com",
    "Good answer, but too long.",
    "Call me on +44 20 7946 0958 if you need details.",
]


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process and its live child processes used so far; this
    process alone when pid is None."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return own + sum(_cpu_s(int(child)) for child in children)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _wait_serving(target: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"feedback service on {target} not SERVING after {timeout_s:.0f} s")


async def _run_level(
    stubs: list[feedback_pb2_grpc.FeedbackServiceStub],
    concurrency: int,
    duration_s: float,
    query_ids: list[str],
    token: str,
    comment_share: float,
    pids: dict[str, int | None],
) -> dict[str, Any]:
    metadata = (("authorization", f"Bearer {token}"),)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.perf_counter() + duration_s
    rng = random.Random(concurrency)

    async def worker(w: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
            request = feedback_pb2.SubmitFeedbackRequest(
                query_id=query_ids[(w + n) % len(query_ids)], idempotency_key=f"c{concurrency}-w{w}-{n}"
            )
            draw = rng.random()
            if draw < comment_share:
                request.comment = COMMENTS[n % len(COMMENTS)]
            elif draw < (1 + comment_share) / 2:
                request.rating = 1 + n % 5
            else:
                request.thumbs_up = n % 2 == 0
            started = time.perf_counter()
            try:
                await stubs[w % len(stubs)].SubmitFeedback(request, metadata=metadata, timeout=10)
                latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    load_before = os.getloadavg()[0]
    cpu_before = {name: _cpu_s(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    acked = max(len(latencies), 1)
    cpu_ms = {name: round((_cpu_s(pid) - cpu_before[name]) * 1000 / acked, 3) for name, pid in pids.items()}
    return {
        "concurrency": concurrency,
        "acked": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "acked_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        # CPU milliseconds each process spent per acknowledged feedback.
        "cpu_ms_per_ack": cpu_ms,
    }


def _wait_ready(log_path: Path, processes: int, timeout_s: float) -> None:
    """Waits for every worker's "feedback ready" log line: a connection opened before a worker
    listens goes to the others for good, which would skew the load."""
    deadline = time.monotonic() + timeout_s
    while log_path.read_text(errors="replace").count("feedback ready") < processes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{processes} feedback workers not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


async def _bench(
    args: argparse.Namespace, target: str, pids: dict[str, int | None], service: str
) -> list[dict[str, Any]]:
    await _wait_serving(target, args.startup_timeout)
    signer = QueryIdSigner(args.query_id_key)
    query_ids = [signer.issue("bench-v1") for _ in range(256)]
    rows = []
    # A local subchannel pool per channel: otherwise channels to one target share one connection,
    # which SO_REUSEPORT would hand to a single worker.
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.channels)
    ]
    try:
        stubs = [feedback_pb2_grpc.FeedbackServiceStub(channel) for channel in channels]
        await _run_level(stubs, 8, args.warmup, query_ids, args.token, args.comment_share, pids)
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            row = await _run_level(
                stubs, concurrency, args.duration, query_ids, args.token, args.comment_share, pids
            )
            row["service"] = service
            rows.append(row)
            print(
                f"  {service}  c={concurrency:<3} {row['acked_per_s']:>8.1f} acked/s  "
                f"p50 {row['p50_ms']:>7.2f} ms  p99 {row['p99_ms']:>7.2f} ms  errors {row['errors'] or 0}  "
                f"CPU ms/ack {row['cpu_ms_per_ack']}  load {row['load_avg_1m']}",
                flush=True,
            )
    finally:
        for channel in channels:
            await channel.close()
    return rows


def _start_service(
    python: str, workers: int | None, bootstrap: str, port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **({"FLYWHEEL_FEEDBACK_WORKERS": str(workers)} if workers is not None else {}),
        "FLYWHEEL_FEEDBACK_GRPC__PORT": str(port),
        "FLYWHEEL_FEEDBACK_METRICS__PORT": "0",
        "FLYWHEEL_FEEDBACK_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "FLYWHEEL_FEEDBACK_RATE_LIMIT__PER_SECOND": "0",
        # INFO for the workers' "feedback ready" lines; calls that succeed log nothing at INFO.
        "FLYWHEEL_FEEDBACK_LOGGING__LEVEL": "INFO",
    }
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [python, "-m", "flywheel_feedback"], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--comment-share", type=float, default=0.1, help="share of comments (redacted)")
    parser.add_argument(
        "--workers", default="1", help="worker counts to compare, e.g. 1,2 (FLYWHEEL_FEEDBACK_WORKERS)"
    )
    parser.add_argument(
        "--baseline-python", help="also run first the service of this interpreter's checkout (1 process)"
    )
    parser.add_argument("--channels", type=int, default=16, help="client connections the calls spread over")
    parser.add_argument("--target", help="a running feedback service (default: start broker and service)")
    parser.add_argument("--token", default="dev-user-token")
    parser.add_argument("--query-id-key-file", help="the service's query id key (default: the dev key)")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    key_file = args.query_id_key_file
    args.query_id_key = Path(key_file).read_bytes().strip() if key_file else DEV_QUERY_ID_KEY

    services: list[tuple[str, str, int | None]] = []
    if args.baseline_python:
        services.append(("baseline", args.baseline_python, None))
    for count in [int(w) for w in args.workers.split(",")]:
        services.append((f"workers={count}", sys.executable, count))

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
        if args.target is not None:
            print(f"feedback service {args.target}; {os.cpu_count()} CPUs; {args.duration:.0f} s per level")
            rows = asyncio.run(_bench(args, args.target, {"client": None}, "target"))
        else:
            with LocalBroker(data_dir=Path(tmp) / "kafka", stop_with_parent=True) as broker:
                for name, python, workers in services:
                    port = free_port()
                    log_path = Path(tmp) / f"service-{name}.log"
                    service = _start_service(python, workers, broker.bootstrap_servers, port, log_path)
                    pids: dict[str, int | None] = {
                        "client": None,
                        "service": service.pid,
                        "broker": broker.pid,
                    }
                    print(f"{name}: 127.0.0.1:{port}; {os.cpu_count()} CPUs; {args.duration:.0f} s per level")
                    try:
                        _wait_ready(log_path, workers or 1, args.startup_timeout)
                        rows += asyncio.run(_bench(args, f"127.0.0.1:{port}", pids, name))
                    finally:
                        service.terminate()
                        service.wait(60)

    print()
    print(
        f"{'service':>11} {'concurrency':>11} {'acked/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
        f"{'service CPU ms/ack':>18}"
    )
    for row in rows:
        print(
            f"{row['service']:>11} {row['concurrency']:>11} {row['acked_per_s']:>9.1f} {row['p50_ms']:>8.2f} "
            f"{row['p99_ms']:>8.2f} {sum(row['errors'].values()):>7} "
            f"{row['cpu_ms_per_ack'].get('service', float('nan')):>18.3f}"
        )
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    for row in rows:
        if row["concurrency"] == 64:
            met = row["acked_per_s"] >= 2000 and row["p99_ms"] < 50
            print(
                f"goal at concurrency 64 (>= 2000 acked/s, p99 < 50 ms), {row['service']}: "
                f"{'met' if met else 'NOT met'}"
            )
    if args.json:
        result = {
            "bench": "feedback",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "duration_s": args.duration,
            "comment_share": args.comment_share,
            "channels": args.channels,
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
            "results": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
