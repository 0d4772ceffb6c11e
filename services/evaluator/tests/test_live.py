"""Live signals: counting per version and minute (durably), and the canary verdict on hand-made stats."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from kafka.consumer.fetcher import ConsumerRecord

from flywheel_common.dev_secrets import DEV_EVENT_SIGNING_KEY, DEV_QUERY_ID_KEY
from flywheel_common.event_signing import SIGNATURE_HEADER, EventSigner
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.redaction import REDACTED_HEADER
from flywheel_evaluator.consumers import SignalConsumer, feedback_signal, interaction_signal
from flywheel_evaluator.live import LATENCY_BOUNDS_MS, LiveStore, Signal, VersionStats, judge_canary
from flywheel_evaluator.settings import CanarySettings, EvaluatorSettings
from flywheel_proto.flywheel.events.v1 import events_pb2

T0 = 1_800_000_000.0  # a minute boundary


def stats(version: str, ratings: list[int], *, down: int = 0, up: int = 0, ignored: int = 0) -> VersionStats:
    s = VersionStats(
        version,
        ratings=len(ratings),
        rating_sum=float(sum(ratings)),
        rating_sq_sum=float(sum(r * r for r in ratings)),
    )
    s.thumbs_down, s.thumbs_up, s.ignored = down, up, ignored
    # Each vote from a session of its own.
    s.sessions = len(ratings) + down + up + ignored
    return s


SETTINGS = CanarySettings(min_samples=10, min_signal_samples=5, min_duration_s=30, max_duration_s=600)


def test_bad_ratings_roll_back_once_sampled() -> None:
    canary, production = stats("v2", [1, 2] * 6), stats("v1", [4, 5] * 6)
    verdict = judge_canary(canary, production, 40, SETTINGS)
    assert verdict.action == "rollback"
    assert verdict.reasons[0] == "worse than production: mean rating 1.50 vs production 4.50 (tolerance 0.30)"
    assert verdict.metrics["canary_mean_rating"] == 1.5
    # Before the minimum sample the same ratings only wait.
    early = judge_canary(stats("v2", [1, 2]), stats("v1", [4, 5] * 6), 40, SETTINGS)
    assert early.action == "wait"


def test_not_worse_is_promoted_after_the_minimum_duration() -> None:
    canary, production = stats("v2", [4, 4, 5, 3] * 3), stats("v1", [4, 3, 4, 4] * 3)
    assert judge_canary(canary, production, 10, SETTINGS).action == "wait"
    verdict = judge_canary(canary, production, 31, SETTINGS)
    assert verdict.action == "promote"
    assert verdict.reasons[0].startswith("not worse: mean rating 4.00 vs production 3.75")


def test_a_drop_within_noise_waits_instead_of_rolling_back() -> None:
    # Mean 3.5 vs 4.0 is past the 0.3 tolerance, but with these spreads the excess is within 1.64
    # standard errors.
    canary, production = stats("v2", [5, 2, 4, 3, 5, 2] * 2), stats("v1", [5, 3, 4, 4, 5, 3] * 2)
    verdict = judge_canary(canary, production, 60, SETTINGS)
    assert verdict.action == "wait"
    assert "within noise (1.64 standard errors" in verdict.reasons[0]
    # Ignoring noise (z = 0), the same numbers roll it back; past the maximum duration they do too.
    strict = SETTINGS.model_copy(update={"confidence_z": 0.0})
    assert judge_canary(canary, production, 60, strict).action == "rollback"
    late = judge_canary(canary, production, 601, SETTINGS)
    assert late.action == "rollback" and late.reasons[0].startswith("still worse than production after 601 s")
    # Twenty times the sample makes the same drop significant.
    big_c, big_p = stats("v2", [5, 2, 4, 3, 5, 2] * 40), stats("v1", [5, 3, 4, 4, 5, 3] * 40)
    assert judge_canary(big_c, big_p, 60, SETTINGS).action == "rollback"


def test_rates_are_compared_with_their_tolerances() -> None:
    canary = stats("v2", [4] * 10, down=8, up=2, ignored=1)
    production = stats("v1", [4] * 10, down=1, up=9, ignored=1)
    verdict = judge_canary(canary, production, 60, SETTINGS)
    assert verdict.action == "rollback"
    assert "thumbs-down rate 80.0% vs production 10.0%" in verdict.reasons[0]


def test_a_rate_is_worse_only_when_past_its_tolerance_beyond_noise() -> None:
    # 5 of 12 sessions ignored against 3 of 21 (a three-round run rolled a candidate back on this,
    # one the gate had found 10 points more accurate): 27 points worse, 17 past the 10-point
    # tolerance, and that excess is within 1.64 standard errors (26 points): wait for more sessions.
    canary, production = stats("v2", [3] * 7, ignored=5), stats("v1", [3] * 18, ignored=3)
    verdict = judge_canary(canary, production, 60, SETTINGS)
    assert verdict.action == "wait"
    assert "ignore rate 41.7% vs production 14.3% (tolerance 10.0%), within noise" in verdict.reasons[0]
    # Four times the sessions at the same rates: past the tolerance with confidence.
    canary, production = stats("v2", [3] * 28, ignored=20), stats("v1", [3] * 72, ignored=12)
    verdict = judge_canary(canary, production, 60, SETTINGS)
    assert verdict.action == "rollback" and "ignore rate 41.7%" in verdict.reasons[0]


def _timed(s: VersionStats, fast: int, slow: int, answers: int = 3) -> VersionStats:
    """Voters answered in 1 s and voters answered in 60 s, `answers` timed answers each."""
    s.voter_latency_ms = [1000.0] * fast + [60_000.0] * slow
    s.voter_error_shares = [0.0] * (fast + slow)
    s.latency_counts[LATENCY_BOUNDS_MS.index(1000)] += fast * answers
    s.latency_counts[LATENCY_BOUNDS_MS.index(60_000)] += slow * answers
    return s


def test_latency_is_judged_per_voter_on_enough_answers() -> None:
    production = _timed(stats("v1", [3] * 12), fast=9, slow=0)
    # Nine answers (three voters): too few to judge, and its better ratings promote it.
    few = _timed(stats("v2", [4] * 12), fast=2, slow=1)
    verdict = judge_canary(few, production, 60, SETTINGS)
    assert verdict.action == "promote" and not any("latency" in r for r in verdict.reasons)
    # Ten voters, one of them slow: no one voter moves the comparison.
    one_slow = _timed(stats("v2", [4] * 12), fast=9, slow=1)
    verdict = judge_canary(one_slow, production, 60, SETTINGS)
    assert verdict.action == "promote"
    assert "not worse: latency per voter 1000 ms vs production 1000 ms (tolerance +50%)" in verdict.reasons
    # Every voter answered in 3 s against 1 s: past the tolerance.
    slow = _timed(stats("v2", [4] * 12), fast=10, slow=0)
    slow.voter_latency_ms = [3000.0] * 10
    verdict = judge_canary(slow, production, 60, SETTINGS)
    assert verdict.action == "rollback" and "latency per voter" in verdict.reasons[0]


def test_undecided_canary_follows_the_policy() -> None:
    thin, production = stats("v2", [5, 5]), stats("v1", [4] * 20)
    for action in ("promote", "rollback"):
        settings = SETTINGS.model_copy(update={"undecided_action": action})
        verdict = judge_canary(thin, production, 601, settings)
        assert verdict.action == action
        assert "undecided after 601 s" in verdict.reasons[0]
    held = judge_canary(thin, production, 601, SETTINGS.model_copy(update={"undecided_action": "hold"}))
    assert held.action == "wait"
    # A canary that looks worse is never promoted just because time ran out.
    worse = judge_canary(stats("v2", [1] * 6), stats("v1", [5] * 6), 601, SETTINGS)
    assert worse.action == "rollback"


def test_store_counts_per_version_and_window(tmp_path: Path) -> None:
    store = LiveStore(tmp_path / "live.sqlite")
    store.record(
        [
            Signal("v1", T0 + 1, "rating", 5, query_id="a", session="s1"),
            Signal("v1", T0 + 2, "rating", 3, query_id="b", session="s2"),
            Signal("v2", T0 + 3, "thumbs", -1, query_id="c", session="s3"),
            Signal("v2", T0 + 4, "thumbs", 1, query_id="d", session="s4"),
            Signal("v2", T0 + 5, "ignored", query_id="e", session="s5"),
            Signal("v2", T0 + 6, "interaction", latency_ms=800, session="s3"),
            Signal("v2", T0 + 7, "interaction", latency_ms=2500, session="s4"),
            Signal("v2", T0 + 8, "interaction", failed=True, session="s5"),
            Signal("v1", T0 + 3600, "rating", 1, query_id="f", session="s6"),
        ]
    )
    store.record([Signal("v1", T0 + 9, "rating", 4, query_id="g", session="s7")])
    v1 = store.stats("v1", T0, T0 + 60)
    assert (v1.ratings, v1.mean_rating, v1.rating_variance, v1.sessions) == (3, 4.0, 1.0, 3)
    assert store.stats("v1", T0, T0 + 7200).ratings == 4
    assert store.stats("v1", T0 + 3600, T0 + 7200).mean_rating == 1.0
    v2 = store.stats("v2", T0, T0 + 60)
    assert (v2.thumbs_down_rate, v2.interactions, v2.errors) == (0.5, 3, 1)
    assert v2.ignore_rate == 1 / 3
    assert v2.latency_quantile_ms(0.5) == 1000 and v2.latency_quantile_ms(0.95) == 3000
    store.close()
    # Durable: a new store on the same file sees the same counts.
    again = LiveStore(tmp_path / "live.sqlite")
    assert again.stats("v1", T0, T0 + 60).ratings == 3
    again.prune(T0 + 1800)
    assert again.stats("v1", T0, T0 + 7200).ratings == 1


def test_a_later_vote_on_an_answer_replaces_the_earlier_one(tmp_path: Path) -> None:
    store = LiveStore(tmp_path / "live.sqlite")
    store.record([Signal("v2", T0 + i, "thumbs", -1, query_id="q", session="s1") for i in range(10)])
    store.record([Signal("v2", T0 + 20, "rating", 1, query_id="q", session="s1")])
    store.record([Signal("v2", T0 + 30, "rating", 5, query_id="q", session="s1")])
    v2 = store.stats("v2", T0, T0 + 60)
    assert (v2.thumbs_down, v2.thumbs, v2.ratings, v2.mean_rating) == (1, 1, 1, 5.0)


def test_feedback_counts_once_per_session_however_many_answers_it_rates(tmp_path: Path) -> None:
    store = LiveStore(tmp_path / "live.sqlite")
    one_visitor = [
        Signal("v2", T0 + i, "thumbs", -1, query_id=f"q{i}", session="attacker") for i in range(10)
    ]
    honest = [Signal("v2", T0 + 20 + i, "thumbs", 1, query_id=f"h{i}", session=f"s{i}") for i in range(3)]
    store.record([*one_visitor, *honest])
    # One mixed session: its ratings are averaged into one, its thumbs netted.
    store.record(
        [
            Signal("v2", T0 + 40, "rating", 1, query_id="m1", session="mixed"),
            Signal("v2", T0 + 41, "rating", 5, query_id="m2", session="mixed"),
            Signal("v2", T0 + 42, "thumbs", 1, query_id="m1", session="mixed"),
            Signal("v2", T0 + 43, "thumbs", -1, query_id="m2", session="mixed"),
        ]
    )
    v2 = store.stats("v2", T0, T0 + 60)
    assert (v2.sessions, v2.thumbs_down, v2.thumbs_up, v2.thumbs) == (5, 1, 3, 4)
    assert (v2.ratings, v2.mean_rating) == (1, 3.0)


def test_the_sessions_of_one_network_are_one_voter(tmp_path: Path) -> None:
    signer = QueryIdSigner(b"k" * 32)
    one_network, other = "e" * 32, "f" * 32
    # Forty sessions made from one network, each served an answer it thumbs down and rates 1.
    scripted = [(f"{i:032x}", signer.issue("v2", f"{i:032x}", one_network, now=T0)) for i in range(40)]
    signals = [
        Signal("v2", T0 + i, kind, value, query_id=query_id, session=session)
        for i, (session, query_id) in enumerate(scripted)
        for kind, value in (("interaction", 0), ("thumbs", -1), ("rating", 1))
    ]
    # Three visitors of another network and two asked without one (internal callers): one voter, two.
    for i, network in enumerate([other, other, other, "", ""]):
        session = f"{1000 + i:032x}"
        query_id = signer.issue("v2", session, network, now=T0)
        signals += [
            Signal("v2", T0 + 50, "interaction", query_id=query_id, session=session),
            Signal("v2", T0 + 51, "thumbs", 1, query_id=query_id, session=session),
            Signal("v2", T0 + 52, "rating", 5, query_id=query_id, session=session),
        ]
    store = LiveStore(tmp_path / "live.sqlite")
    store.record(signals)
    v2 = store.stats("v2", T0, T0 + 60)
    assert (v2.sessions, v2.sessions_served, v2.interactions) == (4, 4, 45)
    assert (v2.thumbs_down, v2.thumbs_up, v2.ratings, v2.mean_rating) == (1, 3, 4, 4.0)


def _asks(version: str, session: str, network: str, n: int = 1, **kwargs: object) -> list[Signal]:
    """`n` answers a session asked from a network (in q3 query ids), each `interaction` kwargs."""
    signer = QueryIdSigner(b"k" * 32)
    return [
        Signal(
            version,
            T0 + 1,
            "interaction",
            query_id=signer.issue(version, session, network, now=T0),
            session=session,
            **kwargs,  # type: ignore[arg-type]
        )
        for _ in range(n)
    ]


def _honest(store: LiveStore, *, feedback: bool = True, failing: float = 0.0) -> None:
    """Twenty visitors a side, each of a network of its own, answered in about a second and rating
    alike; `failing`: the share of the canary's visitors whose answer failed."""
    for version in ("v1", "v2"):
        signals = []
        for i in range(20):
            session, network = f"{version[1]}{i:031x}", f"{i:02x}{version[1]}" + "0" * 29
            failed = version == "v2" and i < failing * 20
            (ask,) = _asks(version, session, network, latency_ms=900 + 10 * i, failed=failed)
            signals.append(ask)
            if feedback:
                signals.append(
                    Signal(version, T0 + 2, "rating", 4 + i % 2, query_id=ask.query_id, session=session)
                )
        store.record(signals)


