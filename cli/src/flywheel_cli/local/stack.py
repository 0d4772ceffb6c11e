"""The whole system on one machine: Kafka, topics, the base model, every service and the gateway."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel_cli.local.kafka_broker import LocalBroker, free_port
from flywheel_cli.local.prometheus import (
    LocalPrometheus,
    PrometheusError,
    PrometheusOptions,
    chart_rule_groups,
    find_tool,
)
from flywheel_common.files import tree_bytes
from flywheel_common.kafka import ensure_topics
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import KafkaSettings, TopicSettings

if TYPE_CHECKING:
    from flywheel_model.prepare import Precision

log = logging.getLogger(__name__)

DEFAULT_DATASET = Path("datasets/python-faq")
# Where `flywheel kafka start` and `flywheel up` put a local broker when none is named.
DEFAULT_KAFKA_PORT = 9092


class StackError(RuntimeError):
    """The stack could not start (a service exited, or did not become healthy in time)."""


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the stack: its module, ports, what it does, and the environment it is given.

    `port` serves gRPC, or HTTP for the gateway (`http`), which is no Kafka client.
    """

    name: str
    module: str
    port: int
    metrics_port: int
    purpose: str
    env: Mapping[str, str]
    http: bool = False

    @property
    def prefix(self) -> str:
        return f"FLYWHEEL_{self.name.upper()}_"

    @property
    def available(self) -> bool:
        """Whether the service can run here (its package, with its `__main__`, is installed)."""
        try:
            return importlib.util.find_spec(f"{self.module}.__main__") is not None
        except ModuleNotFoundError:
            return False


@dataclass
class StackConfig:
    """What `LocalStack` starts and where; every default is the local, quick-round profile.

    `service_env` adds or overrides environment variables per service, by their full name
    (e.g. `{"trainer": {"FLYWHEEL_TRAINER_BATCH__MAX_EXAMPLES": "64"}}`).
    """

    var_dir: Path = Path("var")
    host: str = "127.0.0.1"
    # None: reuse a broker already listening on the default port, else start one under var/kafka.
    kafka_bootstrap: str | None = None
    kafka_port: int = DEFAULT_KAFKA_PORT
    topics: TopicSettings = field(default_factory=TopicSettings)
    # The evaluator's golden set: this dataset's `gate` split.
    dataset: Path = DEFAULT_DATASET
    gate_split: str = "gate"
    # Prompt tokens of page passages, the same for serving and the gate (training uses the served
    # passages). 200 instead of the services' 400: on two cores every prompt costs half as much to
    # answer and to train on, and neither packaged model answers better from the longer context
    # once trained (docs/local.md).
    context_token_budget: int = 200
    # Passages of at most this many words: in 200 tokens, 40-word passages hold an acceptable answer
    # for 70 % of the traffic and gate questions, 80-word ones (the services' default) for 62 %.
    passage_max_words: int = 40
    # Ports: inference, feedback, trainer, evaluator (gRPC); metrics ports are 9101..9104.
    grpc_ports: tuple[int, int, int, int] = (50051, 50052, 50053, 50054)
    metrics_ports: tuple[int, int, int, int] = (9101, 9102, 9103, 9104)
    # The gateway (HTTP for browsers) and its metrics.
    gateway_port: int = 8080
    gateway_metrics_port: int = 9105
    # Pick free ports (Kafka's too) instead: tests, or a second stack beside a running one.
    free_ports: bool = False
    # Start a broker of its own under var/kafka (on `kafka_port` when free, else any free port) instead
    # of reusing one that listens: a clean start, no other run's topics or consumer offsets.
    own_broker: bool = False
    services: tuple[str, ...] = ("inference", "feedback", "trainer", "evaluator", "gateway")
    prepare_model: bool = True
    # The base model to prepare and register: a packaged model's name (`smollm2-135m`, `gemma3-270m`),
    # a .gguf file or a Hugging Face folder. `flywheel up` names SERVED_BASE_MODEL unless told; None
    # (tests) is SmolLM2-135M-Instruct, the smaller model.
    base_model: str | None = None
    # How it is exported; None: default_precision() (fp32).
    precision: Precision | None = None
    # Seconds each service gets to report SERVING, and to stop after SIGTERM.
    health_timeout_s: float = 300.0
    stop_timeout_s: float = 30.0
    grpc_grace_s: float = 3.0
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # Start a Prometheus (`flywheel up --observe`) that scrapes every service and evaluates the
    # chart's alert rules; its port is a free one with `free_ports`.
    observe: PrometheusOptions | None = None

    @property
    def artifact_root(self) -> Path:
        return self.var_dir / "artifacts"

    @property
    def logs_dir(self) -> Path:
        return self.var_dir / "logs"


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _topic_env(prefix: str, topics: TopicSettings) -> dict[str, str]:
    if topics == TopicSettings():
        return {}
    return {f"{prefix}KAFKA__TOPICS__{name.upper()}": value for name, value in topics.model_dump().items()}


