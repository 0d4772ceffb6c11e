"""A real single-node Apache Kafka broker (KRaft, broker + controller) for development and tests."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from flywheel_common.files import cache_root, repo_root

log = logging.getLogger(__name__)

# Printed by kafka.Kafka once the broker accepts client requests.
_READY_LINE = "Kafka Server started"
_JVM_OPTIONS = (
    "-Xms64m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Xshare:auto",
    "-Djava.awt.headless=true",
    "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
    "-Dorg.slf4j.simpleLogger.showDateTime=true",
)


def default_libs_dir() -> Path:
    """Where Maven copies the broker's jars (git-ignored)."""
    return cache_root() / "kafka" / "libs"


def ensure_jars(libs_dir: Path | None = None) -> Path:
    """Fetches the broker's jars with Maven unless they are already there; returns their folder."""
    libs = libs_dir or default_libs_dir()
    if any(libs.glob("kafka_2.13-*.jar")):
        return libs
    pom = repo_root() / "tools" / "kafka" / "pom.xml"
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("Maven (mvn) fetches the Kafka broker's jars; install it (apt-get install maven)")
    log.info("fetching Kafka jars into %s", libs)
    subprocess.run(
        [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-Dkafka.libs={libs}"],
        check=True,
    )
    return libs


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' source ports from."""
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 49152, 65535  # IANA's dynamic range (macOS, BSD)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, below the range of outgoing connections' source
    ports: a port from that range (what binding port 0 gives) can become some client's source port
    before the service binds it, and a stack's gateway once failed to start on one that had."""
    low, _ = ephemeral_ports()
    candidates = list(range(max(1024, low - 16384), low))
    random.shuffle(candidates)
    for port in candidates[:500]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("Java 17+ runs the Kafka broker; install it (apt-get install default-jre)")
    return java


def _with_parent_death_signal(command: list[str]) -> list[str]:
    # util-linux's setpriv sets PR_SET_PDEATHSIG and execs the command: no Python code runs
    # between fork and exec (unsafe next to gRPC's and Kafka's threads).
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv not found: the Kafka broker will outlive a killed parent")
        return command
    return [setpriv, "--pdeathsig", "TERM", *command]


class LocalBroker:
    """Formats and runs `kafka.Kafka` on loopback; a context manager that stops it on exit.

    Ports are chosen once (free ports unless given) and kept across stop()/start(), and so is
    the data folder, so a restarted broker still has every acknowledged record.
    """

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        port: int = 0,
        controller_port: int = 0,
        host: str = "127.0.0.1",
        libs_dir: Path | None = None,
        log_file: Path | None = None,
        startup_timeout_s: float = 90.0,
        stop_with_parent: bool = False,
    ) -> None:
        self._tmp: Path | None = None
        if data_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="flywheel-kafka-"))
            data_dir = self._tmp
        self.home = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.controller_port = controller_port or free_port(host)
        self.libs_dir = libs_dir
        self.log_file = log_file or self.home / "broker.log"
        self.startup_timeout_s = startup_timeout_s
        # Tests and benchmarks: the broker gets SIGTERM when the thread that started it ends, even
        # when its process is killed, so a timed-out run leaves no broker behind (Linux).
        self.stop_with_parent = stop_with_parent
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """`host:port` of the client listener."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._process.pid if self._process and self._process.poll() is None else None

    def _properties(self) -> Path:
        path = self.home / "server.properties"
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.home / "data"),
            # Topics are created by the services with their partitions and retention, never by accident.
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            # One node: internal topics have one replica and few partitions so they appear fast.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # After a crash the controller waits out the old registration; keep that short.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "2500",
            # Sized for a 2-core machine shared with the services.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
        }
        path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        return path

    def _classpath(self) -> str:
        return str(ensure_jars(self.libs_dir) / "*")

    def _format(self, properties: Path) -> None:
        if (self.home / "data" / "meta.properties").exists():
            return
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        result = subprocess.run(
            [
                _java(),
                *_JVM_OPTIONS,
                "-cp",
                self._classpath(),
                "kafka.tools.StorageTool",
                "format",
                # One argument: a base64 id may start with "-".
                f"--cluster-id={cluster}",
                "-c",
                str(properties),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            output = result.stdout[-2000:] + result.stderr[-2000:]
            raise RuntimeError(f"formatting Kafka storage failed: {output}")

    def start(self) -> LocalBroker:
        """Formats storage on first start, starts the broker and waits until it serves clients."""
        if self.pid is not None:
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        properties = self._properties()
        self._format(properties)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        command = [_java(), *_JVM_OPTIONS, "-cp", self._classpath(), "kafka.Kafka", str(properties)]
        if self.stop_with_parent:
            command = _with_parent_death_signal(command)
        with self.log_file.open("ab") as out:
            self._process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._wait_ready(offset)
        log.info("Kafka broker on %s (pid %d, log %s)", self.bootstrap_servers, self.pid, self.log_file)
        return self

    def _wait_ready(self, offset: int) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                raise RuntimeError(f"Kafka broker exited with {code}; see {self.log_file}")
            with self.log_file.open("rb") as f:
                f.seek(offset)
                if _READY_LINE.encode() in f.read():
                    return
            time.sleep(0.1)
        self.stop(kill=True)
        timeout = self.startup_timeout_s
        raise TimeoutError(f"Kafka broker not ready after {timeout:.0f} s; see {self.log_file}")

    def stop(self, *, kill: bool = False, timeout_s: float = 30.0) -> None:
        """Stops the broker: SIGTERM (controlled shutdown) or, with kill, SIGKILL like a crash."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("Kafka broker did not stop in %.0f s; killing it", timeout_s)
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stops the broker and removes its data when it lives in a temporary folder."""
        self.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(Exception):
            self.close()
