"""Live signals per model version (ratings, thumbs, ignores, errors, latency) and the canary verdict.

Served interactions are counted per version and per minute, and per asker; feedback is kept as one
vote per answer and kind (a later vote replaces it). Both are judged per voter: votes and answers
that share a session or a client network (where the gateway named one) are one voter, so one
visitor is one voice however many events, answers, sessions or networks they make
(docs/security.md). Everything is in SQLite under the evaluator's state
folder, written before the consumer commits its offsets, so a restart neither loses nor needs to
re-read it. A forgotten session's votes and served answers are deleted, and its events, replayed,
are dropped at its tombstone.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flywheel_common.pseudonym import tombstone
from flywheel_common.query_ids import Voters, like_session, query_id_network, query_id_session
from flywheel_evaluator.settings import CanarySettings

# Upper bounds (ms) of the latency histogram kept per version and minute.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10_000, 15_000, 20_000, 30_000,
    60_000, 120_000, math.inf,
)  # fmt: skip
# Finish reasons of interactions that count as failed answers: the engine's error, and the service's
# own answer time limit passing. An answer ended by its caller ("client_deadline": the caller's own
# shorter deadline passed; a cancelled one is not logged) is neither failed nor timed: any caller
# could end its own answers early to sink a canary.
ERROR_REASONS = frozenset({"error", "deadline"})
CLIENT_DEADLINE = "client_deadline"


@dataclass
class Signal:
    """One live observation of a version: a feedback event or a served interaction."""

    version: str
    at: float
    kind: Literal["rating", "thumbs", "ignored", "interaction"]
    value: float = 0.0
    latency_ms: float | None = None
    failed: bool = False
    # The answer the signal is about, and the session it counts for (a keyed pseudonym).
    query_id: str = ""
    session: str = ""

    @property
    def network(self) -> str:
        """The pseudonym of the asker's network its query id names ("" when none was named)."""
        return query_id_network(self.query_id)


@dataclass
class VersionStats:
    """A version's live signals over a time window; feedback counts are per voter (each voter's
    ratings averaged, its thumbs netted), interaction counts per served answer, and the error and
    latency signals the canary is judged on per voter (`voter_error_shares`, `voter_latency_ms`).

    A voter is everything that shares a session or a client network (where the gateway named one).
    """

    version: str
    # Distinct voters that sent feedback, and that were served an answer.
    sessions: int = 0
    sessions_served: int = 0
    interactions: int = 0
    errors: int = 0
    ratings: int = 0
    rating_sum: float = 0.0
    rating_sq_sum: float = 0.0
    thumbs_up: int = 0
    thumbs_down: int = 0
    ignored: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BOUNDS_MS))
    # One value per served voter: its share of failed answers, and its typical answer time (the
    # geometric mean of its timed answers, ms). One client's thousand answers are one value here.
    voter_error_shares: list[float] = field(default_factory=list)
    voter_latency_ms: list[float] = field(default_factory=list)

    def add(self, other: VersionStats) -> None:
        """Adds another window's served-answer counts (feedback and the per-voter signals are counted
        per voter, not added)."""
        self.interactions += other.interactions
        self.errors += other.errors
        self.ratings += other.ratings
        self.rating_sum += other.rating_sum
        self.rating_sq_sum += other.rating_sq_sum
        self.thumbs_up += other.thumbs_up
        self.thumbs_down += other.thumbs_down
        self.ignored += other.ignored
        self.latency_counts = [a + b for a, b in zip(self.latency_counts, other.latency_counts, strict=True)]

    @property
    def thumbs(self) -> int:
        return self.thumbs_up + self.thumbs_down

    @property
    def feedback(self) -> int:
        """Per-voter votes: ratings, thumbs and ignores."""
        return self.ratings + self.thumbs + self.ignored

    @property
    def mean_rating(self) -> float | None:
        return self.rating_sum / self.ratings if self.ratings else None

    @property
    def rating_variance(self) -> float | None:
        """Sample variance of the ratings (None below two ratings)."""
        if self.ratings < 2:
            return None
        mean = self.rating_sum / self.ratings
        return max(self.rating_sq_sum - self.ratings * mean * mean, 0.0) / (self.ratings - 1)

    @property
    def thumbs_down_rate(self) -> float | None:
        return self.thumbs_down / self.thumbs if self.thumbs else None

    @property
    def answers_seen(self) -> int:
        """Voters behind the ignore rate: those served when known, else those with feedback."""
        return max(self.sessions_served, self.sessions)

    @property
    def ignore_rate(self) -> float | None:
        return self.ignored / self.answers_seen if self.answers_seen else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.interactions if self.interactions else None

    @property
    def latency_samples(self) -> int:
        return sum(self.latency_counts)

    def latency_quantile_ms(self, q: float) -> float | None:
        """Upper bound of the histogram bucket holding the q-quantile (None without samples)."""
        total = self.latency_samples
        if not total:
            return None
        running = 0
        for bound, count in zip(LATENCY_BOUNDS_MS, self.latency_counts, strict=True):
            running += count
            if running >= q * total:
                return bound
        return LATENCY_BOUNDS_MS[-1]

    def summary(self) -> dict[str, float]:
        """The numbers a decision records (rates only where there are samples)."""
        out: dict[str, float] = {
            "feedback": float(self.feedback),
            "sessions": float(self.sessions),
            "interactions": float(self.interactions),
        }
        for name in ("mean_rating", "thumbs_down_rate", "ignore_rate", "error_rate"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value)
        p95 = self.latency_quantile_ms(0.95)
        if p95 is not None and math.isfinite(p95):
            out["latency_p95_ms"] = p95
        if self.voter_error_shares:
            out["error_voters"] = float(len(self.voter_error_shares))
            out["voter_error_rate"] = sum(self.voter_error_shares) / len(self.voter_error_shares)
        if self.voter_latency_ms:
            logs = [math.log(ms) for ms in self.voter_latency_ms]
            out["voter_latency_ms"] = round(math.exp(sum(logs) / len(logs)), 1)
        return out


