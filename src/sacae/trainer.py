"""The training loop of a group of N >= 1 seeds in lockstep (`sacae train` is N = 1): collect, update every agent
step after the seed phase, evaluate every `eval_freq` steps, checkpoint every seed; `sacae.schedule` says when.

The loop follows the authors' release step by step (pick a_t, run the update(s) of step t on the replay as it
stands, step the environment with a_t, store the transition) and counts both clocks explicitly: `agent_steps`
(decisions) and `env_steps` (simulator steps, agent steps x action repeat), the one we print and plot. With
`--overlap` the update of step t runs in a worker thread while the environment steps with a_t: neither depends
on the other, so the math is the same, step for step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sacae import faults
from sacae.agent import GroupAgent, SacAeAgent, seed_generator
from sacae.checkpoint import CheckpointStore, numpy_legacy_state, numpy_legacy_tuple, to_arrays, to_tensors
from sacae.config import EXECUTION_FIELDS, TrainConfig, resolve
from sacae.env_pool import EnvPool
from sacae.envs import DMCEnv, make_env
from sacae.errors import NumericalError, RunStopped, SacaeError
from sacae.logger import Logger, count
from sacae.placement import ReplayPlacement, check_replay_device, check_replay_fits, replay_transitions
from sacae.process import configure_process, describe_session
from sacae.replay import ReplayBuffer
from sacae.rundir import (
    WorkDirLock,
    foreign_entries,
    is_run,
    read_config,
    read_status,
    remove_outputs,
    run_finished,
    write_status,
)
from sacae.schedule import Schedule
from sacae.storage import check_writable, load_torch, save_torch_atomic, write_text_atomic, writing
from sacae.trackers import check_installed
from sacae.video import VideoRecorder


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SacaeError(f"--device {name} is not a device name; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SacaeError(f"--device {name} was asked for but PyTorch sees no CUDA GPU here; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise SacaeError(f"--device {name} is not supported; use auto, cpu, cuda or cuda:N.")
    return device


def new_replay(cfg: TrainConfig, env: DMCEnv, device: torch.device, seed, frames_device="cpu") -> ReplayBuffer:
    """An empty replay buffer for `cfg`'s run on `env` (sized by `replay_transitions`)."""
    spec = env.spec
    return ReplayBuffer(
        spec.frame_shape,
        spec.obs_dtype,
        spec.action_dim,
        replay_transitions(cfg),
        frame_stack=env.frame_stack,
        episode_length=cfg.episode_agent_steps,
        device=device,
        seed=seed,
        frames_device=frames_device,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def eval_seed(run_seed: int, env_steps: int) -> int:
    """The eval environment's seed for the evaluation at `env_steps`: independent of the run's history."""
    return int(np.random.SeedSequence([run_seed, env_steps, 1]).generate_state(1)[0])


def evaluate_agent(
    agent: SacAeAgent,
    env: DMCEnv,
    num_episodes: int,
    seed: int,
    video: VideoRecorder | None = None,
    video_name: str = "",
) -> list[float]:
    """Returns of `num_episodes` episodes of the deterministic policy; the first goes to `video` if given."""
    was_training = agent.training
    agent.train(False)
    returns = []
    for episode in range(num_episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        recorder = video if episode == 0 else None
        if recorder is not None:
            recorder.init()
            recorder.record(env)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs, sample=False))
            total += reward
            done = terminated or truncated
            if recorder is not None:
                recorder.record(env)
        if recorder is not None:
            recorder.save(video_name)
        returns.append(total)
        faults.reached("eval_episode")
    agent.train(was_training)
    return returns


@dataclass
class PendingStep:
    """An agent step whose actions are chosen (one per training seed) and whose updates are under way (a checkpoint
    may fall inside it)."""

    actions: list[np.ndarray]
    updates: int
    done: int = 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# How long a run waits for the work-dir lock of a process on another machine (a requeued Slurm job whose previous
# node is gone holds its NFS lock until the lease expires, about 90 s on NFSv4).
LOCK_WAIT_SECONDS = 150.0


# Which workers step a group's environments (`EnvPool`'s `workers`): auto (the default), serial, threads or processes.
ENV_WORKERS_VARIABLE = "SACAE_ENV_WORKERS"


def env_workers() -> str:
    """The pools' workers: $SACAE_ENV_WORKERS, else auto (`sacae.env_pool.default_workers`)."""
    value = os.environ.get(ENV_WORKERS_VARIABLE) or "auto"
    if value not in ("auto", "serial", "threads", "processes"):
        raise SacaeError(f"{ENV_WORKERS_VARIABLE}={value} is not a kind of worker; use auto, serial, threads or "
                         "processes.")  # fmt: skip
    return value


def seed_dir(runs_dir: str | Path, cfg: TrainConfig, seed: int) -> Path:
    """RUNS_DIR/<task>/<configuration>/seed_<seed>, the layout of `sacae sweep` and `sacae report`."""
    return Path(runs_dir) / cfg.env_name / cfg.configuration / f"seed_{seed}"


