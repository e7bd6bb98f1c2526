"""Run outputs: console lines in the seed's format, train.log / eval.log as JSON lines, TensorBoard curves, and the
same scalars to wandb and MLflow (sacae.trackers)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from sacae.errors import SacaeError
from sacae.storage import write_failure, writing

# Console columns of a training episode: (label, key, format).
TRAIN_COLUMNS = (
    ("E", "episode", "d"),
    ("S", "env_steps", "d"),
    ("D", "duration", ".1f"),
    ("R", "episode_reward", ".4f"),
    ("BR", "batch_reward", ".4f"),
    ("ALOSS", "actor_loss", ".4f"),
    ("CLOSS", "critic_loss", ".4f"),
    ("RLOSS", "ae_loss", ".4f"),
)
EVAL_COLUMNS = (("S", "env_steps", "d"), ("ER", "episode_reward", ".4f"))


def count(n: int, noun: str) -> str:
    """`n` and a regular English noun, plural unless n is 1: "1 run", "2 threads"."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cell(label: str, value: Any, fmt: str) -> str:
    # Losses do not exist before the first update: print them as 0, as the seed's first line shows.
    value = 0 if value is None else value
    text = format(value, fmt)
    return f"{label}: {text} s" if label == "D" else f"{label}: {text}"


