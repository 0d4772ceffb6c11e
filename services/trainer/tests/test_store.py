"""The join store: joins, waiting feedback, duplicates, the policy's bookkeeping, batches, retention."""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any

import pytest

from flywheel_common.query_ids import QueryIdSigner
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_trainer.policy import ExamplePolicy, FeedbackSignal
from flywheel_trainer.settings import PolicySettings
from flywheel_trainer.store import FAILED, QUEUED, JoinStore, NeedsNoReview, ReviewReason


def test_feedback_joins_its_interaction_in_either_order(store: JoinStore, ev: Any) -> None:
    r1 = store.ingest([ev.interaction(1)], [ev.correction(1)])
    assert r1.examples == {"correction": 1}
    r2 = store.ingest([], [ev.correction(2)])
    assert not r2.examples
    assert store.counts()["feedback.waiting"] == 1
    r3 = store.ingest([ev.interaction(2)], [])
    assert r3.examples == {"correction": 1}
    assert store.counts()["feedback.waiting"] == 0


def test_redelivered_events_change_nothing(store: JoinStore, ev: Any) -> None:
    batch = ([ev.interaction(1), ev.interaction(2)], [ev.correction(1), ev.rating(2, 5)])
    first = store.ingest(*batch)
    assert first.examples == {"correction": 1, "positive": 1}
    again = store.ingest(*batch)
    assert not again.examples
    assert again.duplicates == 4
    assert store.counts()["examples"] == 2


def test_correction_supersedes_a_pending_positive_and_blocks_later_ones(store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.rating(1, 5)])
    assert store.counts()["examples.positive"] == 1
    store.ingest([], [ev.correction(1)])
    counts = store.counts()
    assert counts["examples.correction"] == 1 and "examples.positive" not in counts
    later = store.ingest([], [ev.rating(1, 4, fid="another")])
    assert not later.examples


def test_one_positive_and_one_negative_per_answer(store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.rating(1, 5), ev.thumbs(1, True)])
    store.ingest([ev.interaction(2)], [ev.rating(2, 1), ev.thumbs(2, False)])
    counts = store.counts()
    assert counts["examples.positive"] == 1
    assert counts["examples.negative"] == 1


def test_examples_carry_the_interaction_and_the_redacted_correction(store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(7, answer="wrong")], [ev.correction(7, "Item 7 is [EMAIL].")])
    cut = store.cut(max_examples=10, reason="manual")
    assert cut is not None
    (row,) = store.dataset_rows(cut.dataset_id)
    assert row["answer"] == "Item 7 is [EMAIL]."
    assert row["model_answer"] == "wrong"
    assert row["passages"] == ["Item 7 is a thing.", "Other text."]
    assert row["question"] == "What is item 7?"
    assert row["page_title"] == "Page 7"
    assert not any("pseudonym" in key for key in row)


def test_cut_takes_the_oldest_n_and_every_negative_once(store: JoinStore, ev: Any) -> None:
    for i in range(5):
        store.ingest([ev.interaction(i)], [ev.correction(i)])
    store.ingest([ev.interaction(9)], [ev.rating(9, 1)])
    pending = store.pending()
    assert (pending.examples, pending.negatives) == (5, 1)
    first = store.cut(max_examples=3, reason="size")
    assert first is not None and (first.examples, first.negatives) == (3, 1)
    assert [r["query_id"] for r in store.dataset_rows(first.dataset_id) if r["source"] == "correction"] == [
        "q0",
        "q1",
        "q2",
    ]
    second = store.cut(max_examples=3, reason="manual")
    assert second is not None and (second.examples, second.negatives) == (2, 0)
    assert store.cut(max_examples=3, reason="manual") is None
    ids = [r["id"] for d in (first, second) for r in store.dataset_rows(d.dataset_id)]
    assert len(ids) == len(set(ids)) == 6
    jobs = store.jobs()
    assert {j.dataset_id for j in jobs} == {first.dataset_id, second.dataset_id}
    assert all(j.state == QUEUED for j in jobs)


def test_negatives_alone_cut_no_batch(store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.rating(1, 1)])
    assert store.cut(max_examples=10, reason="manual") is None


