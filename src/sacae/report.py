"""Analysis of finished (or running) training runs: return curves, a table at fixed env steps beside the published
numbers, training-loss curves, written as a Markdown page, an HTML page and summary.json.

Runs are laid out as `<root>/<task>/<configuration>/seed_<i>/` (config.json, train.log, eval.log). Typical use:

    runs = load_runs("runs")
    summary = summarize(runs)
    write_report("runs")  # runs/report/report.md, report.html, *.png, summary.json
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import itertools
import json
import os
import re
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import tyro

from sacae.config import EXECUTION_FIELDS, RUN_CONTROL_FIELDS, TrainConfig, train_command
from sacae.errors import SacaeError
from sacae.logger import count
from sacae.rundir import check_config, check_status, read_config, read_log
from sacae.storage import write_text_atomic
from sacae.testbed import PublishedReturn, published_returns

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_AT: tuple[int, ...] = (100_000, 500_000)
DEFAULT_REPS = 2000
DEFAULT_TITLE = "Training report"
LOSS_KEYS: tuple[str, ...] = ("critic_loss", "actor_loss", "ae_loss", "alpha")
# Our configuration (config.json's algorithm) -> the method name of the published table.
PUBLISHED_METHOD = {"sac_ae": "sac_ae", "sac_pixel": "sac_pixel", "sac_states": "sac_state"}
METHOD_TITLE = {"sac_ae": "SAC+AE", "sac_pixel": "pixel SAC", "sac_state": "state SAC"}
SOURCE_TITLE = {"curl": "CURL Table 1", "drq": "DrQ Table 1"}
CONFIGURATION_ORDER = ("sac_ae", "sac_pixel", "sac_states")


@dataclass(frozen=True)
class ReportArgs:
    """Summarise training runs: eval return curves, a table at 100k and 500k env steps beside the published
    numbers, and training-loss curves, as report.md, report.html, PNG plots and summary.json."""

    path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]
    """runs/, runs/<task> or runs/<task>/<configuration>: every folder below holding a config.json is a run."""
    out: str | None = None
    """Output folder (default: PATH/report)."""
    at: tuple[int, ...] = DEFAULT_AT
    """Environment steps of the table's columns."""
    bootstrap_reps: int = DEFAULT_REPS
    """Bootstrap resamples for the confidence intervals."""
    notes: str | None = None
    """A Markdown file (## and ### headings, paragraphs, "- " lists, tables) placed after the page's overview, plots
    and method: what the logs cannot say, e.g. what was checked where a result differs from the published one."""
    page: str | None = None
    """Write the Markdown page to this file instead of OUT/report.md (its plot links lead into OUT)."""
    title: str = DEFAULT_TITLE
    """The page's heading (and the HTML page's title)."""


# ------------------------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True, eq=False)
class Run:
    """One training run (one seed of one configuration on one task) as its files describe it."""

    path: Path
    task: str
    """The run's env name: domain_task (e.g. cartpole_swingup), or gymnasium-<id> (e.g. gymnasium-Pendulum-v1)."""
    configuration: str
    """The configuration's folder name (runs/<task>/<configuration>/seed_<i>), e.g. sac_ae."""
    method: str
    """sac_ae, sac_pixel or sac_states, from the config's encoder and decoder types."""
    seed: str
    """The run's folder name, e.g. seed_3."""
    config: dict[str, Any]
    eval_rows: tuple[dict[str, Any], ...]
    train_rows: tuple[dict[str, Any], ...]
    status: dict[str, Any] | None = None

    def eval_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation env steps (increasing) and mean returns; where a step was logged twice, the later row wins."""
        by_step = {
            int(r["env_steps"]): float(r["episode_reward"]) for r in self.eval_rows if _is_number(r, "episode_reward")
        }
        steps = np.array(sorted(by_step), dtype=np.int64)
        return steps, np.array([by_step[s] for s in steps], dtype=np.float64)

    def train_curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Env steps and values of one train.log column (rows where it is missing or null are left out)."""
        by_step = {int(r["env_steps"]): float(r[key]) for r in self.train_rows if _is_number(r, key)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        return steps, np.array([by_step[s] for s in steps], dtype=np.float64)

    @property
    def last_eval_env_steps(self) -> int | None:
        steps, _ = self.eval_curve()
        return int(steps[-1]) if len(steps) else None

    @property
    def eval_interval(self) -> int | None:
        """Env steps between evaluations: eval_freq x action_repeat, else the logs' median spacing."""
        freq, repeat = self.config.get("eval_freq"), self.config.get("action_repeat")
        if isinstance(freq, int) and isinstance(repeat, int) and freq > 0 and repeat > 0:
            return freq * repeat
        steps, _ = self.eval_curve()
        return int(np.median(np.diff(steps))) if len(steps) > 1 else None

    @property
    def planned_env_steps(self) -> int | None:
        steps, repeat = self.config.get("num_train_steps"), self.config.get("action_repeat")
        return steps * repeat if isinstance(steps, int) and isinstance(repeat, int) else None

    @property
    def wall_clock_hours(self) -> float:
        """Training time over all sessions: status.json's elapsed_seconds when the run wrote it, else the logged
        durations of training episodes plus evaluations (a partial last episode is not logged)."""
        if self.status and _is_number(self.status, "elapsed_seconds"):
            return float(self.status["elapsed_seconds"]) / 3600
        seconds = sum(float(r["duration"]) for r in (*self.train_rows, *self.eval_rows) if _is_number(r, "duration"))
        return seconds / 3600

    @property
    def precision(self) -> str:
        """The networks' precision (fp32, bf16): config.json's, or the default for configs written before the
        setting existed."""
        return str(_with_defaults(self.config)["precision"])

    @property
    def state(self) -> str | None:
        """status.json's state (running, finished, stopped, failed) when the run wrote one."""
        return str(self.status["state"]) if self.status and "state" in self.status else None

    @property
    def resumes(self) -> int | None:
        """How many times the run was resumed, from status.json; None when the run wrote no count."""
        value = self.status.get("resumes") if self.status else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def resumed(self) -> bool:
        """True when status.json counts a resume or a log's env_steps go back (a restart appended to the logs)."""
        if self.resumes:
            return True
        for rows in (self.eval_rows, self.train_rows):
            steps = [r["env_steps"] for r in rows if isinstance(r.get("env_steps"), int)]
            if any(b <= a for a, b in itertools.pairwise(steps)):
                return True
        return False

    @property
    def sessions(self) -> list[dict[str, Any]]:
        """status.json's record of the sessions (processes) that trained the run: machine, env steps from and to."""
        sessions = self.status.get("sessions") if self.status else None
        return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []

    @property
    def machines(self) -> list[str]:
        """The machines the run trained on, in words, first use first; "not recorded" stands for sessions that left
        no record (sessions of versions that did not record them)."""
        if not self.sessions:
            return ["not recorded"]
        labels = [machine_label(s) for s in self.sessions]
        first = self.sessions[0].get("from_env_steps")
        if isinstance(first, int) and first > 0:
            labels.insert(0, f"before {steps_label(first)} env steps: not recorded")
        return list(dict.fromkeys(labels))

    def value_at(self, env_steps: int) -> tuple[int, float] | None:
        """(env steps of the evaluation used, its return) for the column at `env_steps`: the evaluation at exactly
        that step, else the last one before it if at most one evaluation interval earlier, else None."""
        steps, returns = self.eval_curve()
        i = int(np.searchsorted(steps, env_steps, side="right")) - 1
        if i < 0:
            return None
        interval = self.eval_interval
        if steps[i] == env_steps or (interval is not None and env_steps - steps[i] <= interval):
            return int(steps[i]), float(returns[i])
        return None


def machine_label(session: dict[str, Any]) -> str:
    """One session's machine in words: "NVIDIA H100 80GB HBM3 (cuda:0), torch 2.11.0" or "AMD EPYC (2 cores),
    1 thread, torch 2.13.0+cpu"."""
    if session.get("gpu"):
        where = f"{session['gpu']} ({session.get('device', 'cuda')})"
    else:
        cores = session.get("cpu_count")
        where = f"{session.get('processor', 'unknown processor')}" + (f" ({count(cores, 'core')})" if cores else "")
        if isinstance(session.get("threads"), int):
            where += f", {count(session['threads'], 'thread')}"
    return where + (f", torch {session['torch']}" if session.get("torch") else "")


def _is_number(row: dict[str, Any], key: str) -> bool:
    value = row.get(key)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _read_log(run_dir: Path, name: str) -> tuple[tuple[dict[str, Any], ...], str | None]:
    """The rows of one of a run's logs that have env steps, and what is wrong with the lines left out (None when
    nothing is)."""
    rows, problem = read_log(run_dir, name)
    said = None if problem is None else f"{name} {problem}"
    return tuple(r for r in rows if isinstance(r.get("env_steps"), int)), said


def _method(config: dict[str, Any]) -> str:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in config.items() if k in known}).configuration
    except TypeError:
        return str(config.get("configuration", "unknown"))