def _trainer_env(config: StackConfig, var_dir: Path) -> dict[str, str]:
    """Local trainer: the shared artifact store, jobs as local subprocesses, batches cut within minutes.

    A job (a subprocess of the trainer, logging to var/trainer/jobs/) reads its own settings
    (FLYWHEEL_TRAINER_JOB_*) from the trainer's environment.
    """
    p = "FLYWHEEL_TRAINER_"
    return {
        f"{p}ARTIFACT_ROOT": str(var_dir / "artifacts"),
        f"{p}DATA_DIR": str(var_dir / "trainer"),
        f"{p}JOBS__LAUNCHER": "local",
        # A batch of 64 examples, or whatever waited 10 minutes (8 at least).
        f"{p}BATCH__MAX_EXAMPLES": "64",
        f"{p}BATCH__MAX_WAIT_S": "600",
        f"{p}BATCH__MIN_EXAMPLES": "8",
        # A round brings 20-40 examples: 3 epochs of micro-batches of 4 give the model ~25 updates
        # (the defaults, 2 epochs of 8, gave 6 and a gain the gate could not see).
        f"{p}JOB_HYPER__EPOCHS": "3",
        f"{p}JOB_HYPER__GRADIENT_ACCUMULATION": "4",
        # The simulated visitors are trusted: their agreed high ratings train, as the loop's
        # measurements assume (a public deployment leaves them out, docs/security.md).
        f"{p}POLICY__POSITIVE_ROLES": '["user", "expert", "admin"]',
    }


# The local evaluator's canary (`FLYWHEEL_EVALUATOR_CANARY__*`): half the sessions, 16 sessions with
# feedback a side (bench/canary.py measures this profile), at least 10 s, at most 5 minutes.
LOCAL_CANARY = {
    "FRACTION": "0.5",
    "MIN_SAMPLES": "16",
    "MIN_SIGNAL_SAMPLES": "5",
    "MIN_DURATION_S": "10",
    "MAX_DURATION_S": "300",
}


def _evaluator_env(config: StackConfig, var_dir: Path) -> dict[str, str]:
    """Local evaluator: the dataset's gate split as golden set, a canary decided within minutes."""
    p = "FLYWHEEL_EVALUATOR_"
    return {
        f"{p}ARTIFACT_ROOT": str(var_dir / "artifacts"),
        f"{p}STATE_DIR": str(var_dir / "evaluator"),
        f"{p}GOLDEN__DATASET": str(config.dataset.resolve()),
        f"{p}GOLDEN__SPLIT": config.gate_split,
        f"{p}EVALUATION__CONTEXT_TOKEN_BUDGET": str(config.context_token_budget),
        f"{p}EVALUATION__PASSAGE_MAX_WORDS": str(config.passage_max_words),
        **{f"{p}CANARY__{key}": value for key, value in LOCAL_CANARY.items()},
        # Two cores shared by four services and a training job: answer latency is not what a local
        # run tests, so the SLO only catches a model that rambles far beyond the base model.
        f"{p}GATE__LATENCY_P95_SLO_MS": "60000",
        # 44 answerable gate questions make each one worth 2.3 points: a real gain of ~10 points
        # shows P(not better) near 0.15, so the local gate accepts a candidate that is better with
        # 80 % confidence (and never one that regresses beyond the tolerance).
        f"{p}GATE__MAX_P_NOT_BETTER": "0.2",
    }