def test_a_dataset_has_exactly_one_job(store: JoinStore, ev: Any) -> None:
    import sqlite3

    store.ingest([ev.interaction(1)], [ev.correction(1)])
    cut = store.cut(max_examples=10, reason="manual")
    assert cut is not None
    with pytest.raises(sqlite3.IntegrityError), store._tx() as db:
        db.execute(
            "INSERT INTO jobs (job_id, dataset_id, state, examples, created_at) VALUES ('x', ?, ?, 1, 0)",
            (cut.dataset_id, QUEUED),
        )


def test_update_job_checks_states_and_fields(store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.correction(1)])
    cut = store.cut(max_examples=10, reason="manual")
    assert cut is not None
    job = store.update_job(cut.job_id, state=FAILED, reason="because")
    assert (job.state, job.reason) == (FAILED, "because")
    with pytest.raises(ValueError):
        store.update_job(cut.job_id, state="exploded")
    with pytest.raises(ValueError):
        store.update_job(cut.job_id, dataset_id="other")


def test_retention_forgets_old_rows_but_keeps_waiting_examples(store: JoinStore, ev: Any, clock: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.correction(1)])
    store.ingest([ev.interaction(2)], [ev.correction(2)])
    cut = store.cut(max_examples=1, reason="manual")
    assert cut is not None
    store.mark_written(cut.dataset_id, "abc")
    store.ingest([], [ev.correction(3)])  # waits for an interaction that never comes
    clock.now += 100
    purged = store.purge(retention_s=50)
    # The correction that never met its interaction is counted as unjoined.
    assert purged == {
        "unjoined": 1,
        "interactions": 2,
        "feedback": 3,
        "positive_votes": 0,
        "examples": 1,
        "review_claims": 0,
    }
    assert store.pending().examples == 1  # q2, not yet in a dataset


def test_forget_finds_a_waiting_example_the_retention_purge_left(
    store: JoinStore, ev: Any, clock: Any
) -> None:
    session = "a" * 32
    asked = ev.interaction(1, session=session)
    asked.query_id = QueryIdSigner(b"q" * 16).issue("v1", session)
    # An expert's correction: its own pseudonym is the expert's, its query id names the asker.
    store.ingest([asked], [dataclasses.replace(ev.correction(1), query_id=asked.query_id, session="expert")])
    clock.now += 100
    store.purge(retention_s=50)
    assert store.counts()["interactions"] == store.counts()["feedback"] == 0
    assert store.pending().examples == 1  # the example waits for a batch, whatever its age

    forgotten = store.forget(session)
    assert forgotten.examples == 1 and asked.query_id in forgotten.query_ids
    assert store.cut(max_examples=10, reason="manual") is None


def test_purge_removes_claims_that_ended_or_whose_answer_it_purged(
    store: JoinStore, ev: Any, clock: Any
) -> None:
    """A claim's query id names the asker's session and network: it must not outlive its answer."""
    signer = QueryIdSigner(b"q" * 16)
    asked = []
    for i in (1, 2, 3):
        event = ev.interaction(i, session=f"{i}" * 32)
        event.query_id = signer.issue("v1", event.session_pseudonym, "e" * 32, now=clock.now)
        asked.append(event)
    low = [dataclasses.replace(ev.rating(i, 1), query_id=e.query_id) for i, e in enumerate(asked, 1)]
    store.ingest(asked[:2], low[:2])
    clock.now += 100
    store.ingest(asked[2:], low[2:])
    assert store.claim(asked[1].query_id, "bob", ttl_s=10**6)
    assert store.claim(asked[2].query_id, "carol", ttl_s=10**6)
    assert store.claim(asked[0].query_id, "alice", ttl_s=60)
    clock.now += 100  # alice's claim has ended (and no claim since removed it); bob's and carol's hold

    def claimers() -> list[str]:
        return [r["claimer"] for r in store._query("SELECT claimer FROM review_claims ORDER BY claimer")]

    assert store.purge(retention_s=1000)["review_claims"] == 1
    assert claimers() == ["bob", "carol"]
    # q1 and q2 are purged: bob's claim, still running, goes with its answer.
    assert store.purge(retention_s=150)["review_claims"] == 1
    assert claimers() == ["carol"]
    store.purge(retention_s=50)
    assert claimers() == []