@dataclass(frozen=True)
class Damage:
    """A run folder with files that cannot be read: what is wrong with them, and whether the run is left out (its
    config.json cannot be read) or shown without what cannot be read."""

    path: Path
    problems: tuple[str, ...]
    """Each damaged file and what is wrong with it, e.g. 'eval.log line 3 is not JSON'."""
    left_out: bool

    def name(self, root: Path) -> str:
        """The run's folder under `root`."""
        return self.path.relative_to(root).as_posix() if self.path != root else self.path.name

    def sentence(self, root: Path) -> str:
        """What the page says about the run."""
        done = "the run is left out" if self.left_out else "what cannot be read is left out of the report"
        return f"`{self.name(root)}`: {'; '.join(self.problems)}; {done}."


def damage_blocks(damage: Sequence[Damage], root: str | Path) -> list[tuple[Any, ...]]:
    """The page's section on damaged runs (nothing when there are none)."""
    if not damage:
        return []
    return [("h2", "Runs with damaged files"), ("ul", [d.sentence(Path(root)) for d in damage])]


def _load_run(run_dir: Path, config: dict[str, Any]) -> tuple[Run, list[str]]:
    method = _method(config)
    is_seed_dir = run_dir.name.startswith("seed_")
    eval_rows, eval_problem = _read_log(run_dir, "eval.log")
    train_rows, train_problem = _read_log(run_dir, "train.log")
    status, status_problem = check_status(run_dir)
    run = Run(
        path=run_dir,
        # The trainer's own name for the environment: a Gymnasium run's config also holds the default domain/task.
        task=TrainConfig(
            domain_name=config["domain_name"], task_name=config["task_name"], env=config.get("env")
        ).env_name,
        configuration=run_dir.parent.name if is_seed_dir else method,
        method=method,
        seed=run_dir.name if is_seed_dir else f"seed_{config.get('seed', '?')}",
        config=config,
        eval_rows=eval_rows,
        train_rows=train_rows,
        status=status,
    )
    status_problem = None if status_problem is None else f"status.json {status_problem}"
    return run, [p for p in (eval_problem, train_problem, status_problem) if p is not None]


def load_run(run_dir: str | Path) -> Run:
    """The run in `run_dir` (a folder holding config.json, and train.log / eval.log once it has logged). Log lines
    and status.json fields that cannot be read are left out, each with a warning; SacaeError when config.json cannot
    be read."""
    run, problems = _load_run(Path(run_dir), read_config(run_dir))
    for problem in problems:
        warnings.warn(f"{run_dir}: {problem}; left out.", stacklevel=2)
    return run


def load_runs_and_damage(path: str | Path) -> tuple[list[Run], list[Damage]]:
    """Every run under `path` that can be read, sorted by task, configuration and seed (see load_runs), and every
    run folder with damaged files. Raises SacaeError if the folder is missing or holds no readable run."""
    root = Path(path)
    if not root.exists():
        raise SacaeError(f"There is no folder at {root}.")
    if not root.is_dir():
        raise SacaeError(f"{root} is a file, not a folder of runs.")
    folders = sorted({p.parent for p in root.rglob("config.json")})
    runs, damage = [], []
    for folder in folders:
        config, problem = check_config(folder)
        if config is None:
            damage.append(Damage(folder, (f"config.json {problem or 'cannot be read'}",), left_out=True))
            continue
        run, problems = _load_run(folder, config)
        runs.append(run)
        if problems:
            damage.append(Damage(folder, tuple(problems), left_out=False))
    # A folder with logs but no config.json lost it: its task and settings are unknown.
    orphans = sorted({p.parent for p in root.rglob("*.log") if p.name in ("train.log", "eval.log")} - set(folders))
    for folder in orphans:
        logs = " and ".join(name for name in ("train.log", "eval.log") if (folder / name).exists())
        damage.append(Damage(folder, (f"it holds {logs} but no config.json",), left_out=True))
    unreadable = [d for d in damage if d.left_out and d.path in folders]
    if not runs and len(unreadable) == 1:
        read_config(unreadable[0].path)  # raises the sentence naming the file
    if not runs and unreadable:
        shown = "; ".join(f"{d.name(root)}: {d.problems[0]}" for d in unreadable[:3])
        more = f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        raise SacaeError(f"None of the {len(unreadable)} runs under {root} can be read ({shown}{more}).")
    if not runs:
        raise SacaeError(f"There are no runs under {root}: no folder below it holds a config.json.")
    runs.sort(key=lambda r: (r.task, _configuration_key(r.configuration), _seed_key(r.seed)))
    return runs, sorted(damage, key=lambda d: d.path)


