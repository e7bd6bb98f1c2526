"""Launching sweeps: one training run per task and seed, in RUNS_DIR/<task>/<configuration>/seed_<i>/, on Slurm or
on this machine. A task is a dm_control DOMAIN_TASK or a Gymnasium environment, gymnasium:<id>, whose folder is the
run's env name (gymnasium-<id>).

Each run folder gets its exact training command (run.sh), its Slurm script (run.slrm, Slurm runs only), the job
id (id: the Slurm job id, or the process id of a local run) and the job's stdout and stderr, beside what training
writes. Running the same sweep again skips finished runs, leaves queued or running ones alone and starts the rest
again with the same command, which resumes them from their checkpoints.

With --seeds_per_process N each job trains N seeds of a task with `sacae train-seeds`; every seed folder of the
group holds the group's run.sh, run.slrm and id, and the group's stdout and stderr are those of its first seed
(links to them in the others), so that status and the sweep find the job from any of its seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from sacae.config import MAX_SEED, TrainConfig, resolve
from sacae.errors import SacaeError
from sacae.rundir import check_config, check_status, read_status, shown

# Training flags a sweep sets itself for each run (or that would defeat resuming), in their underscore spelling.
SWEEP_FLAGS = ("task", "env", "domain_name", "task_name", "seed", "work_dir", "resume", "no_resume", "force")

# What an `id` file holds: a Slurm job id (an array task's too, 123_4) or the process id of a local run.
JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")

# Prefix of the lines the Slurm script itself writes to stderr (status skips them when it looks for an error).
SCRIPT_PREFIX = "sacae sweep:"

# Slurm job states in which a job may still run (again): a sweep never starts a second copy of such a run.
LIVE_SLURM_STATES = frozenset(
    {
        "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
        "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
    }
)  # fmt: skip

# Memory a run needs beside its replay buffer (networks, PyTorch, MuJoCo, the environments), and the replay bytes
# per transition of a state run (an upper bound over the dm_control tasks and Gymnasium's MuJoCo environments,
# Humanoid's 348 numbers included, next observation included).
RUN_BASE_BYTES = 2 * 1024**3
STATE_TRANSITION_BYTES = 2048


@dataclass(frozen=True)
class SweepArgs:
    """Start one training run per task and seed, on Slurm (sbatch) or on this machine.

    Training flags go after `--`, e.g. `sacae sweep --tasks walker_walk gymnasium:Pendulum-v1 --num_seeds 10 --
    --encoder_type identity --decoder_type identity`. Each run goes to RUNS_DIR/<task>/<configuration>/seed_<i>/
    (<task> is gymnasium-<id> for gymnasium:<id>), where the configuration (sac_ae, sac_pixel, sac_states) follows
    from the training flags. Running the same sweep again skips finished runs, leaves queued or running ones alone
    and resumes the others.
    """

    tasks: tuple[str, ...]
    """dm_control tasks as DOMAIN_TASK (e.g. walker_walk ball_in_cup_catch) and Gymnasium environments as
    gymnasium:<id> (e.g. gymnasium:Pendulum-v1, trained with `sacae train --env gymnasium:<id>`)."""
    train_args: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="-- TRAIN_FLAGS")] = ()
    """Flags of `sacae train` for every run, after `--` (all but --task, --env, --seed and --work_dir, which the
    sweep sets); --env_kwargs goes to every run, so its tasks must all be Gymnasium environments."""
    num_seeds: int = 10
    """Seeds 1 to NUM_SEEDS."""
    seeds: tuple[int, ...] | None = None
    """These seeds instead of 1 to NUM_SEEDS."""
    runs_dir: str = "./runs"
    """Folder that holds <task>/<configuration>/seed_<i>/ (a sweep of the same environment with other --env_kwargs
    needs a folder of its own)."""
    executor: Literal["auto", "slurm", "local"] = "auto"
    """slurm: one sbatch job per run; local: the runs as processes on this machine, a few at a time, while the
    sweep waits in the foreground; auto: slurm when sbatch is on PATH, else local."""
    dry_run: bool = False
    """Print what would start, and write and start nothing."""

    # --- Slurm ---
    partition: str | None = None
    """Slurm partition (default: the cluster's default partition)."""
    time: str | None = None
    """Time limit of each job, as sbatch --time takes it (e.g. 72:00:00; default: the partition's limit)."""
    cpus_per_task: int | None = None
    """CPU cores per job (default: the cluster's default); PyTorch uses that many threads."""
    gpus: int | None = None
    """GPUs per job, as --gres=gpu:N (default: 1 for sac_ae and sac_pixel, 0 for sac_states)."""
    mem: str = "auto"
    """Memory per job, as sbatch --mem takes it (e.g. 32G); auto: the run's replay buffer plus 3 GB; none: the
    cluster's default."""
    account: str | None = None
    """Slurm account to charge."""
    sbatch_options: tuple[str, ...] = ()
    """More sbatch options, each written as one #SBATCH line, with or without the leading dashes
    (e.g. qos=high constraint=volta32gb)."""
    signal_seconds: int = 300
    """Slurm sends USR1 this many seconds before the time limit: the run writes a checkpoint and stops, and the job
    requeues itself and resumes."""

    # --- local ---
    max_parallel: int | None = None
    """Local processes at once (default: as many as this machine's cores and memory allow, at least 1)."""

    seeds_per_process: int = 1
    """Seeds trained together by one job or process (`sacae train-seeds`, meant for one GPU): each task's seeds are
    split into groups of this many consecutive seeds; 1 trains each seed with `sacae train`."""


@dataclass(frozen=True)
class RunPlan:
    """One run of a sweep: where it lives and the exact command that trains (and resumes) it."""

    task: str
    """The run's env name, its folder under RUNS_DIR: walker_walk, or gymnasium-Pendulum-v1."""
    configuration: str
    seed: int
    run_dir: Path
    command: tuple[str, ...]
    """What trains the run: its own `sacae train`, or its group's `sacae train-seeds`."""
    cfg: TrainConfig
    group: tuple[int, ...] = ()
    """The seeds its `sacae train-seeds` process trains, this one among them; () for a run of its own."""

    @property
    def name(self) -> str:
        return f"{self.task}/{self.configuration}/seed_{self.seed}"

    @property
    def lead_dir(self) -> Path:
        """The folder of the first seed of its process, which holds the process's stdout and stderr."""
        return self.run_dir.parent / f"seed_{self.group[0]}" if self.group else self.run_dir

    @property
    def process_name(self) -> str:
        """The name of its job or process: the run's, or its group's (walker_walk/sac_ae/seeds_1_2)."""
        if not self.group:
            return self.name
        return f"{self.task}/{self.configuration}/seeds_{'_'.join(map(str, self.group))}"


@dataclass(frozen=True)
class SlurmJob:
    """What squeue says about one job."""

    job_id: str
    state: str
    reason: str
    restarts: int

    @property
    def live(self) -> bool:
        return self.state in LIVE_SLURM_STATES


# ---------------------------------------------------------------------------------------------------------------
# Plans


def flag_name(token: str) -> str | None:
    """`--work-dir=x` -> work_dir; None for a value."""
    if not token.startswith("--") or token == "--":
        return None
    return token[2:].split("=", 1)[0].replace("-", "_")


def parse_train_args(train_args: Sequence[str]) -> TrainConfig:
    """The training flags of a sweep as a TrainConfig, with one sentence for any flag `sacae train` would refuse."""
    taken = sorted({name for name in map(flag_name, train_args) if name in SWEEP_FLAGS})
    if taken:
        raise SacaeError(
            f"The sweep sets {', '.join('--' + n for n in taken)} itself (each run resumes in its own folder); "
            "remove it from the training flags (use --tasks, --seeds or --runs_dir)."
        )
    try:
        cfg, unknown = tyro.cli(
            TrainConfig, args=list(train_args), use_underscores=True, console_outputs=False, return_unknown_args=True
        )
    except SystemExit:
        raise SacaeError(
            f"The training flags {shlex.join(train_args)} are not valid for `sacae train`; "
            "`sacae train --help` lists them."
        ) from None
    if unknown:
        raise SacaeError(f"`sacae train` has no flag {unknown[0]}; `sacae train --help` lists them.")
    return cfg


def sacae_command() -> list[str]:
    """How this installation's `sacae` is started: the script beside this Python, else `python -m sacae.cli`."""
    script = Path(sys.executable).parent / "sacae"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "sacae.cli"]