def format_console(kind: str, row: dict[str, Any]) -> str:
    """`| train | E: 1 | S: 1000 | D: 0.8 s | R: ... ` or `| eval | S: 0 | ER: 21.1676`."""
    columns = TRAIN_COLUMNS if kind == "train" else EVAL_COLUMNS
    return " | ".join([f"| {kind}"] + [_cell(label, row.get(key), fmt) for label, key, fmt in columns])


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def quiet_tensorboard_threads() -> None:
    """TensorBoard's writer thread dies on a failed write and Python prints its traceback; TensorBoard raises the
    same error again in the thread that writes next, where Logger turns it into one sentence. Only that one
    thread's report is left out: every other thread's uncaught error is printed as usual."""
    previous = threading.excepthook
    if getattr(previous, "sacae_quiet_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.sacae_quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class Logger:
    """Appends one JSON object per training episode to train.log and per evaluation to eval.log, prints the
    console line, and mirrors scalars to TensorBoard and the other trackers at the row's env_steps."""

    def __init__(
        self,
        work_dir: str | Path,
        save_tb: bool = False,
        console: TextIO | None = None,
        truncate: dict[str, int] | None = None,
        purge_step: int | None = None,
        trackers: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
    ):
        """`truncate` ({"train": bytes, "eval": bytes}) cuts the logs back to a checkpoint's sizes before appending
        (a resumed run rewrites what came after it, a truncated last line included); `purge_step` makes
        TensorBoard drop the events at and after that step that an earlier session wrote. `trackers` names the
        experiment trackers (tensorboard, wandb, mlflow; tensorboard is the same as `save_tb`), which get `config`
        as the run's configuration."""
        self.work_dir = Path(work_dir)
        self.console_write = lambda line: print(line, file=console if console is not None else sys.stdout, flush=True)
        self._files = {}
        for kind in ("train", "eval"):
            path = self.work_dir / f"{kind}.log"
            with writing(path, f"the {kind} log"):
                if truncate is not None and path.exists():
                    with open(path, "r+b") as f:
                        f.truncate(min(truncate[kind], os.fstat(f.fileno()).st_size))
                        os.fsync(f.fileno())
                self._files[kind] = open(path, "ab", buffering=0)  # noqa: SIM115 (open for the run's lifetime)
        self._tb = None
        self._tb_failed = False
        if save_tb or "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            quiet_tensorboard_threads()
            try:
                self._tb = SummaryWriter(str(self.work_dir / "tb"), purge_step=purge_step)
            except Exception as e:  # its writer thread's failure, re-raised in TensorBoard's own types
                raise self._tb_failure(e) from None
        self._trackers = None
        if set(trackers) - {"tensorboard"}:
            from sacae.trackers import Trackers, logged_rows

            self._trackers = Trackers(trackers, self.work_dir, config)
            self._trackers.catch_up(logged_rows(self.work_dir))  # what a tracker lacks of the logs as they now stand

    def sizes(self) -> dict[str, int]:
        """Bytes written to each log so far (all of them flushed and fsynced)."""
        return {kind: f.tell() for kind, f in self._files.items()}

    def log(self, kind: str, row: dict[str, Any], video: Path | None = None) -> None:
        """Write one row (and hand an evaluation's `video` file to the trackers that take videos)."""
        row = {k: _json_value(v) for k, v in row.items()}
        self._append(kind, (json.dumps(row) + "\n").encode())
        self.console_write(format_console(kind, row))
        if self._tb is not None:
            step = row["env_steps"]
            try:
                for key, value in row.items():
                    if key not in ("env_steps",) and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self._tb.add_scalar(f"{kind}/{key}", value, step)
                self._tb.flush()
            except Exception as e:  # TensorBoard's writer thread re-raises its own failure here, in its own types
                raise self._tb_failure(e) from None
        if self._trackers is not None:
            self._trackers.log(kind, row, video)

    def _tb_failure(self, error: Exception) -> SacaeError:
        self._tb_failed = True
        if isinstance(error, OSError):
            return write_failure(error, self.work_dir / "tb", "the TensorBoard events")
        return SacaeError(
            f"Could not write the TensorBoard events in {self.work_dir / 'tb'} ({type(error).__name__}: {error}); "
            f"run the same command again to resume from the last checkpoint."
        )

    def _append(self, kind: str, line: bytes) -> None:
        """Append one whole line and fsync it; a line that cannot be written whole is cut off again, so the log
        never ends in half a line."""
        f = self._files[kind]
        start = f.tell()
        try:
            view = memoryview(line)
            while view:
                view = view[f.write(view) :]
            os.fsync(f.fileno())
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(f.fileno(), start)
                f.seek(start)
            raise write_failure(e, f.name, f"the {kind} log", len(line)) from None

    def close(self, finished: bool = True) -> None:
        """Close the logs and end the trackers' runs, as finished or as stopped (to be resumed)."""
        if self._trackers is not None:
            trackers, self._trackers = self._trackers, None
            trackers.close(finished)
        for f in self._files.values():
            f.close()
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception:
                if not self._tb_failed:  # a failure already reported is not raised a second time
                    raise


# The logs' fields that hold numbers (None where a value was not finite or does not exist yet); the counters are
# whole numbers.
_LOG_COUNTERS = ("episode", "env_steps", "agent_steps")
_LOG_NUMBERS = ("duration", "episode_reward", "episode_reward_std", "batch_reward", "critic_loss", "actor_loss",
                "alpha_loss", "alpha", "entropy", "ae_loss", "env_steps_per_second")  # fmt: skip


def _wrong_log_fields(row: dict[str, Any]) -> list[str]:
    def number(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    wrong = [k for k in _LOG_COUNTERS if k in row and (not isinstance(row[k], int) or isinstance(row[k], bool))]
    wrong += [k for k in _LOG_NUMBERS if k in row and not number(row[k])]
    rewards = row.get("episode_rewards")
    if "episode_rewards" in row and not (isinstance(rewards, list) and all(map(number, rewards))):
        wrong.append("episode_rewards")
    return [f"{k} {json.dumps(row[k])[:24]}" for k in wrong]


def read_jsonl(path: str | Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log (none when it does not exist).

    A last line cut short without its newline (a crash mid-write) is left out silently. Any other line that is not a
    JSON object, or whose logged fields have the wrong type (env_steps "x", episode_reward "abc"), is left out and
    described in `problems` ("line 3 is not JSON"), as is a log that cannot be read at all."""
    path = Path(path)
    said = problems if problems is not None else []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        said.append(f"cannot be read ({e.strerror or e})")
        return []
    lines = data.split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if number == len(lines) and line.lstrip().startswith(b"{"):
                break
            said.append(f"line {number} is not JSON")
            continue
        if not isinstance(row, dict):
            said.append(f"line {number} is not a JSON object")
        elif wrong := _wrong_log_fields(row):
            kind = "a value" if len(wrong) == 1 else "values"
            said.append(f"line {number} has {kind} of the wrong type: {', '.join(wrong)}")
        else:
            rows.append(row)
    return rows
