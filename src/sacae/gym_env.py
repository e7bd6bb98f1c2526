"""Registered Gymnasium environments with continuous (Box) actions behind the interface of `sacae.envs.DMCEnv`:
actions in [-1, 1], action repeat, rendered and stacked or flattened state observations, and exact resume by
replaying the episode in progress from its seeded reset.

`--env gymnasium:<id>` names one (`gymnasium:module:Id` imports `module` first, where the environment registers
itself); `--env_kwargs` is a JSON object passed to `gymnasium.make`.
"""

from __future__ import annotations

import atexit
import difflib
import functools
import importlib
import json
import os
import sys
import weakref
from collections import deque
from typing import Any

import numpy as np

from sacae.envs import NO_RENDERER_HINT, EnvSpec, _backend_in_use
from sacae.errors import SacaeError

PREFIX = "gymnasium:"
INSTALL_HINT = "install it with: pip install 'sacae[gymnasium]'"

# rgb_array rendering never needs a display or a sound card; without these SDL (pygame, which draws the classic
# control environments) complains on stderr about the missing desktop session.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")


def import_gymnasium():
    """The gymnasium module, or SacaeError saying how to install it."""
    try:
        import gymnasium
    except ImportError:
        raise SacaeError(
            f"--env gymnasium:... needs the gymnasium package, which is not installed; {INSTALL_HINT}."
        ) from None
    return gymnasium


def gymnasium_id(env: str) -> str:
    """The Gymnasium id in an --env value `gymnasium:<id>`."""
    if not env.startswith(PREFIX) or not env[len(PREFIX) :]:
        raise SacaeError(
            f"--env {env!r} is not of the form gymnasium:<id> (e.g. gymnasium:Pendulum-v1); dm_control tasks are "
            f"named with --task."
        )
    return env[len(PREFIX) :]


def parse_env_kwargs(text: str | None) -> dict[str, Any]:
    """--env_kwargs as a dict: it must hold a JSON object."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SacaeError(
            f"--env_kwargs {text!r} is not valid JSON ({e}); give an object such as '{{\"x\": 1}}'."
        ) from None
    if not isinstance(value, dict):
        raise SacaeError(
            f"--env_kwargs {text!r} is a JSON {type(value).__name__}, not an object of keyword arguments such as "
            f"'{{\"x\": 1}}'."
        )
    return value


def registered_spec(env_id: str):
    """Gymnasium's EnvSpec of `env_id` (`module:Id` imports `module` first), or SacaeError naming what is known."""
    gym = import_gymnasium()
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise SacaeError(
                f"--env gymnasium:{env_id}: the module {module!r} that should register {name!r} could not be "
                f"imported ({e})."
            ) from None
    spec = gym.registry.get(name)
    if spec is None:
        ids = sorted(gym.registry)
        close = difflib.get_close_matches(name, ids, n=3, cutoff=0.6)
        families = sorted({s.name for s in gym.registry.values() if s.namespace is None})
        namespaces = sorted({s.namespace for s in gym.registry.values() if s.namespace is not None})
        hint = f"close matches: {', '.join(close)}; " if close else ""
        raise SacaeError(
            f"Unknown Gymnasium environment {name!r}; {hint}registered families: {', '.join(families)}"
            f"{'; namespaces: ' + ', '.join(namespaces) if namespaces else ''} (an environment of your own: register "
            f"it with gymnasium.register in a module and name it gymnasium:<module>:<id>)."
        )
    return spec


@functools.lru_cache(maxsize=64)
def time_limit(env: str, env_kwargs: str | None) -> int:
    """Environment steps of the longest episode of `--env` (its TimeLimit, or --env_kwargs' max_episode_steps);
    SacaeError when the id, the kwargs or the limit is wrong."""
    env_id = gymnasium_id(env)
    kwargs = parse_env_kwargs(env_kwargs)
    spec = registered_spec(env_id)
    steps = kwargs.get("max_episode_steps", spec.max_episode_steps)
    if steps is None or steps == -1:
        raise SacaeError(
            f"{env_id} has no time limit, and sacae needs episodes that end; give one with --env_kwargs "
            f"'{{\"max_episode_steps\": 1000}}'."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SacaeError(f"--env_kwargs max_episode_steps must be a positive integer (got {steps!r}).")
    return steps


def episode_seed(seed: int, index: int) -> int:
    """The seed given to Gymnasium's reset for episode `index` after `reset(seed=seed)`: one seed per episode makes
    every episode replayable on its own."""
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1)[0])