def task_config(base: TrainConfig, task: str) -> tuple[TrainConfig, tuple[str, str]]:
    """The resolved configuration of the sweep's runs of `task` (DOMAIN_TASK or gymnasium:<id>), and the training
    flag that names it (--task or --env)."""
    from sacae.gym_env import PREFIX  # imported lazily: it imports dm_control (for the rendering backend)

    if task.startswith(PREFIX):
        return resolve(dataclasses.replace(base, env=task)), ("--env", task)
    if base.env_kwargs is not None:
        raise SacaeError(
            f"--env_kwargs goes to every run of the sweep, and {task} is a dm_control task; sweep the Gymnasium "
            "environments that take it on their own."
        )
    return resolve(dataclasses.replace(base, task=task)), ("--task", task)


def plan_sweep(args: SweepArgs, cwd: Path | None = None) -> list[RunPlan]:
    """Every run of the sweep, in task then seed order; SacaeError for a bad task, flag or seed."""
    if not args.tasks:
        raise SacaeError("Give at least one task with --tasks (e.g. --tasks walker_walk).")
    if args.seeds is None and args.num_seeds > 10_000:
        raise SacaeError(f"--num_seeds must be at most 10000 (got {args.num_seeds}).")
    seeds = tuple(args.seeds) if args.seeds is not None else tuple(range(1, args.num_seeds + 1))
    if not seeds:
        raise SacaeError(f"--num_seeds must be at least 1 (got {args.num_seeds}).")
    if len(set(seeds)) != len(seeds):
        raise SacaeError(f"--seeds lists a seed twice ({' '.join(map(str, seeds))}).")
    outside = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if outside:
        raise SacaeError(f"Seeds lie in [0, {MAX_SEED}] (numpy's RandomState takes no others); got {outside[0]}.")
    per = args.seeds_per_process
    if not 1 <= per <= len(seeds):
        raise SacaeError(
            f"--seeds_per_process must lie in [1, {len(seeds)}], the number of seeds of each task (got {per})."
        )
    base = parse_train_args(args.train_args)
    if per > 1:
        from sacae.multiseed import check_multiseed_config  # imported lazily: it imports torch

        check_multiseed_config(base, seeds[:per])
    runs_dir = ((cwd or Path.cwd()) / args.runs_dir).resolve()
    exe = sacae_command()
    plans = []
    folders: dict[str, str] = {}  # env name -> the task that named it
    for task in dict.fromkeys(args.tasks):
        cfg, env_flag = task_config(base, task)
        name = cfg.env_name
        if folders.setdefault(name, task) != task:
            raise SacaeError(f"--tasks {folders[name]} and {task} would share the run folders {name}/; give one.")
        for start in range(0, len(seeds), per):
            group = seeds[start : start + per] if per > 1 else ()
            if group:
                seed_args = ("--seeds", *map(str, group), "--runs_dir", str(runs_dir))
                command = (*exe, "train-seeds", *env_flag, *args.train_args, *seed_args)
            for seed in group or seeds[start : start + 1]:
                run_dir = runs_dir / name / cfg.configuration / f"seed_{seed}"
                if not group:
                    command = (*exe, "train", *env_flag, *args.train_args, "--seed", str(seed), "--work_dir",
                               str(run_dir))  # fmt: skip
                run_cfg = dataclasses.replace(cfg, seed=seed)
                plans.append(RunPlan(name, cfg.configuration, seed, run_dir, command, run_cfg, group))
    return plans