def test_one_network_with_many_failed_or_slow_answers_cannot_roll_back_a_good_canary(tmp_path: Path) -> None:
    attacker, its_network = "a" * 32, "e" * 32
    for attack in (
        _asks("v2", attacker, its_network, 25, latency_ms=25_000.0),
        _asks("v2", attacker, its_network, 25, failed=True),
    ):
        for feedback, elapsed in ((True, 120.0), (True, 601.0), (False, 601.0)):
            store = LiveStore(tmp_path / f"live-{len(list(tmp_path.iterdir()))}.sqlite")
            _honest(store, feedback=feedback)
            store.record(attack)
            canary, production = store.stats("v2", T0, T0 + 120), store.stats("v1", T0, T0 + 120)
            assert (canary.interactions, canary.sessions_served) == (45, 21)
            verdict = judge_canary(canary, production, elapsed, CanarySettings())
            # Promoted on the honest visitors' ratings, or undecided (the policy: promote) without.
            assert verdict.action == "promote", (feedback, elapsed, verdict.reasons)
            store.close()


def test_one_clients_ok_answers_cannot_hide_a_bad_canarys_error_rate(tmp_path: Path) -> None:
    store = LiveStore(tmp_path / "live.sqlite")
    _honest(store, failing=0.3)
    verdict = judge_canary(
        store.stats("v2", T0, T0 + 120), store.stats("v1", T0, T0 + 120), 120, CanarySettings()
    )
    assert verdict.action == "rollback" and "error rate per voter" in verdict.reasons[0]
    # Two thousand answers that did not fail, asked by one client: one voter more (the canary's worst
    # voter is left out of both comparisons: 5 of 19 failing before, 5 of 20 after).
    store.record(_asks("v2", "a" * 32, "e" * 32, 2000, latency_ms=100.0))
    canary = store.stats("v2", T0, T0 + 120)
    assert (canary.interactions, canary.sessions_served) == (2020, 21)
    verdict = judge_canary(canary, store.stats("v1", T0, T0 + 120), 120, CanarySettings())
    assert verdict.action == "rollback"
    assert verdict.reasons[0].startswith(
        "worse than production: error rate per voter 25.0% vs production 0.0%"
    )


