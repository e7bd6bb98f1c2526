"""Where a run's replay frames live (host or GPU memory) and whether the buffer fits there, decided before training."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sacae.config import TrainConfig
from sacae.errors import SacaeError
from sacae.replay import ReplayBuffer

# Memory kept free for the networks, PyTorch and the environments when sizing the replay buffer.
MEMORY_RESERVE_BYTES = 2 * 1024**3
# GPU memory kept free for the networks, their activations and cuDNN's workspace when the replay frames go there.
GPU_MEMORY_RESERVE_BYTES = 4 * 1024**3


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


def check_replay_device(cfg: TrainConfig, device: torch.device) -> None:
    """SacaeError when --replay_device asks for a GPU that the training does not run on."""
    if cfg.replay_device == "cuda" and device.type != "cuda":
        raise SacaeError(
            "--replay_device cuda was asked for but PyTorch sees no CUDA GPU here; use --replay_device auto or host."
        )


@dataclass(frozen=True)
class ReplayPlacement:
    """Where the replay frames live, with the numbers that decided it."""

    frames_device: torch.device
    transitions: int
    frame_bytes: int  # the frame ring
    other_bytes: int  # the per-transition arrays, always in host memory
    host_available: int | None
    gpu_free: int | None  # None without a CUDA device

    @property
    def needed(self) -> int:
        return self.frame_bytes + self.other_bytes

    def describe(self) -> str:
        where = "on the GPU" if self.frames_device.type == "cuda" else "in host memory"
        if self.gpu_free is None:
            return f"frames {where}"
        return (
            f"frames {where} ({self.frame_bytes / 1e9:.2f} GB; the GPU has {self.gpu_free / 1e9:.1f} GB free, "
            f"{GPU_MEMORY_RESERVE_BYTES / 1e9:.1f} GB kept for the networks)"
        )


def place_replay(
    requested: str,
    device: torch.device,
    transitions: int,
    frame_bytes: int,
    other_bytes: int,
    host_available: int | None,
    gpu_free: int | None,
) -> ReplayPlacement:
    """Where the frames go (`requested`: auto, host or cuda); SacaeError when the buffer fits nowhere allowed.

    auto puts them on the GPU when they fit in its free memory less GPU_MEMORY_RESERVE_BYTES, else in host memory;
    None for an amount that cannot be read means no limit."""
    n, needed = transitions, frame_bytes + other_bytes
    per = needed / n
    host_room = None if host_available is None else host_available - MEMORY_RESERVE_BYTES
    gpu_room = None if gpu_free is None else gpu_free - GPU_MEMORY_RESERVE_BYTES

    def fits_host(nbytes: int) -> bool:
        return host_room is None or nbytes <= host_room

    def host_fits_at_most() -> int:
        return max(0, int(host_room / per)) if host_room is not None else n

    def gpu_fits_at_most() -> int:
        return max(0, int(gpu_room / (frame_bytes / n))) if gpu_room is not None and frame_bytes else n

    placement = functools.partial(ReplayPlacement, transitions=n, frame_bytes=frame_bytes, other_bytes=other_bytes,
                                  host_available=host_available, gpu_free=gpu_free)  # fmt: skip
    on_gpu = device.type == "cuda" and (gpu_room is None or frame_bytes <= gpu_room) and fits_host(other_bytes)
    if device.type == "cuda" and (requested == "cuda" or (requested == "auto" and on_gpu)):
        if not on_gpu:
            raise SacaeError(
                f"The replay frames need {frame_bytes / 1e9:.1f} GB for {n:,} transitions but {device} has "
                f"{(gpu_free or 0) / 1e9:.1f} GB free (keeping {GPU_MEMORY_RESERVE_BYTES / 1e9:.1f} GB for the "
                f"networks); lower --replay_buffer_capacity to at most {gpu_fits_at_most():,}, train for fewer "
                f"--num_train_steps or use --replay_device host."
            )
        return placement(frames_device=device)
    if fits_host(needed):
        return placement(frames_device=torch.device("cpu"))
    if device.type == "cuda" and requested == "auto":
        raise SacaeError(
            f"The replay buffer needs {needed / 1e9:.1f} GB for {n:,} transitions ({per / 1e3:.1f} KB each) but "
            f"neither {device} ({(gpu_free or 0) / 1e9:.1f} GB free, keeping {GPU_MEMORY_RESERVE_BYTES / 1e9:.1f} GB) "
            f"nor this machine ({host_available / 1e9:.1f} GB available, keeping {MEMORY_RESERVE_BYTES / 1e9:.1f} GB) "
            f"can hold it; lower --replay_buffer_capacity to at most {max(gpu_fits_at_most(), host_fits_at_most()):,} "
            f"or train for fewer --num_train_steps."
        )
    raise SacaeError(
        f"The replay buffer needs {needed / 1e9:.1f} GB for {n:,} transitions ({per / 1e3:.1f} KB each) but this "
        f"machine has {host_available / 1e9:.1f} GB available (keeping {MEMORY_RESERVE_BYTES / 1e9:.1f} GB free); "
        f"lower --replay_buffer_capacity to at most {host_fits_at_most():,} or train for fewer --num_train_steps."
    )


def check_replay_fits(
    cfg: TrainConfig, device: torch.device, frame_shape, frame_itemsize: int, action_dim: int
) -> ReplayPlacement:
    """Where the replay frames will live and the bytes they need; SacaeError before training if they fit
    nowhere (GPU memory free now, host memory available now)."""
    check_replay_device(cfg, device)
    n = replay_transitions(cfg)
    stack = cfg.frame_stack if cfg.pixels else 1
    frame_bytes, other_bytes = ReplayBuffer.estimate_parts(
        frame_shape, frame_itemsize, action_dim, n, stack, cfg.episode_agent_steps
    )
    gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return place_replay(cfg.replay_device, device, n, frame_bytes, other_bytes, available_memory_bytes(), gpu_free)
