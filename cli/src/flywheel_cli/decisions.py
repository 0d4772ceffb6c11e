"""The evaluator's decisions for people and JSON: one reading shared by `rollout` and the simulation."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2
from flywheel_proto.flywheel.events.v1 import events_pb2


def action_name(action: events_pb2.DecisionAction.ValueType) -> str:
    """`DECISION_ACTION_CANARY_PROMOTE` as `canary_promote` (the name the registry records)."""
    return events_pb2.DecisionAction.Name(action).removeprefix("DECISION_ACTION_").lower()


def timestamp(ts: Any) -> str | None:
    """A protobuf Timestamp as ISO 8601 in UTC (None when unset)."""
    return ts.ToDatetime(tzinfo=dt.UTC).isoformat(timespec="seconds") if ts.seconds else None


def decision_json(decision: evaluator_pb2.Decision) -> dict[str, Any]:
    """A decision as a JSON object."""
    return {
        "decision_id": decision.decision_id,
        "version": decision.version,
        "baseline_version": decision.baseline_version,
        "passed": decision.passed,
        "action": action_name(decision.action),
        "reasons": list(decision.reasons),
        "metrics": dict(decision.metrics),
        "created_at": timestamp(decision.created_at),
    }
