"""Launching sweeps: one training run per task and seed, in RUNS_DIR/<task>/<configuration>/seed_<i>/, on Slurm or
on this machine. A task is a dm_control DOMAIN_TASK or a Gymnasium environment, gymnasium:<id>, whose folder is the
run's env name (gymnasium-<id>).

Each run folder gets its exact training command (run.sh), its Slurm script (run.slrm, Slurm runs only), the job
id (id: the Slurm job id, or the process id of a local run) and the job's stdout and stderr, beside what training
writes. Running the same sweep again skips finished runs, leaves queued or running ones alone and starts the rest
again with the same command, which resumes them from their checkpoints.
"""

from __future__ import annotations

import dataclasses
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
    """Local runs at once (default: as many as this machine's cores and memory allow, at least 1)."""


@dataclass(frozen=True)
class RunPlan:
    """One run of a sweep: where it lives and the exact command that trains (and resumes) it."""

    task: str
    """The run's env name, its folder under RUNS_DIR: walker_walk, or gymnasium-Pendulum-v1."""
    configuration: str
    seed: int
    run_dir: Path
    command: tuple[str, ...]
    cfg: TrainConfig

    @property
    def name(self) -> str:
        return f"{self.task}/{self.configuration}/seed_{self.seed}"


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
    base = parse_train_args(args.train_args)
    runs_dir = ((cwd or Path.cwd()) / args.runs_dir).resolve()
    exe = sacae_command()
    plans = []
    folders: dict[str, str] = {}  # env name -> the task that named it
    for task in dict.fromkeys(args.tasks):
        cfg, env_flag = task_config(base, task)
        name = cfg.env_name
        if folders.setdefault(name, task) != task:
            raise SacaeError(f"--tasks {folders[name]} and {task} would share the run folders {name}/; give one.")
        for seed in seeds:
            run_dir = runs_dir / name / cfg.configuration / f"seed_{seed}"
            command = (*exe, "train", *env_flag, *args.train_args, "--seed", str(seed), "--work_dir", str(run_dir))
            plans.append(RunPlan(name, cfg.configuration, seed, run_dir, command, dataclasses.replace(cfg, seed=seed)))
    return plans


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
    path inside it), as given or relative to the process's working directory, alone or as `--flag=PATH`."""
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
    return False


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    from sacae.storage import write_text_atomic

    write_text_atomic(path, text)
    os.chmod(path, mode)


def run_script(plan: RunPlan, cwd: Path) -> str:
    return (
        "#!/usr/bin/env bash\n"
        f"# Training run {plan.name}, written by `sacae sweep`. Running it again resumes the run.\n"
        f"cd {shlex.quote(str(cwd))}\n"
        f"exec {shlex.join(plan.command)}\n"
    )


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
    """The arguments after `train`: what defines the run, whichever sacae installation starts it."""
    command = list(command)
    return command[command.index("train") + 1 :] if "train" in command else command


# ---------------------------------------------------------------------------------------------------------------
# Slurm