def test_a_session_seen_on_two_networks_is_one_voter(tmp_path: Path) -> None:
    store = LiveStore(tmp_path / "live.sqlite")
    signer = QueryIdSigner(b"k" * 32)
    session, ipv4, ipv6 = "a" * 32, "e" * 32, "f" * 32
    signals = []
    # One session asks and rates from its IPv4 and its IPv6 network; another session of the IPv6
    # network is the same voter; a visitor on a network of its own is another.
    for asker, network in ((session, ipv4), (session, ipv6), ("b" * 32, ipv6), ("c" * 32, "d" * 32)):
        query_id = signer.issue("v2", asker, network, now=T0)
        signals += [
            Signal("v2", T0 + 1, "interaction", latency_ms=1000, query_id=query_id, session=asker),
            Signal("v2", T0 + 2, "thumbs", -1, query_id=query_id, session=asker),
        ]
    store.record(signals)
    v2 = store.stats("v2", T0, T0 + 60)
    assert (v2.sessions, v2.sessions_served, v2.thumbs_down, len(v2.voter_latency_ms)) == (2, 2, 2, 2)


def test_an_answer_its_caller_ended_is_not_a_failed_one() -> None:
    # An anonymous caller's own short deadline (inference logs it "client_deadline") fails nothing;
    # the service's own answer limit passing ("deadline") does.
    ended = events_pb2.Interaction(model_version="v2", total_ms=50.0, finish_reason="client_deadline")
    assert interaction_signal(ended, now=T0) is not None
    assert not interaction_signal(ended, now=T0).failed  # type: ignore[union-attr]
    assert interaction_signal(ended, now=T0).latency_ms is None  # type: ignore[union-attr]  # the caller's time
    timed_out = events_pb2.Interaction(model_version="v2", total_ms=120_000.0, finish_reason="deadline")
    assert interaction_signal(timed_out, now=T0).failed  # type: ignore[union-attr]


