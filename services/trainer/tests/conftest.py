"""Fixtures of the trainer's unit tests: event builders, a store on a settable clock, a registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel_common.registry import ModelRegistry
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_trainer.policy import ExamplePolicy, FeedbackSignal
from flywheel_trainer.settings import PolicySettings
from flywheel_trainer.store import JoinStore


class Clock:
    """A settable clock."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Events:
    """Builders of the events the tests feed the store (the `ev` fixture)."""

    @staticmethod
    def interaction(
        i: int, answer: str = "I am not sure.", *, question: str = "", session: str = ""
    ) -> events_pb2.Interaction:
        return events_pb2.Interaction(
            query_id=f"q{i}",
            page_title=f"Page {i}",
            question=question or f"What is item {i}?",
            answer=answer,
            passages=[f"Item {i} is a thing.", "Other text."],
            model_version="v1",
            session_pseudonym=session or f"s{i}",
        )

    @staticmethod
    def correction(
        i: int, text: str = "", *, fid: str = "", role: int = events_pb2.REVIEWER_ROLE_EXPERT
    ) -> FeedbackSignal:
        return FeedbackSignal(
            feedback_id=fid or f"fc{i}",
            query_id=f"q{i}",
            kind=events_pb2.FEEDBACK_KIND_CORRECTION,
            value=0,
            text=text or f"Item {i} is a thing.",
            role=role,
        )

    @staticmethod
    def rating(i: int, value: int, *, fid: str = "", session: str = "") -> FeedbackSignal:
        return FeedbackSignal(
            feedback_id=fid or f"fr{i}-{value}",
            query_id=f"q{i}",
            kind=events_pb2.FEEDBACK_KIND_RATING,
            value=value,
            text="",
            role=events_pb2.REVIEWER_ROLE_USER,
            session=session or f"s{i}",
        )

    @staticmethod
    def thumbs(
        i: int, up: bool, *, fid: str = "", session: str = "", role: int = events_pb2.REVIEWER_ROLE_USER
    ) -> FeedbackSignal:
        kind = events_pb2.FEEDBACK_KIND_THUMBS
        return FeedbackSignal(fid or f"ft{i}", f"q{i}", kind, 1 if up else -1, "", role, session or f"s{i}")


@pytest.fixture
def ev() -> type[Events]:
    return Events


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[JoinStore]:
    # Any single positive, a visitor's too, trains here; the agreement rule and the roles have
    # tests of their own (test_store.py, test_policy.py).
    policy = ExamplePolicy(
        PolicySettings(positive_min_sessions=1, positive_roles=["user", "expert", "admin"])
    )
    s = JoinStore(tmp_path / "trainer.sqlite3", policy, clock=clock)
    yield s
    s.close()


def fake_model_dir(path: Path) -> Path:
    """A folder the registry accepts as a model (no real weights)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(b"not really onnx")
    return path


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    """A registry with v1 (a stand-in base) in production."""
    reg = ModelRegistry(tmp_path / "artifacts")
    v1 = reg.register(fake_model_dir(tmp_path / "base"), kind="base")
    reg.set_production(v1.version)
    return reg
