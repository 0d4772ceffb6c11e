"""A real Prometheus on the local stack: every dashboard query has data, every alert rule evaluates,
and breaking the trainer, the broker or the gateway makes the matching alert go pending."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from flywheel_cli.local.prometheus import (
    NAMESPACE,
    LocalPrometheus,
    PrometheusOptions,
    chart_rule_groups,
    find_tool,
)
from flywheel_cli.local.stack import LocalStack, StackConfig
from flywheel_common.files import repo_root
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2, feedback_pb2_grpc

# The dashboards' queries are read by the deploy checks' own code (tests/deploy).
sys.path.insert(0, str(repo_root() / "tests" / "deploy"))
import flywheel_deploy_checks as dc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATASET = repo_root() / "datasets" / "python-faq"
DASHBOARDS = sorted((dc.CHART / "dashboards").glob("*.json"))
# Grafana's $__rate_interval is at least four scrape intervals; a minute covers the whole test's traffic.
RATE_INTERVAL = "1m"
# Dashboard series that only something this short test does not do can fill, each with the reason
# (the test fails when one of them has data: then it belongs off the list).
NEEDS_MORE_THAN_THIS_TEST = {
    "flywheel_trainer_training_loss": "set when a training job finishes; the test trains nothing",
}
# Alerts a healthy stack may raise here: the chart's latency SLOs are a production node's, and two
# shared cores answer slower (the p95 measured here was 14 s against the 4 s SLO).
SLOW_MACHINE_ALERTS = {"FlywheelInferenceLatencyHigh", "FlywheelTimeToFirstTokenHigh"}
QUESTIONS = ("What is this page about?", "Who is it written for?", "What does it say first?")


def _tools() -> None:
    for name in ("prometheus", "helm"):
        if find_tool(name) is None:
            pytest.skip(f"{name} is not installed: run scripts/install-deploy-tools")


def _helm() -> Path:
    helm = find_tool("helm")
    assert helm is not None
    return helm


def _env() -> dict[str, dict[str, str]]:
    """Short answers; a golden set of four questions, so the evaluator's idle evaluation of production
    finishes within the test; no canary."""
    return {
        "inference": {"FLYWHEEL_INFERENCE_LIMITS__DEFAULT_MAX_NEW_TOKENS": "16"},
        "evaluator": {
            "FLYWHEEL_EVALUATOR_GOLDEN__LIMIT": "4",
            "FLYWHEEL_EVALUATOR_EVALUATION__MAX_NEW_TOKENS": "16",
            "FLYWHEEL_EVALUATOR_CANARY__ENABLED": "false",
        },
    }


@pytest.fixture
def observed(tmp_path: Path) -> Iterator[LocalStack]:
    """The stack with a broker of its own (the test stops it) and Prometheus scraping every second."""
    _tools()
    config = StackConfig(
        var_dir=tmp_path / "var",
        dataset=DATASET,
        free_ports=True,
        service_env=_env(),
        observe=PrometheusOptions(scrape_interval_s=1.0, evaluation_interval_s=1.0),
    )
    with LocalStack(config) as stack:
        yield stack


def _prometheus(stack: LocalStack) -> LocalPrometheus:
    assert stack.prometheus is not None
    return stack.prometheus


def _sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def _ask(client: httpx.Client, question: str) -> dict[str, Any]:
    """A question through the gateway, as the widget asks it; the answer's `meta` event."""
    page = {"url": "https://example.test/page", "html": (DATASET / "pages" / "general.html").read_text()}
    reply = client.post(
        "/api/v1/answers", json={"question": question, "page": page}, headers={"origin": str(client.base_url)}
    )
    assert reply.status_code == 200, reply.text
    events = _sse(reply.text)
    assert events[-1][0] == "done", events
    return next(data for event, data in events if event == "meta")


def _rate(client: httpx.Client, meta: dict[str, Any], rating: int) -> httpx.Response:
    body = {"query_id": meta["query_id"], "ticket": meta["ticket"], "rating": rating}
    return client.post("/api/v1/feedback", json=body, headers={"origin": str(client.base_url)})


def _reject_one_rating(feedback_target: str) -> None:
    with grpc.insecure_channel(feedback_target) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.SubmitFeedback(
                feedback_pb2.SubmitFeedbackRequest(query_id="never-given", idempotency_key="k1", rating=3),
                metadata=(("authorization", "Bearer dev-user-token"),),
                timeout=30,
            )


def _dashboard_queries() -> list[tuple[str, str]]:
    """(dashboard, PromQL) for every panel and variable query, Grafana's variables filled in."""
    queries = []
    for path in DASHBOARDS:
        for expr in dc.dashboard_exprs(json.loads(path.read_text())):
            variable = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr)
            if variable:
                # Grafana's label_values(metric, label): the values of `label` on `metric`'s series.
                expr = f"count by ({variable[2]}) ({variable[1]})"
            expr = expr.replace("$namespace", NAMESPACE).replace("$__rate_interval", RATE_INTERVAL)
            queries.append((path.name, expr))
    return queries