def test_a_store_made_before_networks_were_counted_opens_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "live.sqlite"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE votes (query_id TEXT NOT NULL, kind TEXT NOT NULL, version TEXT NOT NULL, "
        "session TEXT NOT NULL, minute INTEGER NOT NULL, value REAL NOT NULL, PRIMARY KEY (query_id, kind))"
    )
    old.execute(
        "CREATE TABLE served (version TEXT NOT NULL, minute INTEGER NOT NULL, session TEXT NOT NULL, "
        "PRIMARY KEY (version, minute, session))"
    )
    old.execute("INSERT INTO votes VALUES ('q-old', 'thumbs', 'v2', 's-old', ?, -1)", (int(T0 // 60),))
    old.commit()
    old.close()
    store = LiveStore(path)
    query_id = QueryIdSigner(b"k" * 32).issue("v2", "a" * 32, "e" * 32, now=T0)
    store.record([Signal("v2", T0 + 1, "thumbs", 1, query_id=query_id, session="a" * 32)])
    assert (store.stats("v2", T0, T0 + 60).thumbs_down, store.stats("v2", T0, T0 + 60).thumbs_up) == (1, 1)


def test_a_forgotten_session_leaves_no_vote_nor_trace_and_a_replay_cannot_bring_it_back(
    tmp_path: Path,
) -> None:
    signer = QueryIdSigner(b"k" * 32)
    gone, kept = "a" * 32, "b" * 32
    its_answer, other_answer = signer.issue("v2", gone, now=T0), signer.issue("v2", kept, now=T0)
    events = [
        Signal("v2", T0 + 1, "rating", 1, query_id=its_answer, session=gone),
        Signal("v2", T0 + 2, "thumbs", -1, query_id=its_answer, session=gone),
        # A vote before query ids named sessions: the session is the one the feedback service saw.
        Signal("v2", T0 + 3, "ignored", query_id="legacy-id", session=gone),
        Signal("v2", T0 + 4, "interaction", query_id=its_answer, session=gone),
        Signal("v2", T0 + 5, "rating", 5, query_id=other_answer, session=kept),
        Signal("v2", T0 + 6, "interaction", query_id=other_answer, session=kept),
    ]
    store = LiveStore(tmp_path / "live.sqlite")
    store.record(events)
    assert store.stats("v2", T0, T0 + 60).sessions == 2
    assert any(gone.encode() in path.read_bytes() for path in tmp_path.iterdir())
    assert store.forget(gone) == (3, 1)
    v2 = store.stats("v2", T0, T0 + 60)
    assert (v2.sessions, v2.sessions_served, v2.ratings, v2.thumbs, v2.ignored) == (1, 1, 1, 0, 0)
    assert v2.interactions == 2  # per-minute counts name no session: they stay
    store.close()
    # Nothing of it in the file (nor its write-ahead log), and the tombstone outlives a restart:
    # its events, replayed from Kafka, are dropped.
    for path in tmp_path.iterdir():
        assert gone.encode() not in path.read_bytes(), path.name
    again = LiveStore(tmp_path / "live.sqlite")
    assert again.record(events) == 2
    assert again.stats("v2", T0, T0 + 60).sessions == 1
    assert again.forget(gone) == (0, 0)


def test_the_minimum_evidence_is_distinct_sessions() -> None:
    # Ten thumbs down from one session are one session's vote: never enough to roll back.
    canary = VersionStats("v2", sessions=1, thumbs_down=1)
    production = stats("v1", [], up=20, down=2)
    assert judge_canary(canary, production, 60, SETTINGS).action == "wait"
    many = stats("v2", [], down=12, up=2)
    verdict = judge_canary(many, production, 60, SETTINGS)
    assert verdict.action == "rollback"
    assert verdict.reasons[-1] == "14 canary and 22 production voters with feedback"


def test_canary_start_is_remembered(tmp_path: Path) -> None:
    store = LiveStore(tmp_path / "live.sqlite")
    assert store.canary_started("v2", now=T0) == T0
    assert store.canary_started("v2", now=T0 + 50) == T0
    store.start_canary("v2", at=T0 + 100)
    assert store.canary_started("v2") == T0 + 100


def test_events_become_signals() -> None:
    rating = events_pb2.Feedback(kind=events_pb2.FEEDBACK_KIND_RATING, value=4, model_version="v2")
    rating.created_at.FromSeconds(int(T0))
    assert feedback_signal(rating, now=0) == Signal("v2", T0, "rating", 4.0)
    thumbs = events_pb2.Feedback(
        kind=events_pb2.FEEDBACK_KIND_THUMBS,
        value=-1,
        model_version="v2",
        query_id="q",
        submitter_pseudonym="s",
    )
    assert feedback_signal(thumbs, now=T0) == Signal("v2", T0, "thumbs", -1.0, query_id="q", session="s")
    for ignored in (
        events_pb2.Feedback(kind=events_pb2.FEEDBACK_KIND_CORRECTION, model_version="v2"),
        events_pb2.Feedback(kind=events_pb2.FEEDBACK_KIND_RATING, value=9, model_version="v2"),
        events_pb2.Feedback(kind=events_pb2.FEEDBACK_KIND_RATING, value=3),
        events_pb2.Feedback(
            kind=events_pb2.FEEDBACK_KIND_RATING,
            value=5,
            model_version="v2",
            reviewer_role=events_pb2.REVIEWER_ROLE_EXPERT,
        ),
    ):
        assert feedback_signal(ignored, now=T0) is None
    served = events_pb2.Interaction(model_version="v1", total_ms=1234.0, finish_reason="eos")
    assert interaction_signal(served, now=T0) == Signal("v1", T0, "interaction", 0.0, 1234.0, False)
    of_session = events_pb2.Interaction(model_version="v1", query_id="q", session_pseudonym="s")
    assert interaction_signal(of_session, now=T0) == Signal(
        "v1", T0, "interaction", 0.0, 0.0, False, query_id="q", session="s"
    )
    failed = events_pb2.Interaction(model_version="v1", finish_reason="deadline")
    assert interaction_signal(failed, now=T0).failed  # type: ignore[union-attr]


def signal_consumer(tmp_path: Path) -> tuple[EvaluatorSettings, LiveStore, SignalConsumer, list[str]]:
    """The signal consumer over a live store, with the reasons it dead-letters records for."""
    settings = EvaluatorSettings(state_dir=tmp_path)
    store = LiveStore(tmp_path / "live.sqlite")
    consumer = SignalConsumer(settings, store)
    dead: list[str] = []
    consumer.dead_letter = lambda record, reason: dead.append(reason)  # type: ignore[method-assign]
    return settings, store, consumer, dead


def consumed(topic: str, offset: int, value: bytes, headers: list[tuple[str, bytes]]) -> ConsumerRecord:
    return ConsumerRecord(topic, 0, 0, offset, 0, 0, b"k", value, headers, None, 1, len(value), -1)


def test_only_feedback_the_feedback_service_signed_counts(tmp_path: Path) -> None:
    """A vote produced to Kafka by anyone but the feedback service is dead-lettered, not counted."""
    settings, store, consumer, dead = signal_consumer(tmp_path)
    topic = settings.kafka.topics.feedback

    def vote(offset: int, signer: EventSigner | None) -> ConsumerRecord:
        event = events_pb2.Feedback(
            kind=events_pb2.FEEDBACK_KIND_THUMBS,
            value=-1,
            model_version="v2",
            query_id=f"q{offset}",
            submitter_pseudonym=f"s{offset}",
        )
        event.created_at.FromSeconds(int(T0))
        value = event.SerializeToString()
        headers = [(SIGNATURE_HEADER, signer.sign(topic, b"k", value))] if signer else []
        return consumed(topic, offset, value, headers)

    consumer.handle(
        [
            vote(0, None),
            vote(1, EventSigner(b"someone-elses-key-0123")),
            vote(2, EventSigner(DEV_EVENT_SIGNING_KEY)),
        ]
    )
    assert dead == ["feedback event unsigned or badly signed"] * 2
    stats = store.stats("v2", T0, T0 + 60)
    assert (stats.sessions, stats.thumbs_down) == (1, 1)


def test_only_answers_inference_signed_count(tmp_path: Path) -> None:
    """Forged failed answers could roll a good canary back: only what inference signed counts."""
    settings, store, consumer, dead = signal_consumer(tmp_path)
    topic = settings.kafka.topics.interactions

    def served(offset: int, signer: EventSigner | None) -> ConsumerRecord:
        event = events_pb2.Interaction(
            query_id=f"q{offset}", model_version="v2", finish_reason="error", session_pseudonym=f"s{offset}"
        )
        event.created_at.FromSeconds(int(T0))
        value = event.SerializeToString()
        marked = [(REDACTED_HEADER, b"1")]
        signature = signer.sign(topic, b"k", value, REDACTED_HEADER.encode()) if signer else b""
        headers = [*marked, (SIGNATURE_HEADER, signature)] if signer else marked
        return consumed(topic, offset, value, headers)

    consumer.handle(
        [
            served(0, None),
            served(1, EventSigner(DEV_EVENT_SIGNING_KEY)),  # the feedback service's key
            served(2, EventSigner.for_interactions(DEV_QUERY_ID_KEY)),
        ]
    )
    assert dead == ["interaction event unsigned or badly signed"] * 2
    stats = store.stats("v2", T0, T0 + 60)
    assert (stats.interactions, stats.errors) == (1, 1)
