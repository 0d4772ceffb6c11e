"""`flywheel kafka start|stop|status`: the local development Kafka broker."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time
from pathlib import Path

from flywheel_cli.local.kafka_broker import LocalBroker
from flywheel_common.files import cache_root


def _home(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) if args.data_dir else cache_root() / "kafka" / "local"


def _pid_file(home: Path) -> Path:
    return home / "broker.pid"


def _running_pid(home: Path) -> int | None:
    try:
        pid = int(_pid_file(home).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _start(args: argparse.Namespace) -> int:
    home = _home(args)
    pid = _running_pid(home)
    if pid is not None:
        print(f"Kafka already running (pid {pid}) on {args.host}:{args.port}")
        return 0
    broker = LocalBroker(data_dir=home, host=args.host, port=args.port, controller_port=args.controller_port)
    broker.start()
    _pid_file(home).write_text(f"{broker.pid}\n")
    print(f"Kafka running on {broker.bootstrap_servers} (pid {broker.pid}); log {broker.log_file}")
    print(f"services reach it with FLYWHEEL_<SERVICE>_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap_servers}")
    if not args.foreground:
        return 0
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        signal.sigwait(stop_signals)
    finally:
        broker.stop()
        _pid_file(home).unlink(missing_ok=True)
    return 0


def _stop(args: argparse.Namespace) -> int:
    home = _home(args)
    pid = _running_pid(home)
    if pid is None:
        print("Kafka is not running")
        _pid_file(home).unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and _running_pid(home) is not None:
        time.sleep(0.2)
    if _running_pid(home) is not None:
        print(f"Kafka (pid {pid}) did not stop in {args.timeout:.0f} s; killing it")
        os.kill(pid, signal.SIGKILL)
    _pid_file(home).unlink(missing_ok=True)
    print(f"Kafka (pid {pid}) stopped")
    return 0


def _status(args: argparse.Namespace) -> int:
    home = _home(args)
    pid = _running_pid(home)
    if pid is None:
        print("Kafka is not running")
        return 1
    state = "serving" if _listening(args.host, args.port) else "not listening"
    print(f"Kafka running (pid {pid}), {state} on {args.host}:{args.port}; data in {home}")
    return 0 if state == "serving" else 1


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `kafka start|stop|status` to the flywheel command."""
    kafka = subparsers.add_parser("kafka", help="run a local single-node Kafka broker for development")
    commands = kafka.add_subparsers(dest="kafka_command", required=True)
    for name, func, text in (
        ("start", _start, "fetch the jars if needed, format storage once, start the broker"),
        ("stop", _stop, "stop the broker started by `flywheel kafka start`"),
        ("status", _status, "tell whether the broker runs (exit 1 when not)"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=9092, help="client port (default 9092)")
        sub.add_argument("--controller-port", type=int, default=9093)
        sub.add_argument("--data-dir", help="broker data folder (default .cache/kafka/local)")
        sub.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a stop")
        if name == "start":
            sub.add_argument(
                "--foreground", action="store_true", help="stay attached; Ctrl-C stops the broker"
            )
        sub.set_defaults(func=func)