def _alert(prometheus: LocalPrometheus, name: str, **labels: str) -> str | None:
    """The state (pending, firing) of the alert `name` with these labels; None when inactive."""
    for alert in prometheus.alerts():
        if alert["labels"]["alertname"] == name and labels.items() <= alert["labels"].items():
            return str(alert["state"])
    return None


def test_dashboards_have_data_alerts_evaluate_and_fire(
    observed: LocalStack, wait_until: Callable[..., bool]
) -> None:
    prometheus = _prometheus(observed)
    assert observed.gateway_url is not None
    client = httpx.Client(base_url=observed.gateway_url, timeout=120)
    # A visitor asks three questions and rates two answers (the third is rated once the broker is gone);
    # a request from no page is refused; the feedback service refuses a rating of an unknown answer.
    answers = [_ask(client, question) for question in QUESTIONS]
    for meta, rating in zip(answers[:2], (5, 2), strict=True):
        assert _rate(client, meta, rating).status_code == 200
    assert client.post("/api/v1/answers", json={"question": "?"}).status_code == 403
    _reject_one_rating(observed.targets["feedback"])

    # Every service is a healthy target, labelled as the ServiceMonitors label it in a cluster.
    # Prometheus applies discovered targets at most every 5 s and scrapes them after that, so a fast
    # start may not list them, or know their health, yet.
    jobs = {s.spec.name for s in observed.running}

    def scraped() -> list[dict[str, Any]]:
        return prometheus.api("targets")["activeTargets"]

    wait_until(lambda: {t["labels"]["job"] for t in scraped() if t["health"] != "unknown"} == jobs, 60, 0.5)
    targets = scraped()
    assert {t["labels"]["job"] for t in targets} == jobs
    assert all(t["health"] == "up" for t in targets), [(t["labels"]["job"], t["lastError"]) for t in targets]

    # Every query parses; every dashboard series fills once the traffic reached the services (the
    # trainer and evaluator consume it from Kafka, the evaluator evaluates production while idle).
    queries = _dashboard_queries()
    for _, expr in queries:
        prometheus.query(expr)  # PrometheusError (bad_data) when it does not parse
    later = [(n, e) for n, e in queries if dc.metrics_in_expr(e) & set(NEEDS_MORE_THAN_THIS_TEST)]
    expected = [q for q in queries if q not in later]

    def empty() -> list[tuple[str, str]]:
        return [(name, expr) for name, expr in expected if not prometheus.query(expr)]

    missing = [] if wait_until(lambda: not empty(), 240, 1.0) else empty()
    assert not missing, "dashboard queries without data:\n" + "\n".join(f"{n}: {e}" for n, e in missing)
    for _, expr in later:
        assert not prometheus.query(expr), f"{expr} has data now: take it off NEEDS_MORE_THAN_THIS_TEST"

    # The chart's rules all load, evaluate without error, and stay quiet on a healthy stack (but for
    # the latency SLOs on this slow machine).
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    chart = [r for g in chart_rule_groups(_helm()) for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in chart)
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    for rule in chart:
        prometheus.query(rule["expr"])
    assert {a["labels"]["alertname"] for a in prometheus.alerts()} <= SLOW_MACHINE_ALERTS

    # Breaking things: the trainer stops -> FlywheelServiceDown goes pending for it.
    trainer = next(s for s in observed.running if s.spec.name == "trainer")
    trainer.process.terminate()
    trainer.process.wait(60)
    assert wait_until(
        lambda: _alert(prometheus, "FlywheelServiceDown", service="flywheel-trainer") == "pending", 60, 1.0
    )
    assert _alert(prometheus, "FlywheelServiceDown", service="flywheel-inference") is None

    # The broker goes away -> a rating cannot be stored -> FlywheelFeedbackProduceFailures pending.
    assert observed.broker is not None
    observed.broker.stop(kill=True)
    failed = _rate(client, answers[2], 4)
    assert failed.status_code == 503, failed.text
    assert wait_until(lambda: _alert(prometheus, "FlywheelFeedbackProduceFailures") == "pending", 60, 1.0)
    client.close()

    # The gateway stops -> FlywheelServiceDown goes pending for it too (its selector once missed it).
    gateway = next(s for s in observed.running if s.spec.name == "gateway")
    gateway.process.terminate()
    gateway.process.wait(60)
    assert wait_until(
        lambda: _alert(prometheus, "FlywheelServiceDown", service="flywheel-gateway") == "pending", 60, 1.0
    )
