"""Where the runs of a sweep stand: one row per run folder with its state, progress, last evaluation and ETA.

The state comes from the trainer's status.json and, while a job may still run, from Slurm (squeue, then sacct for
jobs that ended without a word) or from the local process in the run's `id`. A run with a file that cannot be read
(status.json, config.json, id, train.log, eval.log) is "damaged", its detail naming the file and what is wrong,
unless its job or process still runs; the rest of its row shows what could be read.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import tyro

from sacae.config import TrainConfig
from sacae.errors import SacaeError
from sacae.logger import count
from sacae.rundir import check_config, check_status, read_log
from sacae.sweep import (
    SCRIPT_PREFIX,
    SlurmJob,
    check_id,
    local_process_alive,
    read_id,
    sacct_state,
    slurm_jobs,
    trainer_pid,
)

# Files whose presence makes a folder a run folder (its subfolders are then not searched).
RUN_MARKERS = ("run.sh", "status.json", "config.json", "train.log", "id")
REQUEUED_SLURM_STATES = frozenset({"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
SUSPENDED_SLURM_STATES = frozenset({"SUSPENDED", "STOPPED"})
# Training episodes over which steps per second are averaged.
RATE_EPISODES = 10


@dataclass(frozen=True)
class StatusArgs:
    """Show the state of every run under the given folders: queued, running, requeued, stopped, finished or failed,
    with environment steps done, last evaluation return, steps per second and time left."""

    paths: Annotated[tuple[str, ...], tyro.conf.Positional] = ("runs",)
    """Run folders, or folders holding them (e.g. runs, runs/walker_walk, runs/walker_walk/sac_states/seed_1)."""
    json: bool = False
    """One JSON object per run instead of the table."""


@dataclass(frozen=True)
class RunStatus:
    """One run's row."""

    path: str
    task: str
    configuration: str
    seed: str
    state: str  # new, queued, running, requeued, suspended, stopped, finished, failed, damaged
    env_steps: int | None
    total_env_steps: int | None
    eval_return: float | None
    eval_env_steps: int | None
    steps_per_second: float | None
    eta_seconds: float | None
    job: str | None
    detail: str