# Per-minute counters of served answers (stores made before feedback moved to `votes` have more
# columns, unused since).
_COLUMNS = ("interactions", "errors")
_FEEDBACK_KINDS = ("rating", "thumbs", "ignored")
# Per asker (session and network) and minute: answers, failed ones, timed ones and the sum of their
# times' natural logs (ms), so each voter's failure share and geometric-mean time add up exactly.
_ANSWER_COLUMNS = ("interactions", "errors", "timed", "log_latency")


@dataclass
class _Answers:
    interactions: float = 0.0
    errors: float = 0.0
    timed: float = 0.0
    log_latency: float = 0.0

    def add(self, other: _Answers) -> None:
        for name in _ANSWER_COLUMNS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class LiveStore:
    """Per-version, per-minute signal counters and canary start times in one SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # A forgotten session's rows are overwritten on delete, not left in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS signals (version TEXT NOT NULL, minute INTEGER NOT NULL, "
            + ", ".join(f"{c} REAL NOT NULL DEFAULT 0" for c in _COLUMNS)
            + ", latency TEXT NOT NULL DEFAULT '[]', PRIMARY KEY (version, minute))"
        )
        # One vote per answer and kind: a later one replaces it, so repeating a vote adds nothing.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS votes (query_id TEXT NOT NULL, kind TEXT NOT NULL, "
            "version TEXT NOT NULL, session TEXT NOT NULL, minute INTEGER NOT NULL, value REAL NOT NULL, "
            "PRIMARY KEY (query_id, kind))"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS votes_version ON votes (version, minute)")
        # Answers per version, minute and asker (session and network): the per-voter error and
        # latency signals, and the served voters behind the per-voter ignore rate.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (version TEXT NOT NULL, minute INTEGER NOT NULL, "
            "session TEXT NOT NULL, network TEXT NOT NULL, "
            + ", ".join(f"{c} REAL NOT NULL DEFAULT 0" for c in _ANSWER_COLUMNS)
            + ", PRIMARY KEY (version, minute, session, network))"
        )
        # The asker's network pseudonym ("" where none was named), added since stores were made.
        for table in ("votes", "served"):
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if columns and "network" not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN network TEXT NOT NULL DEFAULT ''")
        # Stores made before answers were counted per asker kept only who was served (one network per
        # session and minute): moved over, without counts, so the served voters stay.
        if self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'served'"
        ).fetchone():
            with self._transaction() as db:
                db.execute(
                    "INSERT OR IGNORE INTO answers (version, minute, session, network) "
                    "SELECT version, minute, session, network FROM served"
                )
                db.execute("DROP TABLE served")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS canary (version TEXT PRIMARY KEY, started_at REAL NOT NULL)"
        )
        # Hashes of forgotten sessions (never their pseudonyms), kept beyond any retention.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS forgotten (tombstone TEXT PRIMARY KEY, forgotten_at REAL NOT NULL)"
        )
        self._forgotten = {row[0] for row in self._db.execute("SELECT tombstone FROM forgotten")}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record(self, signals: Iterable[Signal]) -> int:
        """Adds signals durably (one transaction); returns how many were recorded."""
        # Not beside a forget: a signal checked against the tombstones before it, stored after it,
        # would outlive it.
        with self._writing:
            return self._record(signals)

    def _record(self, signals: Iterable[Signal]) -> int:
        buckets: dict[tuple[str, int], VersionStats] = {}
        votes: dict[tuple[str, str], tuple[str, str, str, int, float]] = {}
        answers: dict[tuple[str, int, str, str], _Answers] = {}
        count = 0
        for s in signals:
            if not s.version or self._of_forgotten(s):
                continue
            minute = int(s.at // 60)
            if s.kind in _FEEDBACK_KINDS:
                # Without a query id (not from the feedback service) the event is its own answer.
                key = s.query_id or f"event-{s.session}-{s.at}-{s.value}"
                votes[(key, s.kind)] = (s.version, s.session, s.network, minute, s.value)
            else:
                stats = buckets.setdefault((s.version, minute), VersionStats(s.version))
                asker = answers.setdefault((s.version, minute, s.session, s.network), _Answers())
                stats.interactions += 1
                stats.errors += int(s.failed)
                asker.interactions += 1
                asker.errors += int(s.failed)
                if s.latency_ms is not None and not s.failed:
                    index = bisect.bisect_left(LATENCY_BOUNDS_MS, s.latency_ms)
                    stats.latency_counts[min(index, len(LATENCY_BOUNDS_MS) - 1)] += 1
                    asker.timed += 1
                    asker.log_latency += math.log(max(s.latency_ms, 1.0))
            count += 1
        if not count:
            return 0
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO votes (query_id, kind, version, session, network, minute, value) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (query_id, kind) DO UPDATE SET "
                "version = excluded.version, session = excluded.session, network = excluded.network, "
                "minute = excluded.minute, value = excluded.value",
                [(key, kind, *vote) for (key, kind), vote in votes.items()],
            )
            db.executemany(
                f"INSERT INTO answers (version, minute, session, network, {', '.join(_ANSWER_COLUMNS)}) "
                f"VALUES (?, ?, ?, ?, {', '.join('?' for _ in _ANSWER_COLUMNS)}) "
                "ON CONFLICT (version, minute, session, network) DO UPDATE SET "
                + ", ".join(f"{c} = {c} + excluded.{c}" for c in _ANSWER_COLUMNS),
                [(*key, *(getattr(asker, c) for c in _ANSWER_COLUMNS)) for key, asker in answers.items()],
            )
            for (version, minute), stats in buckets.items():
                row = db.execute(
                    "SELECT latency FROM signals WHERE version = ? AND minute = ?", (version, minute)
                ).fetchone()
                latency = stats.latency_counts
                if row is not None:
                    latency = [a + b for a, b in zip(json.loads(row[0]), latency, strict=True)]
                values = [getattr(stats, c) for c in _COLUMNS]
                db.execute(
                    f"INSERT INTO signals (version, minute, {', '.join(_COLUMNS)}, latency) "
                    f"VALUES (?, ?, {', '.join('?' for _ in _COLUMNS)}, ?) "
                    f"ON CONFLICT (version, minute) DO UPDATE SET "
                    + ", ".join(f"{c} = {c} + excluded.{c}" for c in _COLUMNS)
                    + ", latency = excluded.latency",
                    (version, minute, *values, json.dumps(latency)),
                )
        return count

    def _of_forgotten(self, signal: Signal) -> bool:
        """Whether the signal is a forgotten session's: its own, or the one its query id names."""
        if not self._forgotten:
            return False
        sessions = (signal.session, query_id_session(signal.query_id))
        return any(tombstone(x) in self._forgotten for x in sessions if x)

    def forget(self, session: str) -> tuple[int, int]:
        """Deletes a session's votes (and any on the answers it was given) and the record of what it
        was served, and tombstones it; returns (votes, served rows) removed."""
        if not session:
            raise ValueError("a session pseudonym is required")
        with self._writing, self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO forgotten (tombstone, forgotten_at) VALUES (?, ?)",
                (tombstone(session), time.time()),
            )
            on_its_answers = [
                (query_id, kind)
                for query_id, kind in db.execute(
                    "SELECT query_id, kind FROM votes WHERE query_id LIKE ?", (like_session(session),)
                )
                if query_id_session(query_id) == session
            ]
            db.executemany("DELETE FROM votes WHERE query_id = ? AND kind = ?", on_its_answers)
            votes = (
                len(on_its_answers) + db.execute("DELETE FROM votes WHERE session = ?", (session,)).rowcount
            )
            served = db.execute("DELETE FROM answers WHERE session = ?", (session,)).rowcount
            self._forgotten.add(tombstone(session))
        with self._lock:
            # The write-ahead log still holds the deleted pages' old images until it is emptied.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return votes, served

    def stats(self, version: str, since: float, until: float | None = None) -> VersionStats:
        """A version's signals in the minutes from `since` (inclusive) to `until`."""
        window = (version, int(since // 60), int((until if until is not None else time.time()) // 60))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)}, latency FROM signals "
                "WHERE version = ? AND minute >= ? AND minute <= ?",
                window,
            ).fetchall()
            votes = self._db.execute(
                "SELECT session, network, kind, value FROM votes "
                "WHERE version = ? AND minute >= ? AND minute <= ?",
                window,
            ).fetchall()
            answered = self._db.execute(
                f"SELECT session, network, {', '.join(f'SUM({c})' for c in _ANSWER_COLUMNS)} FROM answers "
                "WHERE version = ? AND minute >= ? AND minute <= ? GROUP BY session, network",
                window,
            ).fetchall()
        voters = Voters((session, network) for session, network, *_ in [*votes, *answered])
        # Each voter's votes of a kind become one: its mean rating, its net thumbs, "ignored".
        per_voter: dict[tuple[str, str], list[float]] = {}
        for session, network, kind, value in votes:
            per_voter.setdefault((voters.of(session, network), kind), []).append(value)
        served: dict[str, _Answers] = {}
        for session, network, *counts in answered:
            served.setdefault(voters.of(session, network), _Answers()).add(_Answers(*counts))
        total = VersionStats(version, sessions_served=len(served))
        total.sessions = len({voter for voter, _ in per_voter})
        for (_, kind), values in per_voter.items():
            mean = sum(values) / len(values)
            if kind == "rating":
                total.ratings += 1
                total.rating_sum += mean
                total.rating_sq_sum += mean * mean
            elif kind == "thumbs":
                total.thumbs_up += int(mean > 0)
                total.thumbs_down += int(mean < 0)
            else:
                total.ignored += 1
        for asker in served.values():
            if asker.interactions:
                total.voter_error_shares.append(asker.errors / asker.interactions)
            if asker.timed:
                total.voter_latency_ms.append(math.exp(asker.log_latency / asker.timed))
        for row in rows:
            part = VersionStats(version)
            for name, value in zip(_COLUMNS, row[:-1], strict=True):
                setattr(part, name, type(getattr(part, name))(value))
            part.latency_counts = list(json.loads(row[-1]))
            total.add(part)
        return total

    def prune(self, older_than: float) -> None:
        """Forgets signals before `older_than` (seconds since the epoch)."""
        with self._transaction() as db:
            minute = int(older_than // 60)
            for table in ("signals", "votes", "answers"):
                db.execute(f"DELETE FROM {table} WHERE minute < ?", (minute,))

    def canary_started(self, version: str, now: float | None = None) -> float:
        """When the canary of `version` started (the first time it is asked, unless set before)."""
        with self._transaction() as db:
            row = db.execute("SELECT started_at FROM canary WHERE version = ?", (version,)).fetchone()
            if row is not None:
                return float(row[0])
            started = now if now is not None else time.time()
            db.execute("INSERT INTO canary (version, started_at) VALUES (?, ?)", (version, started))
            return started

    def start_canary(self, version: str, at: float | None = None) -> None:
        """Marks the start of `version`'s canary (a canary started again restarts its window)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO canary (version, started_at) VALUES (?, ?) "
                "ON CONFLICT (version) DO UPDATE SET started_at = excluded.started_at",
                (version, at if at is not None else time.time()),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


CanaryAction = Literal["promote", "rollback", "wait"]


@dataclass
class CanaryVerdict:
    """What to do with a running canary now, and why."""

    action: CanaryAction
    reasons: list[str]
    metrics: dict[str, float] = field(default_factory=dict)


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if pct else f"{value:.2f}"


def _rate_se(x: float, n: int, y: float, m: int) -> float:
    """Standard error of the difference of two proportions."""
    return math.sqrt(x * (1 - x) / n + y * (1 - y) / m)


@dataclass
class _Comparison:
    """Each signal compared: not worse than its tolerance, worse beyond noise, or worse within noise."""

    z: float
    compared: list[str] = field(default_factory=list)
    worse: list[str] = field(default_factory=list)
    unsure: list[str] = field(default_factory=list)

    def add(
        self,
        name: str,
        c: float,
        p: float,
        worse_by: float,
        se: float,
        tol: float,
        pct: bool = False,
        *,
        line: str = "",
        noise: str = "",
    ) -> None:
        line = line or f"{name} {_fmt(c, pct)} vs production {_fmt(p, pct)} (tolerance {_fmt(tol, pct)})"
        if worse_by <= tol + 1e-12:
            self.compared.append(line)
        elif worse_by - tol > self.z * se:
            # Worse than the tolerance allows with confidence (a one-sided non-inferiority test, as
            # the gate's): a drop only beyond zero with confidence, on a dozen sessions a side, is
            # still within the tolerance's reach of noise.
            self.worse.append(line)
        else:
            self.unsure.append(
                f"{line}, within noise ({self.z:g} standard errors = {noise or _fmt(self.z * se, pct)})"
            )


def _mean_var(values: list[float]) -> tuple[float, float]:
    """Mean and sample variance (0 below two values)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def _per_voter(
    canary: list[float], production: list[float], needed: int
) -> tuple[float, float, float] | None:
    """Canary's mean minus production's over voters' values (higher is worse) and its standard error,
    with each side's worst voter left out, so no one voter (one client, one page that is slow to
    answer) moves the difference either way; None below `needed` voters a side.

    Error and latency need no vote: one client drives them with its own asks, and the error
    tolerance (2 points) is less than one voter's weight in any canary of under fifty voters.
    """
    if min(len(canary), len(production)) < max(needed, 2):
        return None
    c_mean, c_var = _mean_var(sorted(canary)[:-1])
    p_mean, p_var = _mean_var(sorted(production)[:-1])
    return c_mean, p_mean, math.sqrt(c_var / (len(canary) - 1) + p_var / (len(production) - 1))


def _compare_signals(canary: VersionStats, production: VersionStats, settings: CanarySettings) -> _Comparison:
    """Compares every signal that has `min_signal_samples` voters on both sides (latency: and
    `min_latency_samples` timed answers); the error rate and latency per voter (`_per_voter`)."""
    n = settings.min_signal_samples
    result = _Comparison(settings.confidence_z)
    c_mean, p_mean = canary.mean_rating, production.mean_rating
    if c_mean is not None and p_mean is not None and canary.ratings >= n and production.ratings >= n:
        var_c, var_p = canary.rating_variance or 0.0, production.rating_variance or 0.0
        se = math.sqrt(var_c / canary.ratings + var_p / production.ratings)
        result.add("mean rating", c_mean, p_mean, p_mean - c_mean, se, settings.rating_tolerance)
    for name, c_rate, p_rate, c_n, p_n, tol in (
        (
            "thumbs-down rate",
            canary.thumbs_down_rate,
            production.thumbs_down_rate,
            canary.thumbs,
            production.thumbs,
            settings.thumbs_down_tolerance,
        ),
        (
            "ignore rate",
            canary.ignore_rate,
            production.ignore_rate,
            canary.answers_seen,
            production.answers_seen,
            settings.ignore_rate_tolerance,
        ),
    ):
        if c_rate is not None and p_rate is not None and c_n >= n and p_n >= n:
            se = _rate_se(c_rate, c_n, p_rate, p_n)
            result.add(name, c_rate, p_rate, c_rate - p_rate, se, tol, pct=True)
    # Each voter's share of failed answers, averaged over voters.
    errors = _per_voter(canary.voter_error_shares, production.voter_error_shares, n)
    if errors is not None:
        c_rate, p_rate, se = errors
        result.add(
            "error rate per voter", c_rate, p_rate, c_rate - p_rate, se, settings.error_rate_tolerance, True
        )
    # Each voter's typical time (the geometric mean of its answers'), compared as logs: a ratio.
    latency = _per_voter(
        [math.log(ms) for ms in canary.voter_latency_ms],
        [math.log(ms) for ms in production.voter_latency_ms],
        n,
    )
    if (
        latency is not None
        and canary.latency_samples >= settings.min_latency_samples
        and production.latency_samples >= settings.min_latency_samples
    ):
        c_log, p_log, se = latency
        tol = settings.latency_p95_tolerance
        line = (
            f"latency per voter {math.exp(c_log):.0f} ms vs production {math.exp(p_log):.0f} ms "
            f"(tolerance +{tol:.0%})"
        )
        noise = f"x{math.exp(settings.confidence_z * se):.2f}"
        result.add("latency", 0.0, 0.0, c_log - p_log, se, math.log1p(tol), line=line, noise=noise)
    return result


def judge_canary(
    canary: VersionStats, production: VersionStats, elapsed_s: float, settings: CanarySettings
) -> CanaryVerdict:
    """Rolls back when a signal is worse than production by more than its tolerance beyond noise (the
    excess over the tolerance exceeds `confidence_z` standard errors), once both sides have the
    minimum sample; promotes when no signal is worse than its tolerance after the minimum duration;
    otherwise waits. At the maximum duration a canary that still looks worse is rolled back, and one
    without enough samples gets `undecided_action`."""
    metrics = {f"canary_{k}": v for k, v in canary.summary().items()}
    metrics |= {f"production_{k}": v for k, v in production.summary().items()}
    metrics["elapsed_s"] = round(elapsed_s, 1)
    # The evidence is distinct voters (sessions, one per network the gateway named), so a single
    # visitor can neither sink nor carry a canary, however many sessions they make.
    sampled = canary.sessions >= settings.min_samples and production.sessions >= settings.min_samples
    signals = _compare_signals(canary, production, settings)
    worse, unsure, compared = signals.worse, signals.unsure, signals.compared
    samples = f"{canary.sessions} canary and {production.sessions} production voters with feedback"
    undecided = elapsed_s >= settings.max_duration_s
    if worse and sampled:
        return CanaryVerdict("rollback", [f"worse than production: {w}" for w in worse] + [samples], metrics)
    if undecided and (worse or unsure):
        reasons = [f"still worse than production after {elapsed_s:.0f} s: {w}" for w in worse + unsure]
        return CanaryVerdict("rollback", [*reasons, samples], metrics)
    if sampled and elapsed_s >= settings.min_duration_s and not unsure:
        if not compared:
            compared = ["no signal had enough observations on both sides to compare"]
        return CanaryVerdict("promote", [f"not worse: {c}" for c in compared] + [samples], metrics)
    if undecided:
        action = settings.undecided_action
        why = (
            f"undecided after {elapsed_s:.0f} s (limit {settings.max_duration_s:.0f} s): {samples}, "
            f"{settings.min_samples} needed on each side; policy: {action}"
        )
        return CanaryVerdict("wait" if action == "hold" else action, [why], metrics)
    waiting = f"waiting: {samples} ({settings.min_samples} needed each), {elapsed_s:.0f} s elapsed"
    if elapsed_s < settings.min_duration_s:
        waiting += f" ({settings.min_duration_s:.0f} s minimum)"
    return CanaryVerdict("wait", [*unsure, waiting], metrics)