def test_forget_removes_a_claim_that_outlived_its_answer(store: JoinStore, ev: Any, clock: Any) -> None:
    session = "a" * 32
    asked = ev.interaction(1, session=session)
    asked.query_id = QueryIdSigner(b"q" * 16).issue("v1", session, "e" * 32, now=clock.now)
    comment = FeedbackSignal(
        "fm1",
        asked.query_id,
        events_pb2.FEEDBACK_KIND_COMMENT,
        0,
        "Wrong.",
        events_pb2.REVIEWER_ROLE_USER,
        session,
    )
    store.ingest([asked], [comment])  # a comment makes no example: nothing else names the answer
    assert store.claim(asked.query_id, "alice", ttl_s=60)
    # What a purge before claims were purged too left: the claim, without its answer or feedback.
    with store._tx() as db:
        db.execute("DELETE FROM interactions")
        db.execute("DELETE FROM feedback")
    store.forget(session)
    assert not store._query("SELECT * FROM review_claims")


def test_forgetting_a_reviewer_keeps_the_answers_they_reviewed(store: JoinStore, ev: Any) -> None:
    """An expert's pseudonym forgotten takes their corrections and what those made, not the visitors'
    answers they corrected, nor the visitors' own votes on them."""
    visitor, expert = "b" * 32, "e" * 32
    corrected = FeedbackSignal(
        "fc1",
        "q1",
        events_pb2.FEEDBACK_KIND_CORRECTION,
        0,
        "Item 1 is a thing.",
        events_pb2.REVIEWER_ROLE_EXPERT,
        expert,
    )
    store.ingest(
        [ev.interaction(1, session=visitor), ev.interaction(2, session=visitor)],
        [ev.rating(1, 1, session=visitor), corrected, ev.rating(2, 5, session=visitor)],
    )
    assert store.counts()["examples"] == 3  # q1's negative and correction, q2's positive

    forgotten = store.forget(expert)

    assert (forgotten.interactions, forgotten.feedback, forgotten.examples) == (0, 1, 1)
    assert forgotten.query_ids == frozenset() and forgotten.example_ids == {"c-fc1"}
    assert store.counts()["interactions"] == 2
    left = store._query("SELECT feedback_id, session FROM feedback ORDER BY feedback_id")
    assert [(r["feedback_id"], r["session"]) for r in left] == [("fr1-1", visitor), ("fr2-5", visitor)]
    assert sorted(r["example_id"] for r in store._query("SELECT example_id FROM examples")) == [
        "n-q1",
        "p-q2",
    ]


def test_reads_go_on_while_a_write_holds_the_store(store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.correction(1)])
    read: queue.Queue[int] = queue.Queue()
    # A long write: a forget's VACUUM holds the store for seconds on a large file (1.2 s at 85 MB),
    # and the RPCs read it on the event loop.
    with store._tx() as db:
        db.execute("DELETE FROM interactions")
        threading.Thread(target=lambda: read.put(store.counts()["interactions"]), daemon=True).start()
        assert read.get(timeout=5) == 1  # what was committed before the read
    assert store.counts()["interactions"] == 0


def test_the_store_survives_a_reopen(tmp_path: Any, ev: Any) -> None:
    from flywheel_trainer.policy import ExamplePolicy
    from flywheel_trainer.settings import PolicySettings

    path = tmp_path / "s.sqlite3"
    s1 = JoinStore(path, ExamplePolicy(PolicySettings()))
    s1.ingest([ev.interaction(1)], [ev.correction(1), ev.correction(2)])
    s1.close()
    s2 = JoinStore(path, ExamplePolicy(PolicySettings()))
    assert s2.ingest([ev.interaction(2)], []).examples == {"correction": 1}
    assert s2.ingest([ev.interaction(1)], [ev.correction(1)]).duplicates == 2
    assert s2.counts()["examples"] == 2
    s2.close()


def _comment(i: int, text: str) -> FeedbackSignal:
    kind, role = events_pb2.FEEDBACK_KIND_COMMENT, events_pb2.REVIEWER_ROLE_USER
    return FeedbackSignal(f"fm{i}", f"q{i}", kind, 0, text, role)