def sbatch_lines(args: SweepArgs, plan: RunPlan) -> list[str]:
    """The #SBATCH options of one run's job."""
    d = plan.run_dir
    options = [
        f"--job-name={plan.task}.{plan.configuration}.seed_{plan.seed}",
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
        options.append(f"--mem={math.ceil((run_memory_bytes(plan.cfg) + 1024**3) / 1024**3)}G")
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
    run_sh = shlex.quote(str(plan.run_dir / "run.sh"))
    return f"""#!/bin/bash
{header}
# Training run {plan.name}, written by `sacae sweep`.
# Slurm sends USR1 to this shell {args.signal_seconds} s before the time limit: the trainer is told to write a
# checkpoint and stop, then the job requeues itself; the requeued job runs run.sh again, which resumes the run.
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


def local_max_parallel(cfg: TrainConfig) -> int:
    """Runs at once on this machine: one core each (or --num_threads), within the memory available now."""
    from sacae.placement import available_memory_bytes

    cores = len(os.sched_getaffinity(0))
    by_cores = cores // (cfg.num_threads or 1)
    available = available_memory_bytes()
    by_memory = available // run_memory_bytes(cfg) if available is not None else by_cores
    return max(1, min(by_cores, by_memory))


@dataclass
class LocalRun:
    plan: RunPlan
    process: subprocess.Popen
    started: float


def run_local(
    plans: list[RunPlan], max_parallel: int, say: Callable[[str], None], progress_seconds: float = 60.0
) -> dict[str, int]:
    """Run the plans as processes of this machine, `max_parallel` at a time, and wait for all; returns each run's
    exit status by name. Ctrl-C (or SIGTERM to the sweep) asks every run to checkpoint and stop, and waits."""
    threads = max(1, len(os.sched_getaffinity(0)) // max_parallel)
    waiting, running, codes = list(plans), [], {}
    last_check = last_said = time.time()
    last_line = ""

    def start(plan: RunPlan) -> None:
        if local_process_alive(read_id(plan.run_dir), plan.run_dir):
            say(f"{plan.name}: already running as process {read_id(plan.run_dir)}, left alone")
            return
        previous = read_status(plan.run_dir)
        env = dict(os.environ)
        if "--num_threads" not in plan.command and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(plan.run_dir / "stdout", "ab") as out, open(plan.run_dir / "stderr", "ab") as err:
            # A session of its own: Ctrl-C reaches the sweep, which passes exactly one SIGINT on to each run.
            process = subprocess.Popen(
                ["bash", str(plan.run_dir / "run.sh")],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        write_text(plan.run_dir / "id", f"{process.pid}\n")
        running.append(LocalRun(plan, process, time.time()))
        verb = f"resumed at {previous.get('env_steps')} env steps" if previous else "started"
        say(f"{plan.name}: {verb}, process {process.pid}")

    def reap() -> None:
        for run in list(running):
            code = run.process.poll()
            if code is None:
                continue
            running.remove(run)
            codes[run.plan.name] = code
            done = f"{len(codes)}/{len(plans)}"
            took = f"{time.time() - run.started:.0f} s"
            status = read_status(run.plan.run_dir) or {}
            if code == 0:
                say(f"[{done}] {run.plan.name}: finished in {took}")
            elif status.get("state") == "stopped":  # a signal from outside the sweep: it checkpointed and stopped
                say(f"[{done}] {run.plan.name}: stopped at {status.get('env_steps')} env steps after {took}, with a "
                    "checkpoint; run the sweep again to resume")  # fmt: skip
            else:
                say(f"[{done}] {run.plan.name}: exited with status {code} after {took}; see {run.plan.run_dir}/stderr")

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
                line = local_progress(running, len(waiting), len(codes))
                if line != last_line or last_check - last_said >= 10 * progress_seconds:
                    say(line)
                    last_said, last_line = last_check, line
    except KeyboardInterrupt:
        say(f"stopping {len(running)} running run(s): each writes a checkpoint; run the sweep again to resume")
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
    for run in running:
        status = read_status(run.plan.run_dir) or {}
        steps, total = status.get("env_steps"), status.get("total_env_steps")
        parts.append(f"{run.plan.name} {steps}/{total}" if steps is not None else f"{run.plan.name} starting")
    return f"{len(running)} running ({', '.join(parts)}), {waiting} waiting, {done} done"


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
    cannot be read), or planned (dry run). Slurm runs return as soon as they are submitted; local runs return when
    they have all ended.
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
    to_start: list[RunPlan] = []
    for plan in plans:
        status = read_status(plan.run_dir) or {}
        job_id = read_id(plan.run_dir)
        slurm = (plan.run_dir / "run.slrm").exists()
        damaged = damaged_files(plan.run_dir)
        if status.get("state") == "finished":
            outcome[plan.name] = "finished"
            say(f"{plan.name}: finished, skipped")
            continue
        if slurm and job_id in jobs and jobs[job_id].live:
            outcome[plan.name] = f"running {job_id}"
            say(f"{plan.name}: job {job_id} is {jobs[job_id].state.lower()}, left alone")
            continue
        if local_process_alive(pid := job_id or (None if slurm else trainer_pid(status)), plan.run_dir):
            outcome[plan.name] = f"running {pid}"
            say(f"{plan.name}: process {pid} is running, left alone")
            continue
        if "config.json" in damaged:
            outcome[plan.name] = "damaged"
            say(f"{plan.name}: its config.json {damaged['config.json']}, so the run cannot resume; left alone "
                f"(remove {plan.run_dir} to start it over)")  # fmt: skip
            continue
        if slurm and "id" in damaged:
            outcome[plan.name] = "damaged"
            say(f"{plan.name}: its id file {damaged['id']}, so the sweep cannot tell whether its Slurm job still "
                f"runs; left alone (once squeue shows no job of it, remove {plan.run_dir / 'id'} and run the sweep "
                "again)")  # fmt: skip
            continue
        for name, problem in damaged.items():
            then = "the run starts again, from its last checkpoint" if name == "status.json" else "it is written anew"
            say(f"{plan.name}: its {name} {problem}; {then}")
        to_start.append(plan)

    if args.dry_run:
        for plan in to_start:
            outcome[plan.name] = "planned"
            say(f"{plan.name}: would {'resume' if read_status(plan.run_dir) else 'start'}: {shlex.join(plan.command)}")
        return outcome

    for plan in to_start:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(plan.run_dir / "run.sh", run_script(plan, cwd), 0o755)
        if executor == "slurm":
            write_text(plan.run_dir / "run.slrm", slurm_script(args, plan), 0o755)
        else:
            (plan.run_dir / "run.slrm").unlink(missing_ok=True)  # this run is no longer a Slurm job

    if executor == "slurm":
        for plan in to_start:
            resumed = read_status(plan.run_dir)
            job_id = submit_slurm(plan.run_dir)
            write_text(plan.run_dir / "id", f"{job_id}\n")
            outcome[plan.name] = f"submitted {job_id}"
            verb = f"resubmitted (resumes at {resumed.get('env_steps')} env steps)" if resumed else "submitted"
            say(f"{plan.name}: {verb} as job {job_id}")
        if to_start:
            say(f"{len(to_start)} job(s) submitted; `sacae status {args.runs_dir}` shows them")
        return outcome

    if to_start:
        # No more at a time than there are runs: the cores of the slots left empty go to the runs' threads.
        parallel = min(args.max_parallel or local_max_parallel(to_start[0].cfg), len(to_start))
        say(f"{len(to_start)} run(s) on {socket.gethostname()}, {parallel} at a time")
        codes = run_local(to_start, parallel, say)
        for name, code in codes.items():
            outcome[name] = "finished" if code == 0 else f"exited {code}"
    return outcome
