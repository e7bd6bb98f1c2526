"""`sacae bench`: how fast training runs on this machine, measured, printed as a table and one JSON line.

It times the update of each configuration (real replay sampling included) at the default network sizes, the
environment step with its render, and a short segment of real training through the trainer's own step, with the
update and the environment step in sequence and overlapped (--overlap).
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from sacae.config import TrainConfig, resolve
from sacae.errors import SacaeError
from sacae.process import configure_process, processor_name

CONFIGURATIONS = {
    "sac_ae": {"encoder_type": "pixel", "decoder_type": "pixel"},
    "sac_pixel": {"encoder_type": "pixel", "decoder_type": "identity"},
    "sac_states": {"encoder_type": "identity", "decoder_type": "identity"},
}


@dataclass(frozen=True)
class BenchArgs:
    """Measure update time, environment step time and end-to-end training speed on this machine."""

    task: str = "cartpole_swingup"
    """Task for the environment and training measurements."""
    configurations: tuple[Literal["sac_ae", "sac_pixel", "sac_states"], ...] = ("sac_ae", "sac_pixel", "sac_states")
    updates: int = 20
    """Timed updates per configuration (after the warm-up)."""
    warmup: int = 3
    """Untimed updates (and training steps) first."""
    env_steps: int = 50
    """Timed agent steps of the environment alone."""
    train_steps: int = 10
    """Timed agent steps of real training (sac_ae) after the warm-up, once in sequence and once overlapped."""
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    num_threads: int | None = None
    batch_size: int = 128
    hidden_dim: int = 1024
    num_filters: int = 32
    image_size: int = 84
    seed: int = 1
    reference: bool = True
    """Also time the authors'-style update of sac_ae (sacae.reference, NCHW tensors) as the baseline."""


def _summary(seconds: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "n": len(seconds)}


def _config(args: BenchArgs, configuration: str, work_dir: str, **overrides) -> TrainConfig:
    return resolve(
        TrainConfig(
            task=args.task, device=args.device, precision=args.precision, num_threads=args.num_threads,
            batch_size=args.batch_size, hidden_dim=args.hidden_dim, num_filters=args.num_filters,
            image_size=args.image_size, seed=args.seed, work_dir=work_dir, **CONFIGURATIONS[configuration],
            **overrides,
        )
    )  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_updates(args: BenchArgs, configuration: str, reference: bool = False) -> dict:
    """Seconds per update, replay sampling included, on a buffer of random frames of the real shapes; with
    `reference`, of the authors'-style update on the same networks in the usual NCHW layout instead."""
    from sacae.agent import SacAeAgent
    from sacae.envs import make_env
    from sacae.replay import ReplayBuffer
    from sacae.trainer import select_device

    cfg = _config(args, configuration, tempfile.gettempdir())
    device = select_device(cfg.device)
    env = make_env(cfg, seed=cfg.seed)
    spec = env.spec
    torch.manual_seed(cfg.seed)
    agent = SacAeAgent(spec.obs_shape, spec.action_dim, cfg, device)
    update = agent.update
    if reference:
        from sacae.reference import reference_update

        for net in agent.networks().values():
            net.to(memory_format=torch.contiguous_format)

        def update(batch, step):
            reference_update(agent, batch, step)

    replay = ReplayBuffer(spec.frame_shape, spec.obs_dtype, spec.action_dim, 2000, env.frame_stack,
                          cfg.episode_agent_steps, device, seed=cfg.seed)  # fmt: skip
    rng = np.random.default_rng(cfg.seed)

    def random_obs():
        if cfg.pixels:
            return rng.integers(0, 256, size=spec.obs_shape, dtype=np.uint8)
        return rng.standard_normal(spec.obs_shape).astype(np.float32)

    replay.start_episode(random_obs())
    for _ in range(1000):
        replay.add(rng.uniform(-1, 1, spec.action_dim), float(rng.random()), random_obs(), 1.0)
    seconds = []
    for i in range(args.warmup + args.updates):
        _sync(device)
        t0 = time.perf_counter()
        update(replay.sample(cfg.batch_size), i)  # alternate steps: the actor runs on every second one
        _sync(device)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - t0)
    env.close()
    return _summary(seconds)


