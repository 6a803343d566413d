"""The SQLite schema of trainpatterns studies, and the check every database file passes before we write.

Our tables are named ``tp_*`` so that they never meet another program's: Optuna's RDB storage, for
one, names its tables ``studies``, ``trials``, ``trial_params``, ``version_info`` ... A file that
already exists is first inspected through a read-only connection; if it holds any table that is not
ours it is refused with the names of those tables, and nothing has been written to it (not even the
switch to WAL mode, which rewrites the file header).

Files written by trainpatterns before the prefix (tables ``studies`` and ``trials`` with exactly our
columns) are migrated in place, in one write transaction: the two tables are renamed and the index
rebuilt. Their rows are kept as they are.
"""
from __future__ import annotations

import os
import sqlite3
from urllib.parse import quote

__all__ = ["SCHEMA", "inspect_file", "migrate_unprefixed"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS tp_studies (
    study_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    direction TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tp_trials (
    study_id INTEGER NOT NULL REFERENCES tp_studies(study_id),
    number INTEGER NOT NULL,
    state TEXT NOT NULL,
    value REAL,
    params TEXT NOT NULL DEFAULT '{}',
    distributions TEXT NOT NULL DEFAULT '{}',
    intermediate TEXT NOT NULL DEFAULT '{}',
    user_attrs TEXT NOT NULL DEFAULT '{}',
    system_attrs TEXT NOT NULL DEFAULT '{}',
    owner TEXT,
    heartbeat REAL,
    run_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    datetime_start REAL,
    datetime_complete REAL,
    PRIMARY KEY (study_id, number)
);
CREATE INDEX IF NOT EXISTS tp_trials_state ON tp_trials(study_id, state);
"""

OUR_TABLES = frozenset({"tp_studies", "tp_trials"})
_UNPREFIXED = {
    "studies": ("study_id", "name", "direction", "created"),
    "trials": ("study_id", "number", "state", "value", "params", "distributions", "intermediate", "user_attrs",
               "system_attrs", "owner", "heartbeat", "run_id", "attempts", "datetime_start", "datetime_complete"),
}
_OPTUNA_MARKS = {"alembic_version", "version_info", "trial_params", "trial_values"}


def _tables(conn: sqlite3.Connection) -> set:
    """User tables and views (SQLite's own ``sqlite_*`` tables left out)."""
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')").fetchall()
    return {r[0] for r in rows if not r[0].startswith("sqlite_")}


def _is_unprefixed_ours(conn: sqlite3.Connection, tables: set) -> bool:
    if tables != set(_UNPREFIXED):
        return False
    return all(tuple(r[1] for r in conn.execute(f"PRAGMA table_info({name})")) == cols
               for name, cols in _UNPREFIXED.items())


def inspect_file(path: str) -> bool:
    """Check the database at ``path`` without writing to it. Returns True when it is a trainpatterns
    file from before the ``tp_`` prefix (``migrate_unprefixed`` converts it), False when it is ours
    or new. ValueError, naming the file and the reason, when it is not SQLite or holds other tables."""
    if not os.path.exists(path):
        return False
    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise ValueError(f"storage {path}: cannot open it as an SQLite database ({e})") from None
    try:
        tables = _tables(conn)
        unprefixed = _is_unprefixed_ours(conn, tables)
    except sqlite3.DatabaseError as e:  # not SQLite (a text file), a directory, unreadable
        raise ValueError(f"storage {path}: cannot open it as an SQLite database ({e})") from None
    finally:
        conn.close()
    foreign = sorted(tables - OUR_TABLES)
    if unprefixed or not foreign:
        return unprefixed
    hint = ""
    if _OPTUNA_MARKS & set(foreign):
        hint = (" It looks like an Optuna database: keep using it with Optuna, or copy a study out of it with "
                f"trainpatterns.tuning.import_from_optuna('sqlite:///{path}', study_name, to_storage=...) into a "
                "file of its own.")
    raise ValueError(f"storage {path}: the database holds tables that are not trainpatterns' "
                     f"({', '.join(foreign)}); refusing to use it, and nothing in it was changed. Give the study "
                     f"a file of its own.{hint}")


def migrate_unprefixed(conn: sqlite3.Connection) -> None:
    """Rename a pre-prefix file's tables to ``tp_*`` inside one write transaction. Several processes
    may open the same old file at once: whoever takes the lock first migrates, the others find it done."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _is_unprefixed_ours(conn, _tables(conn)):
            conn.execute("DROP INDEX IF EXISTS trials_state")
            conn.execute("ALTER TABLE studies RENAME TO tp_studies")
            conn.execute("ALTER TABLE trials RENAME TO tp_trials")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