def process_groups(plans: list[RunPlan]) -> list[list[RunPlan]]:
    """The plans in the groups that one job or process trains, in order."""
    groups: list[list[RunPlan]] = []
    for plan in plans:
        if groups and plan.group and groups[-1][0].group == plan.group and groups[-1][0].task == plan.task:
            groups[-1].append(plan)
        else:
            groups.append([plan])
    return groups


def process_memory_bytes(plan: RunPlan) -> int:
    """A generous estimate of the peak memory of the process that trains `plan`: every seed it trains counted as a
    run of its own."""
    return max(1, len(plan.group)) * run_memory_bytes(plan.cfg)


def run_memory_bytes(cfg: TrainConfig) -> int:
    """A generous estimate of a run's peak memory: its replay buffer (each pixel frame stored once) plus the rest."""
    transitions = max(1, min(cfg.replay_buffer_capacity, cfg.num_train_steps))
    per = 3 * cfg.image_size**2 + 64 if cfg.pixels else STATE_TRANSITION_BYTES
    return transitions * per + RUN_BASE_BYTES


# ---------------------------------------------------------------------------------------------------------------
# Run folders


def check_id(run_dir: Path) -> tuple[str | None, str | None]:
    """The job or process id in a run's `id` file, and what is wrong with the file in words (None when nothing is,
    or there is no file)."""
    try:
        text = (run_dir / "id").read_bytes().decode("utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    if not text:
        return None, "is empty"
    if not JOB_ID.fullmatch(text):
        return None, f"holds {shown(text)}, which is no job or process id"
    return text, None


def read_id(run_dir: Path) -> str | None:
    """The job or process id of a run (None when it has none, or its `id` file is damaged)."""
    return check_id(run_dir)[0]


def trainer_pid(status: dict[str, Any]) -> str | None:
    """The process that last wrote status.json, where it ran on this machine: the way to a run whose `id` does not
    lead to it (started by `sacae train` itself, or its `id` damaged)."""
    pid = status.get("pid")
    return str(pid) if pid is not None and status.get("host") == socket.gethostname() else None


def local_process_alive(pid_text: str | None, run_dir: Path) -> bool:
    """Whether process `pid_text` still runs this run on this machine: its command line names the run folder (or a
    path inside it), as given or relative to the process's working directory, alone or as `--flag=PATH`, or it is
    a `sacae train-seeds` whose --seeds and --runs_dir make this run folder one of its seeds'."""
    if not pid_text or not pid_text.isdigit():
        return False
    proc = Path("/proc") / pid_text
    try:
        stat = (proc / "stat").read_text()
        argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    try:
        cwd = os.readlink(proc / "cwd")
    except OSError:  # another user's process: its arguments can only be taken as they are
        cwd = None
    if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
        return False
    folder = os.path.realpath(run_dir)
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if not value or value.startswith("-"):
            continue
        path = os.path.realpath(os.path.join(cwd, value)) if cwd else value
        if path == folder or path.startswith(folder + os.sep):
            return True
    group = group_of(argv)
    if group is None:
        return False
    seeds, runs_dir = group
    match = re.fullmatch(r"seed_(\d+)", os.path.basename(folder))
    # A group's seed folders are RUNS_DIR/<task>/<configuration>/seed_<i>, which its command line does not name.
    runs = os.path.realpath(os.path.join(cwd, runs_dir)) if cwd else runs_dir
    parents = Path(folder).parents
    return match is not None and int(match.group(1)) in seeds and len(parents) > 2 and parents[2] == Path(runs)


def group_of(argv: Sequence[str]) -> tuple[set[int], str] | None:
    """The seeds and the runs folder of a `sacae train-seeds` command line (None for any other command)."""
    if "train-seeds" not in argv:
        return None
    args = list(argv[argv.index("train-seeds") + 1 :])
    seeds: set[int] = set()
    runs_dir = "runs"  # train-seeds' default
    for i, arg in enumerate(args):
        name = flag_name(arg)
        if name == "runs_dir":
            runs_dir = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else runs_dir)
        elif name == "seeds":
            values = [arg.split("=", 1)[1]] if "=" in arg else itertools.takewhile(lambda a: not a.startswith("-"),
                                                                                   args[i + 1 :])  # fmt: skip
            seeds = {int(v) for v in values if v.isdigit()}
    return seeds, runs_dir


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    from sacae.storage import write_text_atomic

    write_text_atomic(path, text)
    os.chmod(path, mode)