def test_review_queue_holds_answers_that_need_an_expert(store: JoinStore, ev: Any, clock: Any) -> None:
    store.ingest([ev.interaction(i) for i in range(1, 7)], [])
    clock.now += 1
    store.ingest([], [ev.rating(1, 1)])
    clock.now += 1
    store.ingest([], [ev.thumbs(2, False), ev.rating(3, 5), _comment(4, "Wrong year.")])
    items = store.review_items(caller="a", canary_version=None)
    # q3 was rated well, q5 and q6 got no feedback: not in the queue; the newest feedback first.
    assert [i.query_id for i in items] == ["q2", "q4", "q1"]
    q4 = items[1]
    assert q4.reasons == [ReviewReason.COMMENT] and q4.comments == ["Wrong year."]
    assert q4.passages == ["Item 4 is a thing.", "Other text."] and q4.model_version == "v1"
    assert items[2].reasons == [ReviewReason.LOW_RATING] and items[2].lowest_rating == 1
    # Every answer of the canary version is in it, whatever its feedback.
    canary = store.review_items(caller="a", canary_version="v1")
    assert {i.query_id for i in canary} == {f"q{i}" for i in range(1, 7)}
    assert ReviewReason.CANARY in canary[0].reasons


def test_review_queue_by_impact_counts_how_many_asked_a_question(store: JoinStore, ev: Any) -> None:
    again = ev.interaction(2, session="s9")
    again.query_id = "q2-again"
    store.ingest([ev.interaction(1), ev.interaction(2), again], [ev.rating(1, 1), ev.rating(2, 2)])
    newest = store.review_items(caller="a", canary_version=None, order="impact")
    # q1 is worse (rating 1 against 2) but q2's question was asked twice: (6-2)*2 > (6-1)*1.
    assert [(i.query_id, i.times_asked, i.impact) for i in newest] == [("q2", 2, 8.0), ("q1", 1, 5.0)]
    with pytest.raises(ValueError):
        store.review_items(caller="a", canary_version=None, order="random")


def test_a_question_asked_over_and_over_from_one_network_is_asked_once(store: JoinStore, ev: Any) -> None:
    signer = QueryIdSigner(b"k" * 32)
    # Thirty sessions of one network (and one of them three times) ask q1's question; one rates it low.
    scripted = []
    for n in range(32):
        event = ev.interaction(1, session=f"{n % 30:032x}")
        event.query_id = signer.issue("v1", event.session_pseudonym, "e" * 32)
        scripted.append(event)
    low = dataclasses.replace(ev.rating(1, 1), query_id=scripted[0].query_id)
    store.ingest(
        [*scripted, ev.interaction(2), ev.interaction(3, question=ev.interaction(2).question)],
        [low, ev.rating(2, 2)],
    )
    items = store.review_items(caller="a", canary_version=None, order="impact")
    # The network is one asker: (6-1)*1; q2's question was asked by two sessions: (6-2)*2.
    assert [(i.query_id, i.times_asked) for i in items] == [("q2", 2), (scripted[0].query_id, 1)]


def test_a_session_asking_from_two_networks_is_asked_once(store: JoinStore, ev: Any) -> None:
    signer = QueryIdSigner(b"k" * 32)
    # One session asks q1's question from its IPv4 and its IPv6 network (a dual-stack line).
    dual = []
    for network in ["e" * 32, "f" * 32]:
        event = ev.interaction(1, session="a" * 32)
        event.query_id = signer.issue("v1", event.session_pseudonym, network)
        dual.append(event)
    low = dataclasses.replace(ev.rating(1, 1), query_id=dual[0].query_id)
    store.ingest(dual, [low])
    (item,) = store.review_items(caller="a", canary_version=None, order="impact")
    assert (item.times_asked, item.impact) == (1, 5.0)


def test_an_expert_review_takes_the_answer_out_of_the_queue(store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1), ev.interaction(2)], [ev.rating(1, 1), ev.rating(2, 1)])
    store.ingest([], [ev.correction(1)])
    assert [i.query_id for i in store.review_items(caller="a", canary_version=None)] == ["q2"]
    # The correction still became a supervised example.
    assert store.counts()["examples.correction"] == 1


