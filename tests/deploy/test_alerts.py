"""The PrometheusRule: promtool checks the rendered rules and runs their unit tests (alerts_test.yaml)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import flywheel_deploy_checks as dc
import pytest
import yaml

HERE = Path(__file__).resolve().parent
SCENARIO = "gpu-values.yaml"


@pytest.fixture(scope="module")
def rule(renders: dict[str, dc.Render]) -> dict[str, Any]:
    (doc,) = renders[SCENARIO].of_kind("PrometheusRule")
    return doc


def write_rules(path: Path, rule: dict[str, Any], *, annotations: bool = True) -> Path:
    groups = copy.deepcopy(rule["spec"]["groups"])
    if not annotations:
        for g in groups:
            for r in g["rules"]:
                r.pop("annotations", None)
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def promtool_run(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def unit_test(promtool: Path, rule: dict[str, Any], workdir: Path) -> subprocess.CompletedProcess[str]:
    write_rules(workdir / "rules.yaml", rule, annotations=False)
    shutil.copy(HERE / "alerts_test.yaml", workdir / "alerts_test.yaml")
    return promtool_run(promtool, "test", "rules", "alerts_test.yaml", cwd=workdir)


def test_promtool_check_rules(promtool: Path, rule: dict[str, Any], tmp_path: Path) -> None:
    write_rules(tmp_path / "rules.yaml", rule)
    proc = promtool_run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests(promtool: Path, rule: dict[str, Any], tmp_path: Path) -> None:
    proc = unit_test(promtool, rule, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_unit_tested(rule: dict[str, Any]) -> None:
    tested = {
        t["alertname"]
        for case in yaml.safe_load((HERE / "alerts_test.yaml").read_text())["tests"]
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts - tested == set()


def test_alerts_have_severity_summary_and_runbook(rule: dict[str, Any]) -> None:
    runbook = (dc.ROOT / "docs" / "runbook.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, re.M)
    }
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
            assert r["annotations"]["summary"], r["alert"]
            anchor = r["annotations"]["runbook_url"].rsplit("#", 1)[1]
            assert anchor == r["alert"].lower() and anchor in anchors, (
                f"{r['alert']}: no runbook entry #{anchor}"
            )


def unwatched_services(render: dc.Render, rule: dict[str, Any]) -> set[str]:
    """The Services a ServiceMonitor scrapes that FlywheelServiceDown's `service=~` selector misses
    (`up` carries the Service's name as its `service` label)."""
    (expr,) = [
        r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "FlywheelServiceDown"
    ]
    match = re.search(r'service=~"([^"]+)"', expr)
    assert match, expr
    scraped = {
        service["metadata"]["name"]
        for monitor in render.of_kind("ServiceMonitor")
        for service in render.of_kind("Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    }
    assert scraped, "no ServiceMonitor selects a Service"
    return {name for name in scraped if not re.fullmatch(match[1], name)}


def test_service_down_watches_every_scraped_service(renders: dict[str, dc.Render]) -> None:
    """A service with a ServiceMonitor that the alert's selector misses goes down unnoticed (the
    gateway did until issue 13)."""
    assert len(renders[SCENARIO].of_kind("ServiceMonitor")) == len(dc.SERVICES)
    for name in dc.SCENARIOS:
        for rule in renders[name].of_kind("PrometheusRule"):
            assert unwatched_services(renders[name], rule) == set(), name


# ---------------------------------------------------------------- each check fails on a broken input


def test_a_service_the_alert_misses_is_caught(rule: dict[str, Any], renders: dict[str, dc.Render]) -> None:
    broken = copy.deepcopy(rule)
    for g in broken["spec"]["groups"]:
        for r in g["rules"]:
            r["expr"] = r["expr"].replace("(gateway|", "(")
    assert unwatched_services(renders[SCENARIO], broken) == {"fw-flywheel-gateway"}


def test_typo_in_a_rule_metric_is_caught(promtool: Path, rule: dict[str, Any], tmp_path: Path) -> None:
    broken = copy.deepcopy(rule)
    for g in broken["spec"]["groups"]:
        for r in g["rules"]:
            r["expr"] = r["expr"].replace(
                "flywheel_inference_request_duration_seconds", "flywheel_inference_request_duraton_seconds"
            )
    # The metric check finds the name nowhere in the code ...
    exposed = dc.exposed_metrics(dc.source_files())
    used = {m for e in dc.rule_exprs(broken) for m in dc.metrics_in_expr(e)}
    assert "flywheel_inference_request_duraton_seconds_bucket" in dc.missing_metrics(used, exposed)
    # ... and the unit test of that alert fails (it never fires).
    proc = unit_test(promtool, broken, tmp_path)
    assert proc.returncode != 0
    assert "FlywheelInferenceLatencyHigh" in proc.stdout + proc.stderr


def test_promtool_check_catches_a_bad_expression(
    promtool: Path, rule: dict[str, Any], tmp_path: Path
) -> None:
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["expr"] = "sum(rate(flywheel_grpc_requests_total[5m]) > "
    write_rules(tmp_path / "rules.yaml", broken)
    proc = promtool_run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode != 0
