"""The training loop: collect, update every agent step after the seed phase, evaluate every `eval_freq` steps.

The loop follows the authors' release step by step (pick a_t, run the update(s) of step t on the replay as it
stands, step the environment with a_t, store the transition) and counts both clocks explicitly: `agent_steps`
(decisions) and `env_steps` (simulator steps, agent steps x action repeat), the one we print and plot.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sacae.agent import SacAeAgent
from sacae.config import TrainConfig, resolve
from sacae.envs import DMCEnv, make_env
from sacae.errors import SacaeError
from sacae.logger import Logger
from sacae.replay import ReplayBuffer
from sacae.storage import check_writable, load_torch, save_torch_atomic, write_text_atomic
from sacae.video import VideoRecorder

# Memory kept free for the networks, PyTorch and the environments when sizing the replay buffer.
MEMORY_RESERVE_BYTES = 2 * 1024**3


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


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def replay_transitions(cfg: TrainConfig) -> int:
    """Transitions the buffer will ever hold: its capacity, or fewer when the run is shorter."""
    return max(1, min(cfg.replay_buffer_capacity, cfg.num_train_steps))


def check_replay_fits(cfg: TrainConfig, frame_shape, frame_itemsize: int, action_dim: int) -> int:
    """Bytes the replay buffer will need; SacaeError before training if this machine cannot hold them."""
    n = replay_transitions(cfg)
    stack = cfg.frame_stack if cfg.pixels else 1
    needed = ReplayBuffer.estimate_bytes(frame_shape, frame_itemsize, action_dim, n, stack, cfg.episode_agent_steps)
    available = available_memory_bytes()
    if available is not None and needed > available - MEMORY_RESERVE_BYTES:
        per = needed / n
        fits = max(0, int((available - MEMORY_RESERVE_BYTES) / per))
        raise SacaeError(
            f"The replay buffer needs {needed / 1e9:.1f} GB for {n:,} transitions ({per / 1e3:.1f} KB each) but this "
            f"machine has {available / 1e9:.1f} GB available (keeping {MEMORY_RESERVE_BYTES / 1e9:.1f} GB free); "
            f"lower --replay_buffer_capacity to at most {fits:,} or train for fewer --num_train_steps."
        )
    return needed


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
    agent.train(was_training)
    return returns


class Trainer:
    """One training run: environments, agent, replay, outputs, and the loop that ties them together."""

    def __init__(self, cfg: TrainConfig, console=None):
        cfg = resolve(cfg)
        self.cfg = cfg
        self.device = select_device(cfg.device)
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self.work_dir = check_writable(cfg.work_dir)
        for name in ("train.log", "eval.log"):
            if (self.work_dir / name).exists() and (self.work_dir / name).stat().st_size > 0:
                raise SacaeError(
                    f"{self.work_dir} already holds a run ({name}); choose another --work_dir or remove it first."
                )
        seed_everything(cfg.seed)
        self.env = make_env(cfg, seed=cfg.seed)
        self.eval_env = make_env(cfg, seed=cfg.seed)
        spec = self.env.spec
        itemsize = np.dtype(spec.obs_dtype).itemsize
        self.replay_bytes = check_replay_fits(cfg, spec.frame_shape, itemsize, spec.action_dim)
        replay_seed, action_seed = np.random.SeedSequence(cfg.seed).spawn(2)
        self.replay = ReplayBuffer(
            spec.frame_shape,
            spec.obs_dtype,
            spec.action_dim,
            replay_transitions(cfg),
            frame_stack=self.env.frame_stack,
            episode_length=cfg.episode_agent_steps,
            device=self.device,
            seed=replay_seed,
        )
        self.action_rng = np.random.default_rng(action_seed)
        self.agent = SacAeAgent(spec.obs_shape, spec.action_dim, cfg, self.device)
        write_text_atomic(self.work_dir / "config.json", cfg.to_json())
        self.logger = Logger(self.work_dir, save_tb=cfg.save_tb, console=console)
        self.video = VideoRecorder(self.work_dir / "video" if cfg.save_video else None)
        self.model_dir = self.work_dir / "model"
        if cfg.save_model:
            self.model_dir.mkdir(exist_ok=True)
        self.agent_steps = 0
        self.episode = 0
        self.progress = None
        # The episode in progress (obs is None between episodes) and the evaluation clock.
        self.obs = None
        self.episode_reward, self.episode_start, self.eval_seconds = 0.0, time.time(), 0.0
        self.last_eval: int | None = None

    # ---------------------------------------------------------------------------------------------------------
    @property
    def env_steps(self) -> int:
        return self.agent_steps * self.cfg.action_repeat

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
        return (
            f"sacae: {cfg.configuration} on {cfg.env_name} (action repeat {cfg.action_repeat}), "
            f"{cfg.num_train_steps:,} agent steps = {cfg.num_train_steps * cfg.action_repeat:,} env steps, "
            f"device {self.device}, {cfg.precision}, {torch.get_num_threads()} threads; replay {len_fmt(per)} per "
            f"transition, {self.replay_bytes / 1e9:.2f} GB for {self.replay.capacity:,}; output in {self.work_dir}"
        )

    # ---------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        print(self.describe(), file=sys.stderr, flush=True)
        self.progress = tqdm(
            total=cfg.num_train_steps * cfg.action_repeat,
            unit=" env steps",
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
            desc=f"{cfg.configuration} {cfg.env_name}",
        )
        if not self.progress.disable:
            self.logger.console_write = lambda line: tqdm.write(line, file=sys.stdout)
        try:
            while self.agent_steps < cfg.num_train_steps:
                self.step()
            if self.last_eval != self.agent_steps:
                self.evaluate()
        finally:
            self.progress.close()
            self.logger.close()

    def step(self) -> None:
        """One agent step of the schedule: evaluate if due, start an episode if needed, pick a_t, run the
        update(s) of step t, step the environment with a_t and store the transition."""
        cfg = self.cfg
        if self.agent_steps % cfg.eval_freq == 0 and self.last_eval != self.agent_steps:
            t0 = time.time()
            self.evaluate()
            self.eval_seconds += time.time() - t0
        if self.obs is None:
            self.obs, _ = self.env.reset()
            self.replay.start_episode(self.obs)
            self.episode_reward, self.episode_start, self.eval_seconds = 0.0, time.time(), 0.0
            self.episode += 1

        if self.agent_steps < cfg.init_steps:
            action = self.env.sample_action(self.action_rng)
        else:
            action = self.agent.act(self.obs, sample=True)
        self._run_updates(self.updates_at(self.agent_steps))

        next_obs, reward, terminated, truncated, _ = self.env.step(action)
        self.episode_reward += reward
        # The time limit is a truncation: keep bootstrapping through it (not_done = 1).
        self.replay.add(action, reward, next_obs, 0.0 if terminated else 1.0)
        self.obs = next_obs
        self.agent_steps += 1
        if self.progress is not None:
            self.progress.update(cfg.action_repeat)

        if terminated or truncated:
            duration = time.time() - self.episode_start - self.eval_seconds
            self._log_train_episode(self.episode_reward, duration)
            self.obs = None

    def _run_updates(self, n: int) -> None:
        if n == 1:
            self.agent.update(self.replay.sample(self.cfg.batch_size), self.agent_steps)
            return
        if n == 0:
            return
        # The seed phase's burst takes minutes on a CPU: show it, as a bar on a terminal, else as log lines
        # (Slurm's stderr files) about every 10%.
        bar = tqdm(total=n, desc="seed-phase updates", unit=" updates", leave=False, file=sys.stderr,
                   disable=not sys.stderr.isatty())  # fmt: skip
        every = max(1, n // 10)
        start = time.time()
        for i in range(1, n + 1):
            self.agent.update(self.replay.sample(self.cfg.batch_size), self.agent_steps)
            bar.update(1)
            if bar.disable and (i % every == 0 or i == n):
                elapsed = time.time() - start
                print(f"sacae: seed-phase updates {i}/{n}, {elapsed:.0f} s, about {elapsed / i * (n - i):.0f} s left",
                      file=sys.stderr, flush=True)  # fmt: skip
        bar.close()

    def _log_train_episode(self, episode_reward: float, duration: float) -> None:
        metrics = self.agent.metrics.pop()
        row: dict[str, Any] = {
            "episode": self.episode,
            "env_steps": self.env_steps,
            "agent_steps": self.agent_steps,
            "duration": duration,
            "episode_reward": episode_reward,
            **metrics,
            "env_steps_per_second": (self.cfg.episode_agent_steps * self.cfg.action_repeat) / max(duration, 1e-9),
        }
        self.logger.log("train", row)

    def evaluate(self) -> None:
        cfg = self.cfg
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
        self.logger.log("eval", row)
        if cfg.save_model:
            save_snapshot(self.model_dir / f"{self.env_steps}.pt", self)


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
    snapshots = sorted((run_dir / "model").glob("[0-9]*.pt"), key=lambda p: int(p.stem))
    if not snapshots:
        raise SacaeError(f"{run_dir} has no snapshot in model/; train with --save_model to write them.")
    return snapshots[-1]


def evaluate_run(
    run_dir: str | Path,
    snapshot: str | None = None,
    num_episodes: int | None = None,
    save_video: bool = True,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Load a run's snapshot, evaluate it and (optionally) write a video; returns a summary row."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SacaeError(f"There is no run directory {run_dir}.")
    cfg = resolve(TrainConfig.load(run_dir / "config.json"))
    path = Path(snapshot) if snapshot else latest_snapshot(run_dir)
    dev = select_device(device)
    state = load_torch(path, map_location=dev)
    if not isinstance(state, dict) or "networks" not in state:
        raise SacaeError(f"{path} is not a sacae snapshot (it has no networks).")
    env = make_env(cfg, seed=seed)
    agent = SacAeAgent(env.spec.obs_shape, env.spec.action_dim, cfg, dev)
    try:
        agent.load_state_dict({"networks": state["networks"], "log_alpha": state["log_alpha"]})
    except (KeyError, RuntimeError) as e:
        raise SacaeError(f"{path} does not match the run's config ({type(e).__name__}).") from None
    video = VideoRecorder(run_dir / "video") if save_video else None
    n = cfg.num_eval_episodes if num_episodes is None else num_episodes
    video_name = f"eval_{path.stem}"
    returns = evaluate_agent(agent, env, n, seed, video, video_name)
    video_path = run_dir / "video" / f"{video_name}.mp4" if video is not None and n > 0 else None
    return {
        "snapshot": os.fspath(path),
        "env_steps": state.get("env_steps"),
        "episode_reward": float(np.mean(returns)) if returns else None,
        "episode_rewards": returns,
        "video": os.fspath(video_path) if video_path else None,
    }