def _accept(i: int, *, fid: str = "") -> FeedbackSignal:
    kind, role = events_pb2.FEEDBACK_KIND_RATING, events_pb2.REVIEWER_ROLE_EXPERT
    return FeedbackSignal(fid or f"fa{i}", f"q{i}", kind, 5, "", role, "expert")


def _queue(store: JoinStore) -> list[str]:
    return [i.query_id for i in store.review_items(caller="a", canary_version=None)]


def test_a_review_leaves_the_queue_only_once_the_policy_kept_it(store: JoinStore, ev: Any) -> None:
    long_answer = "Long. " * 400  # 2,400 characters: past max_target_chars, no usable target
    store.ingest([ev.interaction(1), ev.interaction(2, long_answer)], [ev.rating(1, 1), ev.rating(2, 1)])
    # A correction the policy drops (too long to train on) and an accept of an answer that cannot be
    # a target are received, not kept: both answers wait for another review.
    too_long = store.ingest([], [ev.correction(1, "x" * 2001, fid="long"), _accept(2)])
    assert not too_long.examples and too_long.ignored["correction too long"] == 1
    assert sorted(_queue(store)) == ["q1", "q2"]
    # A correction that trains, and a correction of the long answer, take them out.
    assert store.ingest([], [ev.correction(1), ev.correction(2)]).examples == {"correction": 2}
    assert _queue(store) == []
    # An accept the policy keeps (the model's answer as a positive) takes an answer out too.
    store.ingest([ev.interaction(3)], [ev.rating(3, 1)])
    assert store.ingest([], [_accept(3)]).examples == {"positive": 1}
    assert _queue(store) == []


def test_a_store_made_before_kept_reviews_keeps_its_queue(tmp_path: Any, ev: Any) -> None:
    path = tmp_path / "old.sqlite3"
    s1 = JoinStore(path, ExamplePolicy(PolicySettings()))
    s1.ingest([ev.interaction(1), ev.interaction(2)], [ev.rating(1, 1), ev.rating(2, 1), _accept(1)])
    # The column as a store made before it lacks it: every joined review counted then.
    s1._db.execute("ALTER TABLE feedback DROP COLUMN kept")
    s1.close()
    s2 = JoinStore(path, ExamplePolicy(PolicySettings(use_positives=False)))
    assert [i.query_id for i in s2.review_items(caller="a", canary_version=None)] == ["q2"]
    s2.close()


def test_a_later_correction_replaces_an_earlier_one_not_yet_batched(store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.correction(1, "First try.", fid="c1")])
    later = store.ingest([], [ev.correction(1, "Second thoughts.", fid="c2")])
    assert later.examples == {"correction": 1} and later.ignored["earlier correction replaced"] == 1
    cut = store.cut(max_examples=10, reason="manual")
    assert cut is not None
    assert [r["answer"] for r in store.dataset_rows(cut.dataset_id)] == ["Second thoughts."]
    # One already in a dataset stays there; a third correction waits for the next batch.
    third = store.ingest([], [ev.correction(1, "Third.", fid="c3")])
    assert third.examples == {"correction": 1} and not third.ignored["earlier correction replaced"]
    assert [r["answer"] for r in store.dataset_rows(cut.dataset_id)] == ["Second thoughts."]
    assert store.pending().examples == 1
    # A replay of the replaced one brings nothing back.
    assert store.ingest([], [ev.correction(1, "First try.", fid="c1")]).duplicates == 1
    assert store.pending().examples == 1


def test_a_claim_on_an_answer_that_needs_no_review_is_not_kept(store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1), ev.interaction(2)], [ev.rating(1, 5), ev.rating(2, 1)])
    with pytest.raises(NeedsNoReview):
        store.claim("q1", "alice", ttl_s=60)
    assert not store._query("SELECT * FROM review_claims")
    # A visitor then rates it low: it is in everyone's queue at once.
    store.ingest([], [ev.rating(1, 1)])
    assert [i.query_id for i in store.review_items(caller="bob", canary_version=None)] == ["q1", "q2"]
    # An expert's own claim of an answer reviewed since goes when they claim it again.
    assert store.claim("q2", "alice", ttl_s=60)
    store.ingest([], [ev.correction(2)])
    with pytest.raises(NeedsNoReview):
        store.claim("q2", "alice", ttl_s=60)
    assert not store._query("SELECT * FROM review_claims")


