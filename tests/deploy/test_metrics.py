"""Every metric the dashboards and alerts query exists in the services' code; dashboards are well formed."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import flywheel_deploy_checks as dc
import pytest
import yaml

DASHBOARDS = sorted((dc.CHART / "dashboards").glob("*.json"))
# Series Prometheus makes itself, not the code.
PROMETHEUS_SERIES = {"up"}


def used_metrics() -> dict[str, set[str]]:
    """Metric -> where it is queried (dashboard files, and the alert rule template)."""
    used: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        for expr in dc.dashboard_exprs(json.loads(path.read_text())):
            for m in dc.metrics_in_expr(expr):
                used.setdefault(m, set()).add(path.name)
    rules = (dc.CHART / "templates" / "observability" / "prometheusrule.yaml").read_text()
    for m in dc.metrics_in_expr(rules):
        used.setdefault(m, set()).add("prometheusrule.yaml")
    return used


USED = used_metrics()


@pytest.fixture(scope="module")
def exposed() -> dict[str, Path]:
    return dc.exposed_metrics(dc.source_files())


@pytest.mark.parametrize("metric", sorted(USED))
def test_queried_metric_exists_in_code(metric: str, exposed: dict[str, Path]) -> None:
    if metric in exposed:
        return
    svc = dc.owning_service(metric)
    if svc and not dc.service_exists(svc):
        pytest.skip(f"pending: services/{svc} is not written yet ({metric}, used in {sorted(USED[metric])})")
    pytest.fail(f"{metric} (used in {sorted(USED[metric])}) is defined nowhere under libs/ or services/")


def test_rendered_rules_query_only_known_metrics(renders: dict[str, dc.Render]) -> None:
    """The rendered rules name the same metrics as the template (nothing hidden behind values)."""
    for name in dc.SCENARIOS:
        for doc in renders[name].of_kind("PrometheusRule"):
            for expr in dc.rule_exprs(doc):
                assert dc.metrics_in_expr(expr) <= set(USED), expr


def test_metric_scan_understands_prometheus_client(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "from prometheus_client import Counter, Gauge, Histogram\n"
        "import prometheus_client as pc\n"
        "A = Counter('flywheel_a_total', 'a')\n"
        "B = pc.Histogram('flywheel_b_seconds', 'b', ['x'])\n"
        "C = Gauge(name='flywheel_c', documentation='c')\n"
        "D = Counter('requests', 'd', namespace='flywheel', subsystem='d')\n"
    )
    exposed = dc.exposed_metrics([src])
    assert {
        "flywheel_a_total",
        "flywheel_b_seconds_bucket",
        "flywheel_b_seconds_count",
        "flywheel_c",
        "flywheel_d_requests_total",
    } <= set(exposed)
    assert "flywheel_a_total_total" not in exposed
    assert dc.missing_metrics({"flywheel_b_seconds_buckett", "flywheel_c"}, exposed) == [
        "flywheel_b_seconds_buckett"
    ]


def counter_selections(expr: str) -> set[tuple[str, str, str]]:
    """(counter, label, value) for each `flywheel_..._total{label="value"}` matcher but the namespace."""
    found = set()
    for metric, matchers in re.findall(r"\b(flywheel_\w+_total)\{([^}]*)\}", expr):
        for label, value in re.findall(r'(\w+)\s*=\s*"([^"]*)"', matchers):
            if label != "namespace":
                found.add((metric, label, value))
    return found


def initial_series(metric: str, exposed: dict[str, Path]) -> list[dict[str, str]]:
    """The label sets `metric` has as soon as the module defining it is imported."""
    from prometheus_client import REGISTRY

    path = exposed[metric]
    package = path.parts[path.parts.index("src") + 1 :]
    importlib.import_module(".".join((*package[:-1], path.stem)))
    return [s.labels for family in REGISTRY.collect() for s in family.samples if s.name == metric]


def test_counters_alerts_select_by_label_start_at_zero(
    renders: dict[str, dc.Render], exposed: dict[str, Path]
) -> None:
    """A counter whose first series appears at 1 has not increased for Prometheus, so an alert on
    `increase(x_total{state="failed"}[1h]) > 0` would miss the first failure (promtool's unit tests
    feed it from 0, and a real Prometheus showed the difference)."""
    (rule,) = renders["gpu-values.yaml"].of_kind("PrometheusRule")
    selections = {s for expr in dc.rule_exprs(rule) for s in counter_selections(expr)}
    assert ("flywheel_trainer_jobs_total", "state", "failed") in selections
    for metric, label, value in sorted(selections):
        series = initial_series(metric, exposed)
        assert any(s.get(label) == value for s in series), (
            f"{metric}{{{label}={value!r}}} is not at 0 from the start: with_label_values() in the code"
        )


def test_counter_selection_scan() -> None:
    expr = (
        'sum(increase(flywheel_a_total{namespace="x", state="failed", code=~"A|B"}[1h]))'
        ' / flywheel_b_total{k!="v"}'
    )
    assert counter_selections(expr) == {("flywheel_a_total", "state", "failed")}


def test_dashboard_queries_are_promql_only() -> None:
    exprs = [e for path in DASHBOARDS for e in dc.dashboard_exprs(json.loads(path.read_text()))]
    assert "prometheus" not in exprs  # the datasource variable's plugin id
    assert "label_values(flywheel_grpc_requests_total, namespace)" in exprs


def test_error_ratio_is_zero_not_empty_without_errors(promtool: Path, tmp_path: Path) -> None:
    """With no failed call the error-ratio panel shows 0 per service, not "No data": a real
    Prometheus found the bare ratio empty (its numerator has no series until a call fails)."""
    (expr,) = [
        e for path in DASHBOARDS for e in dc.dashboard_exprs(json.loads(path.read_text())) if "code=~" in e
    ]
    expr = expr.replace("$namespace", "flywheel").replace("$__rate_interval", "5m")
    series = 'flywheel_grpc_requests_total{{namespace="flywheel", service="{}", method="M", code="{}"}}'
    case = {
        "interval": "1m",
        "input_series": [
            {"series": series.format("healthy", "OK"), "values": "0+60x10"},
            {"series": series.format("failing", "OK"), "values": "0+30x10"},
            {"series": series.format("failing", "INTERNAL"), "values": "0+30x10"},
        ],
        "promql_expr_test": [
            {
                "expr": expr,
                "eval_time": "10m",
                "exp_samples": [
                    {"labels": '{service="healthy"}', "value": 0},
                    {"labels": '{service="failing"}', "value": 0.5},
                ],
            }
        ],
    }
    (tmp_path / "ratio_test.yaml").write_text(yaml.safe_dump({"tests": [case]}))
    proc = subprocess.run(
        [str(promtool), "test", "rules", "ratio_test.yaml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path) -> None:
    d: dict[str, Any] = json.loads(path.read_text())
    assert d["uid"].startswith("flywheel-") and d["title"].startswith("Flywheel / ")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert 'namespace=~"$namespace"' in t["expr"], f"{p['title']}: {t['expr']}"


def test_dashboards_are_configmaps_for_the_sidecar(renders: dict[str, dc.Render]) -> None:
    cms = [
        d for d in renders["gpu-values.yaml"].of_kind("ConfigMap") if "-dashboard-" in d["metadata"]["name"]
    ]
    assert {k for cm in cms for k in cm["data"]} == {p.name for p in DASHBOARDS}
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "Flywheel"
        for text in cm["data"].values():
            json.loads(text)
