"""Feedback store: served impressions and their outcomes in SQLite (WAL, fsync on every commit).

An event is one impression (request id, scenario, user, the items shown with their positions, propensities
and the model's expected reward) with its outcomes (objective -> value in [0, 1] per shown item, with time).
A batch of events is one transaction: acknowledged only after the commit is on disk, and never half-written.
The same request id sent again with the same content is a duplicate (stored once); with other content it
is refused. Each shown item's reward (its outcomes weighted as the service weighs the objectives) updates
the item's running totals in the same transaction: the bandit's state, which survives restarts.

Schema changes are migrations applied in order; ``PRAGMA user_version`` records how many ran.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.data import INTERACTIONS_FILE, DataError, load_scenario
from shared.files import atomic_write_bytes

from .bandit import ItemStats

MIGRATIONS = (
    """
    CREATE TABLE impressions (
        request_id TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        scenario TEXT NOT NULL,
        user_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        arm TEXT NOT NULL,
        checkpoint TEXT NOT NULL,
        served REAL NOT NULL
    );
    CREATE INDEX impressions_by_scenario ON impressions (scenario, arm);
    CREATE TABLE shown (
        request_id TEXT NOT NULL REFERENCES impressions (request_id),
        position INTEGER NOT NULL,
        item_id TEXT NOT NULL,
        propensity REAL NOT NULL,
        expected REAL NOT NULL,
        explored INTEGER NOT NULL,
        reward REAL NOT NULL,
        PRIMARY KEY (request_id, position)
    );
    CREATE TABLE outcomes (
        request_id TEXT NOT NULL REFERENCES impressions (request_id),
        item_id TEXT NOT NULL,
        objective TEXT NOT NULL,
        value REAL NOT NULL,
        time REAL NOT NULL,
        PRIMARY KEY (request_id, item_id, objective)
    );
    CREATE TABLE item_stats (
        scenario TEXT NOT NULL,
        item_id TEXT NOT NULL,
        shown INTEGER NOT NULL,
        reward REAL NOT NULL,
        expected REAL NOT NULL,
        PRIMARY KEY (scenario, item_id)
    );
    """,
)


class FeedbackConflict(ValueError):
    """A request id that is already stored with other content."""


@dataclass(frozen=True)
class Shown:
    item_id: str
    position: int  # 0 = top of the list
    propensity: float  # probability the policy put this item in the list
    expected: float  # the model's expected reward of the item for this user (its prior)
    explored: bool = False  # filled an exploration slot


@dataclass(frozen=True)
class Outcome:
    item_id: str
    objective: str
    value: float  # in [0, 1]: a click 1, a rating scaled to [0, 1]
    time: float  # unix seconds


@dataclass(frozen=True)
class Event:
    """One served list and what the user did with it."""

    request_id: str
    scenario: str
    user_id: str
    served: float  # unix seconds
    shown: tuple[Shown, ...]
    outcomes: tuple[Outcome, ...] = ()
    policy: str = "greedy"
    arm: str = "A"
    checkpoint: str = ""

    def digest(self) -> str:
        """Hash of the whole content (a request id sent again must carry the same)."""
        shown = [[s.item_id, s.position, s.propensity, s.expected, s.explored] for s in self.shown]
        outcomes = [[o.item_id, o.objective, o.value, o.time] for o in self.outcomes]
        head = [self.request_id, self.scenario, self.user_id, self.served, self.policy, self.arm, self.checkpoint]
        return hashlib.sha256(json.dumps([head, shown, outcomes]).encode()).hexdigest()

    def reward(self, item_id: str, weights: Mapping[str, float]) -> float:
        """The item's outcomes weighted by ``weights`` (objective -> weight, summing to 1); missing = 0."""
        return sum(weights.get(o.objective, 0.0) * o.value for o in self.outcomes if o.item_id == item_id)


