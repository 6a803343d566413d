"""SQLite storage for studies and trials: safe for several processes on one machine, resumable.

One database file holds any number of studies. It runs in WAL mode (readers never block the
writer) with a busy timeout, and every state change that must not race -- claiming the next trial,
recovering trials of dead processes -- happens inside ``BEGIN IMMEDIATE`` (the database write lock),
so two workers can never claim the same trial or the same trial number.

Crash safety. A claimed trial records its owner (``host:pid:process start time``, so a recycled
pid is not mistaken for the original process) and a heartbeat that the owning process refreshes
while it runs. Before every claim, RUNNING trials whose owner is gone (same host: the process no
longer exists; another host: no heartbeat for ``heartbeat_grace_s``) are put back to WAITING with
their number, parameters, reports and checkpoint directory kept, and the next claim retries them
first; after ``max_retries`` attempts such a trial is marked FAILED with the reason. So a study
killed at any moment (SIGKILL included) loses no trial and duplicates none: every committed
suggestion, report and result is on disk (WAL with synchronous=NORMAL survives process death; only
a power cut may lose the last transactions).

Multi-machine (on paper): the schema is plain SQL with one lock-taking transaction per claim, so a
server database (PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``) shared by the machines is the
path; SQLite over a network file system is not safe and is not supported.

Rows store parameters as their external values (JSON), distributions as JSON, intermediate values
as a JSON object ``{step: value}``. The tables (``tp_studies``, ``tp_trials``) and the read-only
check that refuses a file holding anyone else's tables are in ``sqlite_schema``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from .space import distribution_from_json
from .sqlite_schema import SCHEMA, inspect_file, migrate_unprefixed
from .trial import FrozenTrial, TrialState

__all__ = ["SQLiteStorage", "parse_storage"]

def _proc_start_time(pid: int) -> str:
    """The process start time in clock ticks since boot (Linux /proc), "" where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_id() -> str:
    """This process's identity as stored in a claimed trial's ``owner`` column."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_proc_start_time(pid)}"


def _owner_alive(owner: str, heartbeat: Optional[float], now: float, grace_s: float) -> bool:
    host, pid_s, start = owner.rsplit(":", 2)
    if host == socket.gethostname():
        pid = int(pid_s)
        if start:
            return _proc_start_time(pid) == start
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return heartbeat is not None and now - heartbeat < grace_s


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def parse_storage(storage: Union[None, str, os.PathLike, "SQLiteStorage"]) -> "SQLiteStorage":
    """None, ":memory:" or "sqlite://" -> an in-memory database (this process only);
    "sqlite:///relative.db", "sqlite:////absolute.db" or a plain path -> that file. Anything else
    that starts like a URL (``sqlite:/x``, ``postgresql://...``) is a ValueError, raised before
    anything is created (a file name that starts with ``name:`` is written ``./name:...``)."""
    if isinstance(storage, SQLiteStorage):
        return storage
    if storage is None:
        return SQLiteStorage(None)
    if not isinstance(storage, (str, os.PathLike)):
        raise TypeError(f"storage must be None, a path, 'sqlite:///path.db' or an SQLiteStorage, got "
                        f"{type(storage).__qualname__}")
    s = os.fspath(storage)
    if s in (":memory:", "sqlite://", "sqlite:///:memory:"):
        return SQLiteStorage(None)
    if s.startswith("sqlite:///") and len(s) > len("sqlite:///"):
        return SQLiteStorage(s[len("sqlite:///"):])
    if _URL_SCHEME.match(s):
        raise ValueError(f"storage {s!r} is not a supported URL: use 'sqlite:///relative.db', "
                         "'sqlite:////absolute.db' or a file path")
    if not s:
        raise ValueError("storage is an empty path: use a file path, 'sqlite:///path.db' or None (in memory)")
    return SQLiteStorage(s)


class SQLiteStorage:
    """Studies and trials in one SQLite database. ``path=None``: in memory, one process (threads
    share one connection under a lock). With a path: one connection per thread and process, WAL,
    ``busy_timeout_s`` to wait for the write lock. Picklable (workers reopen the same file)."""

    def __init__(self, path: Union[None, str, os.PathLike], *, busy_timeout_s: float = 60.0,
                 heartbeat_grace_s: float = 60.0) -> None:
        self.path = None if path is None else str(Path(path).resolve())
        self.busy_timeout_s = float(busy_timeout_s)
        self.heartbeat_grace_s = float(heartbeat_grace_s)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._memory_conn: Optional[sqlite3.Connection] = None
        unprefixed = False
        if self.path is not None:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"storage {self.path}: cannot create its directory ({e.strerror or e})") from None
            unprefixed = inspect_file(self.path)  # before any write: a foreign file is refused untouched
        with self._lock:
            try:
                if unprefixed:
                    migrate_unprefixed(self._conn())
                self._conn().executescript(SCHEMA)
            except sqlite3.DatabaseError as e:  # a file replaced or damaged since it was inspected
                self._close_thread_conn()
                raise ValueError(f"storage {self.path}: cannot open it as an SQLite database ({e})") from None

    def _close_thread_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @property
    def url(self) -> Optional[str]:
        return None if self.path is None else f"sqlite:///{self.path}"

    def __getstate__(self) -> dict:
        if self.path is None:
            raise TypeError("an in-memory study storage cannot be sent to another process; "
                            "use a file storage (storage='study.db') for n_jobs worker processes")
        return dict(path=self.path, busy_timeout_s=self.busy_timeout_s, heartbeat_grace_s=self.heartbeat_grace_s)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], busy_timeout_s=state["busy_timeout_s"],
                      heartbeat_grace_s=state["heartbeat_grace_s"])

    # ----- connections and transactions ------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self.path is None:
            if self._memory_conn is None:
                self._memory_conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            return self._memory_conn
        conn = getattr(self._local, "conn", None)
        # A connection must not cross a fork: key it by pid as well as by thread.
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database lock from its first statement."""
        with self._lock:
            c = self._conn()
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list:
        with self._lock:
            return self._conn().execute(sql, args).fetchall()

    # ----- studies ---------------------------------------------------------------------------------

    def create_study(self, name: str, direction: str, load_if_exists: bool) -> int:
        with self._tx() as c:
            row = c.execute("SELECT study_id, direction FROM tp_studies WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if not load_if_exists:
                    raise ValueError(f"study {name!r} already exists in {self.path or 'memory'}; "
                                     "pass load_if_exists=True to continue it")
                if row[1] != direction:
                    raise ValueError(f"study {name!r} exists with direction {row[1]!r}, not {direction!r}")
                return int(row[0])
            cur = c.execute("INSERT INTO tp_studies (name, direction, created) VALUES (?, ?, ?)",
                            (name, direction, time.time()))
            return int(cur.lastrowid)

    def get_study(self, name: str) -> tuple[int, str]:
        rows = self._read("SELECT study_id, direction FROM tp_studies WHERE name = ?", (name,))
        if not rows:
            raise KeyError(f"no study named {name!r} in {self.path or 'memory'} "
                           f"(studies: {self.study_names()})")
        return int(rows[0][0]), rows[0][1]

    def study_names(self) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM tp_studies ORDER BY study_id")]

    # ----- claiming --------------------------------------------------------------------------------

    def _recover_dead(self, c: sqlite3.Connection, study_id: int, max_retries: int) -> None:
        now = time.time()
        rows = c.execute("SELECT number, owner, heartbeat, attempts, system_attrs FROM tp_trials "
                         "WHERE study_id = ? AND state = 'RUNNING'", (study_id,)).fetchall()
        for number, owner, heartbeat, attempts, sys_json in rows:
            if owner and _owner_alive(owner, heartbeat, now, self.heartbeat_grace_s):
                continue
            sys_attrs = json.loads(sys_json)
            why = f"attempt {attempts} was interrupted: owner process {owner} died or lost its heartbeat"
            sys_attrs.setdefault("interruptions", []).append(why)
            if attempts >= max_retries:
                sys_attrs["fail_reason"] = f"{why}; gave up after {attempts} attempts (max_retries={max_retries})"
                c.execute("UPDATE tp_trials SET state = 'FAILED', system_attrs = ?, datetime_complete = ?, "
                          "owner = NULL "
                          "WHERE study_id = ? AND number = ?", (json.dumps(sys_attrs), now, study_id, number))
            else:
                c.execute("UPDATE tp_trials SET state = 'WAITING', system_attrs = ?, owner = NULL "
                          "WHERE study_id = ? AND number = ?", (json.dumps(sys_attrs), study_id, number))

    def claim_trial(self, study_id: int, *, run_id: str, owner: str, max_in_run: Optional[int],
                    max_total: Optional[int], max_retries: int,
                    propose_locked: Optional[Callable[[list], Optional[dict]]] = None,
                    promote_locked: Optional[Callable[[list], Optional[int]]] = None) -> Optional[FrozenTrial]:
        """Atomically take the next trial for ``owner`` and return it as RUNNING, or None when the
        budget is spent (``max_in_run`` trials claimed by ``run_id``, or ``max_total`` trials in the
        study) and nothing is left to retry or promote, or the sampler has nothing left. Order:
        trials of dead processes and enqueued (WAITING) trials first, then a paused trial the pruner
        promotes (``promote_locked``), then a new number: the budgets limit only new numbers, so a
        resumed run always finishes the trials that were interrupted. ``propose_locked(trials)`` fixes a new trial's parameters inside the lock (the
        grid sampler: no two workers take the same point) and returns None when exhausted."""
        with self._tx() as c:
            self._recover_dead(c, study_id, max_retries)
            now = time.time()
            row = c.execute("SELECT number FROM tp_trials WHERE study_id = ? AND state = 'WAITING' "
                            "ORDER BY number LIMIT 1", (study_id,)).fetchone()
            if row is None and promote_locked is not None:
                number = promote_locked(self._trials(c, study_id))
                row = None if number is None else (number,)
            if row is not None:
                c.execute("UPDATE tp_trials SET state = 'RUNNING', owner = ?, heartbeat = ?, run_id = ?, "
                          "attempts = attempts + 1, datetime_start = COALESCE(datetime_start, ?), value = NULL, "
                          "datetime_complete = NULL "
                          "WHERE study_id = ? AND number = ?", (owner, now, run_id, now, study_id, row[0]))
                return self._trials(c, study_id, number=row[0])[0]
            (n_total, next_number) = c.execute(
                "SELECT COUNT(*), COALESCE(MAX(number) + 1, 0) FROM tp_trials WHERE study_id = ?",
                (study_id,)).fetchone()
            if max_total is not None and n_total >= max_total:
                return None
            if max_in_run is not None:
                (n_run,) = c.execute("SELECT COUNT(*) FROM tp_trials WHERE study_id = ? AND run_id = ?",
                                     (study_id, run_id)).fetchone()
                if n_run >= max_in_run:
                    return None
            if propose_locked is not None:
                fixed = propose_locked(self._trials(c, study_id))
                if fixed is None:
                    return None
                sys_attrs = {"fixed_params": fixed}
            else:
                sys_attrs = {}
            c.execute("INSERT INTO tp_trials (study_id, number, state, system_attrs, owner, heartbeat, run_id, "
                      "attempts, datetime_start) VALUES (?, ?, 'RUNNING', ?, ?, ?, ?, 1, ?)",
                      (study_id, next_number, json.dumps(sys_attrs), owner, now, run_id, now))
            return self._trials(c, study_id, number=next_number)[0]

    def enqueue_trial(self, study_id: int, params: dict, user_attrs: dict,
                      duplicate_of: Optional[Callable[[list], Optional[int]]] = None) -> int:
        """Add a WAITING trial whose parameters are fixed to ``params`` (claimed before new ones) and
        return its number; or, when ``duplicate_of(trials)`` (run inside the lock, so two processes
        never both enqueue the same point) names an existing trial, that trial's number instead."""
        with self._tx() as c:
            if duplicate_of is not None:
                found = duplicate_of(self._trials(c, study_id))
                if found is not None:
                    return found
            (number,) = c.execute("SELECT COALESCE(MAX(number) + 1, 0) FROM tp_trials WHERE study_id = ?",
                                  (study_id,)).fetchone()
            c.execute("INSERT INTO tp_trials (study_id, number, state, system_attrs, user_attrs) "
                      "VALUES (?, ?, 'WAITING', ?, ?)",
                      (study_id, number, json.dumps({"fixed_params": params}), json.dumps(user_attrs)))
            return int(number)

    def add_trials(self, study_id: int, trials: list) -> None:
        """Store finished or imported ``FrozenTrial`` rows as they are, numbers included, in one
        transaction. A RUNNING one has no owner here, so the next claim treats it as interrupted."""
        rows = [(study_id, t.number, t.state.name, t.value, json.dumps(t.params),
                 json.dumps({k: d.to_json() for k, d in t.distributions.items()}),
                 json.dumps({str(k): v for k, v in t.intermediate_values.items()}), json.dumps(t.user_attrs),
                 json.dumps(t.system_attrs), t.attempts, t.datetime_start, t.datetime_complete) for t in trials]
        with self._tx() as c:
            c.executemany("INSERT INTO tp_trials (study_id, number, state, value, params, distributions, intermediate, "
                          "user_attrs, system_attrs, attempts, datetime_start, datetime_complete) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    # ----- updates from the running trial ------------------------------------------------------------

    def _update_running(self, study_id: int, number: int, owner: str, sets: str, args: tuple) -> None:
        with self._tx() as c:
            cur = c.execute(f"UPDATE tp_trials SET {sets} WHERE study_id = ? AND number = ? AND state = 'RUNNING' "
                            "AND owner = ?", args + (study_id, number, owner))
            if cur.rowcount != 1:
                raise RuntimeError(f"trial {number} is no longer RUNNING under this process (it was recovered "
                                   "as dead: was the process suspended longer than heartbeat_grace_s?)")

    def set_params(self, study_id: int, number: int, owner: str, params: dict, dists: dict) -> None:
        self._update_running(study_id, number, owner, "params = ?, distributions = ?",
                             (json.dumps(params), json.dumps({k: d.to_json() for k, d in dists.items()})))

    def set_intermediate(self, study_id: int, number: int, owner: str, values: dict) -> None:
        self._update_running(study_id, number, owner, "intermediate = ?, heartbeat = ?",
                             (json.dumps({str(k): v for k, v in values.items()}), time.time()))

    def set_attrs(self, study_id: int, number: int, owner: str, *, user_attrs: Optional[dict] = None,
                  system_attrs: Optional[dict] = None) -> None:
        sets, args = [], []
        if user_attrs is not None:
            sets.append("user_attrs = ?")
            args.append(json.dumps(user_attrs))
        if system_attrs is not None:
            sets.append("system_attrs = ?")
            args.append(json.dumps(system_attrs))
        if sets:
            self._update_running(study_id, number, owner, ", ".join(sets), tuple(args))

    def finish_trial(self, study_id: int, number: int, owner: str, state: TrialState, value: Optional[float],
                     system_attrs: dict) -> None:
        self._update_running(study_id, number, owner,
                             "state = ?, value = ?, system_attrs = ?, datetime_complete = ?, owner = NULL",
                             (state.name, value, json.dumps(system_attrs),
                              time.time() if state.is_finished() else None))

    def heartbeat(self, owner: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE tp_trials SET heartbeat = ? WHERE owner = ? AND state = 'RUNNING'", (time.time(), owner))

    # ----- reading ---------------------------------------------------------------------------------

    _COLUMNS = ("number, state, value, params, distributions, intermediate, user_attrs, system_attrs, attempts, "
                "datetime_start, datetime_complete")

    def _trials(self, c: sqlite3.Connection, study_id: int, number: Optional[int] = None) -> list[FrozenTrial]:
        if number is None:
            rows = c.execute(f"SELECT {self._COLUMNS} FROM tp_trials WHERE study_id = ? ORDER BY number",
                             (study_id,)).fetchall()
        else:
            rows = c.execute(f"SELECT {self._COLUMNS} FROM tp_trials WHERE study_id = ? AND number = ?",
                             (study_id, number)).fetchall()
        return [_frozen(r) for r in rows]

    def get_trials(self, study_id: int) -> list[FrozenTrial]:
        with self._lock:
            return self._trials(self._conn(), study_id)

    def get_trial(self, study_id: int, number: int) -> FrozenTrial:
        with self._lock:
            found = self._trials(self._conn(), study_id, number=number)
        if not found:
            raise KeyError(f"no trial {number} in this study")
        return found[0]


@functools.lru_cache(maxsize=256)
def _distributions(s: str) -> dict:
    """The distributions of a trial from their stored JSON, cached: a study's trials mostly share
    one space, and decoding it per trial per read would cost a third of a GP suggestion at 100
    trials (distributions are frozen dataclasses, so sharing them is safe)."""
    return {k: distribution_from_json(v) for k, v in json.loads(s).items()}


def _frozen(r: tuple) -> FrozenTrial:
    number, state, value, params, dists, inter, user, system, attempts, t0, t1 = r
    return FrozenTrial(
        number=int(number), state=TrialState[state], value=None if value is None else float(value),
        params=json.loads(params),
        distributions=dict(_distributions(dists)),
        intermediate_values={int(k): (math.nan if v is None else float(v)) for k, v in json.loads(inter).items()},
        user_attrs=json.loads(user), system_attrs=json.loads(system), attempts=int(attempts),
        datetime_start=t0, datetime_complete=t1)