def load_runs(path: str | Path) -> list[Run]:
    """Every run under `path` (runs/, runs/<task>, runs/<task>/<configuration> or one run folder), sorted by task,
    configuration and seed. A run whose config.json cannot be read is left out, and lines of logs or fields of
    status.json that cannot be read, each with a warning. Raises SacaeError if the folder is missing or holds no
    readable run."""
    runs, damage = load_runs_and_damage(path)
    for d in damage:
        warnings.warn(d.sentence(Path(path)).replace("`", ""), stacklevel=2)
    return runs


def _configuration_key(name: str) -> tuple[int, str]:
    return (CONFIGURATION_ORDER.index(name) if name in CONFIGURATION_ORDER else len(CONFIGURATION_ORDER), name)


def _seed_key(seed: str) -> tuple[int, str]:
    digits = re.sub(r"\D", "", seed)
    return (int(digits) if digits else -1, seed)


def _by_task(runs: Sequence[Run]) -> dict[str, dict[str, list[Run]]]:
    grouped: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        grouped.setdefault(run.task, {}).setdefault(run.configuration, []).append(run)
    return grouped


# ------------------------------------------------------------------------------------------------------------
# Summary


@dataclass(frozen=True)
class Cell:
    """The returns of one configuration on one task at one env step, over its seeds."""

    task: str
    configuration: str
    method: str
    env_steps: int
    seeds: tuple[str, ...]
    """All seeds of the configuration, including those without a value here."""
    values: dict[str, float]
    """Seed -> the return used for this column."""
    used_env_steps: dict[str, int]
    """Seed -> env steps of the evaluation whose return is used (differs from env_steps near a run's end)."""
    mean: float | None = None
    std: float | None = None
    """Sample standard deviation over seeds (ddof 1); None with fewer than two seeds."""
    iqm: float | None = None
    iqm_ci: tuple[float, float] | None = None
    mean_ci: tuple[float, float] | None = None

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Summary:
    """What `summarize` found: one Cell per task, configuration and env step, and sentences about the data."""

    runs: tuple[Run, ...]
    at: tuple[int, ...]
    cells: tuple[Cell, ...]
    notes: dict[str, list[str]]
    """Task -> sentences about missing seeds, unequal lengths, differing settings."""
    published: tuple[PublishedReturn, ...]
    bootstrap_reps: int
    seed: int = 0
    generated_by: str = field(default="")

    @property
    def tasks(self) -> list[str]:
        return sorted({c.task for c in self.cells})

    def cells_of(self, task: str, env_steps: int) -> list[Cell]:
        return [c for c in self.cells if c.task == task and c.env_steps == env_steps]

    def published_of(self, task: str, env_steps: int) -> list[PublishedReturn]:
        return [p for p in self.published if p.task == task and p.env_steps == env_steps]

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per cell and per published number (for pandas.DataFrame or a CSV)."""
        rows: list[dict[str, Any]] = []
        for task in self.tasks:
            for env_steps in self.at:
                for c in self.cells_of(task, env_steps):
                    rows.append({"task": task, "env_steps": env_steps, "configuration": c.configuration,
                                 "seeds": f"{c.n} of {len(c.seeds)}", "mean": c.mean, "std": c.std, "iqm": c.iqm,
                                 "iqm_ci_low": c.iqm_ci[0] if c.iqm_ci else None,
                                 "iqm_ci_high": c.iqm_ci[1] if c.iqm_ci else None})  # fmt: skip
                for p in self.published_of(task, env_steps):
                    rows.append({"task": task, "env_steps": env_steps, "configuration": _published_label(p),
                                 "seeds": None, "mean": p.mean, "std": p.std, "iqm": None, "iqm_ci_low": None,
                                 "iqm_ci_high": None})  # fmt: skip
        return rows

    def to_dict(self) -> dict[str, Any]:
        """summary.json's content."""
        return {
            "generated_by": self.generated_by,
            "at": list(self.at),
            "bootstrap_reps": self.bootstrap_reps,
            "cells": [{**dataclasses.asdict(c), "seeds": list(c.seeds), "n": c.n} for c in self.cells],
            "runs": [_run_dict(r) for r in self.runs],
            "published": [dataclasses.asdict(p) for p in self.published if p.task in self.tasks],
            "notes": self.notes,
        }


def _run_dict(run: Run) -> dict[str, Any]:
    return {
        "path": str(run.path),
        "task": run.task,
        "configuration": run.configuration,
        "method": run.method,
        "seed": run.seed,
        "precision": run.precision,
        "last_eval_env_steps": run.last_eval_env_steps,
        "planned_env_steps": run.planned_env_steps,
        "evaluations": len(run.eval_curve()[0]),
        "wall_clock_hours": run.wall_clock_hours,
        "state": run.state,
        "resumed": run.resumed,
        "resumes": run.resumes,
        "machines": run.machines,
        "command": run_command(run),
    }


def _published_label(p: PublishedReturn) -> str:
    return f"published {METHOD_TITLE.get(p.method, p.method)} ({SOURCE_TITLE.get(p.source, p.source)})"


def summarize(
    runs: Sequence[Run], at: Sequence[int] = DEFAULT_AT, bootstrap_reps: int = DEFAULT_REPS, seed: int = 0
) -> Summary:
    """Per task, configuration and env step in `at`: mean, sample std and IQM over seeds with 95% stratified
    bootstrap CIs (rliable), plus the published numbers of the same tasks and notes on missing or uneven data."""
    if not runs:
        raise SacaeError("There are no runs to summarise.")
    if not at or any(s <= 0 for s in at):
        raise SacaeError(f"The env steps to summarise at must be positive (got {', '.join(map(str, at)) or 'none'}).")
    if bootstrap_reps < 1:
        raise SacaeError(f"--bootstrap_reps must be at least 1 (got {bootstrap_reps}).")
    at = tuple(sorted(set(at)))
    grouped = _by_task(runs)
    cells = [
        _cell(task, configuration, seeds, env_steps)
        for task, configurations in grouped.items()
        for configuration, seeds in configurations.items()
        for env_steps in at
    ]
    cells = _with_intervals(cells, bootstrap_reps, seed)
    notes = {
        task: _notes(configurations, [c for c in cells if c.task == task]) for task, configurations in grouped.items()
    }
    published = tuple(p for p in published_returns() if p.task in grouped and p.env_steps in at)
    return Summary(tuple(runs), at, tuple(cells), notes, published, bootstrap_reps, seed)


