"""The example policy: corrections supervise, high ratings keep the answer, low ones are negatives."""

from __future__ import annotations

from typing import Any

from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_trainer.policy import ExamplePolicy, FeedbackSignal, Source
from flywheel_trainer.settings import PolicySettings

POLICY = ExamplePolicy(PolicySettings(positive_roles=["user", "expert", "admin"]))


def test_expert_correction_is_supervised(ev: Any) -> None:
    assert POLICY.decide(ev.correction(1), "answer").source is Source.CORRECTION


def test_correction_from_an_untrusted_role_or_empty_is_dropped(ev: Any) -> None:
    assert POLICY.decide(ev.correction(1, role=events_pb2.REVIEWER_ROLE_USER), "a").source is None
    assert POLICY.decide(ev.correction(1, text="   "), "a").source is None
    long = ev.correction(1, text="x" * 3000)
    assert POLICY.decide(long, "a").source is None


def test_ratings_map_to_positive_negative_or_nothing(ev: Any) -> None:
    assert POLICY.decide(ev.rating(1, 5), "a fine answer").source is Source.POSITIVE
    assert POLICY.decide(ev.rating(1, 4), "a fine answer").source is Source.POSITIVE
    assert POLICY.decide(ev.rating(1, 3), "a fine answer").source is None
    assert POLICY.decide(ev.rating(1, 2), "a bad answer").source is Source.NEGATIVE
    assert POLICY.decide(ev.rating(1, 1), "a bad answer").source is Source.NEGATIVE
    assert POLICY.decide(ev.thumbs(1, True), "a fine answer").source is Source.POSITIVE
    assert POLICY.decide(ev.thumbs(1, False), "a bad answer").source is Source.NEGATIVE


def test_positive_needs_an_answer_and_can_be_disabled(ev: Any) -> None:
    assert POLICY.decide(ev.rating(1, 5), "  ").source is None
    off = ExamplePolicy(PolicySettings(use_positives=False))
    assert off.decide(ev.rating(1, 5), "fine").source is None


def test_visitors_positives_are_left_out_unless_the_deployment_trusts_them(ev: Any) -> None:
    """A visitor's sessions are free and the page is theirs: by default only reviewers' high
    ratings keep an answer; a visitor's low rating is still a negative."""
    default = ExamplePolicy(PolicySettings())
    assert default.decide(ev.rating(1, 5), "fine").source is None
    assert default.decide(ev.rating(1, 1), "bad").source is Source.NEGATIVE
    expert = ev.thumbs(1, True, role=events_pb2.REVIEWER_ROLE_EXPERT)
    assert default.decide(expert, "fine").source is Source.POSITIVE


def test_comments_and_ignored_are_no_examples() -> None:
    for kind in (events_pb2.FEEDBACK_KIND_COMMENT, events_pb2.FEEDBACK_KIND_IGNORED):
        assert POLICY.decide(FeedbackSignal("f", "q", kind, 0, "text", 1), "a").source is None