def time_env(args: BenchArgs) -> dict:
    """Seconds per agent step of the pixel environment (physics x action repeat and the observation's render),
    and of one render alone."""
    from sacae.envs import make_env

    cfg = _config(args, "sac_ae", tempfile.gettempdir())
    env = make_env(cfg, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    env.reset()
    step_s, render_s = [], []
    for i in range(args.warmup + args.env_steps):
        t0 = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(env.sample_action(rng))
        t1 = time.perf_counter()
        env.render()
        t2 = time.perf_counter()
        if i >= args.warmup:
            step_s.append(t1 - t0)
            render_s.append(t2 - t1)
        if terminated or truncated:
            env.reset()
    env.close()
    return {"step": _summary(step_s), "render": _summary(render_s), "action_repeat": cfg.action_repeat}


def time_training(args: BenchArgs, overlap: Literal["on", "off"] = "off") -> dict:
    """Steady agent steps/s of real sac_ae training (collection, update, replay), through Trainer.step, with the
    update and the environment step in sequence (off) or overlapped (on)."""
    from sacae.trainer import Trainer

    with tempfile.TemporaryDirectory() as work_dir:
        cfg = _config(args, "sac_ae", work_dir, init_steps=0, eval_freq=10**9, num_eval_episodes=0,
                      num_train_steps=args.warmup + args.train_steps + 1, overlap=overlap)  # fmt: skip
        trainer = Trainer(cfg)
        trainer.logger.console_write = lambda line: None
        for _ in range(args.warmup + 1):
            trainer.step()
        _sync(trainer.device)
        t0 = time.perf_counter()
        for _ in range(args.train_steps):
            trainer.step()
        _sync(trainer.device)
        elapsed = time.perf_counter() - t0
        trainer.close()
    agent_steps_per_s = args.train_steps / elapsed
    return {"agent_steps_per_s": agent_steps_per_s, "env_steps_per_s": agent_steps_per_s * cfg.action_repeat,
            "action_repeat": cfg.action_repeat}  # fmt: skip


def replay_bytes_per_transition(args: BenchArgs, capacity: int = 1_000_000) -> float:
    from sacae.replay import ReplayBuffer

    cfg = _config(args, "sac_ae", tempfile.gettempdir())
    frame = (3, cfg.image_size, cfg.image_size)
    return ReplayBuffer.estimate_bytes(frame, 1, 1, capacity, cfg.frame_stack, cfg.episode_agent_steps) / capacity


def run_bench(args: BenchArgs) -> dict:
    """All measurements as one dictionary (what `sacae bench` prints as JSON)."""
    for name in ("updates", "env_steps", "train_steps"):
        if getattr(args, name) < 1:
            raise SacaeError(f"--{name} must be at least 1 (got {getattr(args, name)}).")
    from sacae.trainer import select_device

    device = select_device(args.device)
    configure_process(args.num_threads)
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else processor_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "task": args.task,
        "batch_size": args.batch_size,
        "hidden_dim": args.hidden_dim,
        "update": {c: time_updates(args, c) for c in args.configurations},
        "update_reference": {"sac_ae": time_updates(args, "sac_ae", reference=True)} if args.reference else {},
        "env": time_env(args),
        "train": time_training(args, overlap="off"),
        "train_overlap": time_training(args, overlap="on"),
        "replay_bytes_per_transition": replay_bytes_per_transition(args),
    }
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if device.type == "cuda":
        result["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def format_table(r: dict) -> str:
    lines = [
        f"sacae bench: {r['device']} ({r['device_name']}), torch {r['torch']}, {r['threads']} threads, "
        f"{r['precision']}, batch {r['batch_size']}, hidden {r['hidden_dim']}, task {r['task']}",
        f"{'measurement':<34}{'median':>12}{'min':>12}{'max':>12}",
    ]
    for name, s in r["update"].items():
        lines.append(f"{'update ' + name + ' (s)':<34}{s['median_s']:>12.4f}{s['min_s']:>12.4f}{s['max_s']:>12.4f}")
    for name, s in r["update_reference"].items():
        label = f"update {name} authors' style (s)"
        lines.append(f"{label:<34}{s['median_s']:>12.4f}{s['min_s']:>12.4f}{s['max_s']:>12.4f}")
        if name in r["update"]:
            speedup = s["median_s"] / r["update"][name]["median_s"]
            lines.append(f"{'speed-up of the ' + name + ' update':<34}{speedup:>11.2f}x")
    env = r["env"]
    for part in ("step", "render"):
        s = env[part]
        label = "env render 84x84 (ms)" if part == "render" else f"env step (x{env['action_repeat']} + render) (ms)"
        lines.append(f"{label:<34}{s['median_s'] * 1e3:>12.2f}{s['min_s'] * 1e3:>12.2f}{s['max_s'] * 1e3:>12.2f}")
    t = r["train"]
    lines.append(f"{'training sac_ae agent steps/s':<34}{t['agent_steps_per_s']:>12.3f}")
    lines.append(f"{'training sac_ae env steps/s':<34}{t['env_steps_per_s']:>12.3f}")
    o = r["train_overlap"]
    lines.append(f"{'  overlapped: agent steps/s':<34}{o['agent_steps_per_s']:>12.3f}")
    lines.append(f"{'  speed-up of the overlap':<34}{o['agent_steps_per_s'] / t['agent_steps_per_s']:>11.2f}x")
    lines.append(f"{'replay bytes per pixel transition':<34}{r['replay_bytes_per_transition']:>12.0f}")
    lines.append(f"{'peak RSS (GB)':<34}{r['peak_rss_gb']:>12.2f}")
    if "gpu_peak_memory_gb" in r:
        lines.append(f"{'GPU peak memory (GB)':<34}{r['gpu_peak_memory_gb']:>12.2f}")
    return "\n".join(lines)


def bench(args: BenchArgs) -> dict:
    result = run_bench(args)
    print(format_table(result))
    print(json.dumps(result), flush=True)
    return result