def _cell(task: str, configuration: str, seeds: list[Run], env_steps: int) -> Cell:
    found = {run.seed: run.value_at(env_steps) for run in seeds}
    values = {s: v[1] for s, v in found.items() if v is not None}
    arr = np.array(list(values.values()))
    return Cell(
        task=task,
        configuration=configuration,
        method=seeds[0].method,
        env_steps=env_steps,
        seeds=tuple(run.seed for run in seeds),
        values=values,
        used_env_steps={s: v[0] for s, v in found.items() if v is not None},
        mean=float(arr.mean()) if len(arr) else None,
        std=float(arr.std(ddof=1)) if len(arr) > 1 else None,
    )


def _with_intervals(cells: list[Cell], reps: int, seed: int) -> list[Cell]:
    """The cells with IQM and its (and the mean's) 95% stratified bootstrap CI over seeds filled in."""
    scored = {i: np.array(list(c.values.values())).reshape(-1, 1) for i, c in enumerate(cells) if c.values}
    if not scored:
        return cells
    from rliable import library as rly  # imported here: rliable pulls in arch, statsmodels and pandas
    from rliable import metrics

    def iqm_and_mean(scores: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores)])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arch's notice about RandomState, which rliable passes
        points, intervals = rly.get_interval_estimates(
            {str(i): s for i, s in scored.items()}, iqm_and_mean, reps=reps, random_state=np.random.RandomState(seed)
        )
    out = list(cells)
    for i in scored:
        point, ci = points[str(i)], intervals[str(i)]
        out[i] = dataclasses.replace(
            cells[i],
            iqm=float(point[0]),
            iqm_ci=(float(ci[0, 0]), float(ci[1, 0])),
            mean_ci=(float(ci[0, 1]), float(ci[1, 1])),
        )
    return out


def steps_label(env_steps: int) -> str:
    """100000 -> '100k', 1500000 -> '1.5M', 950 -> '950'."""
    for size, unit in ((1_000_000, "M"), (1_000, "k")):
        if env_steps >= size:
            return f"{env_steps / size:.3g}{unit}"
    return str(env_steps)


def _notes(configurations: dict[str, list[Run]], cells: list[Cell]) -> list[str]:
    notes: list[str] = []
    counts = {name: len(seeds) for name, seeds in configurations.items()}
    if len(set(counts.values())) > 1:
        notes.append("The configurations have unequal numbers of seeds: "
                     + ", ".join(f"{name} {n}" for name, n in counts.items()) + ".")  # fmt: skip
    for name, seeds in configurations.items():
        notes.extend(_length_notes(name, seeds))
        notes.extend(_setting_notes(name, seeds))
        notes.extend(_published_setting_notes(name, seeds))
    for cell in cells:
        notes.extend(_cell_notes(cell, {r.seed: r for r in configurations[cell.configuration]}))
    return notes


def _stop_text(run: Run) -> str:
    last = run.last_eval_env_steps
    if last is None:
        text = f"{run.seed} has no evaluation yet"
    else:
        text = f"{run.seed} stops at {steps_label(last)} env steps"
    return text + (f" ({run.state})" if run.state in ("running", "stopped", "failed") else "")


def _length_notes(name: str, seeds: list[Run]) -> list[str]:
    lasts = {r.seed: r.last_eval_env_steps for r in seeds}
    if len(set(lasts.values())) <= 1:
        return []
    ends = ", ".join(f"{s} {steps_label(v) if v is not None else 'none'}" for s, v in lasts.items())
    shortest = min((v for v in lasts.values() if v is not None), default=None)
    tail = f"; past {steps_label(shortest)} its curve averages fewer seeds" if shortest is not None else ""
    return [f"{name}: the seeds' last evaluations are at different env steps ({ends}){tail}."]


def _setting_notes(name: str, seeds: list[Run]) -> list[str]:
    # Where and how a run is executed, saved or restarted: not what it computes.
    ignored = {"seed", "work_dir", "save_tb", "save_video", "save_model", "checkpoint_every",
               *EXECUTION_FIELDS, *RUN_CONTROL_FIELDS}  # fmt: skip
    first = _with_defaults(seeds[0].config)
    notes = []
    for run in seeds[1:]:
        config = _with_defaults(run.config)
        keys = sorted(k for k in set(first) | set(config) if k not in ignored and first.get(k) != config.get(k))
        if keys:
            diffs = ", ".join(f"{k}={config.get(k)!r} ({seeds[0].seed}: {first.get(k)!r})" for k in keys)
            notes.append(f"{name}: {run.seed} differs from {seeds[0].seed} in more than the seed: {diffs}.")
    return notes


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config with the settings it does not name (it was written before they existed) at their defaults."""
    return {**dataclasses.asdict(TrainConfig()), **config}


def _published_setting_notes(name: str, seeds: list[Run]) -> list[str]:
    method = PUBLISHED_METHOD.get(seeds[0].method)
    ours = sorted({r.config.get("action_repeat") for r in seeds}, key=str)
    theirs = sorted({p.action_repeat for p in published_returns() if p.method == method and p.task == seeds[0].task})
    if theirs and ours != theirs:
        return [f"{name} runs use action repeat {', '.join(map(str, ours))}; the published "
                f"{METHOD_TITLE[method]} numbers use {', '.join(map(str, theirs))}."]  # fmt: skip
    return []


def _cell_notes(cell: Cell, runs: dict[str, Run]) -> list[str]:
    at = steps_label(cell.env_steps)
    notes = []
    missing = [s for s in cell.seeds if s not in cell.values]
    if missing:
        why = "; ".join(_stop_text(runs[s]) for s in missing)
        notes.append(f"At {at}, {cell.configuration} uses {cell.n} of {len(cell.seeds)} seeds: {why}.")
    for seed, used in cell.used_env_steps.items():
        if used != cell.env_steps:
            last = runs[seed].last_eval_env_steps
            reason = "its last; the run stops before" if last == used else "none at exactly"
            notes.append(f"At {at}, {cell.configuration} {seed} counts its evaluation at {steps_label(used)} "
                         f"env steps ({reason} {at}).")  # fmt: skip
    return notes


# ------------------------------------------------------------------------------------------------------------
# Plots


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure drawn by the Agg canvas: no display and no pyplot state, so reports run headless and a notebook's
    own backend is left alone (it still shows the returned figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _colors(configurations: Sequence[str]) -> dict[str, str]:
    return {name: f"C{i}" for i, name in enumerate(sorted(configurations, key=_configuration_key))}


def mean_curve(
    seeds: Sequence[tuple[np.ndarray, np.ndarray]], reps: int = DEFAULT_REPS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Env steps, mean over seeds and the 95% percentile-bootstrap CI of that mean (resampling seeds) of curves
    given as (env_steps, values) per seed; each step averages the seeds that logged it."""
    grid = np.unique(np.concatenate([steps for steps, _ in seeds])) if seeds else np.array([], dtype=np.int64)
    rng = np.random.default_rng(seed)
    means, lows, highs = [], [], []
    for step in grid:
        v = np.array([values[steps == step][0] for steps, values in seeds if np.any(steps == step)])
        means.append(v.mean())
        if len(v) == 1:
            lows.append(v[0])
            highs.append(v[0])
            continue
        resampled = v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1)
        lows.append(np.percentile(resampled, 2.5))
        highs.append(np.percentile(resampled, 97.5))
    return grid, np.array(means), np.array(lows), np.array(highs)