def _gateway_env(
    config: StackConfig, port: int, metrics_port: int, grpc_ports: dict[str, int]
) -> dict[str, str]:
    """Local gateway: in front of the stack's services, the dataset's pages under /demo/ with the widget."""
    p = "FLYWHEEL_GATEWAY_"
    env = {
        f"{p}HTTP__HOST": config.host,
        f"{p}HTTP__PORT": str(port),
        f"{p}HTTP__GRACE_S": str(config.grpc_grace_s),
        f"{p}METRICS__HOST": config.host,
        f"{p}METRICS__PORT": str(metrics_port),
        # Plain http on loopback: a browser keeps no Secure cookie from http://127.0.0.1.
        f"{p}SESSION__SECURE_COOKIES": "false",
        **{f"{p}SERVICES__{name.upper()}": f"127.0.0.1:{port}" for name, port in grpc_ports.items()},
    }
    pages = config.dataset / "pages"
    if pages.is_dir():
        env[f"{p}DEMO_PAGES_DIR"] = str(pages.resolve())
    return env


def service_specs(config: StackConfig) -> list[ServiceSpec]:
    """The services of the stack, their ports and their environment, in start order."""
    var_dir = config.var_dir.resolve()
    grpc_ports = list(config.grpc_ports)
    metrics_ports = list(config.metrics_ports)
    if config.free_ports:
        grpc_ports = [free_port(config.host) for _ in grpc_ports]
        metrics_ports = [free_port(config.host) for _ in metrics_ports]
    rows: list[tuple[str, str, Callable[[StackConfig, Path], dict[str, str]] | None]] = [
        ("inference", "answers questions about a page", None),
        ("feedback", "takes ratings and corrections", None),
        ("trainer", "feedback -> fine-tuning jobs", _trainer_env),
        ("evaluator", "gate, canary, rollback", _evaluator_env),
    ]
    specs = []
    for index, (name, purpose, extra) in enumerate(rows):
        if name not in config.services:
            continue
        prefix = f"FLYWHEEL_{name.upper()}_"
        env = {
            f"{prefix}GRPC__HOST": config.host,
            f"{prefix}GRPC__PORT": str(grpc_ports[index]),
            f"{prefix}GRPC__GRACE_S": str(config.grpc_grace_s),
            f"{prefix}METRICS__HOST": config.host,
            f"{prefix}METRICS__PORT": str(metrics_ports[index]),
            **_topic_env(prefix, config.topics),
        }
        if name == "inference":
            env[f"{prefix}ARTIFACT_ROOT"] = str(var_dir / "artifacts")
            env[f"{prefix}LIMITS__CONTEXT_TOKEN_BUDGET"] = str(config.context_token_budget)
            env[f"{prefix}LIMITS__PASSAGE_MAX_WORDS"] = str(config.passage_max_words)
        if extra is not None:
            env.update(extra(config, var_dir))
        env.update(config.service_env.get(name, {}))
        specs.append(
            ServiceSpec(name, f"flywheel_{name}", grpc_ports[index], metrics_ports[index], purpose, env)
        )
    if "gateway" in config.services:
        http_port, metrics_port = config.gateway_port, config.gateway_metrics_port
        if config.free_ports:
            http_port, metrics_port = free_port(config.host), free_port(config.host)
        env = _gateway_env(config, http_port, metrics_port, {s.name: s.port for s in specs})
        env.update(config.service_env.get("gateway", {}))
        specs.append(
            ServiceSpec(
                "gateway",
                "flywheel_gateway",
                http_port,
                metrics_port,
                "widget, API, review console",
                env,
                True,
            )
        )
    return specs


