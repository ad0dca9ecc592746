"""The interaction store on a device: every question a person asked, each attempt the model made, and the verdicts.

One SQLite file in WAL mode, so readers never block the writer and a crash (kill -9 included) loses no
committed interaction: each write is one transaction, an interaction and its first attempt land together
or not at all. Many writers may share the file, threads and processes alike; a writer waits up to
`busy_timeout` seconds for the lock. The schema carries its version (`PRAGMA user_version`) and is
migrated forward on open, one step per version, each step in its own transaction.

Rows keep the exact token ids: the prompt an attempt was generated under and the ids it generated, so
training replays what was sampled, never a re-tokenisation of the text.

A round learns from the store in three steps that survive a crash between any two: `pending` lists what
may be trained on, `claim` records which interactions a round used (no other round sees them meanwhile), and
once the server has accepted the round's reply `confirm` marks them consumed (or `release` frees them for a
later round if it was not).
An interaction a person deletes is gone with its attempts and claims: no later round sees it.

The database and its WAL and shared-memory files are readable by their owner only (mode 0600, whatever the
umask); a store made by an older spearfl is narrowed to that when opened.

Left out: encryption at rest (the file lives on the person's own device, under its permissions).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from spearfl.errors import UserError

# Version i + 1 is reached from version i by MIGRATIONS[i]; a new database runs them all.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: interactions and their attempts, with round claims
        """CREATE TABLE interactions (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            question TEXT NOT NULL,
            options TEXT,
            consumed_round INTEGER,
            consumed_at REAL
        )""",
        """CREATE TABLE attempts (
            interaction_id TEXT NOT NULL REFERENCES interactions(id) ON DELETE CASCADE,
            attempt INTEGER NOT NULL,
            prompt_ids TEXT NOT NULL,
            text TEXT NOT NULL,
            token_ids TEXT NOT NULL,
            finished_by TEXT NOT NULL,
            adapter_version INTEGER NOT NULL,
            created_at REAL NOT NULL,
            verdict INTEGER,
            hint TEXT,
            hint_withheld INTEGER NOT NULL DEFAULT 0,
            hint_gave_answer INTEGER NOT NULL DEFAULT 0,
            judged_at REAL,
            PRIMARY KEY (interaction_id, attempt)
        )""",
        """CREATE TABLE claims (
            round INTEGER NOT NULL,
            interaction_id TEXT NOT NULL REFERENCES interactions(id) ON DELETE CASCADE,
            PRIMARY KEY (round, interaction_id)
        )""",
    ),
    (  # 2: an owner per interaction, so a person lists and deletes their own; the age index serves retention
        "ALTER TABLE interactions ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX interactions_owner ON interactions(owner, created_at)",
        "CREATE INDEX interactions_age ON interactions(created_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
PRIVATE = 0o600
COMPANION_SUFFIXES = ("-wal", "-shm", "-journal")  # SQLite's files beside the database


class StoreError(UserError):
    """A request the store cannot honour: a verdict given twice, a revision before a verdict, an unknown one."""


class UnknownInteraction(StoreError):
    """No interaction (or attempt) with that id: never stored, or deleted."""


@dataclass(frozen=True)
class Attempt:
    """One answer: the prompt ids it was generated under, what it generated, and the person's verdict."""

    prompt_ids: list[int]
    text: str
    token_ids: list[int]
    adapter_version: int
    finished_by: str = "length"  # "eos", "stop" (the answer line's end) or "length": as the sampler reports it
    created_at: float = 0.0
    verdict: bool | None = None  # None: not judged yet
    hint: str | None = None
    hint_withheld: bool = False  # the hint stated an option: kept for the record, never shown to the model
    # the hint was shown and held the number of the answer later judged right: the revision copied it
    hint_gave_answer: bool = False