def plot_returns(runs: Sequence[Run], task: str, reps: int = DEFAULT_REPS, published: bool = True) -> Figure:
    """Evaluation return vs env steps of each configuration on `task`: the mean over seeds, a 95% bootstrap band
    over seeds, each seed as a thin line, and the published mean ± std at 100k and 500k as error bars."""
    configurations = _by_task(runs).get(task, {})
    colors = _colors(list(configurations))
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    # Published numbers only within the steps the runs were meant to reach, so short runs keep a readable scale.
    reach = max((r.planned_env_steps or r.last_eval_env_steps or 0 for r in runs if r.task == task), default=0)
    for name, seeds in configurations.items():
        curves = [c for c in (r.eval_curve() for r in seeds) if len(c[0])]
        for steps, values in curves:
            ax.plot(steps, values, color=colors[name], alpha=0.25, linewidth=0.8)
        if curves:
            grid, mean, low, high = mean_curve(curves, reps)
            ax.plot(grid, mean, color=colors[name], linewidth=2, label=f"{name} ({count(len(curves), 'seed')})")
            ax.fill_between(grid, low, high, color=colors[name], alpha=0.2, linewidth=0)
        if published:
            _plot_published(ax, task, seeds[0].method, colors[name], reach)
    ax.set(title=task, xlabel="environment steps", ylabel="evaluation return")
    _steps_axis(ax)
    ax.grid(alpha=0.3)
    if configurations:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def _plot_published(ax: Any, task: str, method: str, color: str, reach: int) -> None:
    rows = [p for p in published_returns() if p.task == task and p.method == PUBLISHED_METHOD.get(method)]
    markers = {"curl": "o", "drq": "s"}
    for p in rows:
        if p.env_steps > reach:
            continue
        label = f"published {METHOD_TITLE[p.method]} ({SOURCE_TITLE.get(p.source, p.source)})"
        ax.errorbar(p.env_steps, p.mean, yerr=p.std, color=color, marker=markers.get(p.source, "^"),
                    markerfacecolor="none", capsize=3, linestyle="none", label=label)  # fmt: skip
    _dedupe_legend_labels(ax)


def _dedupe_legend_labels(ax: Any) -> None:
    seen: set[str] = set()
    for artist in ax.containers:
        label = artist.get_label()
        if label in seen:
            artist.set_label("_" + label)
        seen.add(label)


def _spans_decades(series: Sequence[np.ndarray]) -> bool:
    """Whether positive values range over more than a factor of 10 (a log axis then reads better)."""
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in series])
    return bool(len(values) and np.all(values > 0) and values.max() / values.min() > 10)


def _steps_axis(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: steps_label(int(x)) if x >= 0 else ""))


def plot_losses(runs: Sequence[Run], task: str, reps: int = DEFAULT_REPS) -> Figure:
    """Critic, actor and autoencoder loss and the temperature alpha vs env steps on `task`, the mean over seeds of
    each configuration (from train.log)."""
    configurations = _by_task(runs).get(task, {})
    colors = _colors(list(configurations))
    fig = _figure((10, 6.5))
    axes = fig.subplots(2, 2, sharex=True)
    for ax, key in zip(axes.flat, LOSS_KEYS, strict=True):
        plotted = False
        for name, seeds in configurations.items():
            curves = [c for c in (r.train_curve(key) for r in seeds) if len(c[0])]
            if not curves:
                continue
            grid, mean, low, high = mean_curve(curves, reps)
            ax.plot(grid, mean, color=colors[name], label=name)
            ax.fill_between(grid, low, high, color=colors[name], alpha=0.2, linewidth=0)
            plotted = True
        if plotted and _spans_decades([line.get_ydata() for line in ax.get_lines()]):
            ax.set_yscale("log")
        if not plotted:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=key)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("environment steps")
        _steps_axis(ax)
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{task}: training (mean over seeds)")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------------------
# Pages: a list of blocks rendered both as Markdown and as HTML.


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.1f}, {ci[1]:.1f}]"


def _table_block(summary: Summary, task: str, env_steps: int) -> tuple[str, list[str], list[list[str]]]:
    header = ["", "seeds", "mean", "std", "IQM [95% CI]"]
    rows = [
        [c.configuration, f"{c.n} of {len(c.seeds)}", _fmt(c.mean), _fmt(c.std), _fmt(c.iqm) + _ci(c.iqm_ci)]
        for c in summary.cells_of(task, env_steps)
    ]
    rows += [
        [_published_label(p), "", f"{p.mean:.0f}", f"{p.std:.0f}", ""] for p in summary.published_of(task, env_steps)
    ]
    return ("table", header, rows)


# The overview's method groups, in the order of the published tables; a configuration of another method gets a
# group of its own after them.
OVERVIEW_GROUPS = ("sac_ae", "sac_pixel", "sac_state")
SOURCE_SHORT = {"curl": "CURL", "drq": "DrQ"}
SOURCE_CITATION = {"curl": "Srinivas et al. 2020, Table 1", "drq": "Kostrikov et al. 2021, Table 1"}
NO_VALUE = "—"


@dataclass(frozen=True)
class OverviewColumn:
    """One column of the overview table: one of our configurations, or the published numbers of a method, at one
    env step."""

    env_steps: int
    group: str
    """The published method name the column belongs to (sac_ae, sac_pixel, sac_state) or our own method."""
    configuration: str | None = None
    """Ours; None for the column of published numbers."""

    @property
    def label(self) -> str:
        return self.configuration or "published"

    @property
    def group_title(self) -> str:
        return METHOD_TITLE.get(self.group, self.group)


