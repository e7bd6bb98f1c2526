"""The run folder: the files a training run writes there, and its status.json as every command reads it."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sacae.errors import SacaeError

# Outputs of a run that starting over (--no_resume) removes.
RUN_OUTPUTS = ("train.log", "eval.log", "status.json", "tb", "video", "model", "checkpoint", "trackers.json", "wandb",
               "mlruns")  # fmt: skip


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's status.json as every command reads it: None when absent or unreadable, else its known fields, each
    of the type STATUS_FIELDS gives it or None; a field of another type is left out (check_status says which)."""
    return check_status(run_dir)[0]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


STATUS_STATES = ("running", "stopped", "failed", "finished")
# status.json's fields as the trainers write them, with the test each value passes (None always does: not known).
# read_status returns only these: a field the trainers begin to write is added here to be read back.
STATUS_FIELDS: dict[str, Callable[[Any], bool]] = {
    "state": lambda v: isinstance(v, str) and v in STATUS_STATES,
    "env_steps": _is_int,
    "total_env_steps": _is_int,
    "agent_steps": _is_int,
    "elapsed_seconds": _is_number,
    "session_env_steps_per_second": _is_number,
    "resumes": _is_int,
    "pid": _is_int,
    "host": _is_str,
    "time": _is_number,
    "message": _is_str,
    "seeds_in_process": lambda v: isinstance(v, list) and all(_is_int(s) for s in v),
    "sessions": lambda v: isinstance(v, list),
    "seed_failed": lambda v: isinstance(v, bool),  # a group stopped this seed alone (sacae.trainer)
}
# One record of "sessions": the machine and the env steps of one process that trained the run.
SESSION_FIELDS: dict[str, Callable[[Any], bool]] = {
    "started": _is_str,
    "host": _is_str,
    "processor": _is_str,
    "cpu_count": _is_int,
    "threads": _is_int,
    "device": _is_str,
    "gpu": _is_str,
    "torch": _is_str,
    "from_env_steps": _is_int,
    "to_env_steps": _is_int,
    "seconds": _is_number,
}
_MISSING = object()


def _typed_fields(
    value: dict[str, Any], fields: dict[str, Callable[[Any], bool]], prefix: str, wrong: list[str]
) -> dict[str, Any]:
    """The `fields` of `value` whose values pass their test (or are None); each other one named in `wrong`."""
    kept = {}
    for name, fits in fields.items():
        if name in value:
            if value[name] is None or fits(value[name]):
                kept[name] = value[name]
            else:
                wrong.append(f"{prefix}{name} {shown(value[name])}")
    return kept


def _read_json(path: Path) -> tuple[Any, str | None]:
    """A JSON file's value, or _MISSING and why it cannot be read (no reason when there is no such file)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _MISSING, None
    except OSError as e:
        return _MISSING, f"cannot be read ({e.strerror or e})"
    if not data.strip():
        return _MISSING, "is empty"
    try:
        return json.loads(data.decode("utf-8")), None
    except UnicodeDecodeError:
        return _MISSING, "cannot be read as JSON (it is not UTF-8 text)"
    except json.JSONDecodeError as e:
        return _MISSING, f"cannot be read as JSON ({e.msg} at line {e.lineno} column {e.colno})"
    except (ValueError, RecursionError):
        return _MISSING, "cannot be read as JSON"


def shown(value: Any, width: int = 24) -> str:
    """A value as its file holds it, cut short: what a sentence about a damaged file quotes."""
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def wrong_types(wrong: list[str]) -> str:
    """ "has a value of the wrong type: env_steps "abc"" for the given `name value` items."""
    return f"has {'a value' if len(wrong) == 1 else 'values'} of the wrong type: {', '.join(wrong)}"


def check_status(run_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """A run's status.json with its fields checked, and what is wrong with the file in words (e.g. "cannot be read
    as JSON (...)", "has a value of the wrong type: env_steps "abc""; None when nothing is, or there is no file).

    The status holds only the fields of STATUS_FIELDS that pass their test (or are None), and in "sessions" only
    the records that are objects, each with only the fields of SESSION_FIELDS that pass theirs."""
    value, problem = _read_json(Path(run_dir) / "status.json")
    if value is _MISSING:
        return None, problem
    if not isinstance(value, dict):
        return None, "does not hold a JSON object"
    wrong: list[str] = []
    status = _typed_fields(value, STATUS_FIELDS, "", wrong)
    sessions = []
    for i, session in enumerate(status.get("sessions") or []):
        if not isinstance(session, dict):
            wrong.append(f"sessions[{i}] {shown(session)}")
            continue
        sessions.append(_typed_fields(session, SESSION_FIELDS, f"sessions[{i}].", wrong))
    if "sessions" in status:
        status["sessions"] = sessions if status["sessions"] is not None else None
    return status, wrong_types(wrong) if wrong else None


@functools.cache
def _config_types() -> dict[str, Any]:
    from sacae.config import TrainConfig

    return typing.get_type_hints(TrainConfig)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value is one of the type `hint` (str, int, float, bool, None, Literal[...] and unions of them)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    checks: dict[Any, Callable[[Any], bool]] = {
        bool: lambda v: isinstance(v, bool),
        int: _is_int,
        float: _is_number,
        str: _is_str,
    }
    return checks.get(hint, lambda v: True)(value)


def check_config(
    run_dir: str | Path, required: tuple[str, ...] = ("domain_name", "task_name")
) -> tuple[dict[str, Any] | None, str | None]:
    """A run's config.json, and what is wrong with it in words (None when nothing is, or there is no file).

    A config is returned only whole: a JSON object that holds the `required` settings and whose settings of
    TrainConfig all have that setting's type (settings it does not know are the reader's to refuse or ignore)."""
    value, problem = _read_json(Path(run_dir) / "config.json")
    if value is _MISSING:
        return None, problem
    if not isinstance(value, dict):
        return None, "does not hold a JSON object"
    lacking = [name for name in required if name not in value]
    if lacking:
        return None, f"lacks {' and '.join(lacking)}"
    types_ = {**_config_types(), "configuration": str}
    wrong = [f"{k} {shown(v)}" for k, v in value.items() if k in types_ and not _fits(v, types_[k])]
    return (None, wrong_types(wrong)) if wrong else (value, None)


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """A run's config.json checked as check_config does; SacaeError in one sentence when it is missing or damaged."""
    path = Path(run_dir) / "config.json"
    config, problem = check_config(run_dir)
    if config is not None:
        return config
    if problem is None:
        raise SacaeError(f"There is no config file at {path}.")
    raise SacaeError(f"The config file {path} {problem}.")