def flatten_observation(obs: Any) -> np.ndarray:
    """A state observation as one float32 vector: dicts in sorted key order, tuples in order, arrays raveled."""
    if isinstance(obs, dict):
        parts = [flatten_observation(obs[k]) for k in sorted(obs)]
    elif isinstance(obs, tuple):
        parts = [flatten_observation(o) for o in obs]
    else:
        return np.asarray(obs, dtype=np.float32).ravel()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


_warned_nondeterministic: set[str] = set()
_open_envs: weakref.WeakSet[GymnasiumEnv] = weakref.WeakSet()


@atexit.register
def _close_open_envs() -> None:
    # MuJoCo's renderers free their GL contexts in __del__, which fails (noisily) once the interpreter has begun
    # tearing down; closing them while it still runs is quiet.
    for env in list(_open_envs):
        env.close()


def _is_mujoco_env(spec) -> bool:
    entry = spec.entry_point
    return isinstance(entry, str) and entry.startswith("gymnasium.envs.mujoco.")


class GymnasiumEnv:
    """One Gymnasium environment with actions in [-1, 1], action repeat and pixel or state observations.

    `reset(seed=) -> obs, info`; `step(action) -> obs, reward, terminated, truncated, info`, with the environment's
    own terminated (no bootstrap) and truncated (its TimeLimit: bootstrap through it) kept apart. Pixel observations
    are the rgb_array render resized to `image_size`, uint8, channels first, the last `frame_stack` stacked along
    channels; state observations are the observation flattened (`flatten_observation`). Episode i after
    `reset(seed=s)` (or the constructor's seed) starts from Gymnasium's `reset(seed=episode_seed(s, i))`.
    """

    def __init__(
        self,
        env_id: str,
        *,
        seed: int,
        env_kwargs: dict[str, Any] | None = None,
        pixels: bool = True,
        image_size: int = 84,
        action_repeat: int = 1,
        frame_stack: int = 3,
    ):
        gym = import_gymnasium()
        spec = registered_spec(env_id)
        self.env_id = env_id
        self.pixels = pixels
        self.image_size = image_size
        self.action_repeat = action_repeat
        self.frame_stack = frame_stack if pixels else 1
        kwargs = dict(env_kwargs or {})
        self._env = self._make(gym, spec, kwargs)
        _open_envs.add(self)
        self.nondeterministic = bool(spec.nondeterministic)
        try:
            self._check_spaces(gym)
        except SacaeError:
            self.close()
            raise
        space = self._env.action_space
        self._action_shape = space.shape
        self._action_dtype = space.dtype
        self._action_low = space.low.astype(np.float64).ravel()
        self._action_high = space.high.astype(np.float64).ravel()
        action_dim = int(np.prod(space.shape))
        self._frames: deque[np.ndarray] = deque(maxlen=self.frame_stack)
        # Which episode of which seed stream is (or will next be) running, and the actions taken in it: what
        # `get_state` needs to rebuild the episode in progress.
        self._seed, self._episode_index = seed, 0
        self._in_episode = False
        self._episode_actions: list[np.ndarray] = []
        self.episode_env_steps = 0
        self._obs: np.ndarray | None = None
        first = self._probe()
        if pixels:
            self.spec = EnvSpec((3 * self.frame_stack, *first.shape[1:]), np.dtype(np.uint8), action_dim, first.shape)
        else:
            self.spec = EnvSpec(first.shape, np.dtype(np.float32), action_dim, first.shape)
        if self.nondeterministic and env_id not in _warned_nondeterministic:
            _warned_nondeterministic.add(env_id)
            print(
                f"sacae: {env_id} is registered as nondeterministic: a resumed run cannot replay the episode in "
                f"progress and starts a fresh one instead",
                file=sys.stderr,
                flush=True,
            )

    def _make(self, gym, spec, kwargs: dict[str, Any]):
        render_modes = _render_modes(gym, spec)
        if self.pixels:
            mode = kwargs.setdefault("render_mode", "rgb_array")
            if mode != "rgb_array":
                raise SacaeError(
                    f"--env_kwargs sets render_mode {mode!r}, but pixel observations are rgb_array renders; leave "
                    f"render_mode out."
                )
            if render_modes is not None and "rgb_array" not in render_modes:
                raise SacaeError(
                    f"{self.env_id} cannot render rgb_array images (its render modes: "
                    f"{', '.join(render_modes) or 'none'}), so it cannot be trained from pixels; train it from states "
                    f"with --encoder_type identity --decoder_type identity."
                )
            if _is_mujoco_env(spec):
                # Rendering at the observation's size directly is many times cheaper than rendering 480x480.
                kwargs.setdefault("width", self.image_size)
                kwargs.setdefault("height", self.image_size)
        elif render_modes is not None and "rgb_array" in render_modes:
            kwargs.setdefault("render_mode", "rgb_array")  # for evaluation videos; nothing renders unless asked
        try:
            return gym.make(self.env_id, **kwargs)
        except SacaeError:
            raise
        except Exception as e:  # an environment's constructor may raise anything for arguments it refuses
            given = f" with --env_kwargs {json.dumps(kwargs)}" if kwargs else ""
            raise SacaeError(f"gymnasium.make could not make {self.env_id}{given} ({type(e).__name__}: {e}).") from None

    def _check_spaces(self, gym) -> None:
        space = self._env.action_space
        if not isinstance(space, gym.spaces.Box):
            raise SacaeError(
                f"{self.env_id} has a {type(space).__name__} action space; SAC needs continuous actions (a Box), "
                f"such as those of Pendulum-v1 or the MuJoCo environments."
            )
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise SacaeError(
                f"{self.env_id} has unbounded actions ({space}); SAC's actions in [-1, 1] are rescaled to the "
                f"bounds, so they must be finite."
            )
        if self._env.spec is None or self._env.spec.max_episode_steps is None:
            raise SacaeError(
                f"{self.env_id} has no time limit, and sacae needs episodes that end; give one with --env_kwargs "
                f"'{{\"max_episode_steps\": 1000}}'."
            )

    def _probe(self) -> np.ndarray:
        """The first observation of episode 0 (its frame, for pixels), checking that it can be made."""
        obs, _ = self._env.reset(seed=episode_seed(self._seed, 0))
        if not self.pixels:
            try:
                return flatten_observation(obs)
            except (TypeError, ValueError) as e:
                raise SacaeError(
                    f"{self.env_id}'s observations ({self._env.observation_space}) cannot be flattened into one "
                    f"vector of numbers ({e})."
                ) from None
        try:
            frame = self._env.render()
        except Exception as e:  # renderers raise several types when no GL context can be made
            raise SacaeError(
                f"{self.env_id} could not render with {_backend_in_use()} ({type(e).__name__}: {e}); "
                f"{NO_RENDERER_HINT}."
            ) from None
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] not in (3, 4):
            shape = getattr(frame, "shape", type(frame).__name__)
            raise SacaeError(
                f"{self.env_id}'s rgb_array render is not an RGB image (got {shape}), so it cannot be trained from "
                f"pixels; train it from states with --encoder_type identity --decoder_type identity."
            )
        return np.ascontiguousarray(self._resized(frame).transpose(2, 0, 1))

    # ---------------------------------------------------------------------------------------------------------
    def render(self, height: int | None = None, width: int | None = None) -> np.ndarray:
        """An RGB image (H, W, 3) of the environment's rgb_array render, resized to (height, width)."""
        frame = self._env.render()
        if frame is None:
            raise SacaeError(f"{self.env_id} was made without render_mode rgb_array, so it cannot render images.")
        return self._resized(frame, height, width)

    def _resized(self, frame: np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
        frame = np.asarray(frame, dtype=np.uint8)[..., :3]
        size = (width or self.image_size, height or self.image_size)
        if frame.shape[1::-1] != size:
            from PIL import Image

            frame = np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR))
        return np.ascontiguousarray(frame)

    def _frame(self) -> np.ndarray:
        return np.ascontiguousarray(self.render().transpose(2, 0, 1))

    def _observe(self, obs: Any) -> np.ndarray:
        if not self.pixels:
            return flatten_observation(obs)
        self._frames.append(self._frame())
        return np.concatenate(self._frames, axis=0)

    # ---------------------------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None:
            self._seed, self._episode_index = seed, 0
        raw, info = self._env.reset(seed=episode_seed(self._seed, self._episode_index))
        self._episode_index += 1
        self._in_episode, self._episode_actions, self.episode_env_steps = True, [], 0
        if self.pixels:
            first = self._frame()
            self._frames.extend([first] * self.frame_stack)
            self._obs = np.concatenate(self._frames, axis=0)
        else:
            self._obs = flatten_observation(raw)
        return self._obs, info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        return self._step(action, render=True)

    def _step(self, action: np.ndarray, render: bool):
        action = np.asarray(action, dtype=np.float64).ravel()
        if action.shape != self._action_low.shape:
            raise ValueError(f"action has shape {action.shape}, expected {self._action_low.shape}")
        self._episode_actions.append(action.astype(np.float32))
        scaled = self._action_low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (self._action_high - self._action_low)
        scaled = scaled.reshape(self._action_shape).astype(self._action_dtype)
        reward, terminated, truncated, info = 0.0, False, False, {}
        raw = None
        for _ in range(self.action_repeat):
            raw, r, terminated, truncated, info = self._env.step(scaled)
            reward += float(r)
            self.episode_env_steps += 1
            if terminated or truncated:
                break
        if terminated or truncated:
            self._in_episode, self._episode_actions = False, []
        if render or not self.pixels:
            self._obs = self._observe(raw)
        return self._obs, reward, bool(terminated), bool(truncated), info

    # ---------------------------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """The seed stream, the episode in progress and its current observation, as plain values (see
        `set_state`)."""
        in_episode = self._in_episode
        return {
            "seed": self._seed % 2**64,
            "episode_index": self._episode_index,
            "in_episode": in_episode,
            "actions": np.asarray(self._episode_actions, dtype=np.float32).reshape(-1, self.spec.action_dim),
            "observation": self._obs.copy() if in_episode and self._obs is not None else np.zeros(0, np.float32),
        }

    def set_state(self, state: dict[str, Any]) -> np.ndarray | None:
        """Bring the environment to a state from `get_state`; returns the current observation (None between
        episodes). An episode in progress is rebuilt by resetting with its seed and replaying its actions
        (rendering only the frames the observation stacks). If the replay does not end on the saved observation
        (the environment is not deterministic), one warning line goes to stderr and None is returned: the caller
        starts a fresh episode rather than continue from a state that differs from the one it stored."""
        self._seed, self._episode_index = int(state["seed"]), int(state["episode_index"])
        self._in_episode, self._episode_actions = False, []
        if not bool(state["in_episode"]):
            return None
        self._episode_index -= 1  # the episode in progress, replayed
        obs, _ = self.reset()
        actions = np.asarray(state["actions"], dtype=np.float32)
        render_from = len(actions) - self.frame_stack
        ended = False  # a saved episode in progress never ended within its own actions
        for i, action in enumerate(actions):
            obs, _, terminated, truncated, _ = self._step(action, render=i >= render_from)
            if terminated or truncated:
                ended = True
                break
        saved = np.asarray(state["observation"])
        if ended or obs is None or obs.shape != saved.shape or not np.array_equal(obs, saved):
            print(
                f"sacae: warning: replaying the episode in progress of {self.env_id} did not reproduce its saved "
                f"observation (the environment is not deterministic); starting a fresh episode instead",
                file=sys.stderr,
                flush=True,
            )
            self._in_episode, self._episode_actions = False, []
            return None
        return obs

    def sample_action(self, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(-1.0, 1.0, size=self.spec.action_dim).astype(np.float32)

    def close(self) -> None:
        env, self._env = getattr(self, "_env", None), None
        if env is not None:
            env.close()
        _open_envs.discard(self)


def _render_modes(gym, spec) -> list[str] | None:
    """The render modes an environment class declares (None when the entry point does not say)."""
    entry = spec.entry_point
    try:
        creator = gym.envs.registration.load_env_creator(entry) if isinstance(entry, str) else entry
    except Exception:  # the environment's own import error surfaces, with its message, from gymnasium.make
        return None
    metadata = getattr(creator, "metadata", None)
    return list(metadata.get("render_modes", [])) if isinstance(metadata, dict) else None