def run_script(plan: RunPlan, cwd: Path) -> str:
    what = (
        (f"Training runs {plan.process_name} in one process" if plan.group else f"Training run {plan.name}")
        + ", written by `sacae sweep`. Running it again resumes "
        + ("them" if plan.group else "the run")
    )
    return f"#!/usr/bin/env bash\n# {what}.\ncd {shlex.quote(str(cwd))}\nexec {shlex.join(plan.command)}\n"


def check_script(run_sh: Path) -> tuple[list[str] | None, str | None]:
    """The training command an existing run.sh starts, and what is wrong with the file in words (None when nothing
    is, or there is no file)."""
    try:
        lines = run_sh.read_bytes().decode("utf-8").splitlines()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    except UnicodeDecodeError:
        return None, "is not text"
    for line in lines:
        if line.startswith("exec "):
            try:
                return shlex.split(line[len("exec ") :]), None
            except ValueError as e:
                return None, f"has a command that cannot be split into words ({e})"
    return None, "starts no command (it has no exec line)"


def script_command(run_sh: Path) -> list[str] | None:
    """The training command an existing run.sh starts (None if there is none, or it is damaged)."""
    return check_script(run_sh)[0]


def damaged_files(run_dir: Path) -> dict[str, str]:
    """The files of a run folder that the sweep reads and cannot, each with what is wrong with it in words."""
    checks = {
        "status.json": lambda: check_status(run_dir)[1],
        "config.json": lambda: check_config(run_dir)[1],
        "id": lambda: check_id(run_dir)[1],
        "run.sh": lambda: check_script(run_dir / "run.sh")[1],
    }
    return {name: problem for name, check in checks.items() if (problem := check()) is not None}


def train_part(command: Sequence[str]) -> list[str]:
    """The arguments after `train` or `train-seeds`, what defines the run whichever sacae installation starts it,
    with the seeds left out and the run folder as the runs folder above it (`--runs_dir RUNS_DIR`): the same
    training flags whether the run trains alone or in a group."""
    command = list(command)
    for sub in ("train", "train-seeds"):
        if sub in command:
            command = command[command.index(sub) + 1 :]
            break
    flags: list[str] = []
    skip = False  # inside the values of --seeds
    for i, token in enumerate(command):
        name = flag_name(token)
        if name is not None:
            skip = name in ("seed", "seeds")
        if skip or (i > 0 and flag_name(command[i - 1]) in ("work_dir", "runs_dir")):
            continue
        if name == "work_dir" and i + 1 < len(command):
            flags += ["--runs_dir", str(Path(command[i + 1]).parent.parent.parent)]
        elif name == "runs_dir" and i + 1 < len(command):
            flags += ["--runs_dir", command[i + 1]]
        else:
            flags.append(token)
    return flags


def process_seeds(command: Sequence[str] | None) -> tuple[int, ...] | None:
    """The seeds a run.sh's process trains together: those of its `sacae train-seeds`, () for `sacae train`."""
    if command is None:
        return None
    group = group_of(command)
    if group is None:
        return ()
    command = list(command)
    start = command.index("--seeds") + 1 if "--seeds" in command else len(command)
    return tuple(int(a) for a in itertools.takewhile(lambda a: a.isdigit(), command[start:]))