class FeedbackStore:
    """The feedback database of one service (thread-safe: one writer at a time)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"{self.path}: is a folder; serve.feedback-db names the database file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise ValueError(f"{self.path}: cannot open the feedback database ({exc})") from None
        self._lock = threading.Lock()
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")  # the WAL is fsynced before a commit returns
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except (sqlite3.DatabaseError, ValueError) as exc:
            self._db.close()
            if isinstance(exc, ValueError):
                raise
            raise ValueError(f"{self.path}: not a crossrec feedback database ({exc})") from None

    def _migrate(self) -> None:
        version = self.version
        if version == 0 and self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise ValueError(f"{self.path}: holds another application's tables; give crossrec a file of its own")
        if version > len(MIGRATIONS):
            raise ValueError(
                f"{self.path}: schema version {version} is newer than this crossrec knows ({len(MIGRATIONS)})"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self._transaction():
                for statement in filter(str.strip, script.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    @property
    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def record(self, events: Sequence[Event], weights: Mapping[str, float]) -> list[bool]:
        """Store a batch in one durable transaction; per event, whether it was new (False: a duplicate).
        ``weights``: objective -> weight of the reward (summing to 1). Raises :class:`FeedbackConflict` (nothing
        stored) when a request id is already stored with other content or repeats within the batch."""
        ids = [e.request_id for e in events]
        if len(set(ids)) != len(ids):
            raise FeedbackConflict("a request_id repeats within the batch")
        new = []
        with self._lock, self._transaction():
            for event in events:
                row = self._db.execute(
                    "SELECT digest FROM impressions WHERE request_id = ?", (event.request_id,)
                ).fetchone()
                if row is not None:
                    if row[0] != event.digest():
                        raise FeedbackConflict(f"request_id {event.request_id!r} is already stored with other content")
                    new.append(False)
                    continue
                self._insert(event, weights)
                new.append(True)
        return new

    def _insert(self, event: Event, weights: Mapping[str, float]) -> None:
        db = self._db
        db.execute(
            "INSERT INTO impressions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (event.request_id, event.digest(), event.scenario, event.user_id, event.policy, event.arm,
             event.checkpoint, event.served),
        )  # fmt: skip
        for s in event.shown:
            reward = event.reward(s.item_id, weights)
            db.execute(
                "INSERT INTO shown VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event.request_id, s.position, s.item_id, s.propensity, s.expected, int(s.explored), reward),
            )
            db.execute(
                "INSERT INTO item_stats VALUES (?, ?, 1, ?, ?) ON CONFLICT (scenario, item_id) DO UPDATE SET "
                "shown = shown + 1, reward = reward + excluded.reward, expected = expected + excluded.expected",
                (event.scenario, s.item_id, reward, s.expected),
            )
        db.executemany(
            "INSERT INTO outcomes VALUES (?, ?, ?, ?, ?)",
            [(event.request_id, o.item_id, o.objective, o.value, o.time) for o in event.outcomes],
        )

    def item_stats(self, scenario: str, item_ids: Sequence[str]) -> ItemStats:
        """Feedback totals aligned with ``item_ids`` (zeros for items never shown; items not listed are left
        out) and the reward earned and expected over every item of the scenario."""
        with self._lock:
            rows = self._db.execute(
                "SELECT item_id, shown, reward, expected FROM item_stats WHERE scenario = ?", (scenario,)
            ).fetchall()
        found = {r[0]: r[1:] for r in rows}
        table = np.asarray([found.get(i, (0, 0.0, 0.0)) for i in item_ids], dtype=np.float64).reshape(-1, 3)
        return ItemStats(table[:, 0], table[:, 1], table[:, 2], sum(r[2] for r in rows), sum(r[3] for r in rows))

    def engagements(self, scenario: str, objective: str) -> Iterator[tuple[str, str, float, dict[str, float]]]:
        """(user, item, time, the item's other outcomes) for every shown item whose ``objective`` outcome is
        positive, in the order the events were stored."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.user_id, o.item_id, o.time, o.request_id FROM outcomes o JOIN impressions i "
                "USING (request_id) WHERE i.scenario = ? AND o.objective = ? AND o.value > 0 ORDER BY o.rowid",
                (scenario, objective),
            ).fetchall()
            others = self._db.execute(
                "SELECT o.request_id, o.item_id, o.objective, o.value FROM outcomes o JOIN impressions i "
                "USING (request_id) WHERE i.scenario = ? AND o.objective != ?",
                (scenario, objective),
            ).fetchall()
        labels: dict[tuple[str, str], dict[str, float]] = {}
        for request_id, item_id, name, value in others:
            labels.setdefault((request_id, item_id), {})[name] = value
        for user, item, time, request_id in rows:
            yield user, item, time, labels.get((request_id, item), {})

    def arm_rewards(self, scenario: str) -> dict[str, np.ndarray]:
        """Arm -> reward of each of its impressions (the sum over its shown items), in the order stored."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.arm, COALESCE(SUM(s.reward), 0) FROM impressions i JOIN shown s USING (request_id) "
                "WHERE i.scenario = ? GROUP BY i.request_id ORDER BY i.rowid",
                (scenario,),
            ).fetchall()
        out: dict[str, list[float]] = {}
        for arm, reward in rows:
            out.setdefault(arm, []).append(reward)
        return {arm: np.asarray(v) for arm, v in out.items()}


def ingest(store: FeedbackStore, folder: str | Path) -> tuple[int, int]:
    """Append the engagements recorded in ``store`` for the scenario at ``folder`` to its canonical log, each
    once: (rows added, engagements already in the log). An engagement is a shown item whose first objective's
    outcome is positive, at the outcome's time; the item's other outcomes become its labels (>= 0.5 -> 1).
    Deduplicated by (user, item, timestamp), so running it again, or after a crash, adds nothing twice. The log
    is replaced atomically (old content + the new rows), and only after every new row is checked."""
    folder = Path(folder)
    scenario = load_scenario(folder)  # the canonical loader's errors for a bad folder
    if scenario.order != "timestamp":
        raise DataError(f"{folder / INTERACTIONS_FILE}: the log has no timestamps; feedback can only join a timed log")
    path = folder / INTERACTIONS_FILE
    old = path.read_bytes()
    present = set()
    for line in old.decode("utf-8").splitlines():
        if line.strip():
            known = json.loads(line)
            present.add((known["user_id"], known["item_id"], float(known["timestamp"])))
    items = set(scenario.item_ids)
    engagement, labelled = scenario.objectives[0], scenario.objectives[1:]
    lines, already = [], 0
    for user, item, time, outcomes in store.engagements(scenario.name, engagement):
        if item not in items:
            raise DataError(f"{store.path}: feedback on item '{item}', which is not in {folder}'s catalog")
        key = (user, item, float(time))
        if key in present:
            already += 1
            continue
        present.add(key)
        row: dict[str, object] = {
            "user_id": user,
            "item_id": item,
            "timestamp": int(time) if time.is_integer() else time,
        }
        row.update({o: int(outcomes[o] >= 0.5) for o in labelled if o in outcomes})
        lines.append(json.dumps(row) + "\n")
    if lines:
        separator = b"" if not old or old.endswith(b"\n") else b"\n"
        atomic_write_bytes(path, old + separator + "".join(lines).encode("utf-8"))
    return len(lines), already


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (nothing half-written)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