def test_claims_keep_an_item_from_other_experts_until_they_expire(
    store: JoinStore, ev: Any, clock: Any
) -> None:
    store.ingest([ev.interaction(1)], [ev.rating(1, 1)])
    until = store.claim("q1", "alice", ttl_s=60)
    assert until == clock.now + 60
    assert store.claim("q1", "bob", ttl_s=60) is None
    assert store.review_items(caller="bob", canary_version=None) == []
    (mine,) = store.review_items(caller="alice", canary_version=None)
    assert mine.claimed_until == until
    clock.now += 61
    assert store.claim("q1", "bob", ttl_s=60) == clock.now + 60
    assert store.claim("q1", "bob", ttl_s=60, release=True) == 0.0
    assert store.review_items(caller="alice", canary_version=None)[0].claimed_until is None
    with pytest.raises(KeyError):
        store.claim("q-unknown", "alice", ttl_s=60)


def test_a_later_rating_replaces_the_earlier_one_and_never_adds(store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.rating(1, 5)])
    assert store.counts()["examples.positive"] == 1
    # The visitor changes their mind: the pending positive goes, the negative takes its place.
    store.ingest([], [ev.rating(1, 1)])
    counts = store.counts()
    assert counts["examples.negative"] == 1 and "examples.positive" not in counts
    # Redelivering the first rating (a Kafka replay) does not bring it back.
    again = store.ingest([], [ev.rating(1, 5)])
    assert again.duplicates == 1 and "examples.positive" not in store.counts()
    # Ten thumbs down on one answer are one vote: the review queue sees one, not ten.
    store.ingest([ev.interaction(2)], [ev.thumbs(2, False, fid=f"down-{n}") for n in range(10)])
    (item,) = [i for i in store.review_items(caller="x", canary_version=None) if i.query_id == "q2"]
    assert item.thumbs_down == 1
    assert store.counts()["examples.negative"] == 2


def test_an_expert_vote_stands_when_the_visitor_changes_theirs(store: JoinStore, ev: Any) -> None:
    expert = ev.thumbs(1, True, fid="expert-up", session="expert", role=events_pb2.REVIEWER_ROLE_EXPERT)
    store.ingest([ev.interaction(1, "Item 1 is a thing.")], [expert, ev.rating(1, 5)])
    store.ingest([], [ev.rating(1, 3)])
    assert store.counts()["examples.positive"] == 1


def agreeing_store(tmp_path: Any, clock: Any, **policy: Any) -> JoinStore:
    settings = PolicySettings(**{"positive_roles": ["user", "expert", "admin"], **policy})
    return JoinStore(tmp_path / "agree.sqlite3", ExamplePolicy(settings), clock=clock)


def test_a_positive_trains_only_once_independent_sessions_agree(tmp_path: Any, clock: Any, ev: Any) -> None:
    store = agreeing_store(tmp_path, clock)
    question, answer = "Who made it?", "Guido made it."
    # The same question, asked with other spacing and case, is the same question.
    variants = [question, "  who made IT? ", question, question]
    asked = [ev.interaction(i, answer, question=variants[i], session=f"s{i % 3}") for i in range(4)]
    # One session's thumbs up on two of its answers: still one session, no example.
    first = store.ingest(asked, [ev.thumbs(0, True, session="s0"), ev.thumbs(3, True, session="s0")])
    assert not first.examples and first.ignored["positive waiting for other sessions to agree"] == 2
    # A second session agrees (a rating of 4 on its own answer): one positive.
    agreed = store.ingest([], [ev.rating(1, 4, session="s1")])
    assert agreed.examples == {"positive": 1}
    # A third agreeing session adds no second copy of the same target.
    third = store.ingest([], [ev.thumbs(2, True, session="s2")])
    assert not third.examples and third.ignored["positive for this answer already kept"] == 1
    # Another answer to the same question has agreement of its own to earn.
    other = store.ingest([ev.interaction(9, "Someone else.", question=question)], [ev.thumbs(9, True)])
    assert not other.examples
    store.close()