# ---------------------------------------------------------------------------------------------------------------
# Slurm


def sbatch_lines(args: SweepArgs, plan: RunPlan) -> list[str]:
    """The #SBATCH options of one run's job (of its group's, for a run trained in a group)."""
    d = plan.lead_dir
    options = [
        f"--job-name={plan.process_name.replace('/', '.')}",
        f"--output={d / 'stdout'}",
        f"--error={d / 'stderr'}",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{args.signal_seconds}",
        "--nodes=1",
        "--ntasks=1",
    ]
    if args.partition:
        options.append(f"--partition={args.partition}")
    if args.time:
        options.append(f"--time={args.time}")
    if args.cpus_per_task:
        options.append(f"--cpus-per-task={args.cpus_per_task}")
    gpus = args.gpus if args.gpus is not None else (1 if plan.cfg.pixels else 0)
    if gpus:
        options.append(f"--gres=gpu:{gpus}")
    if args.mem == "auto":
        options.append(f"--mem={math.ceil((process_memory_bytes(plan) + 1024**3) / 1024**3)}G")
    elif args.mem.lower() != "none":
        options.append(f"--mem={args.mem}")
    if args.account:
        options.append(f"--account={args.account}")
    options += [o if o.startswith("-") else f"--{o}" for o in args.sbatch_options]
    return options


def slurm_script(args: SweepArgs, plan: RunPlan) -> str:
    """The batch script: run run.sh in the background so that the shell can take Slurm's USR1, pass it on (the
    trainer writes a checkpoint and exits 138) and requeue the job, whose next start runs run.sh again and resumes."""
    header = "".join(f"#SBATCH {o}\n" for o in sbatch_lines(args, plan))
    run_sh = shlex.quote(str(plan.lead_dir / "run.sh"))
    what = f"Training runs {plan.process_name} in one process" if plan.group else f"Training run {plan.name}"
    them = "them" if plan.group else "the run"
    return f"""#!/bin/bash
{header}
# {what}, written by `sacae sweep`.
# Slurm sends USR1 to this shell {args.signal_seconds} s before the time limit: the trainer is told to write a
# checkpoint and stop, then the job requeues itself; the requeued job runs run.sh again, which resumes {them}.
P="{SCRIPT_PREFIX}"
echo "$P job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) started on $(hostname) at $(date '+%F %T')" >&2
# As many compute threads as CPUs allocated (Slurm's default is one): more threads than cores slow training down
# many times over when jobs share a node.
cpus=${{SLURM_CPUS_PER_TASK:-${{SLURM_JOB_CPUS_PER_NODE:-1}}}}
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-${{cpus%%[!0-9]*}}}}

child=
requeue() {{
  echo "$P time limit near: asking the trainer to checkpoint, then requeueing job $SLURM_JOB_ID" >&2
  code=138
  if [ -n "$child" ]; then
    kill -USR1 "$child" 2>/dev/null
    wait "$child"
    code=$?
  fi
  if [ "$code" = 138 ]; then
    echo "$P checkpoint written; requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$code"
}}
trap requeue USR1

bash {run_sh} &
child=$!
wait "$child"
code=$?
echo "$P training exited with status $code at $(date '+%F %T')" >&2
exit "$code"
"""


def slurm_jobs(job_ids: Iterable[str]) -> dict[str, SlurmJob] | None:
    """The jobs among `job_ids` that Slurm's controller still knows, by id; None where squeue is missing or fails.

    A job the controller has forgotten (some time after it ended) is simply absent.
    """
    ids = sorted({j for j in job_ids if j and j.replace("_", "").isdigit()})
    if shutil.which("squeue") is None:
        return None
    jobs: dict[str, SlurmJob] = {}
    for start in range(0, len(ids), 200):
        chunk = ids[start : start + 200]
        cmd = ["squeue", "-h", "-t", "all", "-j", ",".join(chunk), "-O", "JobID:|,State:|,Reason:|,RestartCnt:|"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            if "Invalid job id" in out.stderr:
                continue  # every id of the chunk is forgotten
            return None
        for line in out.stdout.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) >= 4 and fields[0]:
                restarts = int(fields[3]) if fields[3].isdigit() else 0
                jobs[fields[0]] = SlurmJob(fields[0], fields[1], fields[2], restarts)
    return jobs


def sacct_state(job_id: str) -> str | None:
    """The final state Slurm's accounting records for a job (e.g. COMPLETED, TIMEOUT, OUT_OF_MEMORY), if any."""
    if shutil.which("sacct") is None:
        return None
    cmd = ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        fields = line.split("|")
        if len(fields) >= 2 and fields[0] == job_id:
            return fields[1].split()[0] if fields[1] else None
    return None


