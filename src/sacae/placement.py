"""Sizing a run before it starts: where its replay frames live (host or GPU memory), and whether the replay buffer, the
networks (with their gradients, Adam moments and target copies) and one update's activations fit in memory."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sacae.config import TrainConfig, conv_output_size
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
    """SacaeError when --device names a GPU that is not there, or --replay_device asks for a GPU that the training
    does not run on."""
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        seen = f"{count} (cuda:0 to cuda:{count - 1})" if count else "no CUDA GPU"
        raise SacaeError(f"--device {device} names a GPU that is not there: PyTorch sees {seen}.")
    if cfg.replay_device == "cuda" and device.type != "cuda":
        raise SacaeError(
            "--replay_device cuda was asked for but PyTorch sees no CUDA GPU here; use --replay_device auto or host."
        )


# Bytes of a float32.
FLOAT_BYTES = 4


def _mlp_parameters(in_dim: int, hidden_dim: int, out_dim: int) -> int:
    """Parameters of sacae.networks.mlp: three Linear layers with biases."""
    return in_dim * hidden_dim + hidden_dim + hidden_dim * hidden_dim + hidden_dim + hidden_dim * out_dim + out_dim


@dataclass(frozen=True)
class AgentMemory:
    """Bytes the agent takes beside the replay buffer, on the training device: the networks (weights, gradients,
    Adam's two moments, the target critic) and the activations of one update on a batch."""

    network_bytes: int
    activation_bytes: int
    batch_size: int
    largest: str  # the flag that sizes the largest part: the one to lower

    @property
    def total(self) -> int:
        return self.network_bytes + self.activation_bytes

    def refusal(self, where: str, num_seeds: int = 1) -> SacaeError:
        """The sentence for networks that do not fit `where`; a group of `num_seeds` seeds holds one set per seed."""
        k = num_seeds
        whose = "The networks and one update" if k == 1 else f"The networks and one update of {k} seeds"
        lower = f"--{self.largest}" if k == 1 else f"--{self.largest} or train fewer seeds at once"
        return SacaeError(
            f"{whose} need {k * self.total / 1e9:.1f} GB ({k * self.network_bytes / 1e9:.1f} GB of "
            f"weights, gradients, Adam moments and target networks, {k * self.activation_bytes / 1e9:.1f} GB of "
            f"activations for batches of {self.batch_size:,}) but {where}; lower {lower}."
        )


def agent_memory(cfg: TrainConfig, obs_shape: tuple[int, ...], action_dim: int) -> AgentMemory:
    """What SacAeAgent(obs_shape, action_dim, cfg) and its update take, counted from the shapes in sacae.networks
    without building anything (a size too large to allocate is refused before it is tried). Activations are those
    an update keeps at its peak (tests/test_flags.py compares the estimate with a real update's)."""
    hidden, features, filters, layers = cfg.hidden_dim, cfg.encoder_feature_dim, cfg.num_filters, cfg.num_layers
    conv = fc = 0
    if cfg.pixels:
        channels, side = obs_shape[0], obs_shape[-1]
        out = conv_output_size(side, layers)
        conv = (channels * 9 + 1) * filters + (layers - 1) * (filters * filters * 9 + filters)
        fc = filters * out * out * features + 3 * features  # Linear and LayerNorm
    else:
        features = obs_shape[0]
    q_heads = 2 * _mlp_parameters(features + action_dim, hidden, 1)
    actor_trunk = _mlp_parameters(features, hidden, 2 * action_dim)
    decoder = decoder_conv = 0
    if cfg.decoder_type == "pixel":
        channels, side = obs_shape[0], obs_shape[-1]
        out = conv_output_size(side, layers)
        decoder_conv = (layers - 1) * (filters * filters * 9 + filters) + filters * channels * 9 + channels
        decoder = features * filters * out * out + filters * out * out + decoder_conv
    # Trained parameters carry a gradient and two Adam moments; the target critic is one more copy of the critic;
    # the autoencoder's encoder optimizer keeps its own moments of the critic's encoder.
    trained, target = conv + fc + q_heads + fc + actor_trunk + decoder, conv + fc + q_heads
    network_bytes = FLOAT_BYTES * (4 * trained + target + (2 * (conv + fc) if decoder else 0))

    if cfg.pixels:
        pixels = obs_shape[0] * obs_shape[1] * obs_shape[2]
        side = (obs_shape[-1] - 3) // 2 + 1
        conv_outputs = filters * sum((side - 2 * i) ** 2 for i in range(layers))
        # Float copies of an image and of one conv pass's outputs alive at an update's peak, measured on a CPU
        # (peak resident memory over batch sizes 128 to 512): with the autoencoder, the normalised batches, the
        # reconstruction, its target and their gradients and the decoder's mirror of the conv pass; without, the
        # normalised batches and the pass the critic's backward step keeps. Rounded up.
        images, passes = (9, 5) if cfg.decoder_type == "pixel" else (3, 2.5)
        per_sample = 2 * pixels + FLOAT_BYTES * int(images * pixels + passes * conv_outputs)  # uint8 obs, next_obs
    else:
        per_sample = FLOAT_BYTES * 8 * obs_shape[0]
    # The MLPs (Q heads, target Q heads, actor): their hidden layers before and after the ReLU, with gradients.
    per_sample += FLOAT_BYTES * 26 * hidden
    activation_bytes = cfg.batch_size * per_sample

    parts = {
        "hidden_dim": FLOAT_BYTES * (5 * (q_heads + actor_trunk)),
        "num_filters": FLOAT_BYTES * 7 * (conv + decoder_conv),
        "encoder_feature_dim": FLOAT_BYTES * 7 * (fc + decoder - decoder_conv),
        "batch_size": activation_bytes,
    }
    return AgentMemory(network_bytes, activation_bytes, cfg.batch_size, max(parts, key=parts.__getitem__))


@dataclass(frozen=True)
class ReplayPlacement:
    """Where the replay frames live, with the numbers that decided it."""

    frames_device: torch.device
    transitions: int
    frame_bytes: int  # the frame ring
    other_bytes: int  # the per-transition arrays, always in host memory
    host_available: int | None
    gpu_free: int | None  # None without a CUDA device
    gpu_reserve: int = GPU_MEMORY_RESERVE_BYTES  # GPU memory kept for the networks, their update and cuDNN
    num_seeds: int = 1  # the seeds whose buffers were sized together (frame_bytes and other_bytes are one seed's)

    @property
    def needed(self) -> int:
        """One seed's bytes."""
        return self.frame_bytes + self.other_bytes

    def describe(self) -> str:
        where = "on the GPU" if self.frames_device.type == "cuda" else "in host memory"
        if self.gpu_free is None:
            return f"frames {where}"
        frames = f"{self.frame_bytes / 1e9:.2f} GB"
        return (
            f"frames {where} ({frames if self.num_seeds == 1 else f'{self.num_seeds} x {frames}'}; the GPU has "
            f"{self.gpu_free / 1e9:.1f} GB free, {self.gpu_reserve / 1e9:.1f} GB kept for the networks)"
        )


def place_replay(
    requested: str,
    device: torch.device,
    transitions: int,
    frame_bytes: int,
    other_bytes: int,
    host_available: int | None,
    gpu_free: int | None,
    agent: AgentMemory | None = None,
    num_seeds: int = 1,
) -> ReplayPlacement:
    """Where the frames go (`requested`: auto, host or cuda); SacaeError when the buffer fits nowhere allowed, or
    when the agent (networks and one update, on the training device) does not fit at all.

    auto puts them on the GPU when they fit in its free memory less GPU_MEMORY_RESERVE_BYTES and the agent, else in
    host memory; None for an amount that cannot be read means no limit. `transitions`, `frame_bytes`, `other_bytes`
    and `agent` are one seed's: a group of `num_seeds` seeds (`sacae train-seeds`) holds `num_seeds` buffers and
    agents, so each is counted that many times (the frames of all seeds go to the GPU, or none), and a refusal
    adds "train fewer seeds at once" to the flags to lower."""
    k = num_seeds
    if k < 1:
        raise ValueError(f"num_seeds must be at least 1 (got {k})")
    n, needed = transitions, k * (frame_bytes + other_bytes)
    per = needed / n  # the group's bytes per transition of --replay_buffer_capacity
    on_cuda = device.type == "cuda"
    agent_bytes = k * agent.total if agent is not None else 0
    if agent is not None and on_cuda and gpu_free is not None and agent_bytes > gpu_free:
        raise agent.refusal(f"{device} has {gpu_free / 1e9:.1f} GB free", k)
    if agent is not None and not on_cuda and host_available is not None:
        if agent_bytes > host_available - MEMORY_RESERVE_BYTES:
            raise agent.refusal(
                f"this machine has {host_available / 1e9:.1f} GB available (keeping "
                f"{MEMORY_RESERVE_BYTES / 1e9:.1f} GB free)",
                k,
            )
    host_agent = 0 if on_cuda else agent_bytes
    host_room = None if host_available is None else host_available - MEMORY_RESERVE_BYTES - host_agent
    gpu_reserve = GPU_MEMORY_RESERVE_BYTES + (agent_bytes if on_cuda else 0)
    gpu_room = None if gpu_free is None else gpu_free - gpu_reserve
    host_kept = f"{MEMORY_RESERVE_BYTES / 1e9:.1f} GB free" + (
        f" and {host_agent / 1e9:.1f} GB for the networks" if host_agent else ""
    )

    def fits_host(nbytes: int) -> bool:
        return host_room is None or nbytes <= host_room

    def host_fits_at_most() -> int:
        return max(0, int(host_room / per)) if host_room is not None else n

    def gpu_fits_at_most() -> int:
        return max(0, int(gpu_room / (k * frame_bytes / n))) if gpu_room is not None and frame_bytes else n

    # One seed: the sentences as they always were; a group names its buffers and the seeds as a thing to lower.
    buffers = "The replay buffer needs" if k == 1 else f"The {k} replay buffers need"
    frames_need = "The replay frames need" if k == 1 else f"The replay frames of {k} seeds need"
    each = f"{n:,} transitions" + ("" if k == 1 else " per seed")
    fewer_steps = "train for fewer --num_train_steps" + ("" if k == 1 else ", train fewer seeds at once")
    last_or = " or" if k == 1 else ","
    last_or += " train for fewer --num_train_steps" + ("" if k == 1 else " or train fewer seeds at once")

    placement = functools.partial(
        ReplayPlacement,
        transitions=n,
        frame_bytes=frame_bytes,
        other_bytes=other_bytes,
        host_available=host_available,
        gpu_free=gpu_free,
        gpu_reserve=gpu_reserve,
        num_seeds=k,
    )
    on_gpu = on_cuda and (gpu_room is None or k * frame_bytes <= gpu_room) and fits_host(k * other_bytes)
    if on_cuda and (requested == "cuda" or (requested == "auto" and on_gpu)):
        if not on_gpu:
            raise SacaeError(
                f"{frames_need} {k * frame_bytes / 1e9:.1f} GB for {each} but {device} has "
                f"{(gpu_free or 0) / 1e9:.1f} GB free (keeping {gpu_reserve / 1e9:.1f} GB for the "
                f"networks); lower --replay_buffer_capacity to at most {gpu_fits_at_most():,}, {fewer_steps} "
                f"or use --replay_device host."
            )
        return placement(frames_device=device)
    if fits_host(needed):
        return placement(frames_device=torch.device("cpu"))
    if on_cuda and requested == "auto":
        raise SacaeError(
            f"{buffers} {needed / 1e9:.1f} GB for {each} ({per / k / 1e3:.1f} KB each) but "
            f"neither {device} ({(gpu_free or 0) / 1e9:.1f} GB free, keeping {gpu_reserve / 1e9:.1f} GB) "
            f"nor this machine ({host_available / 1e9:.1f} GB available, keeping {host_kept}) "
            f"can hold it; lower --replay_buffer_capacity to at most {max(gpu_fits_at_most(), host_fits_at_most()):,}"
            f"{last_or}."
        )
    raise SacaeError(
        f"{buffers} {needed / 1e9:.1f} GB for {each} ({per / k / 1e3:.1f} KB each) but this "
        f"machine has {host_available / 1e9:.1f} GB available (keeping {host_kept}); "
        f"lower --replay_buffer_capacity to at most {host_fits_at_most():,}{last_or}."
    )


def check_fits(
    cfg: TrainConfig,
    device: torch.device,
    frame_shape: tuple[int, ...],
    frame_itemsize: int,
    action_dim: int,
    num_seeds: int = 1,
    held_bytes: int = 0,
) -> ReplayPlacement:
    """Where the replay frames will live and the bytes they need; SacaeError before anything is allocated when the
    replay buffer, the networks (with gradients, Adam moments and target copies) and one update's activations do
    not fit (GPU memory free now, host memory available now), naming the flag to lower.

    `num_seeds`: the seeds of a group (`sacae train-seeds`), each with its own buffer and networks, all counted.
    `held_bytes`: memory on `device` that the networks being sized already hold (built before this check), counted
    as free again since the estimate counts them."""
    check_replay_device(cfg, device)
    n = replay_transitions(cfg)
    stack = cfg.frame_stack if cfg.pixels else 1
    frame_bytes, other_bytes = ReplayBuffer.estimate_parts(
        frame_shape, frame_itemsize, action_dim, n, stack, cfg.episode_agent_steps
    )
    obs_shape = (frame_shape[0] * stack, *frame_shape[1:])
    agent = agent_memory(cfg, obs_shape, action_dim)
    gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    host_available = available_memory_bytes()
    if held_bytes and gpu_free is not None:
        gpu_free += held_bytes
    elif held_bytes and host_available is not None and device.type == "cpu":
        host_available += held_bytes
    return place_replay(
        cfg.replay_device, device, n, frame_bytes, other_bytes, host_available, gpu_free, agent, num_seeds
    )


def check_agent_fits(
    cfg: TrainConfig, device: torch.device, obs_shape: tuple[int, ...], action_dim: int
) -> AgentMemory:
    """The agent's bytes (networks and one update) when they fit on `device` now, else SacaeError naming the flag to
    lower: for what builds an agent without a replay buffer (evaluating a snapshot)."""
    agent = agent_memory(cfg, obs_shape, action_dim)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if agent.total > free:
            raise agent.refusal(f"{device} has {free / 1e9:.1f} GB free")
        return agent
    available = available_memory_bytes()
    if available is not None and agent.total > available - MEMORY_RESERVE_BYTES:
        raise agent.refusal(
            f"this machine has {available / 1e9:.1f} GB available (keeping {MEMORY_RESERVE_BYTES / 1e9:.1f} GB free)"
        )
    return agent


# The name the trainer has called: the same check, now counting the networks too.
check_replay_fits = check_fits