def read_log(run_dir: str | Path, name: str) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of a run's train.log or eval.log that can be read, and what is wrong with the others in words
    ("line 3 is not JSON (and 2 more damaged lines)"; None when nothing is)."""
    from sacae.logger import count, read_jsonl  # the logger's writer imports torch: not for reading a folder

    problems: list[str] = []
    rows = read_jsonl(Path(run_dir) / name, problems)
    if not problems:
        return rows, None
    more = f" (and {count(len(problems) - 1, 'more damaged line')})" if len(problems) > 1 else ""
    return rows, problems[0] + more


# ---------------------------------------------------------------------------------------------------------------
# Ownership: which files of a folder sacae wrote, and one writer at a time.

LOCK_NAME = ".lock"
# What `sacae sweep` writes into a run folder before the trainer starts there; with these alone a folder is still
# empty for training.
LAUNCH_FILES = ("run.sh", "run.slrm", "id", "stdout", "stderr")
# Inside each output folder, the names sacae writes (temporaries included); anything else there is the user's.
OWN_FILES: dict[str, tuple[str, ...]] = {
    "tb": ("events.out.tfevents.*",),
    "video": ("[0-9]*.mp4", "eval_*.mp4", ".*.tmp.mp4"),
    "model": ("[0-9]*.pt", ".*.tmp.pt"),
    "checkpoint": ("state-*.pt", "state-*.pt.damaged", ".*.tmp*", "replay/chunk-*.npz", "replay/.*.tmp*"),
    # The trackers' local stores (sacae.trackers): wandb's offline runs and MLflow's file store.
    "wandb": ("offline-run-*/**/*", "run-*/**/*", "latest-run", "debug*.log"),
    "mlruns": ("**/*",),
}


def is_run(work_dir: Path) -> bool:
    """A folder is a sacae run once the trainer has written its config.json there."""
    return (work_dir / "config.json").is_file()


def foreign_entries(work_dir: Path) -> list[str]:
    """What a folder that is not a run holds besides the lock and a sweep's launch files (sorted names, folders
    with a trailing slash)."""
    if not work_dir.is_dir():
        return []
    ignored = {LOCK_NAME, *LAUNCH_FILES}
    names = []
    for p in sorted(work_dir.iterdir()):
        if p.name in ignored or p.name.startswith(".write-test-"):
            continue
        names.append(p.name + ("/" if p.is_dir() else ""))
    return names


def remove_outputs(work_dir: Path, names: tuple[str, ...] = RUN_OUTPUTS) -> list[str]:
    """Delete the outputs `names` that sacae wrote in `work_dir` (files it names, and in output folders only the
    files it writes there); returns what was left because sacae did not write it (paths relative to the folder)."""
    left: list[str] = []
    for name in names:
        path = work_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            left += _remove_own_files(path, OWN_FILES.get(name, ()), work_dir)
    return left


def _remove_own_files(folder: Path, patterns: tuple[str, ...], root: Path) -> list[str]:
    for pattern in patterns:
        for p in folder.glob(pattern):
            if p.is_file() or p.is_symlink():
                p.unlink()
    left = []
    # Deepest first, so that a folder emptied of its own files goes too.
    for p in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            p.rmdir()
        elif not p.is_dir():
            left.append(str(p.relative_to(root)))
    if not any(folder.iterdir()):
        folder.rmdir()
    return sorted(left)


class WorkDirLock:
    """An exclusive lock on a run folder, held while a process trains there.

    It is an flock(2) on WORK_DIR/.lock, so the kernel drops it when the process ends in any way (SIGKILL included):
    a lock never outlives its process on a local disk. On NFS, Linux maps flock onto the server's byte-range locks:
    another node sees the lock too, and the server releases the lock of a node that disappeared once that node's
    lease expires (NFSv4: about 90 s). The file also says who holds it (pid, host), for the refusal.
    """

    def __init__(self, work_dir: Path, wait_seconds: float = 0.0):
        """Take the lock, or raise WorkDirBusy naming its holder. A holder on another machine may be a node that
        is gone whose NFS lease has not expired yet: wait up to `wait_seconds` for it before refusing."""
        self.path = work_dir / LOCK_NAME
        self._file = open(self.path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        self.supported = True
        deadline, said = time.monotonic() + wait_seconds, False
        while True:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self.holder()
                if time.monotonic() >= deadline or holder.get("host") in (None, socket.gethostname()):
                    self._file.close()
                    raise WorkDirBusy(work_dir, holder) from None
                if not said:
                    print(f"sacae: {work_dir} is locked by pid {holder.get('pid', '?')} on {holder['host']}; "
                          f"waiting up to {wait_seconds:.0f} s for it", file=sys.stderr, flush=True)  # fmt: skip
                    said = True
                time.sleep(1.0)
            except OSError:  # ENOLCK, EOPNOTSUPP: a filesystem without locks (NFS mounted with nolock)
                self.supported = False
                break
        with contextlib.suppress(OSError):  # who holds it is for the refusal's sentence; the lock is what counts
            self._file.seek(0)
            self._file.truncate()
            self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
            self._file.flush()

    def holder(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                holder = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the descriptor drops the flock


class WorkDirBusy(SacaeError):  # noqa: N818
    """Another process trains in the folder."""

    def __init__(self, work_dir: Path, holder: dict[str, Any]):
        pid, host = holder.get("pid", "?"), holder.get("host", "another machine")
        super().__init__(
            f"{work_dir} is in use by another sacae process (pid {pid} on {host}); a run folder has one writer at a "
            f"time: wait for it to end or stop it (its checkpoint keeps its progress), or choose another --work_dir."
        )


def run_finished(work_dir: Path) -> bool | None:
    """Whether the run in `work_dir` is finished, from the most reliable record there is: the newest readable
    checkpoint (a finished run writes one at its last step), else status.json; None when neither can be read and
    the folder holds logs, that is when a guard cannot know."""
    from sacae.checkpoint import CheckpointStore  # imports torch: only for commands that train

    store = CheckpointStore(work_dir)
    if store.states():
        return store.newest_says_finished()
    status = read_status(work_dir)
    if status is not None and isinstance(status.get("state"), str):
        return status["state"] == "finished"
    logs = [work_dir / name for name in ("train.log", "eval.log")]
    return None if any(p.is_file() and p.stat().st_size > 0 for p in logs) else False


def _fit_status(status: dict[str, Any], room: int) -> bytes | None:
    """`status` as compact JSON of at most `room` bytes: whole if it fits, else without its session records (the
    checkpoint keeps them, and the next write restores them), else with its message shortened; None if not even
    the state fits."""
    whole = json.dumps(status, separators=(",", ":")).encode()
    if len(whole) <= room:
        return whole
    short = {k: v for k, v in status.items() if k != "sessions"}
    message = str(short.get("message", ""))
    while True:
        text = json.dumps(short, separators=(",", ":")).encode()
        if len(text) <= room:
            return text
        if not message:
            return None
        message = message[: max(0, len(message) - max(16, len(text) - room))]
        short["message"] = message + "..." if message else ""


def write_status(work_dir: Path, status: dict[str, Any]) -> None:
    """Write WORK_DIR/status.json atomically. When the disk is full, a failure must still be recorded: the new
    status then overwrites the old file in place, compact and padded to its length, which needs no new blocks."""
    from sacae.storage import write_failure, write_text_atomic

    path = work_dir / "status.json"
    try:
        write_text_atomic(path, json.dumps(status, indent=2) + "\n")
        return
    except OSError as e:
        error = e
    try:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            compact = _fit_status(status, size - 1)
            if compact is None:
                raise error
            f.write(compact + b" " * (size - len(compact) - 1) + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        raise write_failure(error, path, "the run's status") from None