def submit_slurm(run_dir: Path) -> str:
    """sbatch run.slrm; returns the job id."""
    try:
        out = subprocess.run(
            ["sbatch", "--parsable", str(run_dir / "run.slrm")], cwd=run_dir, capture_output=True, text=True
        )
    except OSError as e:
        raise SacaeError(f"sbatch could not be started ({e.strerror}).") from None
    if out.returncode != 0:
        reason = " ".join(out.stderr.split()) or f"exit status {out.returncode}"
        raise SacaeError(f"sbatch refused the job of {run_dir} ({reason}).")
    return out.stdout.strip().split(";")[0]


# ---------------------------------------------------------------------------------------------------------------
# Local


def local_max_parallel(plan: RunPlan) -> int:
    """Processes at once on this machine: one core (or --num_threads) for each seed a process trains, within the
    memory available now."""
    from sacae.placement import available_memory_bytes

    cores = len(os.sched_getaffinity(0))
    by_cores = cores // ((plan.cfg.num_threads or 1) * max(1, len(plan.group)))
    available = available_memory_bytes()
    by_memory = available // process_memory_bytes(plan) if available is not None else by_cores
    return max(1, min(by_cores, by_memory))


@dataclass
class LocalRun:
    """One process of a local sweep and the runs it trains (one, or its group's)."""

    plans: list[RunPlan]
    process: subprocess.Popen
    started: float


