"""Run outputs: console lines in the seed's format, train.log / eval.log as JSON lines, TensorBoard curves."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

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


class Logger:
    """Appends one JSON object per training episode to train.log and per evaluation to eval.log, prints the
    console line, and mirrors scalars to TensorBoard at the row's env_steps."""

    def __init__(
        self,
        work_dir: str | Path,
        save_tb: bool = False,
        console: TextIO | None = None,
        truncate: dict[str, int] | None = None,
        purge_step: int | None = None,
    ):
        """`truncate` ({"train": bytes, "eval": bytes}) cuts the logs back to a checkpoint's sizes before appending
        (a resumed run rewrites what came after it, a truncated last line included); `purge_step` makes
        TensorBoard drop the events at and after that step that an earlier session wrote."""
        self.work_dir = Path(work_dir)
        self.console_write = lambda line: print(line, file=console if console is not None else sys.stdout, flush=True)
        self._files = {}
        for kind in ("train", "eval"):
            path = self.work_dir / f"{kind}.log"
            if truncate is not None and path.exists():
                with open(path, "r+b") as f:
                    f.truncate(min(truncate[kind], os.fstat(f.fileno()).st_size))
                    os.fsync(f.fileno())
            self._files[kind] = open(path, "a")
        self._tb = None
        if save_tb:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.work_dir / "tb"), purge_step=purge_step)

    def sizes(self) -> dict[str, int]:
        """Bytes written to each log so far (all of them flushed and fsynced)."""
        return {kind: f.tell() for kind, f in self._files.items()}

    def log(self, kind: str, row: dict[str, Any]) -> None:
        row = {k: _json_value(v) for k, v in row.items()}
        f = self._files[kind]
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
        self.console_write(format_console(kind, row))
        if self._tb is not None:
            step = row["env_steps"]
            for key, value in row.items():
                if key not in ("env_steps",) and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log; a truncated last line (a crash mid-write) is ignored."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows
