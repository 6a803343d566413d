"""The run directories of ``trainpatterns train``: where a new run goes, which run ``--resume``
continues, what a run's ``config.json`` must hold, and the loggers a run writes.

A new run goes to ``runs/<task>-<YYYYmmdd-HHMMSS>`` (the task: ``pendulum`` for the built-in job,
the ``--data`` file's name without its extension otherwise). ``--resume`` without ``--run-dir``
continues the newest run of the task the other arguments name: the newest by the start time in
its name among the directories of that task holding a ``config.json`` (and, for ``--data``, made
from the same file), so runs of other tasks beside it are never picked. ``config.json`` also keeps
the ``--logger`` choices, so a resumed run goes on writing the logs it started.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Optional, Sequence

from .callbacks import Callback
from .loggers import CSVLogger, TensorBoardLogger
from .pendulum import UsageError

__all__ = ["LOGGERS", "RUNS", "check_saved", "chosen_loggers", "make_loggers", "new_run_dir", "newest_run",
           "read_config", "restarted_by_torchrun", "task_name"]

RUNS = "runs"
LOGGERS = ("csv", "tensorboard")
_RUN_NAME = re.compile(r"^(?P<task>.+)-(?P<time>\d{8}-\d{6})$")

# The type each DEFAULTS key must have in a saved config.json (bool is no int here).
_CONFIG_TYPES = dict(data=(str, type(None)), samples=(int,), steps=(int,), batch_size=(int,), lr=(float, int),
                     hidden=(int,), checkpoints=(int,), seed=(int,), interpolation=(bool, type(None)))


def task_name(data: Optional[str]) -> str:
    """The task a run trains: ``pendulum`` without data, else the data file's stem (``mine.npz``:
    ``mine``), as :class:`~trainpatterns.pendulum.Job` names it."""
    return "pendulum" if data is None else os.path.splitext(os.path.basename(data))[0]


def new_run_dir(task: str) -> str:
    return os.path.join(RUNS, f"{task}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_saved(saved: object, path: str) -> dict:
    """``saved`` (config.json as parsed) if it is an object whose known keys have the right types."""
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {path} is not a run configuration (a JSON object), got {type(saved).__name__}")
    for key, types in _CONFIG_TYPES.items():
        value = saved.get(key)
        if key in saved and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise UsageError(f"--resume: {path}: {key!r} must be {want}, got {json.dumps(value)}")
    loggers = saved.get("loggers", [])
    if not (isinstance(loggers, list) and all(name in LOGGERS for name in loggers)):
        raise UsageError(f"--resume: {path}: 'loggers' must be a list of {list(LOGGERS)}, got {json.dumps(loggers)}")
    return saved


def read_config(run_dir: str) -> dict:
    """The checked ``config.json`` of ``run_dir``; a UsageError when there is none or it is bad."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"--resume: {run_dir} holds no run (no config.json)")
    try:
        with open(path) as f:
            return check_saved(json.load(f), path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume: cannot read {path} ({e})") from None


def _same_data(run_dir: str, data: Optional[str]) -> bool:
    """Whether the run was made from ``data`` (an unreadable config counts as a match: resuming it
    then reports what is wrong with it)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return True
    return not isinstance(saved, dict) or saved.get("data") == (None if data is None else os.path.abspath(data))


def newest_run(data: Optional[str], root: str = RUNS) -> tuple[Optional[str], Optional[str]]:
    """``(the run --resume continues without --run-dir, None)`` (see the module docstring), or
    ``(None, why there is none)``."""
    task = task_name(data)
    try:
        names = os.listdir(root)
    except OSError:
        names = []
    mine, others = [], set()
    for name in names:
        match = _RUN_NAME.match(name)
        if match is None or not os.path.isfile(os.path.join(root, name, "config.json")):
            continue
        if match["task"] != task:
            others.add(match["task"])
        elif _same_data(os.path.join(root, name), data):
            mine.append((match["time"], name))
    if not mine:
        seen = f"; it holds runs of {', '.join(sorted(others))} (--data FILE picks the task)" if others else ""
        return None, (f"--resume: no {task} run to continue under {root}/ (a {task}-<time> directory with a "
                      f"config.json){seen}; name one with --run-dir")
    return os.path.join(root, max(mine)[1]), None


def restarted_by_torchrun(run_dir: Optional[str]) -> bool:
    """True when torchrun (``--max-restarts``) restarted this group and the run it started exists:
    the run then continues from its newest checkpoint, as with ``--resume``. Restartable runs need
    ``--run-dir``, since a default directory is named after the start time of each incarnation."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) == 0:
        return False
    if run_dir is None:
        raise UsageError("under torchrun --max-restarts, pass --run-dir: a restarted group continues the run there")
    return (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
            and os.path.isfile(os.path.join(run_dir, "config.json")))


def chosen_loggers(given: Optional[Sequence[str]], saved: Optional[dict]) -> list:
    """The ``--logger`` names (each once), else those the resumed run was started with."""
    names = given if given else (saved or {}).get("loggers", [])
    return [name for name in LOGGERS if name in names]


def make_loggers(names: Sequence[str], run_dir: str) -> list[Callback]:
    """The callbacks writing ``names``'s logs into ``run_dir`` (``metrics.csv``, event files)."""
    out: list[Callback] = []
    for name in names:
        if name == "csv":
            out.append(CSVLogger(run_dir))
        else:
            try:
                out.append(TensorBoardLogger(run_dir))
            except ImportError:
                raise UsageError("--logger tensorboard needs the tensorboard package: pip install "
                                 "'trainpatterns[tensorboard]'") from None
    return out