def overview_columns(summary: Summary) -> list[OverviewColumn]:
    """The overview's columns: per env step, per method, our configurations that have a value there on some task,
    then the method's published numbers if some task of the page has one there."""
    methods = {c.configuration: c.method for c in summary.cells}
    groups = [*OVERVIEW_GROUPS, *sorted({PUBLISHED_METHOD.get(m, m) for m in methods.values()} - set(OVERVIEW_GROUPS))]
    columns = []
    for env_steps, group in itertools.product(summary.at, groups):
        for name in sorted(methods, key=_configuration_key):
            reached = any(c.values for c in summary.cells if c.configuration == name and c.env_steps == env_steps)
            if PUBLISHED_METHOD.get(methods[name], methods[name]) == group and reached:
                columns.append(OverviewColumn(env_steps, group, configuration=name))
        if any(p.method == group and p.env_steps == env_steps for p in summary.published):
            columns.append(OverviewColumn(env_steps, group))
    return columns


def _decimals(value: float) -> int:
    """Places after the point: none from 100 up (as the published tables), else enough to tell small returns apart."""
    return 0 if abs(value) >= 100 else 1 if abs(value) >= 1 else 3


def _overview_ours(cell: Cell | None) -> str:
    if cell is None:
        return NO_VALUE
    seeds = f"{cell.n} of {count(len(cell.seeds), 'seed')}" if cell.n < len(cell.seeds) else count(cell.n, "seed")
    if cell.mean is None:
        return f"{NO_VALUE} ({seeds})"
    places = _decimals(cell.mean)
    spread = f" ± {cell.std:.{places}f}" if cell.std is not None else ""
    return f"{cell.mean:.{places}f}{spread} ({seeds})"


def _source_key(source: str) -> tuple[bool, str]:
    return (source not in SOURCE_SHORT, source)


def _overview_published(found: Sequence[PublishedReturn]) -> str:
    """Each source's mean ± std, "; " between sources, e.g. "311 ± 11 (CURL); 276 ± 38 (DrQ)"."""
    ordered = sorted(found, key=lambda p: _source_key(p.source))
    return "; ".join(f"{p.mean:g} ± {p.std:g} ({SOURCE_SHORT.get(p.source, p.source)})" for p in ordered) or NO_VALUE


def _overview_block(summary: Summary) -> tuple[str, list[OverviewColumn], list[list[str]]]:
    """Every task (rows) and configuration at every env step of the summary beside the published numbers."""
    columns = overview_columns(summary)
    cells = {(c.task, c.configuration, c.env_steps): c for c in summary.cells}
    with_published = {p.task for p in published_returns()}
    rows = []
    for task in summary.tasks:
        row = [task if task in with_published else f"{task} (no published numbers)"]
        for col in columns:
            if col.configuration is not None:
                row.append(_overview_ours(cells.get((task, col.configuration, col.env_steps))))
            else:
                found = [p for p in summary.published_of(task, col.env_steps) if p.method == col.group]
                row.append(_overview_published(found))
        rows.append(row)
    return ("overview", columns, rows)


def _overview_caption(summary: Summary, columns: Sequence[OverviewColumn]) -> str:
    shown = {(c.configuration, c.env_steps) for c in columns if c.configuration}
    configurations = sorted({c.configuration for c in summary.cells}, key=_configuration_key)
    sources = sorted({p.source for p in summary.published}, key=_source_key)
    steps = " and ".join(steps_label(s) for s in summary.at)
    text = (f"Evaluation return at {steps} env steps. Ours, named by configuration: mean ± std over the seeds that "
            "reach the step, and how many.")  # fmt: skip
    if sources:
        cited = "; ".join(f"{SOURCE_SHORT.get(s, s)}: {SOURCE_CITATION.get(s, s)}" for s in sources)
        text += f" Published, mean ± std: {cited}."
    text += f" {NO_VALUE}: no run, or no published number."
    for env_steps in summary.at:
        short = [f"`{name}`" for name in configurations if (name, env_steps) not in shown]
        if short:
            text += f" Not reached at {steps_label(env_steps)} env steps: {', '.join(short)}."
    return text


def _runs_block(runs: Sequence[Run]) -> tuple[str, list[str], list[list[str]]]:
    header = ["configuration", "seed", "precision", "last eval (env steps)", "planned", "evaluations", "hours", "state",
              "resumes", "machine"]  # fmt: skip
    rows = []
    for r in runs:
        last, planned = r.last_eval_env_steps, r.planned_env_steps
        rows.append([r.configuration, r.seed, r.precision, steps_label(last) if last is not None else "none",
                     steps_label(planned) if planned is not None else "?", str(len(r.eval_curve()[0])),
                     f"{r.wall_clock_hours:.2f}", r.state or "", _resumes_text(r), "; ".join(r.machines)])  # fmt: skip
    return ("table", header, rows)


# Flags a reproduction command leaves out: the seed and folder are written per seed; see run_command.
_NOT_IN_COMMAND = ("seed", "work_dir", *EXECUTION_FIELDS)


def run_command(run: Run) -> str:
    """The `sacae train` command that reproduces the run into the folder layout of `sacae sweep` and this report:
    runs/<task>/<configuration>/seed_<i>. Execution flags (device, threads, overlap, replay placement) are left out:
    they do not change what the run computes, a resume may change them, and the Runs table says how each session
    ran."""
    words = train_command(run.config, leave_out=_NOT_IN_COMMAND)
    if "seed" in run.config:
        words += ["--seed", str(run.config["seed"])]
    return shlex.join([*words, "--work_dir", f"runs/{run.task}/{run.configuration}/{run.seed}"])


def _commands_block(configurations: dict[str, list[Run]]) -> tuple[str, list[str]]:
    """One line per configuration whose seeds differ only in the seed (else one per seed)."""
    items = []
    for name, seeds in configurations.items():
        shared = {shlex.join(train_command(r.config, leave_out=_NOT_IN_COMMAND)) for r in seeds}
        numbers = [str(r.config.get("seed", "?")) for r in seeds]
        if len(shared) == 1 and len(seeds) > 1:
            items.append(f"{name}, seeds {', '.join(numbers)}: `{shared.pop()} --seed S "
                         f"--work_dir runs/{seeds[0].task}/{name}/seed_S` for S in {' '.join(numbers)}")  # fmt: skip
        else:
            items += [f"{name} {r.seed}: `{run_command(r)}`" for r in seeds]
    return ("ul", items)


def _resumes_text(run: Run) -> str:
    if run.resumes is not None:
        return str(run.resumes)
    return "yes" if run.resumed else "no sign"