def run_local(
    groups: list[list[RunPlan]], max_parallel: int, say: Callable[[str], None], progress_seconds: float = 60.0
) -> dict[str, int]:
    """Run each group of plans as one process of this machine (a run of its own, or a group's `sacae
    train-seeds`), `max_parallel` at a time, and wait for all; returns each run's exit status by name. Ctrl-C (or
    SIGTERM to the sweep) asks every process to checkpoint and stop, and waits."""
    threads = max(1, len(os.sched_getaffinity(0)) // max_parallel)
    waiting, running, codes = list(groups), [], {}
    total = sum(map(len, groups))
    last_check = last_said = time.time()
    last_line = ""

    def start(group: list[RunPlan]) -> None:
        lead = group[0]
        if local_process_alive(read_id(lead.run_dir), lead.run_dir):
            say(f"{lead.process_name}: already running as process {read_id(lead.run_dir)}, left alone")
            return
        previous = read_status(lead.run_dir)
        env = dict(os.environ)
        if "--num_threads" not in lead.command and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(lead.run_dir / "stdout", "ab") as out, open(lead.run_dir / "stderr", "ab") as err:
            # A session of its own: Ctrl-C reaches the sweep, which passes exactly one SIGINT on to each run.
            process = subprocess.Popen(
                ["bash", str(lead.run_dir / "run.sh")],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        for plan in group:
            write_text(plan.run_dir / "id", f"{process.pid}\n")
        running.append(LocalRun(group, process, time.time()))
        verb = f"resumed at {previous.get('env_steps')} env steps" if previous else "started"
        say(f"{lead.process_name}: {verb}, process {process.pid}")

    def reap() -> None:
        for run in list(running):
            code = run.process.poll()
            if code is None:
                continue
            running.remove(run)
            took = f"{time.time() - run.started:.0f} s"
            for plan in run.plans:
                status = read_status(plan.run_dir) or {}
                # A group exits 0 while any of its seeds finished; a seed that failed alone says so in its status.
                failed_alone = code == 0 and status.get("state") == "failed"
                codes[plan.name] = 3 if failed_alone else code
                done = f"{len(codes)}/{total}"
                if failed_alone:
                    say(f"[{done}] {plan.name}: failed after {took} ({status.get('message')}), the other seeds of "
                        f"its process went on")  # fmt: skip
                elif code == 0:
                    say(f"[{done}] {plan.name}: finished in {took}")
                elif status.get("state") == "stopped":  # a signal from outside the sweep: it checkpointed, stopped
                    say(f"[{done}] {plan.name}: stopped at {status.get('env_steps')} env steps after {took}, with a "
                        "checkpoint; run the sweep again to resume")  # fmt: skip
                else:
                    say(f"[{done}] {plan.name}: exited with status {code} after {took}; see {plan.lead_dir}/stderr")

    def forward(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, forward) if _main_thread() else None
    try:
        while waiting or running:
            while waiting and len(running) < max_parallel:
                start(waiting.pop(0))
            time.sleep(0.5)
            reap()
            if running and time.time() - last_check >= progress_seconds:
                # A line when the runs have moved on, else one every ten intervals to show the sweep is alive.
                last_check = time.time()
                line = local_progress(running, sum(map(len, waiting)), len(codes))
                if line != last_line or last_check - last_said >= 10 * progress_seconds:
                    say(line)
                    last_said, last_line = last_check, line
    except KeyboardInterrupt:
        stopping = sum(len(run.plans) for run in running)
        say(f"stopping {stopping} running run(s): each writes a checkpoint; run the sweep again to resume")
        for run in running:
            if run.process.poll() is None:
                run.process.send_signal(signal.SIGINT)
        for run in running:
            run.process.wait()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return codes


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def local_progress(running: list[LocalRun], waiting: int, done: int) -> str:
    parts = []
    for plan in (plan for run in running for plan in run.plans):
        status = read_status(plan.run_dir) or {}
        steps, total = status.get("env_steps"), status.get("total_env_steps")
        parts.append(f"{plan.name} {steps}/{total}" if steps is not None else f"{plan.name} starting")
    return f"{len(parts)} running ({', '.join(parts)}), {waiting} waiting, {done} done"


# ---------------------------------------------------------------------------------------------------------------
# The sweep


def choose_executor(executor: str, say: Callable[[str], None]) -> str:
    if executor != "auto":
        if executor == "slurm" and shutil.which("sbatch") is None:
            raise SacaeError("--executor slurm needs sbatch on PATH; use --executor local to run on this machine.")
        return executor
    if shutil.which("sbatch") is not None:
        return "slurm"
    say("sbatch is not on PATH: running the sweep on this machine (--executor local), in the foreground")
    return "local"


def check_same_command(plan: RunPlan) -> None:
    """A run folder that already holds a run started with other training flags is not resumed with these."""
    old = script_command(plan.run_dir / "run.sh")
    started = (plan.run_dir / "status.json").exists() or (plan.run_dir / "train.log").exists()
    if old is None or not started or train_part(old) == train_part(plan.command):
        return
    before, now = flag_groups(train_part(old)), flag_groups(train_part(plan.command))
    gone = " ".join(g for g in before if g not in now) or "nothing more"
    added = " ".join(g for g in now if g not in before) or "nothing more"
    raise SacaeError(
        f"{plan.run_dir} holds a run started with other training flags (it has {gone}, this sweep asks for "
        f"{added}); use another --runs_dir or remove that folder."
    )


def flag_groups(args: Sequence[str]) -> list[str]:
    """["--a", "1", "--b"] -> ["--a 1", "--b"]."""
    groups: list[list[str]] = []
    for token in args:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return [shlex.join(g) for g in groups]


def sweep(args: SweepArgs, say: Callable[[str], None] | None = None, cwd: Path | None = None) -> dict[str, str]:
    """Start (or resume) every run of the sweep that is neither finished nor still queued or running.

    Returns what happened to each run, by name (`task/configuration/seed_i`): submitted JOB_ID, started,
    finished, running JOB_ID, exited N (local), damaged (left alone: its config.json, or the id of its Slurm job,
    cannot be read), blocked (left alone: it trains in one process with a damaged run), or planned (dry run).
    Slurm runs return as soon as they are submitted; local runs return when they have all ended.
    """
    if say is None:

        def say(line: str) -> None:
            print(f"sacae sweep: {line}", flush=True)

    if not 1 <= args.signal_seconds <= 65535:
        raise SacaeError(f"--signal_seconds must lie in [1, 65535] as sbatch takes it (got {args.signal_seconds}).")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SacaeError(f"--max_parallel must be at least 1 (got {args.max_parallel}).")
    cwd = (cwd or Path.cwd()).resolve()
    plans = plan_sweep(args, cwd)
    for plan in plans:
        check_same_command(plan)
    executor = choose_executor(args.executor, say)

    # Runs submitted to Slurm before are checked against squeue whichever executor starts them now.
    slurm_ids = [read_id(p.run_dir) for p in plans if (p.run_dir / "run.slrm").exists()]
    jobs: dict[str, SlurmJob] | None = {}
    if executor == "slurm" or any(slurm_ids):
        jobs = slurm_jobs(filter(None, slurm_ids))
        if jobs is None and executor == "slurm":
            raise SacaeError("squeue did not answer, so the sweep cannot tell which runs are still queued or running.")
        jobs = jobs or {}

    outcome: dict[str, str] = {}
    to_start: list[list[RunPlan]] = []
    for group in process_groups(plans):
        verdicts = [run_verdict(plan, jobs) for plan in group]
        results = [result for result, _ in verdicts]
        live = next((r for r in results if r is not None and r.startswith("running")), None)
        if all(r == "finished" for r in results) or live or "damaged" in results:
            # The process trains its seeds together: it starts for all of them or for none.
            for plan, (result, line) in zip(group, verdicts, strict=True):
                if result is None:
                    why = f"its job or process {live.split()[1]} runs" if live else "another of its seeds is damaged"
                    result = live or "blocked"
                    line = f"{plan.name}: trained in one process as {plan.process_name}; {why}, left alone"
                outcome[plan.name] = result
                say(line)
            continue
        for plan in group:
            check_same_group(plan)
            for name, problem in damaged_files(plan.run_dir).items():
                again = name == "status.json"
                then = "the run starts again, from its last checkpoint" if again else "it is written anew"
                say(f"{plan.name}: its {name} {problem}; {then}")
        to_start.append(group)

    if args.dry_run:
        for group in to_start:
            lead = group[0]
            resume = any(read_status(plan.run_dir) for plan in group)
            for plan in group:
                outcome[plan.name] = "planned"
            say(f"{lead.process_name}: would {'resume' if resume else 'start'}: {shlex.join(lead.command)}")
        return outcome

    for group in to_start:
        for plan in group:
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(plan.run_dir / "run.sh", run_script(plan, cwd), 0o755)
            if executor == "slurm":
                write_text(plan.run_dir / "run.slrm", slurm_script(args, plan), 0o755)
            else:
                (plan.run_dir / "run.slrm").unlink(missing_ok=True)  # this run is no longer a Slurm job
            link_outputs(plan)

    if executor == "slurm":
        for group in to_start:
            lead = group[0]
            resumed = read_status(lead.run_dir)
            job_id = submit_slurm(lead.run_dir)
            for plan in group:
                write_text(plan.run_dir / "id", f"{job_id}\n")
                outcome[plan.name] = f"submitted {job_id}"
            verb = f"resubmitted (resumes at {resumed.get('env_steps')} env steps)" if resumed else "submitted"
            say(f"{lead.process_name}: {verb} as job {job_id}")
        if to_start:
            say(f"{len(to_start)} job(s) submitted; `sacae status {args.runs_dir}` shows them")
        return outcome

    if to_start:
        # No more at a time than there are processes: the cores of the slots left empty go to their threads.
        parallel = min(args.max_parallel or local_max_parallel(to_start[0][0]), len(to_start))
        runs = sum(map(len, to_start))
        grouped = f" in {len(to_start)} process(es)" if to_start[0][0].group else ""
        say(f"{runs} run(s) on {socket.gethostname()}{grouped}, {parallel} at a time")
        codes = run_local(to_start, parallel, say)
        for name, code in codes.items():
            outcome[name] = "finished" if code == 0 else f"exited {code}"
    return outcome


def run_verdict(plan: RunPlan, jobs: dict[str, SlurmJob]) -> tuple[str | None, str]:
    """What a sweep does with one run, as its outcome and the line that says so: finished, running JOB_ID or
    damaged, all left alone; None (and no line) for a run to start."""
    status = read_status(plan.run_dir) or {}
    job_id = read_id(plan.run_dir)
    slurm = (plan.run_dir / "run.slrm").exists()
    damaged = damaged_files(plan.run_dir)
    if status.get("state") == "finished":
        return "finished", f"{plan.name}: finished, skipped"
    if slurm and job_id in jobs and jobs[job_id].live:
        return f"running {job_id}", f"{plan.name}: job {job_id} is {jobs[job_id].state.lower()}, left alone"
    if local_process_alive(pid := job_id or (None if slurm else trainer_pid(status)), plan.run_dir):
        return f"running {pid}", f"{plan.name}: process {pid} is running, left alone"
    if "config.json" in damaged:
        return "damaged", (f"{plan.name}: its config.json {damaged['config.json']}, so the run cannot resume; left "
                           f"alone (remove {plan.run_dir} to start it over)")  # fmt: skip
    if slurm and "id" in damaged:
        return "damaged", (f"{plan.name}: its id file {damaged['id']}, so the sweep cannot tell whether its Slurm job "
                           f"still runs; left alone (once squeue shows no job of it, remove {plan.run_dir / 'id'} and "
                           "run the sweep again)")  # fmt: skip
    return None, ""


def check_same_group(plan: RunPlan) -> None:
    """A started run goes on with the seeds it trained with: a group resumes from a checkpoint that all its seeds
    have, so a seed joining other seeds would take the group back to the start (or itself)."""
    started = (plan.run_dir / "status.json").exists() or (plan.run_dir / "train.log").exists()
    before = process_seeds(script_command(plan.run_dir / "run.sh"))
    if not started or before is None or before == plan.group:
        return
    was = f"with seeds {' '.join(map(str, before))} in one process" if before else "in a process of its own"
    now = f"with seeds {' '.join(map(str, plan.group))}" if plan.group else "in a process of its own"
    raise SacaeError(
        f"{plan.run_dir} was started {was} and this sweep would resume it {now}; run the sweep with the "
        f"--seeds_per_process it was started with, or use another --runs_dir."
    )


def link_outputs(plan: RunPlan) -> None:
    """A group's stdout and stderr are its first seed's files; the other seeds' folders link to them."""
    for name in ("stdout", "stderr"):
        path = plan.run_dir / name
        if plan.run_dir == plan.lead_dir:
            if path.is_symlink():  # the folder led no group before, and now it does
                path.unlink()
            continue
        temporary = path.with_name(f".{name}.link")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(Path("..") / plan.lead_dir.name / name)
        os.replace(temporary, path)