# ---------------------------------------------------------------------------------------------------------------


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run folder at or under `paths`, sorted."""
    runs = set()
    for root in paths:
        if not root.exists():
            raise SacaeError(f"There is no folder {root}.")
        for folder, subfolders, files in os.walk(root):
            if any(marker in files for marker in RUN_MARKERS):
                runs.add(Path(folder).resolve())
                subfolders.clear()
            else:
                subfolders.sort()
    return sorted(runs)


def run_labels(run_dir: Path) -> tuple[str, str, str]:
    """(task, configuration, seed) from the layout <task>/<configuration>/seed_<i>, else from config.json (the task
    is the run's env name: cartpole_swingup, or gymnasium-Pendulum-v1)."""
    match = re.fullmatch(r"seed_(\d+)", run_dir.name)
    if match:
        return run_dir.parent.parent.name, run_dir.parent.name, match.group(1)
    cfg = check_config(run_dir)[0]
    if cfg is None:  # damaged, or without its task
        return run_dir.name, "?", "?"
    # The trainer's own name for the environment: a Gymnasium run's config also holds the default domain and task.
    task = TrainConfig(domain_name=cfg["domain_name"], task_name=cfg["task_name"], env=cfg.get("env")).env_name
    return task, str(cfg.get("configuration", "?")), str(cfg.get("seed", "?"))


def last_error_line(run_dir: Path) -> str:
    """The last line the run wrote to stderr, leaving out the Slurm script's own lines and progress bars."""
    path = run_dir / "stderr"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    for line in reversed(re.split(r"[\r\n]+", text)):
        line = line.strip()
        if line and not line.startswith(SCRIPT_PREFIX):
            return line
    return ""


def training_rate(train_rows: list[dict[str, Any]]) -> tuple[float | None, bool]:
    """Environment steps per second of training over the last episodes (evaluations excluded), and whether they
    are episodes with updates. Once updates have begun only those count: the seed phase's random steps are many
    times faster and would make the time left look short."""
    episodes: list[tuple[int, float, bool]] = []  # env steps, seconds, updated
    previous = 0
    for row in train_rows:
        env_steps, duration = row.get("env_steps"), row.get("duration")
        if isinstance(env_steps, int) and isinstance(duration, (int, float)) and env_steps > previous:
            episodes.append((env_steps - previous, float(duration), row.get("critic_loss") is not None))
        previous = env_steps if isinstance(env_steps, int) else previous
    updated = [e for e in episodes if e[2]]
    recent = (updated or episodes)[-RATE_EPISODES:]
    seconds = sum(e[1] for e in recent)
    return (sum(e[0] for e in recent) / seconds if seconds > 0 else None), bool(updated)


def time_left(
    done: int, total: int, rate: float | None, eval_rows: list[dict[str, Any]], cfg: dict[str, Any]
) -> float | None:
    """Seconds of training left at `rate`, plus the evaluations still due at their measured duration."""
    if rate is None or rate <= 0 or total <= done:
        return None if total > done else 0.0
    seconds = (total - done) / rate
    durations = [r["duration"] for r in eval_rows[-3:] if isinstance(r.get("duration"), (int, float))]
    eval_every = cfg.get("eval_freq", 0) * (cfg.get("action_repeat") or 1)
    if durations and eval_every > 0:
        seconds += math.ceil((total - done) / eval_every) * sum(durations) / len(durations)
    return seconds


def last_update(status: dict[str, Any]) -> str:
    t = status.get("time")
    return f"; last update {human_seconds(time.time() - t)} ago" if isinstance(t, (int, float)) else ""


def slurm_final_state(job_id: str, job: SlurmJob | None) -> str | None:
    if job is not None:
        return job.state
    return sacct_state(job_id)


def run_status(run_dir: Path, jobs: dict[str, SlurmJob] | None) -> RunStatus:
    """One run's state and progress; `jobs` is squeue's answer (None where Slurm cannot be asked)."""
    status, status_problem = check_status(run_dir)
    status = status or {}
    trainer_state = status.get("state")
    job_id, id_problem = check_id(run_dir)
    cfg, config_problem = check_config(run_dir, required=())  # the labels come from the folders where it lacks them
    cfg = cfg or {}
    rows_train, train_problem = read_log(run_dir, "train.log")
    rows_eval, eval_problem = read_log(run_dir, "eval.log")
    if (rows_train or rows_eval) and not (run_dir / "status.json").exists():
        status_problem = "is missing"  # the trainer writes it before its first log row
    damage = [
        f"{name} {problem}"
        for name, problem in (
            ("status.json", status_problem),
            ("config.json", config_problem),
            ("id file", id_problem),
            ("train.log", train_problem),
            ("eval.log", eval_problem),
        )
        if problem is not None
    ]
    slurm = (run_dir / "run.slrm").exists()
    job = jobs.get(job_id) if slurm and jobs is not None and job_id else None
    detail = ""
    alive = False  # a job or process still runs it: its state says more than any damaged file

    if trainer_state == "finished":
        state = "finished"
    elif job is not None and job.live:
        alive = True
        if job.state == "PENDING":
            state = "requeued" if job.restarts > 0 or trainer_state else "queued"
            detail = f"waiting ({job.reason})" if job.reason and job.reason != "None" else ""
            if job.restarts:
                detail = f"restarts {job.restarts}" + (f", {detail}" if detail else "")
        elif job.state in REQUEUED_SLURM_STATES:
            state, detail = "requeued", f"restarts {job.restarts}"
        elif job.state in SUSPENDED_SLURM_STATES:
            state = "suspended"
        else:
            state = "running"
            detail = "starting" if not trainer_state else (f"restarts {job.restarts}" if job.restarts else "")
    elif not slurm and local_process_alive(local_pid := job_id or trainer_pid(status), run_dir):
        job_id, alive = local_pid, True
        state = "running"
        detail = "starting" if not trainer_state else ""
    elif slurm and jobs is None and job_id:
        # squeue is not available here: the trainer's last word is all there is.
        state = trainer_state or "queued"
        detail = "Slurm cannot be asked from here" + last_update(status)
    elif not slurm and trainer_state and status.get("host") not in (None, socket.gethostname()):
        state = trainer_state
        detail = f"on {status['host']}, which this machine cannot look into" + last_update(status)
    elif trainer_state in ("failed", "stopped"):
        state = trainer_state
        detail = status.get("message") or last_error_line(run_dir)
    elif job_id is None and not trainer_state:
        state = "new"
        detail = "not started; run the sweep"
    else:
        # The job or process is gone and the trainer did not say why: it was killed, or failed before it started.
        state = "failed"
        why = slurm_final_state(job_id, job) if slurm and job_id else None
        reason = last_error_line(run_dir)
        if trainer_state == "running":
            reason = "ended without a word" + (f": {reason}" if reason else "")
        detail = ", ".join(filter(None, [f"Slurm: {why}" if why else "", reason or "no output"]))
    if damage and alive:
        detail = "; ".join([*damage, detail] if detail else damage)
    elif damage:
        state, detail = "damaged", "; ".join(damage)

    env_steps = status.get("env_steps")
    if env_steps is None and rows_train:
        env_steps = rows_train[-1].get("env_steps")
    total = status.get("total_env_steps")
    if total is None and cfg.get("num_train_steps") is not None:
        total = cfg["num_train_steps"] * (cfg.get("action_repeat") or 1)
    scored = [r for r in rows_eval if r.get("episode_reward") is not None]
    rate, updating = training_rate(rows_train)
    eta = None
    seed_phase_only = not updating and (cfg.get("init_steps") or 0) > 0  # the rate says nothing of what follows
    if state not in ("finished", "failed", "damaged") and total is not None and not seed_phase_only:
        eta = time_left(env_steps or 0, total, rate, rows_eval, cfg)
    task, configuration, seed = run_labels(run_dir)
    return RunStatus(
        path=str(run_dir),
        task=task,
        configuration=configuration,
        seed=seed,
        state=state,
        env_steps=env_steps,
        total_env_steps=total,
        eval_return=scored[-1]["episode_reward"] if scored else None,
        eval_env_steps=scored[-1].get("env_steps") if scored else None,
        steps_per_second=rate,
        eta_seconds=eta,
        job=job_id,
        detail=detail,
    )


def collect_status(paths: list[str | Path]) -> list[RunStatus]:
    """The status of every run at or under `paths`, sorted by task, configuration and seed."""
    runs = find_runs([Path(p) for p in paths])
    slurm_ids = [read_id(d) for d in runs if (d / "run.slrm").exists()]
    jobs = slurm_jobs(filter(None, slurm_ids)) if any(slurm_ids) else {}
    rows = [run_status(d, jobs) for d in runs]

    def order(row: RunStatus) -> tuple:
        return (row.task, row.configuration, int(row.seed) if row.seed.isdigit() else math.inf, row.path)

    return sorted(rows, key=order)


# ---------------------------------------------------------------------------------------------------------------


def human_steps(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M".replace(".00M", "M")
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    if n >= 1000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_table(rows: list[RunStatus], detail_width: int = 100) -> str:
    """The runs as an aligned text table, then one line counting the runs in each state."""
    header = ("task", "configuration", "seed", "state", "env steps", "eval return", "steps/s", "ETA", "job", "detail")
    body = []
    for r in rows:
        detail = r.detail if len(r.detail) <= detail_width else r.detail[: detail_width - 1] + "…"
        body.append(
            (
                r.task,
                r.configuration,
                r.seed,
                r.state,
                f"{human_steps(r.env_steps)}/{human_steps(r.total_env_steps)}",
                "-" if r.eval_return is None else f"{r.eval_return:.1f}",
                "-" if r.steps_per_second is None else f"{r.steps_per_second:.0f}",
                human_seconds(r.eta_seconds),
                r.job or "-",
                detail,
            )
        )
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]
    ]
    counts = Counter(r.state for r in rows)
    order = ("running", "queued", "requeued", "suspended", "stopped", "new", "failed", "damaged", "finished")
    summary = ", ".join(f"{counts[s]} {s}" for s in order if counts[s])
    lines.append(f"{count(len(rows), 'run')}: {summary}" if rows else "no runs")
    return "\n".join(lines)


def show_status(args: StatusArgs) -> None:
    rows = collect_status(list(args.paths))
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return
    if not rows:
        raise SacaeError(f"There is no run under {' '.join(args.paths)}.")
    print(format_table(rows))
