"""The trainer's durable state in SQLite: interactions, feedback, examples, datasets, jobs, review claims.

Every polled batch of events is stored in one transaction (WAL, synchronous=FULL) before the
consumer commits its offsets, and events are keyed (interaction by query id, feedback by its
feedback id), so a redelivered event changes nothing: a crash never loses or doubles an example.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import enum
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel_common.pseudonym import tombstone
from flywheel_common.query_ids import count_voters, like_session, query_id_network, query_id_session
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_trainer.policy import ExamplePolicy, FeedbackSignal, Source

SCHEMA = """
CREATE TABLE IF NOT EXISTS interactions (
    query_id TEXT PRIMARY KEY,
    page_title TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    passages TEXT NOT NULL,
    model_version TEXT NOT NULL,
    received_at REAL NOT NULL,
    page_url TEXT NOT NULL DEFAULT '',
    session_pseudonym TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id TEXT PRIMARY KEY,
    query_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    value INTEGER NOT NULL,
    text TEXT NOT NULL,
    role INTEGER NOT NULL,
    received_at REAL NOT NULL,
    joined INTEGER NOT NULL DEFAULT 0,
    session TEXT NOT NULL DEFAULT '',
    superseded INTEGER NOT NULL DEFAULT 0,
    kept INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS feedback_waiting ON feedback (query_id) WHERE joined = 0;
CREATE INDEX IF NOT EXISTS feedback_query ON feedback (query_id);
CREATE INDEX IF NOT EXISTS feedback_kind ON feedback (kind, value);
CREATE TABLE IF NOT EXISTS examples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    example_id TEXT NOT NULL UNIQUE,
    query_id TEXT NOT NULL,
    source TEXT NOT NULL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL,
    dataset_id TEXT
);
CREATE INDEX IF NOT EXISTS examples_pending ON examples (source, seq) WHERE dataset_id IS NULL;
CREATE INDEX IF NOT EXISTS examples_query ON examples (query_id);
CREATE INDEX IF NOT EXISTS examples_dataset ON examples (dataset_id, seq);
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    reason TEXT NOT NULL,
    examples INTEGER NOT NULL,
    negatives INTEGER NOT NULL,
    written INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS positive_votes (
    query_id TEXT PRIMARY KEY,
    agree_key TEXT NOT NULL,
    session TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS positive_votes_key ON positive_votes (agree_key);
CREATE TABLE IF NOT EXISTS forgotten (
    session_hash TEXT PRIMARY KEY,
    forgotten_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS review_claims (
    query_id TEXT PRIMARY KEY,
    claimer TEXT NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    dataset_id TEXT NOT NULL UNIQUE REFERENCES datasets (dataset_id),
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    base_version TEXT NOT NULL DEFAULT '',
    candidate_version TEXT NOT NULL DEFAULT '',
    examples INTEGER NOT NULL,
    launcher TEXT NOT NULL DEFAULT '',
    handle TEXT NOT NULL DEFAULT '',
    event_emitted INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
"""

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED)
TRAINING_SOURCES = (Source.CORRECTION.value, Source.POSITIVE.value)
# Feedback kinds that are a vote on an answer: one per answer and role, the latest.
_VOTES = (events_pb2.FEEDBACK_KIND_RATING, events_pb2.FEEDBACK_KIND_THUMBS)
# The canary's newest answers the review queue considers (a canary may give many thousands; an
# expert reviews a few, and scoring every one would make each listing slow).
CANARY_REVIEW_LIMIT = 1000


@dataclass
class IngestResult:
    """What storing one polled batch did."""

    examples: collections.Counter[str] = field(default_factory=collections.Counter)
    duplicates: int = 0
    ignored: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(frozen=True)
class Forgotten:
    """What forgetting a session removed from the store, and the datasets that held its examples."""

    interactions: int
    feedback: int
    examples: int
    # The answers removed: the datasets on disk are searched for them (and for ids naming the session).
    query_ids: frozenset[str]
    # The examples removed, those the session's feedback made on other sessions' answers among them:
    # the datasets on disk are searched for these ids too.
    example_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Pending:
    """Training examples waiting for a batch."""

    examples: int
    negatives: int
    oldest_received_at: float | None


@dataclass(frozen=True)
class Job:
    """A training job as stored."""

    job_id: str
    dataset_id: str
    state: str
    reason: str
    base_version: str
    candidate_version: str
    examples: int
    launcher: str
    handle: str
    event_emitted: bool
    created_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class Cut:
    """A batch just cut: its dataset and the job that will train on it."""

    dataset_id: str
    job_id: str
    examples: int
    negatives: int
    reason: str


class NeedsNoReview(Exception):
    """A claim refused: the answer is reviewed already, or nothing about it asks for a review."""


class ReviewReason(enum.StrEnum):
    """Why an answer is in the review queue."""

    LOW_RATING = "low_rating"
    THUMBS_DOWN = "thumbs_down"
    COMMENT = "comment"
    CANARY = "canary"


@dataclass(frozen=True)
class ReviewItem:
    """An answer waiting for an expert; `claimed_until` is set when the caller holds a live claim."""

    query_id: str
    question: str
    answer: str
    passages: list[str]
    page_url: str
    page_title: str
    model_version: str
    reasons: list[ReviewReason]
    lowest_rating: int
    thumbs_down: int
    comments: list[str]
    times_asked: int
    impact: float
    answered_at: float
    last_feedback_at: float | None
    claimed_until: float | None


def signal_of(event: events_pb2.Feedback) -> FeedbackSignal:
    """The fields the trainer keeps from a Feedback event; its dedup key is the feedback id."""
    key = event.feedback_id
    if not key:
        # No id (not made by the feedback service): the payload itself identifies a redelivery.
        key = "sha256:" + hashlib.sha256(event.SerializeToString(deterministic=True)).hexdigest()
    return FeedbackSignal(
        feedback_id=key,
        query_id=event.query_id,
        kind=int(event.kind),
        value=int(event.value),
        text=event.redacted_text,
        role=int(event.reviewer_role),
        session=event.submitter_pseudonym,
    )


def agreement_key(question: str, answer: str) -> str:
    """What independent sessions must agree on: the same answer to the same question (normalised)."""
    text = " ".join(question.lower().split()) + "\n" + " ".join(answer.lower().split())
    return hashlib.sha256(text.encode()).hexdigest()


def batch_ids(example_ids: Sequence[str], now: float) -> tuple[str, str]:
    """Dataset and job ids: sortable by time, unique by content, valid Kubernetes names."""
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    stamp = when.strftime("%Y%m%d-%H%M%S") + f"{when.microsecond // 1000:03d}"
    digest = hashlib.sha256("\n".join(example_ids).encode()).hexdigest()[:8]
    return f"ds-{stamp}-{digest}", f"job-{stamp}-{digest}"


class JoinStore:
    """SQLite store shared by the consumer thread and the service's event loop (one lock for writes,
    one for reads)."""

    def __init__(self, path: Path, policy: ExamplePolicy, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives a power cut, which is what lets offsets be committed.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Deleted rows are overwritten, not left in free pages (forgetting a session must forget).
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(SCHEMA)
        # Columns added since a store was made: page URLs (the review queue), sessions (forget and
        # per-session votes), superseded ratings (one rating per answer), networks (one voter each),
        # kept feedback (an expert's review takes an answer out of the queue only once kept).
        for table, column, kind in (
            ("interactions", "page_url", "TEXT NOT NULL DEFAULT ''"),
            ("interactions", "session_pseudonym", "TEXT NOT NULL DEFAULT ''"),
            ("feedback", "session", "TEXT NOT NULL DEFAULT ''"),
            ("feedback", "superseded", "INTEGER NOT NULL DEFAULT 0"),
            ("positive_votes", "network", "TEXT NOT NULL DEFAULT ''"),
            ("interactions", "network", "TEXT NOT NULL DEFAULT ''"),
            ("feedback", "kept", "INTEGER NOT NULL DEFAULT 0"),
        ):
            if column not in {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                if column == "kept":
                    # Reviews stored before: any joined one counted, as it did then (the queue
                    # they left stays as it was).
                    self._db.execute(
                        "UPDATE feedback SET kept = 1 WHERE joined = 1 AND role IN (?, ?)",
                        (events_pb2.REVIEWER_ROLE_EXPERT, events_pb2.REVIEWER_ROLE_ADMIN),
                    )
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS interactions_session ON interactions (session_pseudonym)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS feedback_session ON feedback (session)")
        # The review queue counts how often a question was asked and lists the canary's answers.
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS interactions_question ON interactions (lower(trim(question)))"
        )
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS interactions_version ON interactions (model_version, received_at)"
        )
        # Reads (the RPCs' and the scheduler's, on the event loop) have a connection and a lock of
        # their own: under WAL they never wait for a write, a forget's VACUUM included. Each read is
        # a transaction of its own, so it sees every write committed before it.
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._reader.row_factory = sqlite3.Row
        self._reader.execute("PRAGMA query_only=ON")

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Iterable[Any] | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        params = dict(args) if isinstance(args, Mapping) else tuple(args)
        with self._read_lock:
            return list(self._reader.execute(sql, params))

    # ------------------------------------------------------------ ingest

    def ingest(
        self, interactions: Sequence[events_pb2.Interaction], feedback: Sequence[FeedbackSignal]
    ) -> IngestResult:
        """Stores a polled batch and turns every feedback whose interaction is known into examples.

        Interactions go first, so feedback in the same batch joins at once; feedback whose
        interaction has not arrived waits in the store.
        """
        result = IngestResult()
        now = self._clock()
        with self._tx() as db:
            for event in interactions:
                if not event.query_id:
                    result.ignored["interaction without query id"] += 1
                    continue
                if self._is_forgotten(db, event.session_pseudonym, event.query_id):
                    result.ignored["interaction of a forgotten session"] += 1
                    continue
                cur = db.execute(
                    "INSERT OR IGNORE INTO interactions (query_id, page_title, question, answer, passages, "
                    "model_version, received_at, page_url, session_pseudonym, network) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        event.query_id,
                        event.page_title,
                        event.question,
                        event.answer,
                        json.dumps(list(event.passages)),
                        event.model_version,
                        now,
                        event.page_url,
                        event.session_pseudonym,
                        query_id_network(event.query_id),
                    ),
                )
                if cur.rowcount == 0:
                    result.duplicates += 1
                    continue
                waiting = db.execute(
                    "SELECT * FROM feedback WHERE query_id = ? AND joined = 0 ORDER BY received_at, rowid",
                    (event.query_id,),
                ).fetchall()
                for row in waiting:
                    self._join(db, _signal_from_row(row), now, result)
            for signal in feedback:
                if not signal.query_id:
                    result.ignored["feedback without query id"] += 1
                    continue
                if self._is_forgotten(db, signal.session, signal.query_id):
                    result.ignored["feedback of a forgotten session"] += 1
                    continue
                cur = db.execute(
                    "INSERT OR IGNORE INTO feedback (feedback_id, query_id, kind, value, text, role, "
                    "received_at, session) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        signal.feedback_id,
                        signal.query_id,
                        signal.kind,
                        signal.value,
                        signal.text,
                        signal.role,
                        now,
                        signal.session,
                    ),
                )
                if cur.rowcount == 0:
                    # A redelivered vote, even one superseded since, changes nothing.
                    result.duplicates += 1
                    continue
                if signal.kind in _VOTES:
                    self._supersede(db, signal, now, result)
                self._join(db, signal, now, result)
        return result

    @staticmethod
    def _is_forgotten(db: sqlite3.Connection, session: str, query_id: str) -> bool:
        """Whether the event belongs to a forgotten session: its own, or the one its query id names."""
        hashes = {tombstone(x) for x in (session, query_id_session(query_id)) if x}
        if not hashes:
            return False
        marks = ",".join("?" * len(hashes))
        sql = f"SELECT 1 FROM forgotten WHERE session_hash IN ({marks})"
        return db.execute(sql, tuple(hashes)).fetchone() is not None

    def _supersede(
        self, db: sqlite3.Connection, signal: FeedbackSignal, now: float, result: IngestResult
    ) -> None:
        """One rating or thumbs per answer and role: a later one replaces the earlier, never adds.

        What the earlier one made (a positive, a negative, a vote for agreement) is undone unless it
        is already in a dataset (datasets are immutable); other roles' votes on the answer stand.
        """
        older = db.execute(
            f"SELECT feedback_id FROM feedback WHERE query_id = ? AND role = ? AND feedback_id != ? "
            f"AND superseded = 0 AND kind IN ({','.join('?' * len(_VOTES))})",
            (signal.query_id, signal.role, signal.feedback_id, *_VOTES),
        ).fetchall()
        if not older:
            return
        db.executemany(
            "UPDATE feedback SET superseded = 1 WHERE feedback_id = ?", [(r["feedback_id"],) for r in older]
        )
        result.ignored["earlier rating replaced"] += len(older)
        db.execute(
            "DELETE FROM examples WHERE query_id = ? AND source IN (?, ?) AND dataset_id IS NULL",
            (signal.query_id, Source.POSITIVE.value, Source.NEGATIVE.value),
        )
        db.execute("DELETE FROM positive_votes WHERE query_id = ?", (signal.query_id,))
        others = db.execute(
            f"SELECT * FROM feedback WHERE query_id = ? AND role != ? AND superseded = 0 AND joined = 1 "
            f"AND kind IN ({','.join('?' * len(_VOTES))}) ORDER BY received_at, rowid",
            (signal.query_id, signal.role, *_VOTES),
        ).fetchall()
        for row in others:
            self._join(db, _signal_from_row(row), now, result)

    def _join(self, db: sqlite3.Connection, signal: FeedbackSignal, now: float, result: IngestResult) -> None:
        row = db.execute("SELECT * FROM interactions WHERE query_id = ?", (signal.query_id,)).fetchone()
        if row is None:
            return  # waits for its interaction
        decision = self.policy.decide(signal, row["answer"])
        # Kept: the policy took it (an example, or a positive the answer already has or that waits
        # for agreement). Only a kept review takes the answer out of the review queue; one the policy
        # refused (a correction too long to train on, say) leaves it there for another try.
        db.execute(
            "UPDATE feedback SET joined = 1, kept = ? WHERE feedback_id = ?",
            (decision.source is not None, signal.feedback_id),
        )
        if decision.source is None:
            result.ignored[decision.why] += 1
            return
        source = decision.source
        payload: dict[str, Any] = {
            "query_id": row["query_id"],
            "page_title": row["page_title"],
            "passages": json.loads(row["passages"]),
            "question": row["question"],
            "model_answer": row["answer"],
            "model_version": row["model_version"],
            "feedback_id": signal.feedback_id,
        }
        if source is Source.CORRECTION:
            payload["answer"] = signal.text.strip()
            example_id = f"c-{signal.feedback_id}"
            # The expert's answer supersedes a positive rating of the model's answer not yet batched,
            # and a later correction of the answer replaces an earlier one not yet batched: one
            # target per answer. An earlier one already in a dataset stays there (datasets are
            # immutable) and has trained or will; the later one trains in a later batch.
            db.execute(
                "DELETE FROM examples WHERE query_id = ? AND source = ? AND dataset_id IS NULL",
                (signal.query_id, Source.POSITIVE.value),
            )
            replaced = db.execute(
                "DELETE FROM examples WHERE query_id = ? AND source = ? AND dataset_id IS NULL "
                "AND example_id != ?",
                (signal.query_id, Source.CORRECTION.value, example_id),
            ).rowcount
            if replaced:
                result.ignored["earlier correction replaced"] += replaced
        elif source is Source.POSITIVE:
            corrected = db.execute(
                "SELECT 1 FROM examples WHERE query_id = ? AND source = ?",
                (signal.query_id, Source.CORRECTION.value),
            ).fetchone()
            if corrected:
                result.ignored["positive rating of a corrected answer"] += 1
                return
            if self.policy.needs_agreement(signal) and not self._agreed(db, signal, row, now, result):
                return
            payload["answer"] = row["answer"].strip()
            example_id = f"p-{signal.query_id}"
        else:
            payload["rating"] = signal.value
            payload["feedback_kind"] = signal.kind
            example_id = f"n-{signal.query_id}"
        cur = db.execute(
            "INSERT OR IGNORE INTO examples (example_id, query_id, source, payload, received_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (example_id, signal.query_id, source.value, json.dumps(payload, sort_keys=True), now),
        )
        if cur.rowcount:
            result.examples[source.value] += 1
        else:
            result.ignored[f"{source.value} for this answer already kept"] += 1

    def _agreed(
        self,
        db: sqlite3.Connection,
        signal: FeedbackSignal,
        row: sqlite3.Row,
        now: float,
        result: IngestResult,
    ) -> bool:
        """Records a visitor's positive vote; True once enough distinct voters rated the same answer to
        the same question high and none of their answers is kept as a positive yet.

        Votes that share a session or the client network their query ids name (the gateway names
        it) are one voter (`Voters`): sessions made by the hundred from one network agree with
        nobody, nor does one session asking from its IPv4 and its IPv6 network.
        """
        key = agreement_key(row["question"], row["answer"])
        db.execute(
            "INSERT OR REPLACE INTO positive_votes (query_id, agree_key, session, network, received_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (signal.query_id, key, signal.session, query_id_network(signal.query_id), now),
        )
        voters = count_voters(
            (row["session"], row["network"])
            for row in db.execute("SELECT session, network FROM positive_votes WHERE agree_key = ?", (key,))
        )
        if voters < self.policy.settings.positive_min_sessions:
            result.ignored["positive waiting for other sessions to agree"] += 1
            return False
        kept = db.execute(
            "SELECT 1 FROM examples e JOIN positive_votes v ON v.query_id = e.query_id "
            "WHERE v.agree_key = ? AND e.source = ?",
            (key, Source.POSITIVE.value),
        ).fetchone()
        if kept:
            result.ignored["positive for this answer already kept"] += 1
            return False
        return True

    # ------------------------------------------------------------ batches

    def pending(self) -> Pending:
        """Examples not yet in a dataset."""
        rows = self._query(
            "SELECT source, COUNT(*) AS n, MIN(received_at) AS oldest FROM examples "
            "WHERE dataset_id IS NULL GROUP BY source"
        )
        by = {r["source"]: r for r in rows}
        train = [by[s] for s in TRAINING_SOURCES if s in by]
        negatives = by.get(Source.NEGATIVE.value)
        return Pending(
            examples=sum(r["n"] for r in train),
            negatives=negatives["n"] if negatives else 0,
            oldest_received_at=min((r["oldest"] for r in train), default=None),
        )

    def cut(self, *, max_examples: int, reason: str) -> Cut | None:
        """Moves the oldest waiting training examples (and every waiting negative) into a new
        dataset with its queued job, in one transaction; None when no training example waits."""
        now = self._clock()
        with self._tx() as db:
            placeholders = ",".join("?" * len(TRAINING_SOURCES))
            rows = db.execute(
                f"SELECT seq, example_id FROM examples WHERE dataset_id IS NULL "
                f"AND source IN ({placeholders}) ORDER BY seq LIMIT ?",
                (*TRAINING_SOURCES, max_examples),
            ).fetchall()
            if not rows:
                return None
            dataset_id, job_id = batch_ids([r["example_id"] for r in rows], now)
            db.execute(
                "INSERT INTO datasets (dataset_id, created_at, reason, examples, negatives) "
                "VALUES (?, ?, ?, ?, 0)",
                (dataset_id, now, reason, len(rows)),
            )
            db.executemany(
                "UPDATE examples SET dataset_id = ? WHERE seq = ?", [(dataset_id, r["seq"]) for r in rows]
            )
            negatives = db.execute(
                "UPDATE examples SET dataset_id = ? WHERE dataset_id IS NULL AND source = ?",
                (dataset_id, Source.NEGATIVE.value),
            ).rowcount
            db.execute("UPDATE datasets SET negatives = ? WHERE dataset_id = ?", (negatives, dataset_id))
            db.execute(
                "INSERT INTO jobs (job_id, dataset_id, state, examples, created_at) VALUES (?, ?, ?, ?, ?)",
                (job_id, dataset_id, QUEUED, len(rows), now),
            )
        return Cut(dataset_id, job_id, len(rows), negatives, reason)

    def dataset_rows(self, dataset_id: str) -> list[dict[str, Any]]:
        """A dataset's examples in batch order: {id, source, **payload}."""
        rows = self._query(
            "SELECT example_id, source, payload FROM examples WHERE dataset_id = ? ORDER BY seq",
            (dataset_id,),
        )
        return [{"id": r["example_id"], "source": r["source"], **json.loads(r["payload"])} for r in rows]

    def dataset(self, dataset_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM datasets WHERE dataset_id = ?", (dataset_id,))
        return dict(rows[0]) if rows else None

    def unwritten_datasets(self) -> list[str]:
        """Datasets cut but not yet written to the artifact store (a crash came in between)."""
        sql = "SELECT dataset_id FROM datasets WHERE written = 0 ORDER BY created_at, rowid"
        return [r["dataset_id"] for r in self._query(sql)]

    def mark_written(self, dataset_id: str, sha256: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE datasets SET written = 1, sha256 = ? WHERE dataset_id = ?", (sha256, dataset_id)
            )

    # ------------------------------------------------------------ jobs

    def jobs(self, *, states: Sequence[str] = (), limit: int = 0) -> list[Job]:
        """Jobs, newest first (optionally only in `states`, at most `limit`)."""
        sql = "SELECT * FROM jobs"
        args: list[Any] = []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += list(states)
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return [_job(r) for r in self._query(sql, args)]

    def job(self, job_id: str) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def update_job(self, job_id: str, **fields: Any) -> Job:
        """Sets columns of a job; `state` must be one of JOB_STATES."""
        if "state" in fields and fields["state"] not in JOB_STATES:
            raise ValueError(f"unknown job state {fields['state']!r}")
        allowed = set(Job.__dataclass_fields__) - {"job_id", "dataset_id", "created_at"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        with self._tx() as db:
            sets = ", ".join(f"{k} = ?" for k in fields)
            db.execute(f"UPDATE jobs SET {sets} WHERE job_id = ?", (*fields.values(), job_id))
        job = self.job(job_id)
        assert job is not None
        return job

    # ------------------------------------------------------------ review queue

    def review_items(
        self,
        *,
        caller: str,
        canary_version: str | None,
        order: str = "newest",
        limit: int = 50,
        query_id: str | None = None,
    ) -> list[ReviewItem]:
        """Answers that need an expert and that no expert (or admin) has reviewed yet.

        An answer needs one when a visitor rated it low, gave it a thumbs down or commented on it,
        or when the canary version gave it (its newest CANARY_REVIEW_LIMIT answers). It is reviewed
        once an expert's feedback on it is kept (`_join`): received is not enough, a correction the
        policy refuses leaves it here. Items another caller holds a live claim on are left out;
        `order` is "newest" (latest feedback first) or "impact" (severity x times asked: by distinct
        askers, those sharing a session or a client network being one, `Voters`).
        """
        if order not in ("newest", "impact"):
            raise ValueError(f"unknown order {order!r}")
        now = self._clock()
        where = ""
        args: dict[str, Any] = {
            "rating": events_pb2.FEEDBACK_KIND_RATING,
            "thumbs": events_pb2.FEEDBACK_KIND_THUMBS,
            "comment": events_pb2.FEEDBACK_KIND_COMMENT,
            "expert": events_pb2.REVIEWER_ROLE_EXPERT,
            "admin": events_pb2.REVIEWER_ROLE_ADMIN,
            "low": self.policy.settings.negative_max_rating,
            "canary": canary_version or "",
            "caller": caller,
            "now": now,
            "limit": limit,
            "canary_limit": CANARY_REVIEW_LIMIT,
        }
        if query_id is not None:
            where = "AND i.query_id = :query_id"
            args["query_id"] = query_id
        # By impact every candidate is scored (times asked is counted below, in Python); by newest
        # only the page asked for.
        page = "" if order == "impact" else "ORDER BY last_at DESC, query_id LIMIT :limit"
        rows = self._query(
            f"""
            WITH candidates AS (
                SELECT query_id FROM feedback
                WHERE ((kind = :rating AND value BETWEEN 1 AND :low) OR (kind = :thumbs AND value < 0)
                       OR (kind = :comment AND text != ''))
                  AND role NOT IN (:expert, :admin) AND superseded = 0
                UNION
                SELECT query_id FROM (
                    SELECT query_id FROM interactions WHERE model_version = :canary
                    ORDER BY received_at DESC LIMIT :canary_limit
                )
            ),
            signals AS (
                SELECT f.query_id,
                       MIN(CASE WHEN f.kind = :rating AND f.value > 0 THEN f.value END) AS lowest_rating,
                       SUM(f.kind = :thumbs AND f.value < 0) AS thumbs_down,
                       SUM(f.kind = :comment AND f.text != '') AS comments,
                       MAX(f.received_at) AS last_feedback_at
                FROM candidates c JOIN feedback f ON f.query_id = c.query_id
                WHERE f.role NOT IN (:expert, :admin) AND f.superseded = 0 GROUP BY f.query_id
            ),
            scored AS (
                SELECT i.*, s.last_feedback_at,
                       COALESCE(s.lowest_rating, 0) AS lowest_rating,
                       COALESCE(s.thumbs_down, 0) AS thumbs_down,
                       COALESCE(s.comments, 0) AS comments,
                       i.model_version = :canary AS canary,
                       lower(trim(i.question)) AS asked,
                       c.claimer, c.until,
                       COALESCE(s.last_feedback_at, i.received_at) AS last_at
                FROM candidates k
                JOIN interactions i ON i.query_id = k.query_id
                LEFT JOIN signals s ON s.query_id = i.query_id
                LEFT JOIN review_claims c ON c.query_id = i.query_id AND c.until > :now
                WHERE NOT EXISTS (
                    SELECT 1 FROM feedback e
                    WHERE e.query_id = i.query_id AND e.role IN (:expert, :admin) AND e.kept = 1
                ) {where}
            )
            SELECT *,
                   (CASE WHEN lowest_rating > 0 THEN 6 - lowest_rating ELSE 0 END)
                    + 3 * thumbs_down + 2 * comments + canary AS severity
            FROM scored
            WHERE ((lowest_rating > 0 AND lowest_rating <= :low) OR thumbs_down > 0 OR comments > 0
                   OR canary)
              AND (claimer IS NULL OR claimer = :caller)
            {page}
            """,
            args,
        )
        asked = self._times_asked({r["asked"] for r in rows})
        if order == "impact":
            rows.sort(key=lambda r: (-r["severity"] * asked[r["asked"]], -r["last_at"], r["query_id"]))
            rows = rows[:limit]
        comments: dict[str, list[str]] = collections.defaultdict(list)
        if rows:
            ids = [r["query_id"] for r in rows]
            for row in self._query(
                f"SELECT query_id, text FROM feedback WHERE kind = ? AND text != '' AND role NOT IN (?, ?) "
                f"AND query_id IN ({','.join('?' * len(ids))}) ORDER BY received_at, rowid",
                (args["comment"], args["expert"], args["admin"], *ids),
            ):
                comments[row["query_id"]].append(row["text"])
        return [_review_item(r, comments[r["query_id"]], args["low"], asked[r["asked"]]) for r in rows]

    def _times_asked(self, questions: set[str]) -> dict[str, int]:
        """Distinct askers of each question (trimmed, lowercased): those that share a session or a
        client network are one (`Voters`), per question."""
        pairs: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        ordered = sorted(questions)
        for start in range(0, len(ordered), 500):
            chunk = ordered[start : start + 500]
            for row in self._query(
                "SELECT lower(trim(question)) AS asked, session_pseudonym, network FROM interactions "
                f"WHERE lower(trim(question)) IN ({','.join('?' * len(chunk))})",
                chunk,
            ):
                pairs[row["asked"]].append((row["session_pseudonym"], row["network"]))
        return {question: count_voters(pairs[question]) for question in questions}

    def claim(
        self,
        query_id: str,
        caller: str,
        *,
        ttl_s: float,
        release: bool = False,
        canary_version: str | None = None,
    ) -> float | None:
        """Claims an answer in the review queue for `caller` for `ttl_s` (renewing the caller's own
        claim), or releases the caller's claim.

        Returns the claim's end (0 once released), or None while another caller's claim is live;
        KeyError when no such answer is stored; NeedsNoReview when the answer is not in the queue
        (`canary_version` as the queue's), and then no claim of it is left behind.
        """
        now = self._clock()
        needs_no_review = False
        with self._tx() as db:
            if db.execute("SELECT 1 FROM interactions WHERE query_id = ?", (query_id,)).fetchone() is None:
                raise KeyError(query_id)
            db.execute("DELETE FROM review_claims WHERE until <= ?", (now,))
            held = db.execute("SELECT claimer FROM review_claims WHERE query_id = ?", (query_id,)).fetchone()
            if held is not None and held["claimer"] != caller:
                return None
            if release:
                db.execute("DELETE FROM review_claims WHERE query_id = ?", (query_id,))
                return 0.0
            # Checked while this transaction holds the writers' lock, so no review can be stored in
            # between (the read sees everything committed; no other caller holds the answer).
            listed = self.review_items(
                caller=caller, canary_version=canary_version, query_id=query_id, limit=1
            )
            if not listed:
                db.execute("DELETE FROM review_claims WHERE query_id = ?", (query_id,))
                needs_no_review = True
            else:
                until = now + ttl_s
                db.execute("INSERT OR REPLACE INTO review_claims VALUES (?, ?, ?)", (query_id, caller, until))
        if needs_no_review:
            raise NeedsNoReview(query_id)
        return until

    # ------------------------------------------------------------ housekeeping

    def purge(self, retention_s: float) -> dict[str, int]:
        """Forgets interactions, feedback and batched examples older than the retention window, and
        review claims that ended or whose answer is gone (a claim's query id names the asker).

        Waiting examples are kept whatever their age: they still have to reach a dataset.
        """
        now = self._clock()
        cutoff = now - retention_s
        with self._tx() as db:
            purged = {
                # Feedback that never met its interaction (lost, or from an unknown answer): counted.
                "unjoined": db.execute(
                    "SELECT COUNT(*) FROM feedback WHERE received_at < ? AND joined = 0", (cutoff,)
                ).fetchone()[0],
                "interactions": db.execute(
                    "DELETE FROM interactions WHERE received_at < ?", (cutoff,)
                ).rowcount,
                "feedback": db.execute("DELETE FROM feedback WHERE received_at < ?", (cutoff,)).rowcount,
                "positive_votes": db.execute(
                    "DELETE FROM positive_votes WHERE received_at < ?", (cutoff,)
                ).rowcount,
                "examples": db.execute(
                    "DELETE FROM examples WHERE received_at < ? AND dataset_id IN "
                    "(SELECT dataset_id FROM datasets WHERE written = 1)",
                    (cutoff,),
                ).rowcount,
            }
            purged["review_claims"] = db.execute(
                "DELETE FROM review_claims WHERE until <= ? "
                "OR query_id NOT IN (SELECT query_id FROM interactions)",
                (now,),
            ).rowcount
            return purged

    def forget(self, session: str) -> Forgotten:
        """Removes a session's interactions, all feedback on them and the session's own feedback, with
        their examples, votes and review claims, in one transaction; tombstones the session so its
        events, replayed from Kafka, are dropped. Feedback the session gave on another session's
        answer goes with the examples it made; that answer and others' feedback on it stay.
        `vacuum()` afterwards, so nothing of it stays in free pages of the file (the trainer does once
        the datasets are rewritten: a VACUUM that fails, a full disk, then leaves no dataset
        unrewritten)."""
        if not session:
            raise ValueError("a session pseudonym is required")
        now = self._clock()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO forgotten VALUES (?, ?)", (tombstone(session), now))
            ids = {
                r[0]
                for r in db.execute(
                    "SELECT query_id FROM interactions WHERE session_pseudonym = ?", (session,)
                )
            }
            # An expert's correction carries the expert's pseudonym; its query id names the asker.
            # So does an example's, which outlives its interaction and feedback in the retention
            # purge while it waits for a batch, and a review claim's, which outlived them until
            # the purge removed claims too.
            for table in ("feedback", "examples", "review_claims"):
                ids |= {
                    r[0]
                    for r in db.execute(
                        f"SELECT query_id FROM {table} WHERE query_id LIKE ?", (like_session(session),)
                    )
                    if query_id_session(r[0]) == session
                }
            db.execute("CREATE TEMP TABLE IF NOT EXISTS forget_ids (query_id TEXT PRIMARY KEY)")
            db.execute("DELETE FROM forget_ids")
            db.executemany("INSERT INTO forget_ids VALUES (?)", [(q,) for q in ids])
            inside = "query_id IN (SELECT query_id FROM forget_ids)"
            # The examples the session's own feedback made (on any answer: an expert's correction of
            # someone else's answer is the expert's text), found by the feedback id they carry.
            made = (
                "json_extract(payload, '$.feedback_id') IN "
                "(SELECT feedback_id FROM feedback WHERE session = ?)"
            )
            example_ids = {
                r[0]
                for r in db.execute(f"SELECT example_id FROM examples WHERE {inside} OR {made}", (session,))
            }
            examples = db.execute(f"DELETE FROM examples WHERE {inside} OR {made}", (session,)).rowcount
            feedback = db.execute(f"DELETE FROM feedback WHERE {inside} OR session = ?", (session,)).rowcount
            interactions = db.execute(f"DELETE FROM interactions WHERE {inside}").rowcount
            db.execute(f"DELETE FROM positive_votes WHERE {inside} OR session = ?", (session,))
            db.execute(f"DELETE FROM review_claims WHERE {inside}")
            db.execute("DELETE FROM forget_ids")
        return Forgotten(interactions, feedback, examples, frozenset(ids), frozenset(example_ids))

    def replace_dataset(self, old: str, new: str, *, examples: int, negatives: int, sha256: str) -> None:
        """Points the store (its examples, its job) at a dataset's new version and drops the old id."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM datasets WHERE dataset_id = ?", (old,)).fetchone()
            if row is None:
                raise KeyError(old)
            db.execute(
                "INSERT INTO datasets (dataset_id, created_at, reason, examples, negatives, written, sha256) "
                "VALUES (?, ?, ?, ?, ?, 1, ?)",
                (new, row["created_at"], row["reason"], examples, negatives, sha256),
            )
            db.execute("UPDATE examples SET dataset_id = ? WHERE dataset_id = ?", (new, old))
            db.execute("UPDATE jobs SET dataset_id = ? WHERE dataset_id = ?", (new, old))
            db.execute("DELETE FROM datasets WHERE dataset_id = ?", (old,))

    def vacuum(self) -> None:
        """Rewrites the file without free pages, and empties the write-ahead log into it.

        Writers wait for it (seconds on a large store); readers do not: they have a connection of
        their own and WAL lets them read meanwhile.
        """
        with self._lock:
            for sql in ("PRAGMA wal_checkpoint(TRUNCATE)", "VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)"):
                row = self._db.execute(sql).fetchone()
                # Still busy after the timeout (a reader that would not finish): pages of the
                # forgotten rows may be left in the log, so this must not pass for done.
                if row is not None and row[0]:
                    raise sqlite3.OperationalError(f"{sql}: the database stayed busy")

    def counts(self) -> dict[str, int]:
        """Rows per table, examples by source, and feedback still waiting for its interaction."""
        out: dict[str, int] = {}
        for table in ("interactions", "feedback", "examples", "datasets", "jobs"):
            out[table] = self._query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]
        for row in self._query("SELECT source, COUNT(*) AS n FROM examples GROUP BY source"):
            out[f"examples.{row['source']}"] = row["n"]
        out["feedback.waiting"] = self._query("SELECT COUNT(*) AS n FROM feedback WHERE joined = 0")[0]["n"]
        return out


def _review_item(row: sqlite3.Row, comments: list[str], low: int, times_asked: int) -> ReviewItem:
    reasons = []
    if 0 < row["lowest_rating"] <= low:
        reasons.append(ReviewReason.LOW_RATING)
    if row["thumbs_down"]:
        reasons.append(ReviewReason.THUMBS_DOWN)
    if row["comments"]:
        reasons.append(ReviewReason.COMMENT)
    if row["canary"]:
        reasons.append(ReviewReason.CANARY)
    return ReviewItem(
        query_id=row["query_id"],
        question=row["question"],
        answer=row["answer"],
        passages=json.loads(row["passages"]),
        page_url=row["page_url"],
        page_title=row["page_title"],
        model_version=row["model_version"],
        reasons=reasons,
        lowest_rating=row["lowest_rating"],
        thumbs_down=row["thumbs_down"],
        comments=comments,
        times_asked=times_asked,
        impact=float(row["severity"] * times_asked),
        answered_at=row["received_at"],
        last_feedback_at=row["last_feedback_at"],
        claimed_until=row["until"],
    )


def _signal_from_row(row: sqlite3.Row) -> FeedbackSignal:
    return FeedbackSignal(
        feedback_id=row["feedback_id"],
        query_id=row["query_id"],
        kind=row["kind"],
        value=row["value"],
        text=row["text"],
        role=row["role"],
        session=row["session"],
    )


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["event_emitted"] = bool(data["event_emitted"])
    return Job(**data)