@dataclass(frozen=True)
class Interaction:
    """A question and its attempts: 0 is the first answer, 1, 2, ... the revisions."""

    id: str
    question: str
    options: tuple[str, ...] | None
    owner: str
    created_at: float
    attempts: list[Attempt] = field(default_factory=list)
    consumed_round: int | None = None

    @property
    def first(self) -> Attempt:
        return self.attempts[0]


class InteractionStore:
    """A device's interactions in one SQLite file; safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike, busy_timeout: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE))  # SQLite gives its companions the file's mode
        # One connection per store, serialised by a lock: sqlite3 connections are not for concurrent use.
        self.connection = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        self.lock = threading.Lock()
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it returns
        self.connection.execute("PRAGMA foreign_keys=ON")
        self.make_private()
        self.migrate()

    def close(self) -> None:
        with self.lock:
            self.connection.close()

    def make_private(self) -> None:
        """The database and its companions readable and writable by their owner only."""
        for path in [self.path, *(self.path.with_name(self.path.name + suffix) for suffix in COMPANION_SUFFIXES)]:
            if path.exists():
                os.chmod(path, PRIVATE)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before any read so two writers never interleave."""
        with self.lock:
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                yield self.connection
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
            self.connection.execute("COMMIT")

    @property
    def version(self) -> int:
        with self.lock:
            return self.connection.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one version a transaction; a newer file is refused."""
        while (version := self.version) < SCHEMA_VERSION:
            with self.transaction() as db:
                if db.execute("PRAGMA user_version").fetchone()[0] != version:
                    continue  # another process migrated meanwhile
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")
        if self.version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {self.version} is newer than this spearfl's {SCHEMA_VERSION}")

    # ------------------------------------------------------------------------------------------------ writes

    def add(self, question: str, first: Attempt, options: list[str] | None = None, owner: str = "") -> str:
        """Store a new interaction with its first attempt, in one transaction; returns its id."""
        interaction_id, now = uuid.uuid4().hex, time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO interactions (id, created_at, question, options, owner) VALUES (?, ?, ?, ?, ?)",
                (interaction_id, now, question, None if options is None else json.dumps(list(options)), owner),
            )
            insert_attempt(db, interaction_id, 0, first, now)
        return interaction_id

    def add_revision(self, interaction_id: str, attempt: Attempt) -> int:
        """Append a revision; only after the latest attempt was judged wrong. Returns its attempt number."""
        with self.transaction() as db:
            latest = latest_attempt(db, interaction_id)
            if latest["verdict"] is None:
                raise StoreError(f"interaction {interaction_id}: attempt {latest['attempt']} is not judged yet")
            if latest["verdict"]:
                raise StoreError(f"interaction {interaction_id}: attempt {latest['attempt']} was judged right")
            number = latest["attempt"] + 1
            insert_attempt(db, interaction_id, number, attempt, time.time())
        return number

    def judge(
        self, interaction_id: str, attempt: int, verdict: bool, hint: str | None = None, hint_withheld: bool = False
    ) -> None:
        """Record the person's verdict (and hint) on one attempt, once."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT verdict FROM attempts WHERE interaction_id = ? AND attempt = ?", (interaction_id, attempt)
            ).fetchone()
            if row is None:
                require_interaction(db, interaction_id)
                raise UnknownInteraction(f"interaction {interaction_id} has no attempt {attempt}")
            if row[0] is not None:
                raise StoreError(f"interaction {interaction_id}: attempt {attempt} is already judged")
            db.execute(
                "UPDATE attempts SET verdict = ?, hint = ?, hint_withheld = ?, judged_at = ?"
                " WHERE interaction_id = ? AND attempt = ?",
                (int(verdict), hint, int(hint_withheld), time.time(), interaction_id, attempt),
            )

    def mark_hint_gave_answer(self, interaction_id: str, attempt: int) -> None:
        """The hint on `attempt` held the answer a later attempt was judged right with: that revision is no win."""
        with self.transaction() as db:
            updated = db.execute(
                "UPDATE attempts SET hint_gave_answer = 1 WHERE interaction_id = ? AND attempt = ?", (interaction_id, attempt)
            ).rowcount
            if not updated:
                raise UnknownInteraction(f"interaction {interaction_id} has no attempt {attempt}")

    def delete(self, interaction_id: str, owner: str | None = None) -> None:
        """Delete an interaction with its attempts and claims; `owner` given: only that person's."""
        with self.transaction() as db:
            found = db.execute("SELECT owner FROM interactions WHERE id = ?", (interaction_id,)).fetchone()
            if found is None or (owner is not None and found[0] != owner):
                raise UnknownInteraction(f"no interaction {interaction_id}")
            db.execute("DELETE FROM interactions WHERE id = ?", (interaction_id,))

    def drop_older_than(self, seconds: float) -> int:
        """Retention: delete every interaction created more than `seconds` ago; returns how many."""
        with self.transaction() as db:
            return db.execute("DELETE FROM interactions WHERE created_at < ?", (time.time() - seconds,)).rowcount

    # ------------------------------------------------------------------------------------------------ rounds

    def pending(self) -> list[Interaction]:
        """What a round may learn from: interactions whose first attempt is judged, that no round consumed and no
        unsettled round claimed (a claim waits for the server's word on its round)."""
        with self.lock:
            ids = [row[0] for row in self.connection.execute(
                "SELECT i.id FROM interactions i JOIN attempts a ON a.interaction_id = i.id AND a.attempt = 0"
                " WHERE i.consumed_round IS NULL AND a.verdict IS NOT NULL"
                " AND i.id NOT IN (SELECT interaction_id FROM claims) ORDER BY i.created_at, i.id"
            )]
        return self.get_many(ids)

    def count_pending(self) -> int:
        """How many interactions `pending` would return."""
        with self.lock:
            return self.connection.execute(
                "SELECT COUNT(*) FROM interactions i JOIN attempts a ON a.interaction_id = i.id AND a.attempt = 0"
                " WHERE i.consumed_round IS NULL AND a.verdict IS NOT NULL"
                " AND i.id NOT IN (SELECT interaction_id FROM claims)"
            ).fetchone()[0]

    def claim(self, round_index: int, interaction_ids: list[str]) -> None:
        """Record that round `round_index` trains on these interactions (replacing an earlier claim of it)."""
        with self.transaction() as db:
            db.execute("DELETE FROM claims WHERE round = ?", (round_index,))
            db.executemany(
                "INSERT INTO claims (round, interaction_id) SELECT ?, id FROM interactions WHERE id = ?",
                [(round_index, interaction_id) for interaction_id in interaction_ids],
            )

    def confirm(self, round_index: int) -> int:
        """The server accepted the round: its claimed interactions are consumed; returns how many."""
        with self.transaction() as db:
            consumed = db.execute(
                "UPDATE interactions SET consumed_round = ?, consumed_at = ?"
                " WHERE consumed_round IS NULL AND id IN (SELECT interaction_id FROM claims WHERE round = ?)",
                (round_index, time.time(), round_index),
            ).rowcount
            db.execute("DELETE FROM claims WHERE round = ?", (round_index,))
        return consumed

    def release(self, round_index: int) -> None:
        """The round failed or its reply was dropped: its interactions stay pending."""
        with self.transaction() as db:
            db.execute("DELETE FROM claims WHERE round = ?", (round_index,))

    def claimed_rounds(self) -> list[int]:
        """Rounds with claims neither confirmed nor released (after a crash: to settle before the next round)."""
        with self.lock:
            return [row[0] for row in self.connection.execute("SELECT DISTINCT round FROM claims ORDER BY round")]

    # ------------------------------------------------------------------------------------------------ reads

    def get(self, interaction_id: str) -> Interaction:
        found = self.get_many([interaction_id])
        if not found:
            raise UnknownInteraction(f"no interaction {interaction_id}")
        return found[0]

    def get_many(self, interaction_ids: list[str]) -> list[Interaction]:
        """The interactions with these ids that exist, in the given order, each with its attempts."""
        with self.lock:
            rows = {}
            for interaction_id in interaction_ids:
                row = self.connection.execute(
                    "SELECT id, question, options, owner, created_at, consumed_round FROM interactions WHERE id = ?",
                    (interaction_id,),
                ).fetchone()
                if row is not None:
                    rows[interaction_id] = (row, self.connection.execute(
                        "SELECT prompt_ids, text, token_ids, finished_by, adapter_version, created_at, verdict, hint,"
                        " hint_withheld, hint_gave_answer"
                        " FROM attempts WHERE interaction_id = ? ORDER BY attempt", (interaction_id,),
                    ).fetchall())
        return [interaction_from_rows(*rows[interaction_id]) for interaction_id in interaction_ids if interaction_id in rows]

    def recent(self, owner: str | None = None, limit: int = 100) -> list[Interaction]:
        """The newest interactions first, of one owner or of everyone."""
        query = "SELECT id FROM interactions" + (" WHERE owner = ?" if owner is not None else "")
        with self.lock:
            ids = [row[0] for row in self.connection.execute(
                query + " ORDER BY created_at DESC, id LIMIT ?", ((owner,) if owner is not None else ()) + (limit,)
            )]
        return self.get_many(ids)

    def first_try_accuracy(self) -> dict[int, tuple[int, int]]:
        """adapter version -> (first attempts judged, judged right): how the device's answers improve."""
        with self.lock:
            rows = self.connection.execute(
                "SELECT adapter_version, COUNT(*), SUM(verdict) FROM attempts"
                " WHERE attempt = 0 AND verdict IS NOT NULL GROUP BY adapter_version ORDER BY adapter_version"
            ).fetchall()
        return {version: (judged, int(right)) for version, judged, right in rows}