def test_sessions_of_one_network_do_not_agree_with_each_other(tmp_path: Any, clock: Any, ev: Any) -> None:
    store = agreeing_store(tmp_path, clock)
    signer = QueryIdSigner(b"k" * 32)
    question, answer = "Where is the installer?", "At https://evil.example/setup."
    scripted, elsewhere = "e" * 32, "f" * 32

    def asked(i: int, network: str) -> tuple[events_pb2.Interaction, FeedbackSignal]:
        session = f"{i:032x}"
        interaction = ev.interaction(i, answer, question=question, session=session)
        interaction.query_id = signer.issue("v1", session, network)
        up = ev.thumbs(i, True, session=session)
        return interaction, dataclasses.replace(up, query_id=interaction.query_id)

    # Twenty sessions made from one network agree with nobody: one voter.
    one_network = [asked(i, scripted) for i in range(20)]
    result = store.ingest([a for a, _ in one_network], [f for _, f in one_network])
    assert not result.examples
    assert result.ignored["positive waiting for other sessions to agree"] == 20
    # A session of another network agrees: two voters, one positive.
    interaction, up = asked(20, elsewhere)
    assert store.ingest([interaction], [up]).examples == {"positive": 1}
    # Sessions asked without a network (internal callers) are each a voter, as before.
    other = [asked(i, "") for i in range(30, 32)]
    for a, _ in other:
        a.answer = "Another answer."
    assert store.ingest([a for a, _ in other], [f for _, f in other]).examples == {"positive": 1}
    store.close()


def test_a_session_seen_on_two_networks_does_not_agree_with_itself(
    tmp_path: Any, clock: Any, ev: Any
) -> None:
    store = agreeing_store(tmp_path, clock)
    signer = QueryIdSigner(b"k" * 32)
    question, answer = "Where is the installer?", "At https://evil.example/setup."
    session, ipv4, ipv6, other = "a" * 32, "e" * 32, "f" * 32, "c" * 32

    def asked(i: int, session: str, network: str) -> tuple[events_pb2.Interaction, FeedbackSignal]:
        interaction = ev.interaction(i, answer, question=question, session=session)
        interaction.query_id = signer.issue("v1", session, network)
        up = ev.thumbs(i, True, session=session)
        return interaction, dataclasses.replace(up, query_id=interaction.query_id)

    # One visitor's session asks and thumbs up from its IPv4 /24 and its IPv6 /48: one voter.
    for i, network in enumerate([ipv4, ipv6]):
        interaction, up = asked(i, session, network)
        result = store.ingest([interaction], [up])
        assert not result.examples and result.ignored["positive waiting for other sessions to agree"] == 1
    # A second session of its IPv6 network is the same voter too.
    interaction, up = asked(2, "b" * 32, ipv6)
    assert not store.ingest([interaction], [up]).examples
    # Another visitor, on a network of its own, agrees: two voters, one positive.
    interaction, up = asked(3, other, "d" * 32)
    assert store.ingest([interaction], [up]).examples == {"positive": 1}
    store.close()


def test_an_expert_positive_needs_no_agreement_and_the_rule_can_be_relaxed(
    tmp_path: Any, clock: Any, ev: Any
) -> None:
    store = agreeing_store(tmp_path, clock)
    expert = ev.thumbs(1, True, session="expert", role=events_pb2.REVIEWER_ROLE_EXPERT)
    assert store.ingest([ev.interaction(1, "Fine.")], [expert]).examples == {"positive": 1}
    store.close()
    assert PolicySettings().positive_min_sessions == 2  # the safe default
    relaxed = JoinStore(
        tmp_path / "relaxed.sqlite3",
        ExamplePolicy(PolicySettings(positive_min_sessions=1, positive_roles=["user", "expert"])),
    )
    assert relaxed.ingest([ev.interaction(2, "Fine.")], [ev.thumbs(2, True)]).examples == {"positive": 1}
    relaxed.close()