def _method_items(summary: Summary) -> list[str]:
    return [
        "Return: the mean return of one evaluation's episodes, deterministic policy (`episode_reward` in eval.log).",
        "A seed's value at N env steps: its evaluation at exactly N, else its last evaluation at most one evaluation "
        "interval (eval_freq x action_repeat) before N, else missing; each fallback and missing seed is listed under "
        "the task's Notes.",
        "mean and std (sample, ddof 1) are over the seeds with a value; IQM is the interquartile mean over seeds, "
        f"with a 95% stratified bootstrap CI from `rliable` ({summary.bootstrap_reps} resamples).",
        "Curves: the mean over seeds with a 95% bootstrap band over seeds; thin lines are single seeds. Published "
        "numbers are hollow markers with error bars (circles CURL, squares DrQ).",
        "Hours: status.json's elapsed time, or where a run has none, the logged time of its training episodes and "
        "evaluations. Resumes: status.json's count; without one, yes when a log's env steps go back.",
    ]


def _table_row(line: str) -> list[str]:
    """The cells of one Markdown table row; a backslash-escaped bar stays inside its cell."""
    cells = re.split(r"(?<!\\)\|", line.strip().removeprefix("|").removesuffix("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def _notes_table(lines: list[str]) -> tuple[Any, ...]:
    """A Markdown table (header row, a `|---|` rule, then rows) as a page block; rows are padded or cut to the
    header's width. Without the rule, the lines stay a paragraph."""
    rows = [_table_row(line) for line in lines]
    if len(rows) < 2 or not all(re.fullmatch(r":?-+:?", cell) for cell in rows[1]):
        return ("p", " ".join(lines))
    width = len(rows[0])
    return ("table", rows[0], [(row + [""] * width)[:width] for row in rows[2:]])


def notes_blocks(text: str) -> list[tuple[Any, ...]]:
    """A notes file as page blocks: "## "/"### " headings, paragraphs (consecutive lines), "- " list items (with
    indented continuation lines) and tables (consecutive lines that start with "|", the second a `|---|` rule)."""
    blocks: list[tuple[Any, ...]] = []
    paragraph: list[str] = []
    items: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append(("p", " ".join(paragraph)))
            paragraph.clear()
        if items:
            blocks.append(("ul", list(items)))
            items.clear()
        if table:
            blocks.append(_notes_table(table))
            table.clear()

    for line in text.splitlines():
        stripped = line.strip()
        heading = re.fullmatch(r"(#{1,6})\s+(.*)", stripped)
        if not stripped or heading:
            flush()
            if heading:
                blocks.append((f"h{min(max(len(heading[1]), 2), 3)}", heading[2]))
        elif stripped.startswith("|") and (table or not (paragraph or items)):
            table.append(stripped)
        elif stripped.startswith(("- ", "* ")):
            if paragraph or table:
                flush()
            items.append(stripped[2:].strip())
        elif items and line[:1].isspace():
            items[-1] += " " + stripped
        else:
            if items or table:
                flush()
            paragraph.append(stripped)
    flush()
    return blocks


def _blocks(
    summary: Summary,
    images: dict[str, tuple[str, str]],
    notes: Sequence[tuple[Any, ...]] = (),
    title: str = DEFAULT_TITLE,
) -> list[tuple[Any, ...]]:
    """The page: the overview table and the return plots first (what a reader comes for), then how the numbers are
    made, the notes, and per task the tables with IQM and CIs, the data's own notes, the runs, their commands and the
    training plot."""
    grouped = _by_task(summary.runs)
    overview = _overview_block(summary)
    blocks: list[tuple[Any, ...]] = [
        ("h1", title),
        overview,
        ("p", _overview_caption(summary, overview[1])),
        ("figures", [images[f"{task}_returns"] for task in summary.tasks]),
        ("h2", "How the numbers are made"),
        (
            "p",
            f"Generated by `{summary.generated_by}` on "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {count(len(summary.runs), 'run')}, "
            f"{count(len(summary.tasks), 'task')}.",
        ),  # fmt: skip
        ("ul", _method_items(summary)),
        *notes,
    ]
    for task in summary.tasks:
        blocks.append(("h2", task))
        for env_steps in summary.at:
            blocks += [("h3", f"At {steps_label(env_steps)} env steps"), _table_block(summary, task, env_steps)]
        if summary.notes.get(task):
            blocks += [("h3", "Notes"), ("ul", summary.notes[task])]
        runs = [r for seeds in grouped[task].values() for r in seeds]
        blocks += [("h3", "Runs"), _runs_block(runs), ("h3", "Commands"), _commands_block(grouped[task]),
                   ("h3", "Training"), ("img", *images[f"{task}_losses"])]  # fmt: skip
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows])


def _overview_header(column: OverviewColumn) -> str:
    return f"{steps_label(column.env_steps)} {column.group_title}: {column.label}"


def render_markdown(blocks: Sequence[tuple[Any, ...]]) -> str:
    """The blocks as a Markdown page."""
    out: list[str] = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
        elif kind == "figures":
            out += [f"![{alt}]({src})" for src, alt in rest[0]]
        elif kind == "table":
            out.append(_md_table(*rest))
        elif kind == "overview":
            columns, rows = rest
            out.append(_md_table(["task", *map(_overview_header, columns)], rows))
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)


def _html_img(image_dir: Path, src: str, alt: str) -> str:
    data = base64.b64encode((image_dir / src).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _html_overview(columns: Sequence[OverviewColumn], rows: Sequence[Sequence[str]]) -> str:
    """The overview with grouped headers (env steps, then method, then our configuration or the published source),
    a rule before each method group, published numbers in grey."""
    keys = [(c.env_steps, c.group) for c in columns]
    starts = {i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]}

    def spans(key: Any, label: Any) -> str:
        groups = [list(g) for _, g in itertools.groupby(columns, key=key)]
        return "".join(f'<th colspan="{len(g)}" class="g">{_inline_html(label(g[0]))}</th>' for g in groups)

    def cls(i: int, c: OverviewColumn) -> str:
        names = [n for n, on in (("g", i in starts), ("pub", c.configuration is None)) if on]
        return f' class="{" ".join(names)}"' if names else ""

    head = (
        '<tr><th rowspan="3">task</th>'
        + spans(lambda c: c.env_steps, lambda c: f"at {steps_label(c.env_steps)} env steps") + "</tr><tr>"
        + spans(lambda c: (c.env_steps, c.group), lambda c: c.group_title) + "</tr><tr>"
        + "".join(f"<th{cls(i, c)}>{_inline_html(c.label)}</th>" for i, c in enumerate(columns)) + "</tr>"
    )  # fmt: skip
    body = "".join(
        f"<tr><th>{_html_cell(row[0])}</th>"
        + "".join(
            f"<td{cls(i, c)}>{_html_cell(row[i + 1], c.configuration is None)}</td>" for i, c in enumerate(columns)
        )
        + "</tr>"
        for row in rows
    )
    # Smaller type only where the columns would not fit a 1280-pixel screen otherwise (11 columns of two sweeps).
    size = "" if len(columns) <= 8 else ' style="font-size:.85em"'
    table = f'<table class="overview"{size}><thead>{head}</thead><tbody>{body}</tbody></table>'
    return f'<div class="wide">{table}</div>'


