"""Replay buffer that stores each observation frame once and rebuilds frame stacks from indices when sampling.

An episode of N transitions has N + 1 frames f_0..f_N. Transition t of the episode holds the global number g of
its frame f_t; its observation stacks frames g-k+1..g and its next observation g-k+2..g+1, where indices before the
episode's first frame are clamped to it (the reset frame fills the stack). Frames live in a ring of slots sized
so that every frame a live transition needs is still there; transitions live in their own ring of `capacity`
and are sampled uniformly, as in the authors' release.

The frames may live on the training GPU (`frames_device`): batches are then gathered there; host frames feeding a
GPU travel through page-locked memory, so that neither sampling nor storing a frame waits for the GPU's work.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    not_done: torch.Tensor


def random_batch(pixels: bool, obs_shape: tuple[int, ...], action_dim: int, batch_size: int, device,
                 generator: torch.Generator | None = None) -> Batch:  # fmt: skip
    """A batch of random transitions of these shapes (uint8 frames or float states), for timing updates."""
    b = batch_size
    if pixels:
        obs, next_obs = (torch.randint(0, 256, (b, *obs_shape), dtype=torch.uint8, generator=generator) for _ in "on")
    else:
        obs, next_obs = (torch.randn(b, *obs_shape, generator=generator) for _ in "on")
    action = torch.rand(b, action_dim, generator=generator) * 2 - 1
    reward, not_done = torch.randn(b, 1, generator=generator), torch.ones(b, 1)
    return Batch(*(t.to(device) for t in (obs, action, reward, next_obs, not_done)))


class ReplayBuffer:
    """Uniform replay over transitions of stacked frames (pixels) or state vectors (frame_stack 1)."""

    def __init__(
        self,
        frame_shape: tuple[int, ...],
        frame_dtype: np.dtype | torch.dtype,
        action_dim: int,
        capacity: int,
        frame_stack: int = 1,
        episode_length: int = 1000,
        device: str | torch.device = "cpu",
        seed: int = 0,
        frames_device: str | torch.device = "cpu",
    ):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.frame_shape = tuple(frame_shape)
        self.frame_stack = frame_stack
        self.capacity = capacity
        self.action_dim = action_dim
        self.device = torch.device(device)
        torch_dtype = frame_dtype if isinstance(frame_dtype, torch.dtype) else _TORCH_DTYPE[np.dtype(frame_dtype)]
        self.num_slots = self.frame_slots(capacity, frame_stack, episode_length)
        self.frames = torch.empty((self.num_slots, *self.frame_shape), dtype=torch_dtype, device=frames_device)
        self.frame_no = np.zeros(capacity, dtype=_FRAME_NO)  # global number of the transition's frame f_t
        self.step_in_episode = np.zeros(capacity, dtype=_STEP_IN_EPISODE)  # t, capped at frame_stack - 1
        self.actions = np.zeros((capacity, action_dim), dtype=np.float32)
        self.rewards = np.zeros((capacity, 1), dtype=np.float32)
        self.not_dones = np.zeros((capacity, 1), dtype=np.float32)
        self.rng = np.random.default_rng(seed)
        self.idx = 0  # next transition slot
        self.full = False
        self.frames_written = 0  # global number of the next frame
        self.transitions_written = 0  # global number of the next transition
        self._current_t = -1  # step in episode of the newest frame; -1 before the first episode

    # ---------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.capacity if self.full else self.idx

    @property
    def nbytes(self) -> int:
        """Bytes held when the buffer is full."""
        arrays = (self.frame_no, self.step_in_episode, self.actions, self.rewards, self.not_dones)
        return self.frames.element_size() * self.frames.numel() + sum(a.nbytes for a in arrays)

    @property
    def bytes_per_transition(self) -> float:
        return self.nbytes / self.capacity

    @staticmethod
    def frame_slots(capacity: int, frame_stack: int, episode_length: int) -> int:
        """Size of the frame ring. Each episode adds one frame more than it has transitions, and the oldest live
        transition may look back frame_stack - 1 frames: those frames must never be overwritten while in use."""
        return capacity + math.ceil(capacity / max(1, episode_length)) + frame_stack + 1

    @staticmethod
    def estimate_bytes(
        frame_shape,
        frame_itemsize: int,
        action_dim: int,
        capacity: int,
        frame_stack: int,
        episode_length: int,
    ) -> int:
        """Bytes a full buffer of this shape holds, without allocating it."""
        frames, others = ReplayBuffer.estimate_parts(
            frame_shape, frame_itemsize, action_dim, capacity, frame_stack, episode_length
        )
        return frames + others

    @staticmethod
    def estimate_parts(
        frame_shape,
        frame_itemsize: int,
        action_dim: int,
        capacity: int,
        frame_stack: int,
        episode_length: int,
    ) -> tuple[int, int]:
        """(bytes of the frame ring, bytes of the per-transition arrays) of a full buffer: the frames may live on
        a GPU, the rest always lives in host memory."""
        slots = ReplayBuffer.frame_slots(capacity, frame_stack, episode_length)
        # frame number, step in episode, float32 action, reward and not_done
        per_transition = _FRAME_NO.itemsize + _STEP_IN_EPISODE.itemsize + 4 * (action_dim + 2)
        return slots * int(np.prod(frame_shape)) * frame_itemsize, capacity * per_transition

    def _write_frame(self, frame: np.ndarray) -> None:
        slot = self.frames[self.frames_written % self.num_slots]
        frame = torch.from_numpy(np.ascontiguousarray(frame))
        if slot.is_cuda:
            # Queued behind the GPU's work (an update may be gathering from this ring), without waiting for it.
            slot.copy_(frame.pin_memory(), non_blocking=True)
        else:
            slot.copy_(frame)
        self.frames_written += 1

    def _newest_frame(self, obs: np.ndarray) -> np.ndarray:
        # A stacked observation is frame_stack frames along the first axis; the newest is the last one.
        channels = self.frame_shape[0]
        return obs[-channels:] if self.frame_stack > 1 else obs

    # ---------------------------------------------------------------------------------------------------------
    def start_episode(self, obs: np.ndarray) -> None:
        """Record the first observation of an episode."""
        self._write_frame(self._newest_frame(obs))
        self._current_t = 0

    def add(self, action: np.ndarray, reward: float, next_obs: np.ndarray, not_done: float) -> None:
        """Record the transition from the newest observation with `action` to `next_obs`."""
        if self._current_t < 0:
            raise RuntimeError("start_episode must be called before add")
        i = self.idx
        self.frame_no[i] = self.frames_written - 1
        self.step_in_episode[i] = min(self._current_t, self.frame_stack - 1)
        self.actions[i] = action
        self.rewards[i, 0] = reward
        self.not_dones[i, 0] = not_done
        self._write_frame(self._newest_frame(next_obs))
        self._current_t += 1
        self.transitions_written += 1
        self.idx = (i + 1) % self.capacity
        self.full = self.full or self.idx == 0

    # ---------------------------------------------------------------------------------------------------------
    def sample_indices(self, batch_size: int) -> np.ndarray:
        size = len(self)
        if size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = self.rng.integers(0, size, size=batch_size)
        # Early terminations could make episodes shorter than the ring was sized for; then the oldest transitions'
        # frames may be gone. Redraw those (never happens with dm_control's fixed-length episodes).
        oldest_frame = self.frames_written - self.num_slots
        stale = self.frame_no[idx] - self.step_in_episode[idx] < oldest_frame
        while stale.any():
            idx[stale] = self.rng.integers(0, size, size=int(stale.sum()))
            stale = self.frame_no[idx] - self.step_in_episode[idx] < oldest_frame
        return idx

    def gather(self, idx: np.ndarray) -> Batch:
        """The transitions at `idx`, stacks rebuilt, as tensors on the buffer's device.

        The batch is a copy: adding to the buffer afterwards does not change it (on a GPU, the copy is queued
        before any later write)."""
        k = self.frame_stack
        g = self.frame_no[idx]
        # Frames g-k+1 .. g+1 serve both stacks: obs is the first k of them, next_obs the last k.
        offsets = np.arange(-k + 1, 2)
        first_of_episode = g - self.step_in_episode[idx]
        frame_ids = np.maximum(g[:, None] + offsets[None, :], first_of_episode[:, None])
        slots = torch.from_numpy(frame_ids % self.num_slots)
        dev = self.device
        if self.frames.is_cuda:
            window = self.frames[_to_device(slots, self.frames.device)]
        elif dev.type == "cuda":
            # Gather straight into page-locked memory and send the k + 1 frames of each transition once; the two
            # stacks are cut on the GPU.
            b = len(idx)
            window = torch.empty((b * (k + 1), *self.frame_shape), dtype=self.frames.dtype, pin_memory=True)
            torch.index_select(self.frames, 0, slots.reshape(-1), out=window)
            window = window.view(b, k + 1, *self.frame_shape).to(dev, non_blocking=True)
        else:
            window = self.frames[slots]  # (B, k + 1, *frame_shape)
        if k > 1:
            b = window.shape[0]
            obs = window[:, :k].reshape(b, -1, *self.frame_shape[1:])
            next_obs = window[:, 1:].reshape(b, -1, *self.frame_shape[1:])
        else:
            obs, next_obs = window[:, 0], window[:, 1]
        return Batch(
            obs.to(dev, non_blocking=True),
            _to_device(torch.from_numpy(self.actions[idx]), dev),
            _to_device(torch.from_numpy(self.rewards[idx]), dev),
            next_obs.to(dev, non_blocking=True),
            _to_device(torch.from_numpy(self.not_dones[idx]), dev),
        )

    def sample(self, batch_size: int) -> Batch:
        return self.gather(self.sample_indices(batch_size))

    # ---------------------------------------------------------------------------------------------------------
    # Persistence: the contents as append-only chunks (what was added since a point), and the small state.
    def live_range(self) -> tuple[int, int, int, int]:
        """(first frame, end frame, first transition, end transition) still held, as global numbers."""
        return (
            max(0, self.frames_written - self.num_slots),
            self.frames_written,
            max(0, self.transitions_written - self.capacity),
            self.transitions_written,
        )

    def chunk_since(self, frames_from: int, transitions_from: int) -> dict[str, np.ndarray]:
        """The frames and transitions added since the given global numbers (those still held), as arrays."""
        first_frame, end_frame, first_tr, end_tr = self.live_range()
        f0, t0 = max(frames_from, first_frame), max(transitions_from, first_tr)
        frame_slots = np.arange(f0, end_frame) % self.num_slots
        tr_slots = np.arange(t0, end_tr) % self.capacity
        return {
            "frame_range": np.array([f0, end_frame], dtype=np.int64),
            "transition_range": np.array([t0, end_tr], dtype=np.int64),
            "frames": self.frames[torch.from_numpy(frame_slots).to(self.frames.device)].cpu().numpy(),
            "frame_no": self.frame_no[tr_slots],
            "step_in_episode": self.step_in_episode[tr_slots],
            "actions": self.actions[tr_slots],
            "rewards": self.rewards[tr_slots],
            "not_dones": self.not_dones[tr_slots],
        }

    def load_chunk(self, chunk: dict[str, np.ndarray], frames_end: int, transitions_end: int) -> None:
        """Write a chunk's contents back to their slots, ignoring anything at or after the given ends."""
        f0, f1 = (int(x) for x in chunk["frame_range"])
        t0, t1 = (int(x) for x in chunk["transition_range"])
        nf, nt = max(0, min(f1, frames_end) - f0), max(0, min(t1, transitions_end) - t0)
        if nf:
            slots = torch.from_numpy(np.arange(f0, f0 + nf) % self.num_slots).to(self.frames.device)
            frames = torch.from_numpy(np.ascontiguousarray(chunk["frames"][:nf]))
            self.frames[slots] = frames.to(self.frames.device, self.frames.dtype)
        if nt:
            slots = np.arange(t0, t0 + nt) % self.capacity
            for name in ("frame_no", "step_in_episode", "actions", "rewards", "not_dones"):
                getattr(self, name)[slots] = chunk[name][:nt]

    def state_dict(self) -> dict:
        """Counters and the sampling RNG (the contents travel as chunks)."""
        return {
            "frames_written": self.frames_written,
            "transitions_written": self.transitions_written,
            "current_t": self._current_t,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.frames_written = int(state["frames_written"])
        self.transitions_written = int(state["transitions_written"])
        self._current_t = int(state["current_t"])
        self.idx = self.transitions_written % self.capacity
        self.full = self.transitions_written >= self.capacity
        self.rng.bit_generator.state = state["rng"]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through page-locked memory, so that the copy does not wait for the GPU."""
    if device.type == "cuda" and not t.is_cuda:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


_FRAME_NO = np.dtype(np.int64)
_STEP_IN_EPISODE = np.dtype(np.int16)
_TORCH_DTYPE = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}
