"""A Prometheus server beside the local stack: it scrapes every service and evaluates the chart's alerts."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flywheel_common.files import cache_root, repo_root

CHART = repo_root() / "deploy" / "helm" / "flywheel"
RULE_TEMPLATE = "templates/observability/prometheusrule.yaml"
# The release and namespace docs/deploy.md installs: the rules select `namespace="flywheel"` and
# services named `flywheel-<component>`, so the local targets carry the same labels.
RELEASE = "flywheel"
NAMESPACE = "flywheel"

Doc = dict[str, Any]


class PrometheusError(RuntimeError):
    """Prometheus could not be set up or started, or its HTTP API refused a query."""


@dataclass(frozen=True)
class PrometheusOptions:
    """Where the local Prometheus listens and how often it scrapes and evaluates the rules.

    5 s instead of a cluster's 30 s: a local run lasts minutes, and five small targets cost nothing.
    """

    port: int = 9090
    scrape_interval_s: float = 5.0
    evaluation_interval_s: float = 5.0


def find_tool(name: str) -> Path | None:
    """A tool from .cache/tools/bin (scripts/install-deploy-tools), else from PATH."""
    local = cache_root() / "tools" / "bin" / name
    if local.is_file():
        return local
    found = shutil.which(name)
    return Path(found) if found else None


def chart_rule_groups(helm: Path, *, release: str = RELEASE, namespace: str = NAMESPACE) -> list[Doc]:
    """The chart's alert rule groups as `helm template` renders them (the PrometheusRule's spec.groups)."""
    args = [
        str(helm),
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--show-only",
        RULE_TEMPLATE,
        # The chart refuses to render without a source of secrets, or with network policies but no
        # API server address for the trainer; the rules need neither.
        "--set",
        "secrets.existingSecret=unused",
        "--set",
        "networkPolicy.enabled=false",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise PrometheusError(f"helm could not render {RULE_TEMPLATE}:\n{proc.stderr.strip()}")
    groups: list[Doc] = yaml.safe_load(proc.stdout)["spec"]["groups"]
    return groups


def target_labels(service: str, *, release: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """The labels prometheus-operator gives a target of the chart's ServiceMonitor for `service`.

    `job` is the ServiceMonitor's jobLabel (the component), `service` the Kubernetes Service's name.
    """
    name = f"{release}-{service}"
    return {"namespace": namespace, "service": name, "pod": f"{name}-local", "container": service}


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def prometheus_config(
    metrics_ports: Mapping[str, int], rule_file: Path, options: PrometheusOptions, host: str = "127.0.0.1"
) -> Doc:
    """A configuration that scrapes each service's /metrics as the chart's ServiceMonitors would."""
    interval = options.scrape_interval_s
    return {
        "global": {
            "scrape_interval": _duration(interval),
            "scrape_timeout": _duration(min(interval, 10.0)),
            "evaluation_interval": _duration(options.evaluation_interval_s),
        },
        "rule_files": [str(rule_file)],
        "scrape_configs": [
            {
                "job_name": service,
                "metrics_path": "/metrics",
                # As the ServiceMonitors: the metrics' own `service` label (the gRPC service) wins.
                "honor_labels": True,
                "static_configs": [{"targets": [f"{host}:{port}"], "labels": target_labels(service)}],
            }
            for service, port in metrics_ports.items()
        ],
    }


class LocalPrometheus:
    """A Prometheus process: its configuration, rules and data under `workdir`, its output in `log_file`."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        log_file: Path,
        metrics_ports: Mapping[str, int],
        options: PrometheusOptions,
        *,
        port: int,
        host: str = "127.0.0.1",
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.log_file = log_file
        self.metrics_ports = dict(metrics_ports)
        self.options = options
        self.host = host
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def rule_file(self) -> Path:
        return self.workdir / "rules.yaml"

    @property
    def config_file(self) -> Path:
        return self.workdir / "prometheus.yml"

    def write_rules(self, groups: list[Doc]) -> None:
        """Writes the rule groups Prometheus loads (at start, or on `reload()`)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rule_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))

    def write_config(self, rule_groups: list[Doc]) -> None:
        """Writes the configuration and the rules it loads."""
        self.write_rules(rule_groups)
        config = prometheus_config(self.metrics_ports, self.rule_file, self.options, self.host)
        # JSON is YAML: no second serializer for the same document.
        self.config_file.write_text(json.dumps(config, indent=2))

    def start(self, rule_groups: list[Doc], timeout_s: float = 60.0) -> None:
        """Writes the configuration and rules, starts the server and waits until it is ready."""
        self.write_config(rule_groups)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            out.write(f"--- {dt.datetime.now().isoformat(timespec='seconds')} flywheel up\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [
                    str(self.binary),
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address={self.host}:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.process.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with {self.process.returncode}; see {self.log_file}:\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus not ready after {timeout_s:.0f} s; see {self.log_file}")
            time.sleep(0.5)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def reload(self) -> None:
        """Re-reads the configuration and rule files (SIGHUP), as `kill -HUP` does."""
        if self.process is None or self.process.poll() is not None:
            raise PrometheusError("prometheus is not running")
        self.process.send_signal(signal.SIGHUP)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>: the `data` of a successful reply; PrometheusError with its error otherwise."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30.0) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as error:
            # Prometheus answers a bad query with 400 and a JSON body naming the problem.
            body = json.load(error)
        except (urllib.error.URLError, OSError) as error:
            raise PrometheusError(f"{url}: {error}") from error
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[Doc]:
        """The instant vector (or scalar, as one sample) an expression evaluates to now."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[Doc] = data["result"]
        return result

    def alerts(self) -> list[Doc]:
        """Alerts now pending or firing, with their labels and state."""
        alerts: list[Doc] = self.api("alerts")["alerts"]
        return alerts

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL when it has not stopped in time."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


__all__ = [
    "LocalPrometheus",
    "PrometheusError",
    "PrometheusOptions",
    "chart_rule_groups",
    "find_tool",
    "prometheus_config",
    "target_labels",
]
