"""DeepMind Control Suite tasks behind a Gymnasium-style API: rescaled actions, action repeat, frame stacking; and
`make_env`, which builds the environment a configuration names (a suite task, or a Gymnasium one: `gym_env`).

Rendering is headless: unless the user chose a backend, MUJOCO_GL is set to egl (osmesa where EGL is missing)
before dm_control is imported.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from sacae.errors import SacaeError


def _choose_gl_backend() -> None:
    if "MUJOCO_GL" in os.environ or "dm_control._render" in sys.modules:
        return  # the user's choice, or dm_control already chose when it was imported
    if ctypes.util.find_library("EGL") is None and ctypes.util.find_library("OSMesa") is not None:
        os.environ["MUJOCO_GL"] = "osmesa"
    else:
        os.environ["MUJOCO_GL"] = "egl"


NO_RENDERER_HINT = (
    "install EGL (Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri) or OSMesa (libosmesa6) and set "
    "MUJOCO_GL=egl or MUJOCO_GL=osmesa"
)


class _DropKnownModelWarnings(logging.Filter):
    """dm_control's own cheetah model triggers a MuJoCo deprecation warning on every load; it says nothing a
    user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "settotalmass" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropKnownModelWarnings())
_choose_gl_backend()
try:
    from dm_control import suite  # must follow the choice of MUJOCO_GL
except (ImportError, RuntimeError, OSError) as e:
    raise SacaeError(
        f"dm_control could not be loaded with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({e}); {NO_RENDERER_HINT}."
    ) from None


def _backend_in_use() -> str:
    """The rendering backend dm_control really uses (fixed when dm_control._render was first imported)."""
    backend = getattr(sys.modules.get("dm_control._render"), "BACKEND", None)
    if backend is not None and backend != os.environ.get("MUJOCO_GL"):
        return (
            f"the {backend} backend (dm_control was imported before sacae.envs with MUJOCO_GL unset: set "
            f"MUJOCO_GL=egl before importing it)"
        )
    return f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}"


def all_task_names() -> list[str]:
    return sorted(f"{domain}_{task}" for domain, task in suite.ALL_TASKS)


def task_summary() -> str:
    """Every suite task, by domain: 'acrobot: swingup, swingup_sparse; ball_in_cup: catch; ...'."""
    by_domain: dict[str, list[str]] = {}
    for domain, task in suite.ALL_TASKS:
        by_domain.setdefault(domain, []).append(task)
    return "; ".join(f"{d}: {', '.join(sorted(ts))}" for d, ts in sorted(by_domain.items()))


def split_task_name(name: str, domain: str | None = None, task: str | None = None) -> tuple[str, str]:
    """Turn 'ball_in_cup_catch' into ('ball_in_cup', 'catch'); raise SacaeError listing the valid tasks."""
    if domain is not None and task is not None and (domain, task) in suite.ALL_TASKS:
        return domain, task
    if domain is None:
        for d, t in suite.ALL_TASKS:
            if f"{d}_{t}" == name:
                return d, t
    domains = sorted({d for d, _ in suite.ALL_TASKS})
    if domain is not None and domain not in domains:
        raise SacaeError(f"Unknown dm_control domain '{domain}'; valid domains: {', '.join(domains)}.")
    if domain is not None:
        tasks = sorted(t for d, t in suite.ALL_TASKS if d == domain)
        raise SacaeError(f"Unknown task '{task}' for domain '{domain}'; valid tasks: {', '.join(tasks)}.")
    raise SacaeError(f"Unknown dm_control task '{name}'; valid tasks: {', '.join(all_task_names())}.")


@dataclass(frozen=True)
class EnvSpec:
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    action_dim: int
    frame_shape: tuple[int, ...]


