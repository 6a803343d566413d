"""Studies: create or load one, run trials (``optimize``, or ``ask`` / ``tell``), read the results.

``optimize(objective, n_trials=..., n_jobs=...)`` loops: claim a trial from storage, call
``objective(trial)``, record the outcome. Outcomes:

* a finite number (a float, an int or a 0-d tensor) -> COMPLETE with that value;
* ``raise TrialPruned()`` (after ``trial.should_prune()``) -> PRUNED;
* a NaN / inf / non-numeric return, or an exception whose type is listed in ``catch`` -> FAILED,
  the reason stored as ``trial.fail_reason`` and logged; the study goes on;
* any other exception (``catch=()`` by default, as in Optuna) -> FAILED, and the exception stops
  the study: it propagates from ``optimize`` once the other workers finish their running trials;
* KeyboardInterrupt / SystemExit -> the trial goes back to WAITING (retried on resume) and the
  exception propagates.

``n_jobs > 1`` runs that many worker processes (multiprocessing "spawn"), all claiming trials from
the same SQLite file, so the objective, sampler, pruner and callbacks must be picklable (a top-level
function or an instance of a top-level class, not a lambda or closure) and the storage must be a
file. ``backend="thread"`` runs threads instead (any objective; in-memory storage allowed; useful
when the objective releases the GIL, e.g. torch ops). ``workers`` runs them. With the GP sampler,
workers claim and propose in turns (``turns``), so each proposal avoids the RUNNING trials' points.

Optuna's habits: ``best_params``, ``enqueue_trial``, ``trials_dataframe()`` (pandas), and studies
move to and from Optuna's storages with ``export_to_optuna`` / ``import_from_optuna`` (``interop``).

Budgets: ``n_trials`` counts trials started by this call (over all workers); ``total_trials``
counts all trials of the study, which is what a script that may be killed and rerun wants
("finish the 50-trial study"); ``timeout`` (seconds) stops starting new trials after that long.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import secrets
import sys
import tempfile
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from . import interop
from .gp import GPSampler
from .sqlite import SQLiteStorage, owner_id, parse_storage
from .space import Distribution
from .trial import FrozenTrial, Trial, TrialPruned, TrialRecorder, TrialState
from .turns import proposal_turn
from .workers import Run, new_stop_event, run_processes, run_threads

__all__ = ["Study", "create_study", "load_study", "import_from_optuna"]

_log = logging.getLogger("trainpatterns.tuning")

Objective = Callable[[Trial], Any]
Callback = Callable[["Study", FrozenTrial], None]


def _default_sampler() -> GPSampler:
    return GPSampler()


def create_study(*, direction: str = "minimize", sampler: Any = None, pruner: Any = None,
                 storage: Union[None, str, os.PathLike, SQLiteStorage] = None, study_name: Optional[str] = None,
                 load_if_exists: bool = False, artifact_dir: Union[None, str, os.PathLike] = None) -> "Study":
    """A new study (or the existing one named ``study_name`` with ``load_if_exists=True``).

    direction: "minimize" or "maximize". sampler: default ``GPSampler()``. pruner: e.g.
    ``ASHAPruner()``; default none. storage: None (in memory), a file path or "sqlite:///path.db".
    artifact_dir: where ``trial.checkpoint_dir`` lives; default ``<db dir>/<db stem>_artifacts/<study>``
    (a temporary directory for in-memory storage).
    """
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r} "
                         "(multi-objective studies are not supported)")
    st = parse_storage(storage)
    if study_name is None:
        study_name = f"study-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    study_id = st.create_study(study_name, direction, load_if_exists)
    return Study(study_name, st, study_id, direction, sampler if sampler is not None else _default_sampler(),
                 pruner, artifact_dir)


def load_study(*, study_name: str, storage: Union[str, os.PathLike, SQLiteStorage], sampler: Any = None,
               pruner: Any = None, artifact_dir: Union[None, str, os.PathLike] = None) -> "Study":
    """An existing study from ``storage`` (KeyError naming the studies there if it is missing)."""
    st = parse_storage(storage)
    study_id, direction = st.get_study(study_name)
    return Study(study_name, st, study_id, direction, sampler if sampler is not None else _default_sampler(),
                 pruner, artifact_dir)


class Study(TrialRecorder):
    """A named set of trials in a storage. Build with ``create_study`` / ``load_study``. It is the
    ``TrialRecorder`` of the trials it hands out."""

    heartbeat_interval_s = 5.0
    proposal_wait_s = 300.0  # the longest a worker waits for its turn to propose (``turns``)

    def __init__(self, study_name: str, storage: SQLiteStorage, study_id: int, direction: str, sampler: Any,
                 pruner: Any, artifact_dir: Union[None, str, os.PathLike] = None) -> None:
        self.study_name = study_name
        self.direction = direction
        self.sampler = sampler
        self.pruner = pruner
        self._storage = storage
        self._study_id = study_id
        self._artifact_dir = None if artifact_dir is None else Path(artifact_dir)
        self._owner_cache: Optional[tuple[int, str]] = None
        self._beat_thread: Optional[threading.Thread] = None
        self._turn = threading.Lock()

    # ----- identity, artifacts -----------------------------------------------------------------------

    @property
    def storage(self) -> SQLiteStorage:
        return self._storage

    @property
    def _owner(self) -> str:
        pid = os.getpid()
        if self._owner_cache is None or self._owner_cache[0] != pid:
            self._owner_cache = (pid, owner_id())
        return self._owner_cache[1]

    @property
    def artifact_dir(self) -> Path:
        """The study's directory for per-trial files (``trial.checkpoint_dir`` lives under it)."""
        if self._artifact_dir is None:
            if self._storage.path is None:
                self._artifact_dir = Path(tempfile.mkdtemp(prefix=f"trainpatterns-{self.study_name}-"))
            else:
                db = Path(self._storage.path)
                self._artifact_dir = db.parent / f"{db.stem}_artifacts" / self.study_name
        return self._artifact_dir

    # ----- results ---------------------------------------------------------------------------------

    @property
    def trials(self) -> list[FrozenTrial]:
        """All trials, by number (a fresh read from storage)."""
        return self._storage.get_trials(self._study_id)

    def get_trials(self, states: Optional[Iterable[TrialState]] = None) -> list[FrozenTrial]:
        trials = self.trials
        if states is None:
            return trials
        keep = set(states)
        return [t for t in trials if t.state in keep]

    @property
    def best_trial(self) -> FrozenTrial:
        """The COMPLETE trial with the best value (ties: the earliest). ValueError when none."""
        done = self.get_trials([TrialState.COMPLETE])
        if not done:
            raise ValueError(f"study {self.study_name!r} has no COMPLETE trial yet")
        sign = 1.0 if self.direction == "minimize" else -1.0
        return min(done, key=lambda t: (sign * t.value, t.number))

    @property
    def best_value(self) -> float:
        return self.best_trial.value

    @property
    def best_params(self) -> dict:
        return self.best_trial.params

    def enqueue_trial(self, params: dict, user_attrs: Optional[dict] = None, skip_if_exists: bool = False) -> int:
        """Queue a trial that takes ``params`` (run before sampled ones), as Optuna: each value is
        what ``suggest_*`` of that name returns, checked against the range or choices given there
        (outside them the trial fails, naming the parameter); names the objective never suggests are
        ignored. ``skip_if_exists``: when a trial with the same parameters exists, queue nothing and
        return that trial's number. Returns the queued trial's number."""
        if not isinstance(params, dict):
            raise TypeError(f"enqueue_trial: params must be a dict {{name: value}}, got {type(params).__qualname__}")
        fixed = {}
        for name, v in params.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"enqueue_trial: parameter names must be non-empty strings, got {name!r}")
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                v = int(v)  # numpy integers as well
            elif isinstance(v, numbers.Real) and not isinstance(v, bool):
                v = float(v)
                if not math.isfinite(v):
                    raise ValueError(f"enqueue_trial: parameter {name!r} must be finite, got {v}")
            elif v is not None and not isinstance(v, (bool, str)):
                raise TypeError(f"enqueue_trial: parameter {name!r} is a {type(v).__qualname__}; values must be "
                                "numbers, bools, strings or None")
            fixed[name] = v
        if user_attrs is not None and not isinstance(user_attrs, dict):
            raise TypeError(f"enqueue_trial: user_attrs must be a dict or None, got {type(user_attrs).__qualname__}")
        same = (lambda trials: _same_params(trials, fixed)) if skip_if_exists else None
        return self._storage.enqueue_trial(self._study_id, fixed, dict(user_attrs or {}), same)

    def trials_dataframe(self, attrs: Sequence[str] = interop.DATAFRAME_ATTRS, multi_index: bool = False) -> Any:
        """The trials as a pandas DataFrame, in Optuna's layout: one row per trial, columns ``number``,
        ``value``, ``datetime_start``, ``datetime_complete``, ``duration``, ``params_<name>``,
        ``user_attrs_<key>``, ``system_attrs_<key>``, ``state`` (``attrs`` picks and orders them;
        ``multi_index=True`` keeps ("params", name) pairs). ImportError without pandas."""
        return interop.trials_dataframe(self.trials, tuple(attrs), multi_index)

    def export_to_optuna(self, storage: Any, study_name: Optional[str] = None) -> Any:
        """Copy this study into a new Optuna study (``storage``: an Optuna storage URL such as
        "sqlite:///optuna.db", or an Optuna storage object; ``study_name`` defaults to this one's)
        and return it. Every trial keeps its number, state, value, parameters with their
        distributions, intermediate values, attrs and times. Needs Optuna."""
        return interop.export_study(self.trials, self.direction, storage, study_name or self.study_name)

    # ----- the trial recorder: what a live Trial calls ---------------------------------------------

    def propose_params(self, number: int, history: Sequence[FrozenTrial]) -> dict:
        return self.sampler.before_trial(self, number, history)

    def sample_param(self, number: int, name: str, dist: Distribution, history: Sequence[FrozenTrial]) -> Any:
        return self.sampler.sample_independent(self, number, name, dist, history)

    def record_params(self, number: int, params: dict, distributions: dict) -> None:
        self._storage.set_params(self._study_id, number, self._owner, params, distributions)

    def record_intermediate(self, number: int, values: dict) -> None:
        self._storage.set_intermediate(self._study_id, number, self._owner, values)

    def record_attrs(self, number: int, *, user_attrs: Optional[dict] = None,
                     system_attrs: Optional[dict] = None) -> None:
        self._storage.set_attrs(self._study_id, number, self._owner, user_attrs=user_attrs, system_attrs=system_attrs)

    def ask_pruner(self, trial: Trial) -> bool:
        if self.pruner is None:
            return False
        return bool(self.pruner.should_prune(self, trial, self._storage.get_trials(self._study_id)))

    # ----- ask / tell ------------------------------------------------------------------------------

    def ask(self) -> Trial:
        """Claim the next trial (a retry or enqueued one first). RuntimeError when the sampler has no
        point left (an exhausted grid)."""
        trial = self._claim(run_id=uuid.uuid4().hex, max_in_run=None, max_total=None, max_retries=3)
        if trial is None:
            raise RuntimeError(f"study {self.study_name!r}: the sampler has no point left (grid exhausted)")
        return trial

    def _claim(self, *, run_id: str, max_in_run: Optional[int], max_total: Optional[int],
               max_retries: int) -> Optional[Trial]:
        propose = self.sampler.propose_locked if getattr(self.sampler, "exclusive", False) else None
        promote = getattr(self.pruner, "promote_locked", None)
        serial = getattr(self.sampler, "serial_proposals", False)
        with proposal_turn(self._turn, self._storage.path, self.proposal_wait_s) if serial else nullcontext():
            frozen = self._storage.claim_trial(self._study_id, run_id=run_id, owner=self._owner,
                                               max_in_run=max_in_run, max_total=max_total, max_retries=max_retries,
                                               propose_locked=propose, promote_locked=promote)
            if frozen is None:
                return None
            self._start_heartbeat()
            history = [t for t in self._storage.get_trials(self._study_id) if t.number != frozen.number]
            t0 = time.perf_counter()
            trial = Trial(self, frozen, history)
            trial._record_start(time.perf_counter() - t0)
        return trial

    def tell(self, trial: Trial, value: Any = None, *, state: Optional[TrialState] = None,
             reason: Optional[str] = None) -> FrozenTrial:
        """Finish ``trial``: COMPLETE with ``value`` (FAILED if it is not a finite number), or the given
        ``state`` (PRUNED keeps the last reported value; FAILED records ``reason``)."""
        attrs = trial.system_attrs
        attrs.pop("proposal", None)  # only a RUNNING trial's proposal matters (to the GP's next proposals)
        if state is None:
            try:
                v = float(value)
            except (TypeError, ValueError):
                v, reason = None, f"objective returned {value!r}, not a number"
            if v is not None and not math.isfinite(v):
                v, reason = None, f"objective returned {v}"
            state = TrialState.COMPLETE if v is not None else TrialState.FAILED
        elif state is TrialState.PRUNED:
            iv = trial.intermediate_values
            v = iv[max(iv)] if iv else None
            v = v if v is not None and math.isfinite(v) else None
        else:
            v = None
        if state is TrialState.FAILED:
            attrs["fail_reason"] = reason or "failed"
            _log.warning("trial %d failed: %s", trial.number, attrs["fail_reason"])
        self._storage.finish_trial(self._study_id, trial.number, self._owner, state, v, attrs)
        return self._storage.get_trial(self._study_id, trial.number)

    # ----- optimize --------------------------------------------------------------------------------

    def optimize(self, objective: Objective, n_trials: Optional[int] = None, *, timeout: Optional[float] = None,
                 n_jobs: int = 1, backend: str = "process", catch: Union[type, Iterable[type]] = (),
                 callbacks: Optional[Sequence[Callback]] = None, total_trials: Optional[int] = None,
                 max_retries: int = 3) -> None:
        """Run trials until ``n_trials`` (this call), ``total_trials`` (the whole study), ``timeout``
        seconds or an exhausted sampler, whichever comes first (with none of them: until the sampler
        is exhausted or interrupted). ``catch``: exception types recorded as FAILED trials while the
        study goes on; any other exception fails its trial and stops the study (see the module
        docstring). ``callbacks(study, frozen_trial)`` run after each trial in the process that ran
        it. ``max_retries``: attempts of an interrupted trial before it is FAILED."""
        if not callable(objective):
            raise TypeError(f"objective must be callable objective(trial), got {objective!r}")
        for nm, x in (("n_trials", n_trials), ("total_trials", total_trials)):
            if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 0):
                raise ValueError(f"{nm} must be an int >= 0 or None, got {x!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if n_jobs == -1:
            n_jobs = os.cpu_count() or 1
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
            raise ValueError(f"n_jobs must be an int >= 1 (or -1 for one per CPU), got {n_jobs!r}")
        if backend not in ("process", "thread"):
            raise ValueError(f"backend must be 'process' or 'thread', got {backend!r}")
        catch = _exception_types(catch)
        processes = n_jobs > 1 and backend == "process"
        if processes and self._storage.path is None:
            raise ValueError("n_jobs > 1 with backend='process' needs a file storage "
                             "(storage='study.db'); or pass backend='thread'")
        run = Run(run_id=uuid.uuid4().hex, n_trials=n_trials, total_trials=total_trials,
                  deadline=None if timeout is None else time.time() + timeout, catch=catch,
                  callbacks=list(callbacks or []), max_retries=int(max_retries), stop=new_stop_event(processes))
        if n_jobs == 1:
            self._worker_loop(objective, run)
        elif processes:
            run_processes(self, objective, run, n_jobs)
        else:
            run_threads(self, objective, run, n_jobs)

    def _worker_loop(self, objective: Objective, run: Run) -> None:
        try:
            while not run.stop.is_set() and (run.deadline is None or time.time() < run.deadline):
                trial = self._claim(run_id=run.run_id, max_in_run=run.n_trials, max_total=run.total_trials,
                                    max_retries=run.max_retries)
                if trial is None:
                    return
                frozen = self._run_trial(objective, trial, run.catch)
                for cb in run.callbacks:
                    cb(self, frozen)
        except BaseException:
            run.stop.set()  # the other workers finish their running trial and start no other
            raise

    def _run_trial(self, objective: Objective, trial: Trial, catch: tuple) -> FrozenTrial:
        try:
            value = objective(trial)
        except (KeyboardInterrupt, SystemExit):
            self._storage.finish_trial(self._study_id, trial.number, self._owner, TrialState.WAITING, None,
                                       dict(trial.system_attrs, interruptions=trial.system_attrs.get(
                                           "interruptions", []) + ["interrupted by KeyboardInterrupt/SystemExit"]))
            raise
        except BaseException as e:
            if _is_pruned(e):
                return self.tell(trial, state=TrialState.PRUNED)
            frozen = self.tell(trial, state=TrialState.FAILED, reason=f"{type(e).__name__}: {e}")
            if isinstance(e, catch):
                return frozen
            raise
        return self.tell(trial, value)

    # ----- heartbeat -------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._beat_thread is not None and self._beat_thread.is_alive():
            return
        owner, storage, interval = self._owner, self._storage, self.heartbeat_interval_s

        def beat() -> None:
            while True:
                time.sleep(interval)
                try:
                    storage.heartbeat(owner)
                except Exception as e:  # a busy database must not kill the worker; the next beat retries
                    _log.debug("heartbeat failed: %s", e)

        self._beat_thread = threading.Thread(target=beat, name="trainpatterns-tuning-heartbeat", daemon=True)
        self._beat_thread.start()

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_beat_thread"] = None
        d["_owner_cache"] = None
        del d["_turn"]
        return d

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._turn = threading.Lock()

    def __repr__(self) -> str:
        return f"Study(name={self.study_name!r}, direction={self.direction!r}, storage={self._storage.url or 'memory'})"


def _is_pruned(e: BaseException) -> bool:
    """Ours or Optuna's ``TrialPruned`` (an objective written for Optuna raises the latter; Optuna is
    then already imported, so it is looked up, never imported, here)."""
    optuna_exceptions = sys.modules.get("optuna.exceptions")
    return isinstance(e, TrialPruned) or (optuna_exceptions is not None
                                          and isinstance(e, getattr(optuna_exceptions, "TrialPruned", ())))


def _exception_types(catch: Any) -> tuple:
    """``catch`` as a tuple of exception classes (one class or an iterable of them, as Optuna takes)."""
    types = (catch,) if isinstance(catch, type) else catch
    try:
        types = tuple(types)
    except TypeError:
        types = (types,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise TypeError(f"catch must be an exception class or a tuple of them, got {catch!r}")
    return types


def _same_params(trials: Sequence[FrozenTrial], params: dict) -> Optional[int]:
    """The number of a trial whose enqueued or suggested parameters equal ``params``: the same names,
    numbers equal to a relative 1e-5 as in Optuna's ``skip_if_exists`` (but 4 and 4.0 are the same
    point), other values of the same type and equal."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def equal(a: Any, b: Any) -> bool:
        if number(a) and number(b):
            return math.isclose(a, b, rel_tol=1e-5, abs_tol=0.0)
        return type(a) is type(b) and a == b

    for t in trials:
        for have in (t.system_attrs.get("fixed_params"), t.params):
            if have is not None and have.keys() == params.keys() and all(equal(params[k], have[k]) for k in params):
                return t.number
    return None


def import_from_optuna(storage: Any, study_name: str, *,
                       to_storage: Union[None, str, os.PathLike, SQLiteStorage] = None,
                       to_study_name: Optional[str] = None, sampler: Any = None, pruner: Any = None,
                       artifact_dir: Union[None, str, os.PathLike] = None) -> Study:
    """Copy the Optuna study ``study_name`` from ``storage`` (an Optuna storage URL or object) into a new
    study of ours (``to_storage``: in memory by default; ``to_study_name``: the same name by default)
    and return it. Trials keep their numbers, states (Optuna's FAIL is our FAILED), values,
    parameters with their distributions, intermediate values, attrs and times; a RUNNING trial is
    retried with its parameters on the next claim. Multi-objective studies are refused. Needs Optuna."""
    direction, trials = interop.read_optuna_study(storage, study_name)
    study = create_study(direction=direction, storage=to_storage, study_name=to_study_name or study_name,
                         sampler=sampler, pruner=pruner, artifact_dir=artifact_dir)
    study.storage.add_trials(study._study_id, trials)
    return study
