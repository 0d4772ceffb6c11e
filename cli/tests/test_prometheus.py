"""`flywheel up --observe`: the generated Prometheus configuration, the chart's rules, a missing binary."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from flywheel_cli.local import stack
from flywheel_cli.local.options import add_stack_args, stack_config
from flywheel_cli.local.prometheus import (
    LocalPrometheus,
    PrometheusOptions,
    chart_rule_groups,
    find_tool,
    prometheus_config,
)
from flywheel_cli.local.stack import LocalStack, StackConfig, StackError

PORTS = {"inference": 9101, "feedback": 9102, "trainer": 9103, "evaluator": 9104, "gateway": 9105}


def _tool(name: str) -> Path:
    found = find_tool(name)
    if found is None:
        pytest.skip(f"{name} is not installed: run scripts/install-deploy-tools")
    return found


def test_each_service_is_a_target_labelled_as_its_service_monitor_would_be() -> None:
    config = prometheus_config(PORTS, Path("rules.yaml"), PrometheusOptions(scrape_interval_s=1.5))
    assert config["global"]["scrape_interval"] == "1500ms"
    assert config["rule_files"] == ["rules.yaml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(PORTS)
    inference = jobs["inference"]
    # The ServiceMonitor keeps the metrics' own `service` label (honorLabels) ...
    assert inference["honor_labels"] is True and inference["metrics_path"] == "/metrics"
    (static,) = inference["static_configs"]
    assert static["targets"] == ["127.0.0.1:9101"]
    # ... and the rules select the namespace and the Kubernetes Service names of release "flywheel".
    assert static["labels"]["namespace"] == "flywheel"
    assert static["labels"]["service"] == "flywheel-inference"


def test_promtool_accepts_the_configuration_and_the_chart_rules(tmp_path: Path) -> None:
    helm, promtool = _tool("helm"), _tool("promtool")
    groups = chart_rule_groups(helm)
    assert {"flywheel.serving", "flywheel.loop"} == {g["name"] for g in groups}
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    # Rendered for namespace "flywheel": no template left, every selector on the local labels.
    assert all("{{" not in e for e in exprs) and all('namespace="flywheel"' in e for e in exprs)
    # Not started: only the files it would start with are written, and checked.
    server = LocalPrometheus(
        Path("prometheus"), tmp_path, tmp_path / "log", PORTS, PrometheusOptions(), port=9090
    )
    server.write_config(groups)
    proc = subprocess.run(
        [str(promtool), "check", "config", str(server.config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout


def test_observe_without_prometheus_fails_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack, "find_tool", lambda name: None)
    config = StackConfig(var_dir=tmp_path, prepare_model=False, observe=PrometheusOptions())
    local = LocalStack(config, echo=lambda _: None)
    with pytest.raises(
        StackError, match="prometheus and helm not installed: run scripts/install-deploy-tools"
    ):
        local.start()
    assert local.broker is None and not local.running


def test_the_observe_flag_asks_for_prometheus() -> None:
    parser = argparse.ArgumentParser()
    add_stack_args(parser)
    assert stack_config(parser.parse_args([]), None).observe is None
    config = stack_config(parser.parse_args(["--observe", "--free-ports"]), None)
    assert config.observe == PrometheusOptions() and config.free_ports
