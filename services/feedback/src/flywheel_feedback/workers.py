"""Several feedback worker processes on one port (SO_REUSEPORT), started and drained by a supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from flywheel_common.logging import configure_logging
from flywheel_feedback.settings import FeedbackSettings

log = logging.getLogger("flywheel_feedback.workers")

ENV_PREFIX = "FLYWHEEL_FEEDBACK_"


def _reserve_port(host: str) -> socket.socket:
    """A socket bound to a free port with SO_REUSEPORT, held (not listening) so that no other
    program takes the port before the workers bind it; it never receives a connection."""
    family, _, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def worker_environment(port: int, metrics_dir: str) -> dict[str, str]:
    """A worker's environment: the supervisor's, serving `port` with SO_REUSEPORT, one process,
    metrics written to `metrics_dir` for the supervisor's endpoint instead of a port of its own."""
    return {
        **os.environ,
        f"{ENV_PREFIX}WORKERS": "1",
        f"{ENV_PREFIX}GRPC__PORT": str(port),
        f"{ENV_PREFIX}GRPC__REUSE_PORT": "true",
        f"{ENV_PREFIX}METRICS__PORT": "0",
        # prometheus_client reads it when imported: every worker's counters and histograms go to
        # files there, and the supervisor's /metrics sums them (multiprocess mode).
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
    }


async def _supervise(settings: FeedbackSettings, port: int, metrics_dir: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    env = worker_environment(port, metrics_dir)
    # A session of their own: a Ctrl-C in a terminal reaches the supervisor alone, which drains
    # each worker once (a second signal would end a worker in the middle of its drain).
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flywheel_feedback", env=env, start_new_session=True
        )
        for _ in range(settings.workers)
    ]
    pids = [w.pid for w in workers]
    log.info("feedback: %d workers on port %d", len(workers), port, extra={"port": port, "pids": pids})
    exits = {asyncio.create_task(w.wait()): w for w in workers}
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
    failed = [exits[task] for task in done if task is not stopping]
    if failed:
        # One worker gone means a service at reduced capacity that still looks healthy to some
        # probes: stop all of it, so the orchestrator restarts it whole.
        gone = failed[0]
        log.error("feedback worker %d exited with %s; stopping the others", gone.pid, gone.returncode)
    else:
        log.info("shutdown signal received; draining %d workers", len(workers))
    # Each worker drains on SIGTERM: health NOT_SERVING, in-flight calls finish within the
    # grace, its producer is flushed, so every call answered OK is on Kafka.
    for worker in workers:
        if worker.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                worker.send_signal(signal.SIGTERM)
    await asyncio.gather(*exits)
    stopping.cancel()
    for worker in workers:
        multiprocess.mark_process_dead(worker.pid, metrics_dir)
    # A worker still starting when the signal came ends by it, before its own handler is in place.
    stopped = (0, -signal.SIGTERM)
    return 1 if failed or any(worker.returncode not in stopped for worker in workers) else 0


def supervise(settings: FeedbackSettings) -> int:
    """Runs `settings.workers` feedback processes on one port until SIGTERM; the exit status."""
    configure_logging(settings.logging, "feedback")
    reserved = _reserve_port(settings.grpc.host) if settings.grpc.port == 0 else None
    port = reserved.getsockname()[1] if reserved is not None else settings.grpc.port
    # The standard variable where it is set (a volume of its own), else a folder of this run.
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = given or tempfile.mkdtemp(prefix="flywheel-feedback-metrics-")
    if given:
        # Counts of an earlier run would be added to this one's.
        for stale in Path(given).glob("*.db"):
            stale.unlink()
    try:
        if settings.metrics.port:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=metrics_dir)
            start_http_server(settings.metrics.port, addr=settings.metrics.host, registry=registry)
        return asyncio.run(_supervise(settings, port, metrics_dir))
    finally:
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if reserved is not None:
            reserved.close()