def _html_cell(text: str, published: bool = False) -> str:
    """An overview cell with each bracketed tail in small type: the seeds (and "no published numbers") on a line of
    their own, so the columns stay narrow enough for the table to fit a screen; a published number's source beside
    it, one source a line."""
    lines = []
    text = text.replace(" ± ", "\u2009±\u2009")  # thin spaces, as the papers' tables set it
    for part in text.split("; ") if published else [text]:
        found = re.fullmatch(r"(.*?) \(([^()]*)\)", part)
        if found:
            tail = f'<span class="n">{_inline_html(found[2])}</span>'
            lines.append(_inline_html(found[1]) + (" " if published else "<br>") + tail)
        else:
            lines.append(_inline_html(part))
    return "<br>".join(lines)


# A cell that reads as a number (with a unit, a CI or "2 of 3"): right-aligned so that its digits line up.
NUMBER_CELL = re.compile(r"[-+]?\d[\d.]*(, \d[\d.]*)*( ?(k|M|s|h|%)| of \d+)?( \[[^\]]*\])?")


def _html_td(text: str) -> str:
    align = ' class="num"' if NUMBER_CELL.fullmatch(text) else ""
    return f"<td{align}>{_inline_html(text)}</td>"


def render_html(blocks: Sequence[tuple[Any, ...]], image_dir: Path) -> str:
    """The blocks as one self-contained HTML page (plots embedded as base64 PNG)."""
    body: list[str] = []
    title = next((rest[0] for kind, *rest in blocks if kind == "h1"), DEFAULT_TITLE)
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{_inline_html(rest[0])}</{kind}>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "img":
            body.append(_html_img(image_dir, *rest))
        elif kind == "figures":
            body.append('<div class="figures">' + "".join(_html_img(image_dir, *f) for f in rest[0]) + "</div>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(_html_td(c) for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "overview":
            body.append(_html_overview(*rest))
    # Prose keeps a readable line length; tables and plots may use the page's width.
    style = ("body{font-family:system-ui,sans-serif;line-height:1.45;max-width:1240px;margin:1.5em auto;padding:0 1em}"
             "p,ul{max-width:58em}h1{margin:.2em 0 .5em}"
             "table{border-collapse:collapse;margin:1em 0;font-variant-numeric:tabular-nums}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}td.num{text-align:right}"
             ".wide{overflow-x:auto}.overview td,.overview th{padding:.2em .35em;"
             "white-space:nowrap;text-align:center}.overview tbody th{text-align:left}.overview .n{font-size:.82em;"
             "font-weight:normal;color:#666}"
             ".overview thead th{background:#f5f5f5}.overview .g{border-left:2px solid #888}.overview .pub{color:#666}"
             ".figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:.5em}"
             "img{max-width:100%}code{background:#f3f3f3}")  # fmt: skip
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")  # fmt: skip


def report_command(
    path: str | Path,
    out_dir: str | Path | None,
    at: Sequence[int],
    bootstrap_reps: int,
    notes: str | Path | None = None,
    page: str | Path | None = None,
    title: str = DEFAULT_TITLE,
) -> str:
    """The `sacae report` command line that writes this report."""
    words = ["sacae", "report", str(path)]
    if out_dir is not None:
        words += ["--out", str(out_dir)]
    if tuple(at) != DEFAULT_AT:
        words += ["--at", *map(str, at)]
    if bootstrap_reps != DEFAULT_REPS:
        words += ["--bootstrap_reps", str(bootstrap_reps)]
    for flag, value in (("--notes", notes), ("--page", page), ("--title", None if title == DEFAULT_TITLE else title)):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def write_report(
    path: str | Path,
    out_dir: str | Path | None = None,
    at: Sequence[int] = DEFAULT_AT,
    bootstrap_reps: int = DEFAULT_REPS,
    notes: str | Path | None = None,
    page: str | Path | None = None,
    title: str = DEFAULT_TITLE,
) -> Path:
    """Load the runs under `path`, summarise them and write report.md, report.html, summary.json and per task
    <task>_returns.png and <task>_losses.png to `out_dir` (default: PATH/report); with `page`, the Markdown goes
    there instead, its plot links relative to it. `notes`: a Markdown file placed before the per-task sections;
    `title`: the page's heading. Returns the output folder."""
    runs, damage = load_runs_and_damage(path)
    note_blocks = notes_blocks(_read_notes(Path(notes))) if notes is not None else []
    out = Path(out_dir) if out_dir is not None else Path(path) / "report"
    page_path = Path(page) if page is not None else out / "report.md"
    for folder in (out, page_path.parent):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SacaeError(f"The output folder {folder} cannot be created ({e.strerror}).") from None
    summary = dataclasses.replace(
        summarize(runs, at, bootstrap_reps),
        generated_by=report_command(path, out_dir, at, bootstrap_reps, notes, page, title),
    )
    images: dict[str, tuple[str, str]] = {}
    for task in summary.tasks:
        for kind, plot in (("returns", plot_returns), ("losses", plot_losses)):
            fig = plot(runs, task, bootstrap_reps)
            fig.savefig(out / f"{task}_{kind}.png", dpi=110)
            images[f"{task}_{kind}"] = (f"{task}_{kind}.png", f"{task} {kind}")
    blocks = _blocks(summary, images, [*note_blocks, *damage_blocks(damage, path)], title)
    link = Path(os.path.relpath(out, page_path.parent))
    page_blocks = [_relinked(b, link) for b in blocks]
    write_text_atomic(page_path, render_markdown(page_blocks))
    write_text_atomic(out / "report.html", render_html(blocks, out))
    write_text_atomic(out / "summary.json", json.dumps(summary.to_dict(), indent=2) + "\n")
    return out


def _relinked(block: tuple[Any, ...], link: Path) -> tuple[Any, ...]:
    """A block whose plot paths (relative to the output folder) are made relative to the page's folder."""
    if block[0] == "img":
        return ("img", (link / block[1]).as_posix(), block[2])
    if block[0] == "figures":
        return ("figures", [((link / src).as_posix(), alt) for src, alt in block[1]])
    return block


def _read_notes(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SacaeError(f"The notes file {path} cannot be read ({getattr(e, 'strerror', None) or e}).") from None


def report(args: ReportArgs) -> None:
    """`sacae report`: write the report and say where."""
    out = write_report(args.path, args.out, args.at, args.bootstrap_reps, args.notes, args.page, args.title)
    page = args.page if args.page is not None else out / "report.md"
    print(f"Wrote {page}, {out / 'report.html'}, {out / 'summary.json'} and the plots.")