class SeedRun:
    """What one seed of a group owns: its configuration and run folder (locked), checkpoints, environments, replay
    buffer, random streams, logs, video, the episode in progress and the record of its sessions."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.seed = cfg.seed
        self.work_dir = Path(cfg.work_dir)
        self.lock: WorkDirLock | None = None
        self.logger: Logger | None = None
        self.obs: np.ndarray | None = None  # the episode in progress (None between episodes)
        self.episode = 0
        self.episode_reward, self.episode_start, self.eval_seconds = 0.0, time.time(), 0.0
        self.finished = False
        self.failed: str | None = None  # why this seed stopped while the others train on
        self.resumed_from: Path | None = None
        self.resumes = 0
        self.elapsed_before = 0.0  # training seconds of the earlier sessions of this run
        self.earlier_sessions: list[dict[str, Any]] = []  # one record per earlier session (process) of this run
        self.reopened_finished_run = False

    def build(self, device: torch.device, group: bool, env: Any = None, eval_env: Any = None) -> None:
        """Environments, replay RNGs, agent (and, in a group, the torch generator of its noise), in the order of a
        run of its own, so that every random stream starts where it starts there. `env` and `eval_env` are the
        seed's environments in the group's pools (`pool.envs[i]`), else they are built here; building one draws
        from no global random stream, so either way the streams start where a run of its own starts them."""
        cfg = self.cfg
        self.device = device
        seed_everything(cfg.seed)
        self.env = make_env(cfg, seed=cfg.seed) if env is None else env
        self.eval_env = make_env(cfg, seed=cfg.seed) if eval_env is None else eval_env
        spec = self.env.spec
        itemsize = np.dtype(spec.obs_dtype).itemsize
        self.placement = check_replay_fits(cfg, device, spec.frame_shape, itemsize, spec.action_dim)
        self.replay_seed, action_seed = np.random.SeedSequence(cfg.seed).spawn(2)
        self.replay: ReplayBuffer | None = None  # made or loaded on restore, once: it may fill a GPU
        self.action_rng = np.random.default_rng(action_seed)
        self.agent = SacAeAgent(spec.obs_shape, spec.action_dim, cfg, device)
        self.generator = seed_generator(cfg.seed, device) if group else None

    def new_replay(self, device: torch.device) -> ReplayBuffer:
        return new_replay(self.cfg, self.env, device, self.replay_seed, self.placement.frames_device)

    @property
    def training(self) -> bool:
        return not self.finished and self.failed is None

    def start_episode(self, obs: np.ndarray | None = None) -> None:
        """Begin an episode: reset the environment, or take `obs`, its first observation from a reset already done
        (the group resets its seeds' environments together)."""
        self.obs = self.env.reset()[0] if obs is None else obs
        self.replay.start_episode(self.obs)
        self.episode_reward, self.episode_start, self.eval_seconds = 0.0, time.time(), 0.0
        self.episode += 1

    def rng_state(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" and self.generator is None else None
        return {
            "python": random.getstate(),
            "numpy": numpy_legacy_state(np.random.get_state()),
            # One seed draws its noise from torch's global generator, a group's seed from its own.
            "torch": torch.get_rng_state() if self.generator is None else self.generator.get_state(),
            "cuda": cuda,
            "action": self.action_rng.bit_generator.state,
        }

    def set_rng_state(self, rng: dict[str, Any]) -> None:
        random.setstate(rng["python"])
        np.random.set_state(numpy_legacy_tuple(rng["numpy"]))
        if self.generator is None:
            torch.set_rng_state(rng["torch"])
            if self.device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            self.generator.set_state(rng["torch"])
        self.action_rng.bit_generator.state = rng["action"]


class Trainer:
    """A group of N >= 1 seeds of one configuration trained in lockstep, each into its own run folder: environments,
    agent, replay, outputs, and the loop that ties them together. `sacae train` is the group of one seed.

    Running the same configuration again in the same folders resumes the runs from their newest common
    checkpoint, exactly: the resumed runs write the logs and weights the uninterrupted ones would have written.
    A seed whose losses or parameters become non-finite stops with its own status; the others train on.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        console=None,
        seeds: Sequence[int] | None = None,
        runs_dir: str | Path | None = None,
    ):
        if seeds is None:
            cfg = resolve(load_resume_config(resolve(cfg)))
            configs = [cfg]
        else:
            cfg = resolve(TrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}))
            if cfg.resume is not None:  # the group's folder (or one seed's) and its saved configurations
                configs = load_group_resume_configs(cfg, seeds)
                cfg, seeds = configs[0], [c.seed for c in configs]
            else:
                check_group_config(cfg, seeds)
                folders = [os.fspath(seed_dir(runs_dir or "runs", cfg, s)) for s in seeds]
                configs = [dataclasses.replace(cfg, seed=s, work_dir=w) for s, w in zip(seeds, folders, strict=True)]
        self.cfg = configs[0]
        self.schedule = Schedule(self.cfg)
        self.group = seeds is not None
        self.device = select_device(cfg.device)
        check_replay_device(cfg, self.device)
        # Overlap pays where the update runs elsewhere than the environment (a GPU); on a CPU both share the cores.
        self.overlap = cfg.overlap == "on" or (cfg.overlap == "auto" and self.device.type == "cuda")
        self._update_worker: ThreadPoolExecutor | None = None
        configure_process(cfg.num_threads)
        # Every refusal comes before the first write: a refused command leaves the folders as it found them.
        for c in configs:
            check_work_dir(c, Path(c.work_dir))
        check_installed(cfg.trackers)

        self.runs = [SeedRun(c) for c in configs]
        self._build_runs()
        self.replay_placement = self.runs[0].placement
        self.replay_bytes = self.replay_placement.needed * len(self.runs)
        if self.group:
            try:
                self.replay_placement = check_group_memory(self.runs, self.device)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._close_envs()
                raise

        locked: list[SeedRun] = []
        try:
            start_over = []
            for run in self.runs:
                if self.group:
                    run.work_dir.mkdir(parents=True, exist_ok=True)
                run.work_dir = check_writable(run.cfg.work_dir)
                run.lock = WorkDirLock(run.work_dir, wait_seconds=LOCK_WAIT_SECONDS)
                locked.append(run)
            for run in self.runs:
                # Again under the lock: another process may have changed the folder since the first look.
                start_over.append(check_work_dir(run.cfg, run.work_dir))
        except BaseException:
            with contextlib.suppress(Exception):
                self._close_envs()
            for run in locked:
                run.lock.release()
            raise
        try:
            for run, remove in zip(self.runs, start_over, strict=True):
                if remove:
                    self._start_over(run)
                run.store = CheckpointStore(run.work_dir)
                run.model_dir = run.work_dir / "model"
                run.video = VideoRecorder(run.work_dir / "video" if cfg.save_video else None)

            self.agent_steps = 0
            self.progress = None
            self.last_eval: int | None = None
            self.last_checkpoint: int | None = None
            self.pending: PendingStep | None = None
            self.session_start = time.time()
            self.session = describe_session(self.device)
            self._stop_signal: int | None = None

            log_sizes = self._restore()
            self.session["from_env_steps"] = self.env_steps
            for run, sizes in zip(self.runs, log_sizes, strict=True):
                run.reopened_finished_run = run.finished
                config_path = run.work_dir / "config.json"
                with writing(config_path, "the run's configuration"):
                    if not config_path.is_file() or config_path.read_text() != run.cfg.to_json():
                        write_text_atomic(config_path, run.cfg.to_json())
                    if cfg.save_model:
                        run.model_dir.mkdir(exist_ok=True)
                purge = self.env_steps + 1 if run.resumed_from is not None else None
                run.logger = Logger(run.work_dir, save_tb=cfg.save_tb, console=console, truncate=sizes,
                                    purge_step=purge, trackers=cfg.trackers,
                                    config={**run.cfg.to_dict(), "configuration": cfg.configuration})  # fmt: skip
                if self.group:
                    run.logger.console_write = seed_console(run.seed, console)
            members = self._members()
            if self.group and members:
                generators = [r.generator for r in members]
                self.agent: SacAeAgent | GroupAgent = GroupAgent([r.agent for r in members], generators)
            else:
                self.agent = self.runs[0].agent
            for run in self.runs:
                state = getattr(run, "metrics_state", None)
                if state is not None and run in members:
                    self.agent.metrics.load_state_dict(state, self._index(run))
                del run.agent  # the group agent holds the weights from here on
        except BaseException as e:
            message = str(e) if isinstance(e, SacaeError) else f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                self._close_envs()
            for run in self.runs:
                if is_run(run.work_dir) and not isinstance(e, KeyboardInterrupt):
                    with contextlib.suppress(Exception):
                        status = read_status(run.work_dir) or {}
                        write_status(run.work_dir, {**status, "state": "failed", "message": message,
                                                    "pid": os.getpid(), "host": socket.gethostname(),
                                                    "time": time.time()})  # fmt: skip
                if run.logger is not None:
                    with contextlib.suppress(Exception):
                        run.logger.close()
                run.lock.release()
            raise

    def _build_runs(self) -> None:
        """Build every seed (`SeedRun.build`) with its environments in the group's two pools: `env_pool` holds each
        seed's training environment, `eval_pool` its evaluation one (environment i is seed i's). Two pools of N
        rather than one of 2N: for one seed each holds one environment, which `workers="auto"` builds and calls
        here, exactly as a run of its own. The pools are closed again if anything fails."""
        workers = env_workers()
        configs = [run.cfg for run in self.runs]
        pixels = self.cfg.pixels
        self.env_pool: EnvPool | None = None
        self.eval_pool: EnvPool | None = None
        try:
            makers = [functools.partial(make_env, c, seed=c.seed) for c in configs]
            self.env_pool = EnvPool(makers, workers=workers, pixels=pixels)
            self.eval_pool = EnvPool(makers, workers=workers, pixels=pixels)
            for run, env, eval_env in zip(self.runs, self.env_pool.envs, self.eval_pool.envs, strict=True):
                run.build(self.device, self.group, env, eval_env)
        except BaseException:
            with contextlib.suppress(Exception):
                self._close_envs()
            raise

    def _close_envs(self) -> None:
        """Close both pools, each environment on its worker (worker processes end); again: nothing. Raises the
        first error once both are closed."""
        errors = []
        for pool in (getattr(self, "env_pool", None), getattr(self, "eval_pool", None)):
            if pool is not None:
                try:
                    pool.close()
                except Exception as e:
                    errors.append(e)
        if errors:
            raise errors[0]

    @staticmethod
    def _start_over(run: SeedRun) -> None:
        left = remove_outputs(run.work_dir)
        if left:
            print(f"sacae: starting over in {run.work_dir}; kept what sacae did not write there: "
                  f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}", file=sys.stderr)  # fmt: skip

    def _restore(self) -> list[dict[str, int]]:
        """Load each seed's checkpoint at the newest agent step that every seed has (a kill between two seeds'
        checkpoint writes leaves some a step ahead), if any; returns the log sizes to truncate the logs to."""
        if self.group:
            for run in self.runs:
                run.failed = failed_in_group(run.work_dir)
        runs = [run for run in self.runs if run.failed is None]
        if not runs:
            return [None for _ in self.runs]
        bound = None
        while True:
            loaded = [run.store.load_latest(functools.partial(run.new_replay, self.device), at_most=bound)
                      for run in runs]  # fmt: skip
            steps = {None if x is None else x[0]["agent_steps"] for x in loaded}
            if len(steps) == 1:
                break
            if None in steps:
                # A seed has no checkpoint (a kill before its first one): the group starts over from nothing.
                for run, x in zip(runs, loaded, strict=True):
                    if x is not None:
                        self._start_over(run)
                        run.store = CheckpointStore(run.work_dir)
                loaded = [None] * len(runs)
                break
            bound = min(steps)
        sizes: dict[int, dict[str, int] | None] = {id(run): None for run in self.runs}
        if loaded[0] is None:
            for run in runs:
                run.replay = run.new_replay(self.device)
                # Nothing to resume from: the TensorBoard events of an earlier attempt are rewritten from the start.
                remove_outputs(run.work_dir, ("tb",))
                sizes[id(run)] = {"train": 0, "eval": 0}
            return list(sizes.values())
        # Every environment rebuilds its episode in progress at once, each on its worker.
        observations = self.env_pool.set_state([to_arrays(x[0]["env"]) for x in loaded], self._env_indices(runs))
        for run, (state, replay), obs in zip(runs, loaded, observations, strict=True):
            run.replay = replay
            run.resumed_from = run.store.states()[0]
            run.agent.load_state_dict(state["agent"])
            run.metrics_state = state["metrics"]
            run.set_rng_state(state["rng"])
            run.obs = obs
            run.episode, run.episode_reward = state["episode"], state["episode_reward"]
            run.finished = state["finished"]
            run.resumes = state["resumes"] + (0 if run.finished else 1)
            run.elapsed_before = state["elapsed_seconds"]
            # Checkpoints written before sessions were recorded have none: their earlier sessions stay unknown.
            run.earlier_sessions = list(state.get("sessions", []))
            sizes[id(run)] = state["log_sizes"]
        state = loaded[0][0]
        self.agent_steps = state["agent_steps"]
        self.last_eval, self.last_checkpoint = state["last_eval"], state["agent_steps"]
        pending = [x[0]["pending"] for x, run in zip(loaded, runs, strict=True) if run.training]
        if pending and pending[0] is not None:
            first = pending[0]
            self.pending = PendingStep([p["action"].numpy() for p in pending], first["updates"], first["done"])
        return list(sizes.values())

    # ---------------------------------------------------------------------------------------------------------
    # One seed's view (sacae train, and the tools that drive its Trainer step by step).
    @property
    def replay(self) -> ReplayBuffer:
        return self.runs[0].replay

    @property
    def logger(self) -> Logger:
        return self.runs[0].logger

    @property
    def episode(self) -> int:
        return self.runs[0].episode

    @property
    def work_dir(self) -> Path:
        return self.runs[0].work_dir

    @property
    def training_runs(self) -> list[SeedRun]:
        """The seeds still training, in the order of the group agent's seed axis."""
        return [run for run in self.runs if run.training]

    @property
    def env_steps(self) -> int:
        return self.schedule.env_steps(self.agent_steps)

    def elapsed_seconds(self, run: SeedRun) -> float:
        return run.elapsed_before + time.time() - self.session_start

    def updates_at(self, agent_steps: int) -> int:
        """How many updates run at this agent step; see `Schedule.updates_at`."""
        return self.schedule.updates_at(agent_steps)

    def describe(self) -> str:
        cfg = self.cfg
        first = (self.training_runs or self.runs)[0]
        per = first.replay.bytes_per_transition
        threads = torch.get_num_threads()
        seeds = f"seeds {' '.join(str(r.seed) for r in self.runs)} in one process, " if self.group else ""
        where = self.runs[0].work_dir.parent if self.group else self.work_dir
        return (
            f"sacae: {cfg.configuration} on {cfg.env_name} (action repeat {cfg.action_repeat}), {seeds}"
            f"{cfg.num_train_steps:,} agent steps = {self.schedule.env_steps(cfg.num_train_steps):,} env steps, "
            f"device {self.device}, {cfg.precision}, {count(threads, 'thread')}, overlap "
            f"{'on' if self.overlap else 'off'}; replay {len_fmt(per)} per transition, "
            f"{self.replay_bytes / 1e9:.2f} GB for {first.replay.capacity:,}"
            f"{' x ' + str(len(self.runs)) if self.group else ''}, {self.replay_placement.describe()}; "
            f"output in {where}"
        )

    # ---------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Train to the end (or until a stop signal, then raise RunStopped after writing a checkpoint). In a group,
        NumericalError when every seed failed; seeds that failed while others finished are named on stderr."""
        cfg = self.cfg
        if not self.training_runs:
            for run in self.runs:
                what = "failed" if run.failed else "finished"
                print(f"sacae: the run in {run.work_dir} is already {what} ({self.env_steps:,} env steps); "
                      f"nothing to do.", file=sys.stderr, flush=True)  # fmt: skip
            self.close()
            if all(run.failed for run in self.runs):
                raise NumericalError(
                    "Every seed of this group failed earlier (see their status.json); add --no_resume to start over."
                )
            return
        print(self.describe(), file=sys.stderr, flush=True)
        for run in self.runs:
            if run.resumed_from is not None:
                print(f"sacae: resuming from {run.resumed_from} at env step {self.env_steps:,}", file=sys.stderr,
                      flush=True)  # fmt: skip
        self.progress = tqdm(
            total=self.schedule.env_steps(cfg.num_train_steps),
            initial=self.env_steps,
            unit=" env steps",
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
            desc=f"{cfg.configuration} {cfg.env_name}" + (f" x{len(self.runs)}" if self.group else ""),
        )
        if not self.progress.disable:
            for run in self.runs:
                prefix = f"seed {run.seed} " if self.group else ""
                run.logger.console_write = lambda line, prefix=prefix: tqdm.write(prefix + line, file=sys.stdout)
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self.write_status("running")
            while self.training_runs and (self.schedule.training(self.agent_steps) or self.pending is not None):
                self.step()
                if self._stop_signal is not None:
                    self._stop()
            if self.training_runs and self.last_eval != self.agent_steps:
                self.evaluate()
            for run in self.training_runs:
                run.finished = True
            if any(run.finished for run in self.runs):
                self.checkpoint()
                self.write_status("finished", runs=[run for run in self.runs if run.finished])
        except RunStopped:
            raise
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                self.write_status("stopped", "interrupted without a checkpoint; it resumes from the last one")
            raise
        except BaseException as e:
            message = str(e) if isinstance(e, SacaeError) else f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                self.write_status("failed", message)
            raise
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            self.progress.close()
            self.close()
        failed = [run for run in self.runs if run.failed]
        if failed and len(failed) == len(self.runs):
            raise NumericalError(
                failed[0].failed
                if len(failed) == 1
                else f"Every seed failed ({'; '.join(f'seed {r.seed}: {r.failed}' for r in failed)})"
            )
        if failed:
            print(f"sacae: seed{'s' if len(failed) > 1 else ''} {' '.join(str(r.seed) for r in failed)} failed (see "
                  f"{'their' if len(failed) > 1 else 'its'} status.json); the other seeds finished.",
                  file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        """Stop the update worker, close the environments (their worker processes end), close the logs and let
        another process train in the folders (run() does this when it ends)."""
        if self._update_worker is not None:
            self._update_worker.shutdown(wait=True)
            self._update_worker = None
        try:
            self._close_envs()
        finally:
            for run in self.runs:
                try:
                    run.logger.close(finished=run.finished)
                finally:
                    run.lock.release()

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, from the last checkpoint
        self._stop_signal = signum
        print(f"sacae: received {signal.Signals(signum).name}; stopping after the current step with a checkpoint",
              file=sys.stderr, flush=True)  # fmt: skip

    def _stop(self) -> None:
        signum = self._stop_signal
        paths = self.checkpoint()
        name = signal.Signals(signum).name
        where = paths[0] if len(paths) == 1 else f"in each seed's folder ({len(paths)})"
        message = (
            f"stopped by {name} at env step {self.env_steps:,}; checkpoint {where} written; run the same command "
            f"again to resume"
        )
        self.write_status("stopped", message, runs=self.training_runs)
        raise RunStopped(signum, message)

    def step(self) -> None:
        """One agent step of the schedule, for every training seed: evaluate if due, checkpoint if due, start
        episodes where needed, pick a_t, run the update(s) of step t, step the environments with a_t and store the
        transitions. A stop signal may end it between two updates of the seed phase's burst; the step then
        continues after the resume.

        With overlap, a step's single update runs in the worker thread while the environments step; it has
        finished when step() returns, so nothing between steps (acting, evaluating, checkpointing, logging the
        losses) ever sees an update in flight."""
        cfg, schedule, t = self.cfg, self.schedule, self.agent_steps
        if self.pending is None:
            # A resumed run restarts at the step of its checkpoint, whose evaluation and checkpoint are done already.
            if schedule.evaluates(t) and self.last_eval != t:
                t0 = time.time()
                self.evaluate()
                for run in self.training_runs:
                    run.eval_seconds += time.time() - t0
            if schedule.checkpoints(t) and self.last_checkpoint != t:
                self.checkpoint()
            runs = self.training_runs
            if not runs:
                return
            self._start_episodes(runs)
            if schedule.seed_phase(t):
                actions = [run.env.sample_action(run.action_rng) for run in runs]
            else:
                actions = self.agent.act_seeds([run.obs for run in runs], sample=True)
                bad = [run for run, a in zip(runs, actions, strict=True) if not np.isfinite(a).all()]
                if bad:  # the actions are on the host already: this check is free
                    message = f"The policy produced a non-finite action at env step {self.env_steps:,}."
                    for run in bad:
                        self._fail(run, functools.partial(self.check_finite, run, parameters=True), message)
                    actions = [a for run, a in zip(runs, actions, strict=True) if run not in bad]
                    runs = self.training_runs
                    if not runs:
                        return
            self.pending = PendingStep(actions, schedule.updates_at(t))
        else:
            # Resumed inside a step whose episode the environment could not replay.
            self._start_episodes(self.training_runs)
        runs = self.training_runs
        pending = self.pending
        pool, indices = self.env_pool, self._env_indices(runs)
        in_flight = None
        stepping = False  # a step_async of the pool awaits its step_wait
        dones = []
        try:
            if self.overlap and pending.updates == 1 and pending.done == 0:
                # Worker processes step from step_async on; without workers step_async steps at once, so there the
                # update goes first, to run in its thread beside the stepping.
                if pool.workers != "serial":
                    pool.step_async(pending.actions, indices)
                    stepping = True
                in_flight = self._launch_update()
            elif not self._run_updates(pending):
                return  # stopped inside the burst
            if not stepping:
                pool.step_async(pending.actions, indices)
            stepping = False
            results = pool.step_wait()  # the seeds' environments stepped together, in the order of `runs`
            for run, action, result in zip(runs, pending.actions, results, strict=True):
                next_obs, reward, terminated, truncated, _ = result
                faults.reached("env_step")
                run.episode_reward += reward
                # The time limit is a truncation: keep bootstrapping through it (not_done = 1).
                run.replay.add(action, reward, next_obs, 0.0 if terminated else 1.0)
                run.obs = next_obs
                dones.append(terminated or truncated)
        except BaseException:
            if stepping:
                with contextlib.suppress(BaseException):
                    pool.step_wait()  # the pool's next call needs it
            if in_flight is not None:
                wait([in_flight])  # never leave the agent changing behind an error
            raise
        if in_flight is not None:
            in_flight.result()  # raises the update's own error, if any
            pending.done = 1
            faults.reached("update")
        self.agent_steps += 1
        self.pending = None
        if self.progress is not None:
            self.progress.update(cfg.action_repeat)

        for run, done in zip(runs, dones, strict=True):
            if done:
                duration = time.time() - run.episode_start - run.eval_seconds
                self._log_train_episode(run, run.episode_reward, duration)
                run.obs = None

    def _env_indices(self, runs: Sequence[SeedRun]) -> list[int]:
        """The places of `runs`' environments in the pools (seed i's are environment i of each)."""
        return [self.runs.index(run) for run in runs]

    def _start_episodes(self, runs: Sequence[SeedRun]) -> None:
        """Start an episode for each of `runs` that is between episodes, their environments reset together."""
        starting = [run for run in runs if run.obs is None]
        if starting:
            results = self.env_pool.reset(indices=self._env_indices(starting))
            for run, (obs, _) in zip(starting, results, strict=True):
                run.start_episode(obs)

    def _batches(self) -> list:
        return [run.replay.sample(self.cfg.batch_size) for run in self.training_runs]

    def _update(self, batches: list) -> None:
        if self.group:
            self.agent.update_seeds(batches, self.agent_steps)
        else:
            self.agent.update(batches[0], self.agent_steps)

    def _launch_update(self) -> Future:
        """Start the step's single update in the worker thread. Its batches are drawn and gathered here first: the
        replays' RNGs draw in the same order as without overlap, and each batch is its replay as it stands before
        this step's transition is stored (which may overwrite a frame slot once the ring is full). While the update
        is in flight only it uses torch's RNG: the environments use numpy's generators alone."""
        batches = self._batches()
        if self._update_worker is None:
            # Made now, after torch.set_num_threads: a thread keeps the thread count it first runs an operation with.
            device = self.device
            initializer = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
            self._update_worker = ThreadPoolExecutor(1, thread_name_prefix="sacae-update", initializer=initializer)
        return self._update_worker.submit(self._update, batches)

    def _run_updates(self, pending: PendingStep) -> bool:
        """Run the step's remaining updates; False when a stop signal ended them early."""
        n = pending.updates
        if n - pending.done == 1 and n == 1:
            self._update(self._batches())
            pending.done = 1
            faults.reached("update")
            return True
        if n == 0 or pending.done >= n:
            return True
        # The seed phase's burst takes minutes on a CPU: show it, as a bar on a terminal, else as log lines
        # (Slurm's stderr files) about every 10%.
        bar = tqdm(total=n, initial=pending.done, desc="seed-phase updates", unit=" updates", leave=False,
                   file=sys.stderr, disable=not sys.stderr.isatty())  # fmt: skip
        every = max(1, n // 10)
        start, first = time.time(), pending.done
        try:
            while pending.done < n:
                self._update(self._batches())
                pending.done += 1
                faults.reached("update")
                i = pending.done
                bar.update(1)
                if bar.disable and (i % every == 0 or i == n):
                    elapsed = time.time() - start
                    left = elapsed / (i - first) * (n - i)
                    print(f"sacae: seed-phase updates {i}/{n}, {elapsed:.0f} s, about {left:.0f} s left",
                          file=sys.stderr, flush=True)  # fmt: skip
                if self._stop_signal is not None and pending.done < n:
                    return False
        finally:
            bar.close()
        return True

    def _members(self) -> list[SeedRun]:
        """The seeds the agent holds, in the order of its seed axis (a failed seed leaves it)."""
        return [run for run in self.runs if run.failed is None]

    def _index(self, run: SeedRun) -> int | None:
        """The seed's row in the group agent's metrics (None for a single seed)."""
        return self._members().index(run) if self.group else None

    def _row(self, run: SeedRun) -> int:
        return self._members().index(run)

    def _log_train_episode(self, run: SeedRun, episode_reward: float, duration: float) -> None:
        metrics = self.agent.metrics.pop(self._index(run))
        if not self._fail_if_nonfinite(run):
            return
        row: dict[str, Any] = {
            "episode": run.episode,
            "env_steps": self.env_steps,
            "agent_steps": self.agent_steps,
            "duration": duration,
            "episode_reward": episode_reward,
            **metrics,
            "env_steps_per_second": run.env.episode_env_steps / max(duration, 1e-9),
        }
        run.logger.log("train", row)
        self.write_status("running", runs=[run])

    def _fail_if_nonfinite(self, run: SeedRun, parameters: bool = False) -> bool:
        """Whether the seed is still sound; a seed of a group that is not stops here (its status says why)."""
        return self._fail(run, lambda: self.check_finite(run, parameters))

    def _fail(self, run: SeedRun, check, message: str | None = None) -> bool:
        """Run `check` (which raises NumericalError for `run`), or fail `run` with `message`. One seed raises; a
        group drops the seed from its agent, records it in the seed's status.json and goes on."""
        try:
            check()
            if message is not None:
                raise NumericalError(message)
        except NumericalError as e:
            if not self.group:
                raise
            index = self._index(run)
            kept = [i for i in range(len(self._members())) if i != index]
            run.failed = str(e)
            run.obs = None
            if self.pending is not None:
                self.pending.actions = [self.pending.actions[i] for i in kept]
            if kept:
                self.agent.keep(kept)
            print(f"sacae: seed {run.seed}: {e} The other seeds train on.", file=sys.stderr, flush=True)
            self.write_status("failed", str(e), runs=[run], numerical=True)
            return False
        return True

    def check_finite(self, run: SeedRun | None = None, parameters: bool = False) -> None:
        """NumericalError naming the first loss (or parameter) of the seed that became NaN or infinite."""
        run = run or self.runs[0]
        index = self._index(run)
        bad = self.agent.metrics.nonfinite(index)
        kept = run.store.states()
        keep = f"the last good checkpoint {kept[0]} is kept" if kept else "no checkpoint had been written yet"
        if bad:
            name, step = min(bad.items(), key=lambda kv: kv[1])
            raise NumericalError(
                f"The {name} became non-finite (NaN or infinite) in the update at agent step {step:,} (env step "
                f"{self.schedule.env_steps(step):,}); training stopped and {keep}."
            )
        if parameters:
            names = self.agent.nonfinite_parameters(*(() if index is None else (index,)))
            if names:
                raise NumericalError(
                    f"The parameters {', '.join(names[:3])} hold NaN or infinite values at env step "
                    f"{self.env_steps:,}; training stopped and {keep}."
                )

    def evaluate(self) -> None:
        """Every training seed's evaluation at this step, the seeds' episodes run side by side: for each seed the
        episodes, environment seeds and deterministic actions of `evaluate_agent`."""
        cfg = self.cfg
        for run in list(self.training_runs):
            self._fail_if_nonfinite(run)
        runs = self.training_runs
        if not runs:
            return
        start = time.time()
        self.last_eval = self.agent_steps
        self.agent.train(False)
        video = cfg.save_video
        returns: list[list[float]] = [[] for _ in runs]
        indices = self._env_indices(runs)
        for episode in range(cfg.num_eval_episodes):
            seeds = [eval_seed(run.seed, self.env_steps) if episode == 0 else None for run in runs]
            obs = [first for first, _ in self.eval_pool.reset(seeds=seeds, indices=indices)]
            if episode == 0 and video:
                for run in runs:
                    run.video.init()
                    run.video.record(run.eval_env)  # renders on the environment's worker
            totals, done = [0.0] * len(runs), [False] * len(runs)
            while not all(done):
                actions = self.agent.act_seeds(obs, sample=False)
                going = [i for i in range(len(runs)) if not done[i]]
                results = self.eval_pool.step([actions[i] for i in going], indices=[indices[i] for i in going])
                for i, (next_obs, reward, terminated, truncated, _) in zip(going, results, strict=True):
                    obs[i] = next_obs
                    totals[i] += reward
                    done[i] = terminated or truncated
                    if episode == 0 and video:
                        runs[i].video.record(runs[i].eval_env)
            for i, run in enumerate(runs):
                if episode == 0 and video:
                    run.video.save(str(self.env_steps))
                returns[i].append(totals[i])
            faults.reached("eval_episode")
        self.agent.train(True)
        duration = time.time() - start
        for run, seed_returns in zip(runs, returns, strict=True):
            row = {
                "episode": run.episode,
                "env_steps": self.env_steps,
                "agent_steps": self.agent_steps,
                "episode_reward": float(np.mean(seed_returns)) if seed_returns else None,
                "episode_reward_std": float(np.std(seed_returns)) if seed_returns else None,
                "episode_rewards": seed_returns,
                "duration": duration,
            }
            video_path = run.video.folder / f"{self.env_steps}.mp4" if video and seed_returns else None
            run.logger.log("eval", row, video=video_path)
            if cfg.save_model:
                path = run.model_dir / f"{self.env_steps}.pt"
                with writing(path, "a snapshot of the networks"):
                    save_snapshot(path, self, run, self.agent.seed_state_dict(self._row(run)))

    # ---------------------------------------------------------------------------------------------------------
    def checkpoint(self) -> list[Path]:
        """Write a full checkpoint of every seed as it stands (between steps or inside the seed-phase burst), each
        into its own folder, at the same agent step; a failed seed's folder keeps its last good one."""
        for run in list(self.training_runs):
            self._fail_if_nonfinite(run, parameters=True)
        paths = []
        runs = self.training_runs
        finished = [run for run in self.runs if run.finished and run.failed is None]
        for run in runs if runs else finished:
            i = self._row(run)
            pending = None
            if self.pending is not None and run.training:
                p = self.pending
                action = torch.from_numpy(np.asarray(p.actions[runs.index(run)]))
                pending = {"action": action, "updates": p.updates, "done": p.done}
            state = {
                "config": run.cfg.to_dict(),
                "agent_steps": self.agent_steps,
                "env_steps": self.env_steps,
                "episode": run.episode,
                "episode_reward": run.episode_reward,
                "last_eval": self.last_eval,
                "finished": run.finished,
                "pending": pending,
                "agent": self.agent.seed_state_dict(i),
                "metrics": self.agent.metrics.state_dict(self._index(run)),
                "replay": run.replay.state_dict(),
                "rng": run.rng_state(),
                "env": to_tensors(run.env.get_state()),
                "log_sizes": run.logger.sizes(),
                "resumes": run.resumes,
                "elapsed_seconds": self.elapsed_seconds(run),
                "sessions": self.sessions(run),
            }
            paths.append(run.store.save(state, run.replay, self.agent_steps))
        self.last_checkpoint = self.agent_steps
        return paths

    def write_status(self, state: str, message: str = "", runs: Sequence[SeedRun] | None = None,
                     numerical: bool = False) -> None:  # fmt: skip
        """Each seed's WORK_DIR/status.json: what `sacae status` and the sweep read to know where the run stands.
        By default the seeds still training."""
        for run in self.training_runs if runs is None else runs:
            status = {
                "state": state,
                "env_steps": self.env_steps,
                "total_env_steps": self.schedule.env_steps(self.cfg.num_train_steps),
                "agent_steps": self.agent_steps,
                "elapsed_seconds": round(self.elapsed_seconds(run), 3),
                "session_env_steps_per_second": self._session_speed(),
                "resumes": run.resumes,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "time": time.time(),
                "message": message,
                "sessions": self.sessions(run),
            }
            if self.group:
                status["seeds_in_process"] = [r.seed for r in self.runs]
            if numerical:
                # Read back by the next run of the group: this seed is not resumed (it would fail again) and its
                # last checkpoint does not hold the other seeds back.
                status[FAILED_SEED] = True
            write_status(run.work_dir, status)

    def sessions(self, run: SeedRun | None = None) -> list[dict[str, Any]]:
        """Every session (process) that trained this run, this one last: its machine, the env steps it took the run
        from and to, and its seconds. A session that only reopened a finished run adds nothing."""
        run = run or self.runs[0]
        if run.reopened_finished_run:
            return run.earlier_sessions
        current = {
            **self.session,
            "to_env_steps": self.env_steps,
            "seconds": round(time.time() - self.session_start, 1),
        }
        return [*run.earlier_sessions, current]

    def _session_speed(self) -> float | None:
        seconds = time.time() - self.session_start
        done = self.env_steps - self.session["from_env_steps"]
        return round(done / seconds, 3) if done > 0 and seconds > 0 else None


FAILED_SEED = "seed_failed"


def failed_in_group(work_dir: Path) -> str | None:
    """The message of a seed that a group stopped for non-finite numbers (its status.json says so), else None."""
    status = read_status(work_dir)
    if status is not None and status.get(FAILED_SEED) is True and status.get("state") == "failed":
        return status.get("message") or "failed"
    return None


def seed_console(seed: int, console=None):
    """A group's console: each line prefixed with its seed."""
    out = console if console is not None else sys.stdout
    return lambda line: print(f"seed {seed} {line}", file=out, flush=True)


def check_group_config(cfg: TrainConfig, seeds: Sequence[int]) -> None:
    """SacaeError for a seed list a group cannot train. A group named by --seeds resumes when the same command runs
    again; `sacae train-seeds --resume GROUP_DIR` resumes one by its folder (`load_group_resume_configs`), so
    --resume here (a sweep's training flags) is refused."""
    if not seeds:
        raise SacaeError("--seeds needs at least one seed.")
    if len(set(seeds)) != len(seeds):
        raise SacaeError(f"--seeds lists a seed twice ({' '.join(map(str, seeds))}).")
    if cfg.resume is not None:
        raise SacaeError(
            f"A group of seeds resumes when the same command runs again; drop --resume {cfg.resume} (`sacae "
            f"train-seeds --resume RUNS_DIR/<task>/<configuration>` resumes a group by its folder)."
        )


def check_group_memory(runs: Sequence[SeedRun], device: torch.device) -> ReplayPlacement:
    """Where a group's replay frames live, sized for all its seeds (each seed's own check counted one): every
    seed's replay buffer and networks (with their update) in host or GPU memory, so that `auto` puts the frames on
    the GPU only when every seed's fit there; SacaeError before training otherwise. Sets each seed's placement."""
    run = runs[0]
    spec = run.env.spec
    if device.type == "cuda":
        # The seeds' networks, built already, hold memory that the free figure now lacks and the estimate counts.
        held = torch.cuda.memory_reserved(device)
    else:
        # (the actor shares the critic's convolutions: each tensor once)
        tensors = {id(t): t for r in runs for net in r.agent.networks().values() for t in [*net.parameters(),
                                                                                         *net.buffers()]}  # fmt: skip
        held = sum(t.numel() * t.element_size() for t in tensors.values())
    placement = check_replay_fits(
        run.cfg, device, spec.frame_shape, np.dtype(spec.obs_dtype).itemsize, spec.action_dim, len(runs), held
    )
    for r in runs:
        r.placement = placement
    return placement


def check_work_dir(cfg: TrainConfig, work: Path) -> bool:
    """Whether training in `work` starts over from nothing (True: remove the outputs of the run there first), or
    SacaeError when it may not train there at all. Only reads the folder."""
    if not work.exists():
        return False
    if not work.is_dir():
        raise SacaeError(f"The work dir {work} is a file, not a folder; choose another --work_dir.")
    if not is_run(work):
        foreign = foreign_entries(work)
        if foreign:
            logs = any(name in foreign for name in ("train.log", "eval.log"))
            shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
            raise SacaeError(
                f"{work} holds {'logs' if logs else 'files'} but no config.json: it is not a sacae run (it holds "
                f"{shown}) and sacae only writes into a new, empty or run folder; choose another --work_dir."
            )
        return False
    if cfg.no_resume:
        finished = run_finished(work)
        if finished is None and not cfg.force:
            raise SacaeError(
                f"{work} holds a run whose state cannot be read (no readable checkpoint or status.json), so it may "
                f"be finished; add --force to discard it and start over, or choose another --work_dir."
            )
        if finished and not cfg.force:
            raise SacaeError(
                f"{work} holds a finished run; add --force to discard it and start over, or choose another --work_dir."
            )
        return True
    saved = TrainConfig.load(work / "config.json")
    differ = [
        k
        for k, v in resolve(saved).to_dict().items()
        if k not in EXECUTION_FIELDS and k != "work_dir" and cfg.to_dict()[k] != v
    ]
    if differ:
        shown = ", ".join(f"--{k} {getattr(saved, k)} (now {getattr(cfg, k)})" for k in differ[:4])
        raise SacaeError(
            f"{work} holds a run with a different configuration ({shown}); run it with its own flags to resume it "
            f"(or `sacae train --resume {work}`), add --no_resume to start over there, or choose another --work_dir."
        )
    return False


def load_resume_config(cfg: TrainConfig) -> TrainConfig:
    """With --resume RUN_DIR: the run's saved configuration, in that folder. Execution flags (device, threads,
    overlap, replay device) set away from their defaults on this command line replace the saved ones: they change
    where and how fast the run goes, not what it computes."""
    if cfg.resume is None:
        return cfg
    run_dir = Path(cfg.resume)
    if not run_dir.is_dir():
        raise SacaeError(f"--resume {run_dir}: there is no such run directory.")
    if not (run_dir / "config.json").exists():
        raise SacaeError(f"--resume {run_dir}: the folder has no config.json, so it is not a sacae run.")
    saved = TrainConfig.load(run_dir / "config.json")
    return dataclasses.replace(saved, work_dir=os.fspath(run_dir), **execution_overrides(cfg))


def execution_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """The execution flags (EXECUTION_FIELDS) that `cfg`, a command line, sets away from their defaults."""
    defaults = TrainConfig()
    return {k: getattr(cfg, k) for k in EXECUTION_FIELDS if getattr(cfg, k) != getattr(defaults, k)}


def load_group_resume_configs(cfg: TrainConfig, seeds: Sequence[int] = ()) -> list[TrainConfig]:
    """With `sacae train-seeds --resume GROUP_DIR`: the saved configurations of the group's seeds, one per subfolder
    of GROUP_DIR (RUNS_DIR/<task>/<configuration>, holding seed_<i>/) that holds a config.json, in seed order; with
    `seeds`, those seeds only (each must be there), in that order. A seed folder (one holding config.json) names
    that seed of its group, the folder above it (with `seeds`: the group, those seeds). The seeds' configurations
    must agree except for seed and work dir; execution flags set away from their defaults on this command line
    replace the saved ones, as `load_resume_config` does for one run. SacaeError, one sentence, otherwise."""
    given = Path(cfg.resume)
    flag = f"--resume {given}"
    if not given.is_dir():
        raise SacaeError(f"{flag}: there is no such folder.")
    group_dir = given
    if (given / "config.json").is_file():  # one seed's folder: its group is the folder above
        group_dir = given.parent
        if not seeds:
            seeds = [TrainConfig.load(given / "config.json").seed]
    found: dict[int, tuple[Path, TrainConfig]] = {}
    for folder in sorted(p for p in group_dir.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        saved = TrainConfig.load(folder / "config.json")
        if saved.seed in found:
            raise SacaeError(
                f"{flag}: {found[saved.seed][0].name} and {folder.name} both hold a run of seed {saved.seed}, so the "
                f"group is ambiguous; move one of them out of {group_dir}."
            )
        found[saved.seed] = (folder, saved)
    if not found:
        inner = sorted(p.name for p in group_dir.iterdir() if p.is_dir() and any(p.glob("*/config.json")))
        name = f"its subfolders {', '.join(inner[:4])} hold groups: name one" if inner else "name a group's folder"
        raise SacaeError(
            f"{flag}: the folder holds no seed folders (subfolders with a config.json); {name}, "
            f"RUNS_DIR/<task>/<configuration>."
        )
    check_group_config(dataclasses.replace(cfg, resume=None), list(seeds or found))
    missing = [s for s in seeds if s not in found]
    if missing:
        have = f"seed{'s' if len(found) > 1 else ''} {' '.join(str(s) for s in sorted(found))}"
        raise SacaeError(
            f"{flag} --seeds: the group in {group_dir} has no seed {missing[0]} (it holds {have}); list only those, "
            f"or drop --seeds to resume them all."
        )
    chosen = list(seeds) if seeds else sorted(found)
    overrides = execution_overrides(cfg)
    first_dir, first = found[chosen[0]]
    ignored = {"seed", "work_dir", *overrides}
    for s in chosen[1:]:
        folder, saved = found[s]
        differ = [k for k, v in saved.to_dict().items() if k not in ignored and first.to_dict()[k] != v]
        if not differ:
            continue
        shown = ", ".join(f"--{k} {getattr(first, k)} ({folder.name}: {getattr(saved, k)})" for k in differ[:4])
        if all(k in EXECUTION_FIELDS for k in differ):
            raise SacaeError(
                f"{flag}: {first_dir.name} and {folder.name} last ran with different execution flags ({shown}); give "
                f"{' '.join(f'--{k}' for k in differ)} on this command line to choose the group's."
            )
        raise SacaeError(
            f"{flag}: {first_dir.name} and {folder.name} hold different configurations ({shown}), so they are not one "
            f"group; resume each with `sacae train --resume SEED_DIR`, or list --seeds that agree."
        )
    return [resolve(dataclasses.replace(found[s][1], work_dir=os.fspath(found[s][0]), **overrides)) for s in chosen]


def len_fmt(nbytes: float) -> str:
    return f"{nbytes / 1e3:.1f} KB" if nbytes >= 1e3 else f"{nbytes:.0f} B"


# ------------------------------------------------------------------------------------------------------------
def save_snapshot(path: Path, trainer: Trainer, run: SeedRun | None = None, state: dict | None = None) -> None:
    """A seed's networks and temperature at this point, with the config that built them (loads with
    weights_only)."""
    run = run or trainer.runs[0]
    state = state if state is not None else trainer.agent.seed_state_dict(0)
    save_torch_atomic(
        {
            "config": run.cfg.to_dict(),
            "env_steps": trainer.env_steps,
            "agent_steps": trainer.agent_steps,
            "networks": state["networks"],
            "log_alpha": state["log_alpha"],
        },
        path,
    )


def latest_snapshot(run_dir: Path) -> Path:
    """The run's newest snapshot, model/<env_steps>.pt; other files there (notes.pt, copies) are not snapshots."""
    model = run_dir / "model"
    snapshots = [p for p in model.glob("*.pt") if p.stem.isascii() and p.stem.isdigit() and p.is_file()]
    if not snapshots:
        raise SacaeError(f"{run_dir} has no snapshot in model/; train with --save_model to write them.")
    return max(snapshots, key=lambda p: int(p.stem))


# Settings that shape the networks or the observations: where a snapshot that does not load differs from the run.
_NETWORK_SETTINGS = ("domain_name", "task_name", "encoder_type", "decoder_type", "image_size", "frame_stack",
                     "action_repeat", "hidden_dim", "encoder_feature_dim", "num_layers", "num_filters")  # fmt: skip


def _snapshot_mismatch(path: Path, state: dict[str, Any], cfg: TrainConfig, run_dir: Path) -> SacaeError:
    saved = state.get("config")
    differ = [k for k in _NETWORK_SETTINGS if isinstance(saved, dict) and k in saved and saved[k] != getattr(cfg, k)]
    if differ:
        theirs = ", ".join(f"{k} {saved[k]}" for k in differ)
        ours = ", ".join(f"{k} {getattr(cfg, k)}" for k in differ)
        return SacaeError(f"{path} holds the networks of another configuration ({theirs}) than the run in {run_dir} "
                          f"({ours}); give a snapshot of this run with --snapshot.")  # fmt: skip
    return SacaeError(f"{path} does not fit the networks of the run in {run_dir}; give a snapshot of this run with "
                      "--snapshot.")  # fmt: skip


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())


def evaluate_run(
    run_dir: str | Path,
    snapshot: str | None = None,
    num_episodes: int | None = None,
    save_video: bool = True,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Load a run's snapshot, evaluate it and (optionally) write a video; returns a summary row. A missing or
    damaged config.json or snapshot, or a snapshot of another configuration, is a SacaeError in one sentence."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SacaeError(f"There is no run directory {run_dir}.")
    cfg = resolve(TrainConfig.from_dict(read_config(run_dir)))
    path = Path(snapshot) if snapshot else latest_snapshot(run_dir)
    dev = select_device(device)
    state = load_torch(path, map_location=dev)
    networks = state.get("networks") if isinstance(state, dict) else None
    if not isinstance(networks, dict) or not all(_is_tensor_dict(v) for v in networks.values()):
        raise SacaeError(f"{path} is not a sacae snapshot (it has no networks).")
    if not torch.is_tensor(state.get("log_alpha")):
        raise SacaeError(f"{path} is not a sacae snapshot (it has no temperature, log_alpha).")
    env = make_env(cfg, seed=seed)
    try:
        agent = SacAeAgent(env.spec.obs_shape, env.spec.action_dim, cfg, dev)
    except (RuntimeError, ValueError) as e:
        raise SacaeError(f"The networks that {run_dir / 'config.json'} describes cannot be built ({e}).") from None
    try:
        agent.load_state_dict({"networks": networks, "log_alpha": state["log_alpha"]})
    except (KeyError, RuntimeError):
        raise _snapshot_mismatch(path, state, cfg, run_dir) from None
    video = VideoRecorder(run_dir / "video") if save_video else None
    n = cfg.num_eval_episodes if num_episodes is None else num_episodes
    video_name = f"eval_{path.stem}"
    returns = evaluate_agent(agent, env, n, seed, video, video_name)
    video_path = run_dir / "video" / f"{video_name}.mp4" if video is not None and n > 0 else None
    env_steps = state.get("env_steps")
    return {
        "snapshot": os.fspath(path),
        "env_steps": env_steps if isinstance(env_steps, int) and not isinstance(env_steps, bool) else None,
        "episode_reward": float(np.mean(returns)) if returns else None,
        "episode_rewards": returns,
        "video": os.fspath(video_path) if video_path else None,
    }
