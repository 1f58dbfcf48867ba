"""The durable feedback store (SQLAlchemy Core): SQLite in WAL mode by default, PostgreSQL by URL.

Rows hold what the raw store will hold (redacted, built by ``flywheel.data.events.event_row``); the event id is
unique, so a repeated event is a duplicate. ``export_batch`` is NULL until ``flywheel export`` claims the row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

metadata = sa.MetaData()
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite auto-increments INTEGER PRIMARY KEY only

events = sa.Table(
    "feedback_events",
    metadata,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(128), nullable=False, unique=True),
    sa.Column("received_at", sa.String(32), nullable=False),
    sa.Column("answer_id", sa.String(128)),
    sa.Column("model_version", sa.String(128), nullable=False),
    sa.Column("feedback_type", sa.String(16), nullable=False),
    sa.Column("user_id", sa.String(128)),
    sa.Column("row", sa.Text, nullable=False),  # JSON: the raw-store row less ingested_at and batch_id
    sa.Column("export_batch", sa.String(64), index=True),
)
answers = sa.Table(
    "answers",
    metadata,
    sa.Column("answer_id", sa.String(64), primary_key=True),
    sa.Column("model_version", sa.String(128), nullable=False),
    sa.Column("variant", sa.String(16), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)
tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),  # SHA-256 of the token; the token is never stored
    sa.Column("token_id", sa.String(16), nullable=False, unique=True),
    sa.Column("scope", sa.String(16), nullable=False),  # comma-separated: "chat,feedback" ("admin" alone)
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)
export_batches = sa.Table(
    "export_batches",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # claimed -> committed
    sa.Column("ingested_at", sa.String(32), nullable=False),
    sa.Column("date", sa.String(10), nullable=False),
    sa.Column("events", sa.Integer, nullable=False),
    sa.Column("exported", sa.Integer),
    sa.Column("file", sa.Text),
)


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FeedbackStore:
    """Feedback events, answers, API tokens and export batches in one database."""

    def __init__(self, url: str, synchronous: str = "normal"):
        self.url = url
        self.dialect = url.split(":", 1)[0].split("+", 1)[0]
        if self.dialect == "sqlite":
            self.engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            sa.event.listen(self.engine, "connect", lambda conn, _: _sqlite_pragmas(conn, synchronous))
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        metadata.create_all(self.engine)
        self._insert = (postgresql if self.dialect == "postgresql" else sqlite).insert

    def close(self) -> None:
        self.engine.dispose()

    def write(self, feedback: list[dict], answer_rows: list[dict] = ()) -> set[str]:
        """Insert answers and feedback rows in one transaction; returns the event ids that were new."""
        with self.engine.begin() as conn:
            if answer_rows:
                conn.execute(self._insert(answers).on_conflict_do_nothing(index_elements=["answer_id"]), answer_rows)
            if not feedback:
                return set()
            stmt = self._insert(events).on_conflict_do_nothing(index_elements=["event_id"]).returning(events.c.event_id)
            return set(conn.execute(stmt, feedback).scalars())

    def answer_versions(self, ids: Iterable[str]) -> dict[str, str]:
        ids = list(set(ids))
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(answers.c.answer_id, answers.c.model_version).where(answers.c.answer_id.in_(ids))
            ).all()
        return dict(rows)

    def add_token(self, token_hash: str, token_id: str, scope: str, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                tokens.insert().values(
                    token_hash=token_hash, token_id=token_id, scope=scope, name=name, created_at=utcnow()
                )
            )

    def tokens(self) -> dict[str, tuple[str, str]]:
        """token hash -> (token id, scope)."""
        with self.engine.connect() as conn:
            return {
                h: (i, s) for h, i, s in conn.execute(sa.select(tokens.c.token_hash, tokens.c.token_id, tokens.c.scope))
            }

    def list_tokens(self) -> list[dict]:
        """Every token's public id, scopes (``scope`` as stored and ``scopes`` as a list), name and creation time
        (never the hash)."""
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    sa.select(tokens.c.token_id, tokens.c.scope, tokens.c.name, tokens.c.created_at).order_by(
                        tokens.c.created_at
                    )
                )
                .mappings()
                .all()
            )
        return [{**r, "scopes": r["scope"].split(",")} for r in rows]

    def revoke_token(self, token_id: str) -> bool:
        """Delete the token with this public id; False when there is none."""
        with self.engine.begin() as conn:
            return conn.execute(tokens.delete().where(tokens.c.token_id == token_id)).rowcount > 0

    def count(self, exported: bool | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(events)
        if exported is not None:
            q = q.where(events.c.export_batch.isnot(None) if exported else events.c.export_batch.is_(None))
        with self.engine.connect() as conn:
            return conn.execute(q).scalar_one()

    def erase_user(self, user_id: str) -> int:
        """Delete every stored event of ``user_id`` (exported or not), stored as given or as its pseudonym (an id
        holding personal data is stored pseudonymised: ``flywheel.redact.pseudonymise_id``); returns how many."""
        from flywheel.redact import pseudonymise_id

        ids = {user_id, pseudonymise_id(user_id)}
        with self.engine.begin() as conn:
            return conn.execute(events.delete().where(events.c.user_id.in_(ids))).rowcount

    def event_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(events.c.event_id).order_by(events.c.seq)).scalars())

    # ---- export: claim in one transaction, write, then mark committed -------------------------------------
    def claim(self, batch_id: str, ingested_at: str, date: str) -> int:
        """Stamp every unclaimed row with ``batch_id`` and record the batch, atomically; returns rows claimed.
        A row whose insert commits later stays unclaimed for the next export: none is skipped or taken twice."""
        with self.engine.begin() as conn:
            n = conn.execute(
                events.update().where(events.c.export_batch.is_(None)).values(export_batch=batch_id)
            ).rowcount
            if n:
                conn.execute(
                    export_batches.insert().values(
                        batch_id=batch_id, state="claimed", ingested_at=ingested_at, date=date, events=n
                    )
                )
        return n

    def pending_batches(self) -> list[dict]:
        """Batches claimed but not yet committed to the raw store (an export that crashed)."""
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    sa.select(export_batches)
                    .where(export_batches.c.state == "claimed")
                    .order_by(export_batches.c.batch_id)
                )
                .mappings()
                .all()
            )
        return [dict(r) for r in rows]

    def claimed_rows(self, batch_id: str, chunk: int = 20000) -> Iterator[list[dict]]:
        """The claimed rows of a batch, in arrival order, ``chunk`` at a time."""
        last = -1
        while True:
            with self.engine.connect() as conn:
                found = conn.execute(
                    sa.select(events.c.seq, events.c.row)
                    .where(events.c.export_batch == batch_id, events.c.seq > last)
                    .order_by(events.c.seq)
                    .limit(chunk)
                ).all()
            if not found:
                return
            last = found[-1][0]
            yield [json.loads(r) for _, r in found]

    def finish_batch(self, batch_id: str, exported: int, file: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                export_batches.update()
                .where(export_batches.c.batch_id == batch_id)
                .values(state="committed", exported=exported, file=file)
            )


def _sqlite_pragmas(conn, synchronous: str) -> None:
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
