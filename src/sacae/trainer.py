"""The training loop: collect, update every agent step after the seed phase, evaluate every `eval_freq` steps.

The loop follows the authors' release step by step (pick a_t, run the update(s) of step t on the replay as it
stands, step the environment with a_t, store the transition) and counts both clocks explicitly: `agent_steps`
(decisions) and `env_steps` (simulator steps, agent steps x action repeat), the one we print and plot. With
`--overlap` the update of step t runs in a worker thread while the environment steps with a_t: neither depends
on the other, so the math is the same, step for step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import socket
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sacae import faults
from sacae.agent import SacAeAgent
from sacae.checkpoint import CheckpointStore, numpy_legacy_state, numpy_legacy_tuple, to_arrays, to_tensors
from sacae.config import EXECUTION_FIELDS, TrainConfig, resolve
from sacae.envs import DMCEnv, make_env
from sacae.errors import NumericalError, RunStopped, SacaeError
from sacae.logger import Logger, count
from sacae.placement import check_replay_device, check_replay_fits, replay_transitions
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
    """An agent step whose action is chosen and whose updates are under way (a checkpoint may fall inside it)."""

    action: np.ndarray
    updates: int
    done: int = 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# How long a run waits for the work-dir lock of a process on another machine (a requeued Slurm job whose previous
# node is gone holds its NFS lock until the lease expires, about 90 s on NFSv4).
LOCK_WAIT_SECONDS = 150.0


class Trainer:
    """One training run: environments, agent, replay, outputs, and the loop that ties them together.

    Running the same configuration again in the same work dir resumes the run from its newest checkpoint, exactly:
    the resumed run writes the logs and weights the uninterrupted one would have written.
    """

    def __init__(self, cfg: TrainConfig, console=None):
        cfg = resolve(load_resume_config(resolve(cfg)))
        self.cfg = cfg
        self.device = select_device(cfg.device)
        check_replay_device(cfg, self.device)
        # Overlap pays where the update runs elsewhere than the environment (a GPU); on a CPU both share the cores.
        self.overlap = cfg.overlap == "on" or (cfg.overlap == "auto" and self.device.type == "cuda")
        self._update_worker: ThreadPoolExecutor | None = None
        configure_process(cfg.num_threads)
        # Every refusal comes before the first write: a refused command leaves the folder as it found it.
        check_work_dir(cfg, Path(cfg.work_dir))
        check_installed(cfg.trackers)

        seed_everything(cfg.seed)
        self.env = make_env(cfg, seed=cfg.seed)
        self.eval_env = make_env(cfg, seed=cfg.seed)
        spec = self.env.spec
        itemsize = np.dtype(spec.obs_dtype).itemsize
        self.replay_placement = check_replay_fits(cfg, self.device, spec.frame_shape, itemsize, spec.action_dim)
        self.replay_bytes = self.replay_placement.needed
        self._replay_seed, action_seed = np.random.SeedSequence(cfg.seed).spawn(2)
        self.replay: ReplayBuffer | None = None  # made or loaded by _restore, once: it may fill a GPU
        self.action_rng = np.random.default_rng(action_seed)
        self.agent = SacAeAgent(spec.obs_shape, spec.action_dim, cfg, self.device)

        self.work_dir = check_writable(cfg.work_dir)
        self.lock = WorkDirLock(self.work_dir, wait_seconds=LOCK_WAIT_SECONDS)
        try:
            # Again under the lock: another process may have changed the folder since the first look.
            start_over = check_work_dir(cfg, self.work_dir)
        except BaseException:
            self.lock.release()
            raise
        try:
            if start_over:
                left = remove_outputs(self.work_dir)
                if left:
                    print(f"sacae: starting over in {self.work_dir}; kept what sacae did not write there: "
                          f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}", file=sys.stderr)  # fmt: skip
            self.store = CheckpointStore(self.work_dir)
            self.model_dir = self.work_dir / "model"
            self.video = VideoRecorder(self.work_dir / "video" if cfg.save_video else None)

            self.agent_steps = 0
            self.episode = 0
            self.progress = None
            # The episode in progress (obs is None between episodes) and the evaluation clock.
            self.obs = None
            self.episode_reward, self.episode_start, self.eval_seconds = 0.0, time.time(), 0.0
            self.last_eval: int | None = None
            self.last_checkpoint: int | None = None
            self.pending: PendingStep | None = None
            self.finished = False
            self.resumed_from: Path | None = None
            self.resumes = 0
            self.elapsed_before = 0.0  # training seconds of the earlier sessions of this run
            self.session_start = time.time()
            self.earlier_sessions: list[dict[str, Any]] = []  # one record per earlier session (process) of this run
            self.session = describe_session(self.device)
            self._stop_signal: int | None = None

            log_sizes = self._restore()
            self.session["from_env_steps"] = self.env_steps
            self.reopened_finished_run = self.finished
            config_path = self.work_dir / "config.json"
            with writing(config_path, "the run's configuration"):
                if not config_path.is_file() or config_path.read_text() != cfg.to_json():
                    write_text_atomic(config_path, cfg.to_json())
                if cfg.save_model:
                    self.model_dir.mkdir(exist_ok=True)
            purge = self.env_steps + 1 if self.resumed_from is not None else None
            self.logger = Logger(self.work_dir, save_tb=cfg.save_tb, console=console, truncate=log_sizes,
                                 purge_step=purge, trackers=cfg.trackers,
                                 config={**cfg.to_dict(), "configuration": cfg.configuration})  # fmt: skip
        except BaseException as e:
            if is_run(self.work_dir) and not isinstance(e, KeyboardInterrupt):
                with contextlib.suppress(Exception):
                    status = read_status(self.work_dir) or {}
                    message = str(e) if isinstance(e, SacaeError) else f"{type(e).__name__}: {e}"
                    write_status(self.work_dir, {**status, "state": "failed", "message": message, "pid": os.getpid(),
                                                 "host": socket.gethostname(), "time": time.time()})  # fmt: skip
            self.lock.release()
            raise

    def _new_replay(self) -> ReplayBuffer:
        return new_replay(self.cfg, self.env, self.device, self._replay_seed, self.replay_placement.frames_device)

    def _restore(self) -> dict[str, int]:
        """Load the newest readable checkpoint, if any; returns the log sizes to truncate the logs to."""
        loaded = self.store.load_latest(self._new_replay)
        if loaded is None:
            self.replay = self._new_replay()
            # Nothing to resume from: the TensorBoard events of an earlier attempt are rewritten from the start.
            remove_outputs(self.work_dir, ("tb",))
            return {"train": 0, "eval": 0}
        state, self.replay = loaded
        self.resumed_from = self.store.states()[0]
        self.agent.load_state_dict(state["agent"])
        self.agent.metrics.load_state_dict(state["metrics"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(numpy_legacy_tuple(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.action_rng.bit_generator.state = rng["action"]
        self.obs = self.env.set_state(to_arrays(state["env"]))
        self.agent_steps, self.episode = state["agent_steps"], state["episode"]
        self.episode_reward = state["episode_reward"]
        self.last_eval, self.last_checkpoint = state["last_eval"], state["agent_steps"]
        pending = state["pending"]
        if pending is not None:
            self.pending = PendingStep(pending["action"].numpy(), pending["updates"], pending["done"])
        self.finished = state["finished"]
        self.resumes = state["resumes"] + (0 if self.finished else 1)
        self.elapsed_before = state["elapsed_seconds"]
        # Checkpoints written before sessions were recorded have none: their earlier sessions stay unknown.
        self.earlier_sessions = list(state.get("sessions", []))
        return state["log_sizes"]

    # ---------------------------------------------------------------------------------------------------------
    @property
    def env_steps(self) -> int:
        return self.agent_steps * self.cfg.action_repeat

    @property
    def elapsed_seconds(self) -> float:
        return self.elapsed_before + time.time() - self.session_start

    def updates_at(self, agent_steps: int) -> int:
        """How many updates run at this agent step (the seed phase's burst, or its spread, included)."""
        init = self.cfg.init_steps
        if agent_steps < init or agent_steps == 0:  # nothing stored yet at step 0
            return 0
        if self.cfg.seed_updates == "burst":
            return init if agent_steps == init else 1
        return 2 if agent_steps < 2 * init - 1 else 1

    def describe(self) -> str:
        cfg = self.cfg
        per = self.replay.bytes_per_transition
        threads = torch.get_num_threads()
        return (
            f"sacae: {cfg.configuration} on {cfg.env_name} (action repeat {cfg.action_repeat}), "
            f"{cfg.num_train_steps:,} agent steps = {cfg.num_train_steps * cfg.action_repeat:,} env steps, "
            f"device {self.device}, {cfg.precision}, {count(threads, 'thread')}, overlap "
            f"{'on' if self.overlap else 'off'}; replay {len_fmt(per)} per transition, "
            f"{self.replay_bytes / 1e9:.2f} GB for {self.replay.capacity:,}, {self.replay_placement.describe()}; "
            f"output in {self.work_dir}"
        )

    # ---------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Train to the end (or until a stop signal, then raise RunStopped after writing a checkpoint)."""
        cfg = self.cfg
        if self.finished:
            print(f"sacae: the run in {self.work_dir} is already finished ({self.env_steps:,} env steps); "
                  f"nothing to do.", file=sys.stderr, flush=True)  # fmt: skip
            self.logger.close()
            return
        print(self.describe(), file=sys.stderr, flush=True)
        if self.resumed_from is not None:
            print(f"sacae: resuming from {self.resumed_from} at env step {self.env_steps:,}", file=sys.stderr,
                  flush=True)  # fmt: skip
        self.progress = tqdm(
            total=cfg.num_train_steps * cfg.action_repeat,
            initial=self.env_steps,
            unit=" env steps",
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
            desc=f"{cfg.configuration} {cfg.env_name}",
        )
        if not self.progress.disable:
            self.logger.console_write = lambda line: tqdm.write(line, file=sys.stdout)
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self.write_status("running")
            while self.agent_steps < cfg.num_train_steps or self.pending is not None:
                self.step()
                if self._stop_signal is not None:
                    self._stop()
            if self.last_eval != self.agent_steps:
                self.evaluate()
            self.finished = True
            self.checkpoint()
            self.write_status("finished")
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

    def close(self) -> None:
        """Stop the update worker, close the logs and let another process train here (run() does this when it
        ends)."""
        if self._update_worker is not None:
            self._update_worker.shutdown(wait=True)
            self._update_worker = None
        try:
            self.logger.close(finished=self.finished)
        finally:
            self.lock.release()

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, from the last checkpoint
        self._stop_signal = signum
        print(f"sacae: received {signal.Signals(signum).name}; stopping after the current step with a checkpoint",
              file=sys.stderr, flush=True)  # fmt: skip

    def _stop(self) -> None:
        signum = self._stop_signal
        path = self.checkpoint()
        name = signal.Signals(signum).name
        message = (
            f"stopped by {name} at env step {self.env_steps:,}; checkpoint {path} written; run the same command "
            f"again to resume"
        )
        self.write_status("stopped", message)
        raise RunStopped(signum, message)

    def step(self) -> None:
        """One agent step of the schedule: evaluate if due, checkpoint if due, start an episode if needed, pick
        a_t, run the update(s) of step t, step the environment with a_t and store the transition. A stop signal
        may end it between two updates of the seed phase's burst; the step then continues after the resume.

        With overlap, a step's single update runs in the worker thread while the environment steps; it has
        finished when step() returns, so nothing between steps (acting, evaluating, checkpointing, logging the
        losses) ever sees an update in flight."""
        cfg = self.cfg
        if self.pending is None:
            if self.agent_steps % cfg.eval_freq == 0 and self.last_eval != self.agent_steps:
                t0 = time.time()
                self.evaluate()
                self.eval_seconds += time.time() - t0
            every = cfg.checkpoint_agent_steps
            if every and self.agent_steps % every == 0 and self.agent_steps > 0:
                if self.last_checkpoint != self.agent_steps:
                    self.checkpoint()
            if self.obs is None:
                self._start_episode()
            if self.agent_steps < cfg.init_steps:
                action = self.env.sample_action(self.action_rng)
            else:
                action = self.agent.act(self.obs, sample=True)
                if not np.isfinite(action).all():  # the action is on the host already: this check is free
                    self.check_finite(parameters=True)
                    raise NumericalError(f"The policy produced a non-finite action at env step {self.env_steps:,}.")
            self.pending = PendingStep(action, self.updates_at(self.agent_steps))
        elif self.obs is None:  # resumed inside a step whose episode the environment could not replay
            self._start_episode()
        pending = self.pending
        in_flight = None
        if self.overlap and pending.updates == 1 and pending.done == 0:
            in_flight = self._launch_update()
        elif not self._run_updates(pending):
            return  # stopped inside the burst

        action = pending.action
        try:
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            faults.reached("env_step")
            self.episode_reward += reward
            # The time limit is a truncation: keep bootstrapping through it (not_done = 1).
            self.replay.add(action, reward, next_obs, 0.0 if terminated else 1.0)
        except BaseException:
            if in_flight is not None:
                wait([in_flight])  # never leave the agent changing behind an error
            raise
        if in_flight is not None:
            in_flight.result()  # raises the update's own error, if any
            pending.done = 1
            faults.reached("update")
        self.obs = next_obs
        self.agent_steps += 1
        self.pending = None
        if self.progress is not None:
            self.progress.update(cfg.action_repeat)

        if terminated or truncated:
            duration = time.time() - self.episode_start - self.eval_seconds
            self._log_train_episode(self.episode_reward, duration)
            self.obs = None

    def _start_episode(self) -> None:
        self.obs, _ = self.env.reset()
        self.replay.start_episode(self.obs)
        self.episode_reward, self.episode_start, self.eval_seconds = 0.0, time.time(), 0.0
        self.episode += 1

    def _launch_update(self) -> Future:
        """Start the step's single update in the worker thread. Its batch is drawn and gathered here first: the
        replay's RNG draws in the same order as without overlap, and the batch is the replay as it stands before
        this step's transition is stored (which may overwrite a frame slot once the ring is full). While the update
        is in flight only it uses torch's RNG: the environment uses numpy's generators alone."""
        batch = self.replay.sample(self.cfg.batch_size)
        if self._update_worker is None:
            # Made now, after torch.set_num_threads: a thread keeps the thread count it first runs an operation with.
            device = self.device
            initializer = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
            self._update_worker = ThreadPoolExecutor(1, thread_name_prefix="sacae-update", initializer=initializer)
        return self._update_worker.submit(self.agent.update, batch, self.agent_steps)

    def _run_updates(self, pending: PendingStep) -> bool:
        """Run the step's remaining updates; False when a stop signal ended them early."""
        n = pending.updates
        if n - pending.done == 1 and n == 1:
            self.agent.update(self.replay.sample(self.cfg.batch_size), self.agent_steps)
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
                self.agent.update(self.replay.sample(self.cfg.batch_size), self.agent_steps)
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

    def _log_train_episode(self, episode_reward: float, duration: float) -> None:
        metrics = self.agent.metrics.pop()
        self.check_finite()
        row: dict[str, Any] = {
            "episode": self.episode,
            "env_steps": self.env_steps,
            "agent_steps": self.agent_steps,
            "duration": duration,
            "episode_reward": episode_reward,
            **metrics,
            "env_steps_per_second": self.env.episode_env_steps / max(duration, 1e-9),
        }
        self.logger.log("train", row)
        self.write_status("running")

    def check_finite(self, parameters: bool = False) -> None:
        """NumericalError naming the first loss (or parameter) that became NaN or infinite."""
        bad = self.agent.metrics.nonfinite()
        kept = self.store.states()
        keep = f"the last good checkpoint {kept[0]} is kept" if kept else "no checkpoint had been written yet"
        if bad:
            name, step = min(bad.items(), key=lambda kv: kv[1])
            raise NumericalError(
                f"The {name} became non-finite (NaN or infinite) in the update at agent step {step:,} (env step "
                f"{step * self.cfg.action_repeat:,}); training stopped and {keep}."
            )
        if parameters:
            names = self.agent.nonfinite_parameters()
            if names:
                raise NumericalError(
                    f"The parameters {', '.join(names[:3])} hold NaN or infinite values at env step "
                    f"{self.env_steps:,}; training stopped and {keep}."
                )

    def evaluate(self) -> None:
        cfg = self.cfg
        self.check_finite()
        start = time.time()
        self.last_eval = self.agent_steps
        video = self.video if cfg.save_video else None
        returns = evaluate_agent(
            self.agent,
            self.eval_env,
            cfg.num_eval_episodes,
            eval_seed(cfg.seed, self.env_steps),
            video,
            str(self.env_steps),
        )
        row = {
            "episode": self.episode,
            "env_steps": self.env_steps,
            "agent_steps": self.agent_steps,
            "episode_reward": float(np.mean(returns)) if returns else None,
            "episode_reward_std": float(np.std(returns)) if returns else None,
            "episode_rewards": returns,
            "duration": time.time() - start,
        }
        video_path = self.video.folder / f"{self.env_steps}.mp4" if video is not None and returns else None
        self.logger.log("eval", row, video=video_path)
        if cfg.save_model:
            path = self.model_dir / f"{self.env_steps}.pt"
            with writing(path, "a snapshot of the networks"):
                save_snapshot(path, self)

    # ---------------------------------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """Write a full checkpoint of the run as it stands (between steps or inside the seed-phase burst)."""
        self.check_finite(parameters=True)
        pending = None
        if self.pending is not None:
            p = self.pending
            pending = {"action": torch.from_numpy(np.asarray(p.action)), "updates": p.updates, "done": p.done}
        state = {
            "config": self.cfg.to_dict(),
            "agent_steps": self.agent_steps,
            "env_steps": self.env_steps,
            "episode": self.episode,
            "episode_reward": self.episode_reward,
            "last_eval": self.last_eval,
            "finished": self.finished,
            "pending": pending,
            "agent": self.agent.state_dict(),
            "metrics": self.agent.metrics.state_dict(),
            "replay": self.replay.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": numpy_legacy_state(np.random.get_state()),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
                "action": self.action_rng.bit_generator.state,
            },
            "env": to_tensors(self.env.get_state()),
            "log_sizes": self.logger.sizes(),
            "resumes": self.resumes,
            "elapsed_seconds": self.elapsed_seconds,
            "sessions": self.sessions(),
        }
        path = self.store.save(state, self.replay, self.agent_steps)
        self.last_checkpoint = self.agent_steps
        return path

    def write_status(self, state: str, message: str = "") -> None:
        """WORK_DIR/status.json: what `sacae status` and the sweep read to know where this run stands."""
        status = {
            "state": state,
            "env_steps": self.env_steps,
            "total_env_steps": self.cfg.num_train_steps * self.cfg.action_repeat,
            "agent_steps": self.agent_steps,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "session_env_steps_per_second": self._session_speed(),
            "resumes": self.resumes,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": time.time(),
            "message": message,
            "sessions": self.sessions(),
        }
        write_status(self.work_dir, status)

    def sessions(self) -> list[dict[str, Any]]:
        """Every session (process) that trained this run, this one last: its machine, the env steps it took the run
        from and to, and its seconds. A session that only reopened a finished run adds nothing."""
        if self.reopened_finished_run:
            return self.earlier_sessions
        current = {
            **self.session,
            "to_env_steps": self.env_steps,
            "seconds": round(time.time() - self.session_start, 1),
        }
        return [*self.earlier_sessions, current]

    def _session_speed(self) -> float | None:
        seconds = time.time() - self.session_start
        done = self.env_steps - self.session["from_env_steps"]
        return round(done / seconds, 3) if done > 0 and seconds > 0 else None


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
    defaults = TrainConfig()
    given = {k: getattr(cfg, k) for k in EXECUTION_FIELDS if getattr(cfg, k) != getattr(defaults, k)}
    return dataclasses.replace(saved, work_dir=os.fspath(run_dir), **given)


def len_fmt(nbytes: float) -> str:
    return f"{nbytes / 1e3:.1f} KB" if nbytes >= 1e3 else f"{nbytes:.0f} B"


# ------------------------------------------------------------------------------------------------------------
def save_snapshot(path: Path, trainer: Trainer) -> None:
    """The networks and temperature at this point, with the config that built them (loads with weights_only)."""
    state = trainer.agent.state_dict()
    save_torch_atomic(
        {
            "config": trainer.cfg.to_dict(),
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