@dataclass
class RunningService:
    """A started service process and where it logs."""

    spec: ServiceSpec
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.spec.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    def healthy(self) -> bool:
        """SERVING (gRPC health), or ready (the gateway's /readyz: inference and feedback SERVING)."""
        if not self.spec.http:
            return check_health(self.target, timeout_s=1.0)
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _short(path: Path) -> str:
    """The path relative to the current folder when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def describe_state(config: StackConfig) -> str:
    """What a run starts from: a clean state, or the registry and trainer store another run left."""
    artifacts = config.artifact_root
    registered = (artifacts / "models" / "versions").is_dir()
    registry = ModelRegistry(artifacts) if registered else None
    versions = registry.list_versions() if registry else []
    trained = sorted((artifacts / "datasets").glob("[!.]*")) if (artifacts / "datasets").is_dir() else []
    if len(versions) <= 1 and not trained:
        return f"a clean state in {config.var_dir} (the base model only, no feedback, no training data)"
    production = (registry.state().production if registry else None) or "none"
    return (
        f"the state in {config.var_dir}: {len(versions)} model versions (production {production}), "
        f"{len(trained)} training datasets, the trainer's stored feedback and the broker's offsets"
    )


def runs_on_disk(runs_dir: Path) -> tuple[int, int]:
    """The simulations' state folders under `runs_dir`: how many, and the bytes deleting them frees
    (files linked from elsewhere too, such as the base model's prepared cache, free nothing)."""
    runs = [p for p in runs_dir.glob("[!.]*") if p.is_dir()] if runs_dir.is_dir() else []
    return len(runs), sum(tree_bytes(run, unshared=True) for run in runs)


def check_health(target: str, timeout_s: float = 2.0) -> bool:
    """Whether the gRPC server at `target` reports SERVING (grpc.health.v1, whole server)."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class LocalStack:
    """Starts Kafka (or uses a given broker), the topics, the base model and the services; stops them.

    A context manager: `with LocalStack(StackConfig()) as stack: stack.targets["inference"]`.
    Services are subprocesses (`python -m flywheel_<service>`) in their own process groups, so a
    Ctrl-C in the terminal reaches the supervisor only, which stops them in reverse order.
    """

    def __init__(self, config: StackConfig | None = None, *, echo: Callable[[str], None] = print) -> None:
        self.config = config or StackConfig()
        self.echo = echo
        self.broker: LocalBroker | None = None
        self.prometheus: LocalPrometheus | None = None
        self.bootstrap_servers = ""
        self.base_version: str | None = None
        self.specs = service_specs(self.config)
        self.skipped = [s.name for s in self.specs if not s.available]
        self.running: list[RunningService] = []
        self.started_at = 0.0
        self.startup_s = 0.0
        self.initial_state = ""

    # --- what the stack serves -------------------------------------------------------------------------

    @property
    def targets(self) -> dict[str, str]:
        """gRPC `host:port` of every running gRPC service, by name."""
        return {r.spec.name: r.target for r in self.running if not r.spec.http}

    @property
    def gateway_url(self) -> str | None:
        """Where browsers reach the gateway, when it runs."""
        return next((r.url for r in self.running if r.spec.http), None)

    @property
    def kafka_settings(self) -> KafkaSettings:
        return KafkaSettings(bootstrap_servers=self.bootstrap_servers, topics=self.config.topics)

    # --- start -----------------------------------------------------------------------------------------

    def start(self) -> LocalStack:
        """Brings everything up and waits until every service is SERVING; on failure stops what started."""
        self.started_at = time.monotonic()
        self.initial_state = describe_state(self.config)
        self.echo(f"state: {self.initial_state}")
        try:
            # Before anything starts: a port in use, a missing tool or a chart that does not render
            # fails at once.
            self._check_ports()
            self.config.logs_dir.mkdir(parents=True, exist_ok=True)
            observed = self._prometheus_rules()
            if self.config.prepare_model:
                self._prepare_model()
            self._start_kafka()
            for spec in self.specs:
                if spec.available:
                    self._spawn(spec)
            self._wait_healthy()
            if observed is not None and self.config.observe is not None:
                self._start_prometheus(*observed, self.config.observe)
            self.startup_s = time.monotonic() - self.started_at
        except BaseException:
            self.stop()
            raise
        return self

    def _check_ports(self) -> None:
        """Fails where something listens on a port a service would take. The gRPC servers bind with
        SO_REUSEPORT, so a second stack on the same ports would start without an error and the
        kernel would spread each stack's calls over both stacks' services."""
        if self.config.free_ports:
            return
        taken = [
            f"{port} ({spec.name})"
            for spec in self.specs
            if spec.available
            for port in (spec.port, spec.metrics_port)
            if port and _listening(self.config.host, port)
        ]
        if taken:
            raise StackError(
                f"in use on {self.config.host}: {', '.join(taken)}. Another `flywheel up` is running? "
                "Stop it, or pass --free-ports to run this one beside it."
            )

    def _prometheus_rules(self) -> tuple[Path, list[dict[str, Any]]] | None:
        """The prometheus binary and the chart's alert rules, when the stack is observed.

        StackError when prometheus or helm (which renders the rules) is missing.
        """
        if self.config.observe is None:
            return None
        binary, helm = find_tool("prometheus"), find_tool("helm")
        if binary is None or helm is None:
            missing = " and ".join(n for n, t in (("prometheus", binary), ("helm", helm)) if t is None)
            raise StackError(f"{missing} not installed: run scripts/install-deploy-tools")
        try:
            return binary, chart_rule_groups(helm)
        except PrometheusError as exc:
            raise StackError(str(exc)) from exc

    def _start_prometheus(
        self, binary: Path, rules: list[dict[str, Any]], options: PrometheusOptions
    ) -> None:
        port = free_port(self.config.host) if self.config.free_ports else options.port
        self.prometheus = LocalPrometheus(
            binary,
            (self.config.var_dir / "prometheus").resolve(),
            (self.config.logs_dir / "prometheus.log").resolve(),
            {r.spec.name: r.spec.metrics_port for r in self.running},
            options,
            port=port,
            host=self.config.host,
        )
        try:
            self.prometheus.start(rules)
        except PrometheusError as exc:
            self.prometheus = None
            raise StackError(str(exc)) from exc
        self.echo(f"prometheus: {self.prometheus.url} (the chart's alerts: {self.prometheus.url}/alerts)")

    def _prepare_model(self) -> None:
        from flywheel_model.prepare import (
            ExportOptions,
            default_precision,
            ensure_prepared,
            register_base,
            resolve_source,
        )

        try:
            source = resolve_source(self.config.base_model)
        except FileNotFoundError as exc:
            raise StackError(str(exc)) from exc
        if source is not None and not source.exists():
            raise StackError(f"no base model at {source}: give a .gguf file, a Hugging Face folder or a name")
        options = ExportOptions(precision=self.config.precision or default_precision())
        model_dir = ensure_prepared(source, options, None, force=False, echo=self.echo)
        self.base_version = register_base(model_dir, self.config.artifact_root.resolve(), echo=self.echo)

    def _start_kafka(self) -> None:
        config = self.config
        if config.kafka_bootstrap:
            self.bootstrap_servers = config.kafka_bootstrap
            self.echo(f"Kafka: using {self.bootstrap_servers}")
        elif not config.free_ports and not config.own_broker and _listening(config.host, config.kafka_port):
            self.bootstrap_servers = f"{config.host}:{config.kafka_port}"
            self.echo(f"Kafka: a broker already listens on {self.bootstrap_servers}; using it")
        else:
            self.broker = LocalBroker(
                data_dir=(config.var_dir / "kafka").resolve(),
                host=config.host,
                port=self._kafka_port(),
                controller_port=free_port(config.host),
                log_file=(config.logs_dir / "kafka.log").resolve(),
            )
            self.echo(f"Kafka: starting a local broker on {self.broker.bootstrap_servers} ...")
            self.broker.start()
            self.bootstrap_servers = self.broker.bootstrap_servers
        created = ensure_topics(self.kafka_settings)
        if created:
            self.echo(f"Kafka: created topics {', '.join(created)}")

    def _kafka_port(self) -> int:
        config = self.config
        taken = config.own_broker and _listening(config.host, config.kafka_port)
        return free_port(config.host) if config.free_ports or taken else config.kafka_port

    def _spawn(self, spec: ServiceSpec) -> None:
        log_file = (self.config.logs_dir / f"{spec.name}.log").resolve()
        kafka = {} if spec.http else {f"{spec.prefix}KAFKA__BOOTSTRAP_SERVERS": self.bootstrap_servers}
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **kafka, **spec.env}
        with log_file.open("ab") as out:
            out.write(f"--- {dt.datetime.now().isoformat(timespec='seconds')} flywheel up\n".encode())
            out.flush()
            process = subprocess.Popen(
                [sys.executable, "-m", spec.module],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=Path.cwd(),
                start_new_session=True,
            )
        self.running.append(RunningService(spec, process, log_file))
        log.info("started %s (pid %d), log %s", spec.name, process.pid, log_file)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.health_timeout_s
        waiting = list(self.running)
        while waiting:
            for service in list(waiting):
                code = service.process.poll()
                if code is not None:
                    raise StackError(
                        f"{service.spec.name} exited with {code} while starting; "
                        f"last lines of {service.log_file}:\n{_tail(service.log_file)}"
                    )
                if service.healthy():
                    waiting.remove(service)
                    took = time.monotonic() - self.started_at
                    where = service.url if service.spec.http else service.target
                    self.echo(f"{service.spec.name}: SERVING on {where} ({took:.0f} s)")
            if waiting and time.monotonic() > deadline:
                names = ", ".join(s.spec.name for s in waiting)
                raise StackError(f"not SERVING after {self.config.health_timeout_s:.0f} s: {names}")
            if waiting:
                time.sleep(0.5)

    # --- while running ---------------------------------------------------------------------------------

    def exited(self) -> list[RunningService]:
        """Services whose process has ended."""
        return [s for s in self.running if s.process.poll() is not None]

    def table_rows(self) -> list[tuple[str, str, str, str, str]]:
        """(service, address, metrics port, log, what it does) for the port table."""
        kafka_log = _short(self.broker.log_file) if self.broker else "(external broker)"
        rows = [("kafka", self.bootstrap_servers, "", kafka_log, "topics: interactions, feedback, ...")]
        for service in self.running:
            spec = service.spec
            where = service.url if spec.http else service.target
            rows.append((spec.name, where, str(spec.metrics_port), _short(service.log_file), spec.purpose))
        if self.prometheus is not None:
            log_file = _short(self.prometheus.log_file)
            rows.append(
                ("prometheus", self.prometheus.url, "", log_file, "scrapes /metrics, the chart's alerts")
            )
        return rows

    # --- stop ------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM every service (last started first), wait, then kill what is left; then the broker.

        A second Ctrl-C while waiting kills at once.
        """
        running, self.running = self.running, []
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        try:
            for service in reversed(running):
                if service.process.poll() is None:
                    service.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_timeout_s
            for service in reversed(running):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.process.wait(max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            self.echo("killing the services")
        finally:
            for service in running:
                if service.process.poll() is None:
                    self.echo(f"{service.spec.name} did not stop in time; killing it")
                # Whatever the service started (a local training job) is in its process group.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(service.process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.process.wait(5)
            if self.broker is not None:
                self.broker.stop()
                self.broker = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


__all__ = [
    "DEFAULT_DATASET",
    "LocalStack",
    "ServiceSpec",
    "StackConfig",
    "StackError",
    "check_health",
    "service_specs",
]