class DMCEnv:
    """One dm_control task with actions in [-1, 1], action repeat and pixel or state observations.

    `reset(seed=) -> obs, info`; `step(action) -> obs, reward, terminated, truncated, info`. The suite's time limit
    is a truncation (the critic keeps bootstrapping through it); only a task's own termination is `terminated`.
    Pixel observations are uint8, channels first, the last `frame_stack` renders stacked along channels.
    """

    def __init__(
        self,
        domain_name: str,
        task_name: str,
        *,
        seed: int,
        pixels: bool = True,
        image_size: int = 84,
        action_repeat: int = 1,
        frame_stack: int = 3,
        camera_id: int | None = None,
    ):
        split_task_name(f"{domain_name}_{task_name}", domain_name, task_name)
        self._env = suite.load(domain_name, task_name, task_kwargs={"random": seed})
        self.domain_name, self.task_name = domain_name, task_name
        self.pixels = pixels
        self.image_size = image_size
        self.action_repeat = action_repeat
        self.frame_stack = frame_stack if pixels else 1
        self.camera_id = (2 if domain_name == "quadruped" else 0) if camera_id is None else camera_id
        spec = self._env.action_spec()
        self._action_low = spec.minimum.astype(np.float64)
        self._action_high = spec.maximum.astype(np.float64)
        self._frames: deque[np.ndarray] = deque(maxlen=self.frame_stack)
        # What `get_state` needs to rebuild the episode in progress: the task's RNG state before its reset and
        # the actions taken since.
        self._episode_random: tuple | None = None
        self._episode_actions: list[np.ndarray] = []
        self.episode_env_steps = 0  # simulator steps of the episode in progress (or just ended)
        if pixels:
            frame = self._render_checked()
            self.spec = EnvSpec(
                (3 * self.frame_stack, *frame.shape[1:]), np.dtype(np.uint8), spec.shape[0], frame.shape
            )
        else:
            dim = sum(int(np.prod(v.shape)) for v in self._env.observation_spec().values())
            self.spec = EnvSpec((dim,), np.dtype(np.float32), spec.shape[0], (dim,))

    # ---------------------------------------------------------------------------------------------------------
    @property
    def physics(self):
        return self._env.physics

    @property
    def task_random(self) -> np.random.RandomState:
        return self._env.task.random

    def render(self, height: int | None = None, width: int | None = None) -> np.ndarray:
        """An RGB image (H, W, 3) of the observation camera."""
        return self.physics.render(height or self.image_size, width or self.image_size, camera_id=self.camera_id)

    def _render_checked(self) -> np.ndarray:
        try:
            return self._frame()
        except Exception as e:  # dm_control raises several types when no GL context can be made
            raise SacaeError(
                f"MuJoCo could not render with {_backend_in_use()} ({type(e).__name__}: {e}); {NO_RENDERER_HINT}."
            ) from None

    def _frame(self) -> np.ndarray:
        return np.ascontiguousarray(self.render().transpose(2, 0, 1))

    def _observe(self, time_step) -> np.ndarray:
        if not self.pixels:
            return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in time_step.observation.values()])
        self._frames.append(self._frame())
        return np.concatenate(self._frames, axis=0)

    # ---------------------------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None:
            self.task_random.seed(seed)
        self._episode_random = self.task_random.get_state()
        self._episode_actions = []
        self.episode_env_steps = 0
        time_step = self._env.reset()
        return self._first_observation(time_step), {}

    def _first_observation(self, time_step) -> np.ndarray:
        if self.pixels:
            first = self._frame()
            self._frames.extend([first] * self.frame_stack)
            return np.concatenate(self._frames, axis=0)
        return self._observe(time_step)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self._episode_actions.append(np.array(action, dtype=np.float32, copy=True))
        time_step, reward = self._physics_step(action)
        last = time_step.last()
        terminated = bool(last and time_step.discount == 0.0)
        truncated = bool(last and not terminated)
        if last:
            self._episode_random, self._episode_actions = None, []
        return self._observe(time_step), float(reward), terminated, truncated, {}

    def _physics_step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self._action_low.shape:
            raise ValueError(f"action has shape {action.shape}, expected {self._action_low.shape}")
        scaled = self._action_low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (self._action_high - self._action_low)
        reward = 0.0
        time_step = None
        for _ in range(self.action_repeat):
            time_step = self._env.step(scaled)
            reward += time_step.reward or 0.0
            self.episode_env_steps += 1
            if time_step.last():
                break
        return time_step, reward

    # ---------------------------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """The task's RNG and the episode in progress, as plain arrays (see `set_state`)."""
        random_state = self.task_random.get_state() if self._episode_random is None else self._episode_random
        key = random_state[1]
        return {
            "random_key": np.asarray(key, dtype=np.int64),
            "random_rest": [int(random_state[2]), int(random_state[3]), float(random_state[4])],
            "in_episode": self._episode_random is not None,
            "actions": np.asarray(self._episode_actions, dtype=np.float32).reshape(-1, self.spec.action_dim),
        }

    def set_state(self, state: dict[str, Any]) -> np.ndarray | None:
        """Bring the environment to a state from `get_state`; returns the current observation (None between
        episodes). An episode in progress is rebuilt exactly by resetting from the saved RNG state and replaying
        its actions (rendering only the frames the observation stacks), so every task-specific detail of the
        episode (targets, model changes) comes back with it."""
        pos, has_gauss, cached = state["random_rest"]
        key = np.asarray(state["random_key"], dtype=np.uint32)
        self.task_random.set_state(("MT19937", key, int(pos), int(has_gauss), float(cached)))
        self._episode_random, self._episode_actions = None, []
        if not state["in_episode"]:
            return None
        obs, _ = self.reset()
        actions = np.asarray(state["actions"], dtype=np.float32)
        render_from = len(actions) - self.frame_stack
        for i, action in enumerate(actions):
            self._episode_actions.append(action.copy())
            time_step, _ = self._physics_step(action)
            if i >= render_from or not self.pixels:
                obs = self._observe(time_step)
        return obs

    def sample_action(self, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(-1.0, 1.0, size=self.spec.action_dim).astype(np.float32)

    def close(self) -> None:
        self._env.close()


def make_env(cfg, seed: int):
    """The environment a TrainConfig describes: a DMCEnv, or a GymnasiumEnv for `--env gymnasium:<id>`."""
    if cfg.env is not None:
        from sacae.gym_env import GymnasiumEnv, gymnasium_id, parse_env_kwargs

        return GymnasiumEnv(
            gymnasium_id(cfg.env),
            seed=seed,
            env_kwargs=parse_env_kwargs(cfg.env_kwargs),
            pixels=cfg.pixels,
            image_size=cfg.image_size,
            action_repeat=cfg.action_repeat,
            frame_stack=cfg.frame_stack,
        )
    return DMCEnv(
        cfg.domain_name,
        cfg.task_name,
        seed=seed,
        pixels=cfg.pixels,
        image_size=cfg.image_size,
        action_repeat=cfg.action_repeat,
        frame_stack=cfg.frame_stack,
    )