def insert_attempt(db: sqlite3.Connection, interaction_id: str, number: int, attempt: Attempt, now: float) -> None:
    db.execute(
        "INSERT INTO attempts (interaction_id, attempt, prompt_ids, text, token_ids, finished_by, adapter_version,"
        " created_at, verdict, hint, hint_withheld) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            interaction_id, number, json.dumps(list(attempt.prompt_ids)), attempt.text, json.dumps(list(attempt.token_ids)),
            attempt.finished_by, attempt.adapter_version, now, None if attempt.verdict is None else int(attempt.verdict),
            attempt.hint, int(attempt.hint_withheld),
        ),
    )


def require_interaction(db: sqlite3.Connection, interaction_id: str) -> None:
    if db.execute("SELECT 1 FROM interactions WHERE id = ?", (interaction_id,)).fetchone() is None:
        raise UnknownInteraction(f"no interaction {interaction_id}")


def latest_attempt(db: sqlite3.Connection, interaction_id: str) -> dict:
    require_interaction(db, interaction_id)
    attempt, verdict = db.execute(
        "SELECT attempt, verdict FROM attempts WHERE interaction_id = ? ORDER BY attempt DESC LIMIT 1", (interaction_id,)
    ).fetchone()
    return {"attempt": attempt, "verdict": verdict}


def interaction_from_rows(row: tuple, attempt_rows: list[tuple]) -> Interaction:
    interaction_id, question, options, owner, created_at, consumed_round = row
    attempts = [
        Attempt(
            prompt_ids=json.loads(prompt_ids), text=text, token_ids=json.loads(token_ids), finished_by=finished_by,
            adapter_version=version, created_at=attempt_created, verdict=None if verdict is None else bool(verdict),
            hint=hint, hint_withheld=bool(withheld), hint_gave_answer=bool(gave),
        )
        for prompt_ids, text, token_ids, finished_by, version, attempt_created, verdict, hint, withheld, gave in attempt_rows
    ]
    return Interaction(
        id=interaction_id, question=question, options=None if options is None else tuple(json.loads(options)),
        owner=owner, created_at=created_at, attempts=attempts, consumed_round=consumed_round,
    )
