"""`sacae bench`: how fast training runs on this machine, measured, printed as a table and one JSON line.

It times the update of each configuration (real replay sampling included) at the default network sizes, the
environment step with its render (and the physics and the render inside it), and a short segment of real training
through the trainer's own step, with the update and the environment step in sequence and overlapped (--overlap).
Optionally: the updates in further precisions and compile settings (--precisions, --compile_modes), and the
aggregate speed of several seeds trained in one process (--group_seeds, sacae.group_bench).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from sacae.config import CONFIGURATIONS, TrainConfig, resolve
from sacae.errors import SacaeError
from sacae.process import configure_process, processor_name

MEASUREMENTS = ("update", "env", "train", "group")
GROUP_REPLAY_CAPACITY = 10_000


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
    """Timed agent steps of real training (sac_ae) after the warm-up, once in sequence and once overlapped (and
    timed group steps of --group_seeds)."""
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: Literal["auto", "on", "off"] = "auto"
    """The update's torch.compile setting (train's --compile) in every measurement."""
    precisions: tuple[Literal["fp32", "bf16"], ...] = ()
    """Also time the updates in each combination of these precisions and --compile_modes (default: --precision
    only), e.g. --precisions fp32 bf16 --compile_modes off on."""
    compile_modes: tuple[Literal["auto", "on", "off"], ...] = ()
    """Also time the updates in each combination of these compile settings and --precisions (default: --compile
    only)."""
    train_task: str | None = None
    """Task of the training measurements (default: --task), e.g. cheetah_run."""
    group_seeds: tuple[int, ...] = ()
    """Also measure the aggregate agent steps/s of this many seeds trained in one process (sac_ae on the training
    task, sacae.group_bench), e.g. --group_seeds 1 4 10."""
    only: tuple[Literal["update", "env", "train", "group"], ...] = ()
    """Take only these measurements (default: all; group only with --group_seeds)."""
    partial: str | None = None
    """Write the measurements taken so far to this JSON file after each one (what is left of a bench stopped by a
    time limit)."""
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
    values = dict(
        task=args.task, device=args.device, precision=args.precision, compile=args.compile,
        num_threads=args.num_threads, batch_size=args.batch_size, hidden_dim=args.hidden_dim,
        num_filters=args.num_filters, image_size=args.image_size, seed=args.seed, work_dir=work_dir,
        **CONFIGURATIONS[configuration],
    )  # fmt: skip
    values.update(overrides)
    return resolve(TrainConfig(**values))


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's), so that a timer around it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _with_peak(result: dict, device: torch.device) -> dict:
    """`result` with the GPU memory peak since the last _reset_peak (GB), on a GPU."""
    if device.type == "cuda":
        result["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def time_updates(
    args: BenchArgs,
    configuration: str,
    reference: bool = False,
    precision: str | None = None,
    compile: str | None = None,
) -> dict:
    """Seconds per update, replay sampling included, on a buffer of random frames of the real shapes; with
    `reference`, of the authors'-style update on the same networks in the usual NCHW layout instead. `precision` and
    `compile` default to the bench's."""
    from sacae.agent import SacAeAgent
    from sacae.envs import make_env
    from sacae.replay import ReplayBuffer
    from sacae.trainer import select_device

    overrides = {"precision": precision or args.precision, "compile": compile or args.compile}
    cfg = _config(args, configuration, tempfile.gettempdir(), **overrides)
    device = select_device(cfg.device)
    env = make_env(cfg, seed=cfg.seed)
    spec = env.spec
    torch.manual_seed(cfg.seed)
    _reset_peak(device)
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
        sync_device(device)
        t0 = time.perf_counter()
        update(replay.sample(cfg.batch_size), i)  # alternate steps: the actor runs on every second one
        sync_device(device)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - t0)
    env.close()
    result = _summary(seconds)
    if hasattr(agent, "compiled"):  # False where --compile on fell back to the eager update
        result["compiled"] = bool(agent.compiled)
    return _with_peak(result, device)


def time_env(args: BenchArgs) -> dict:
    """Seconds per agent step of the pixel environment (physics x action repeat and the observation's render), of
    the physics inside it (the simulator steps of one agent step), and of one render alone."""
    from sacae.envs import make_env

    cfg = _config(args, "sac_ae", tempfile.gettempdir())
    env = make_env(cfg, seed=cfg.seed)
    physics_s: list[float] = []
    physics_step = getattr(env, "_physics_step", None)
    if physics_step is not None:  # a DMCEnv: the simulator steps of an agent step, timed inside env.step

        def timed_physics_step(action):
            t0 = time.perf_counter()
            out = physics_step(action)
            physics_s.append(time.perf_counter() - t0)
            return out

        env._physics_step = timed_physics_step
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
    result = {"step": _summary(step_s), "render": _summary(render_s), "action_repeat": cfg.action_repeat}
    if physics_s:
        result["physics"] = _summary(physics_s[args.warmup :])
    return result


def time_training(args: BenchArgs, overlap: Literal["on", "off"] = "off") -> dict:
    """Steady agent steps/s of real sac_ae training (collection, update, replay) on the training task, through
    Trainer.step, with the update and the environment step in sequence (off) or overlapped (on): one seed's
    `sacae train` trainer timed by `sacae.group_bench.time_group`."""
    from sacae.group_bench import time_group
    from sacae.trainer import select_device

    with tempfile.TemporaryDirectory() as work_dir:
        cfg = _config(args, "sac_ae", work_dir, task=args.train_task or args.task, overlap=overlap)
        row = time_group(cfg, 1, steps=args.train_steps, warmup=args.warmup, single=True)
    result = {key: row[key] for key in ("agent_steps_per_s", "env_steps_per_s", "action_repeat")}
    return _with_peak({**result, "task": cfg.env_name}, select_device(args.device))


def time_group_seeds(args: BenchArgs, num_seeds: int) -> dict:
    """Aggregate agent and environment steps/s of `num_seeds` seeds of sac_ae trained in one process on the
    training task (sacae.group_bench.time_group), with the GPU memory peak."""
    try:
        from sacae.group_bench import time_group  # imported lazily: it builds environment pools
    except ImportError as e:
        raise SacaeError(f"--group_seeds needs sacae.group_bench, which cannot be imported here ({e}).") from None
    from sacae.trainer import select_device

    if num_seeds < 1:
        raise SacaeError(f"--group_seeds takes seed counts of at least 1 (got {num_seeds}).")
    device = select_device(args.device)
    with tempfile.TemporaryDirectory() as work_dir:
        # A replay ring of GROUP_REPLAY_CAPACITY per seed: the default million transitions of ten pixel seeds would
        # fit in no GPU and few hosts (21 GB each), and the timed steps use a few hundred.
        cfg = _config(args, "sac_ae", work_dir, task=args.train_task or args.task, init_steps=0, eval_freq=10**9,
                      num_eval_episodes=0, replay_buffer_capacity=GROUP_REPLAY_CAPACITY)  # fmt: skip
        _reset_peak(device)
        row = dict(time_group(cfg, num_seeds, steps=args.train_steps, warmup=args.warmup))
    return _with_peak(row, device)


def replay_bytes_per_transition(args: BenchArgs, capacity: int = 1_000_000) -> float:
    from sacae.replay import ReplayBuffer

    cfg = _config(args, "sac_ae", tempfile.gettempdir())
    frame = (3, cfg.image_size, cfg.image_size)
    return ReplayBuffer.estimate_bytes(frame, 1, 1, capacity, cfg.frame_stack, cfg.episode_agent_steps) / capacity


def _peaks(r) -> list[float]:
    """Every gpu_peak_memory_gb inside the result `r`."""
    if isinstance(r, dict):
        return [v for k, v in r.items() if k == "gpu_peak_memory_gb"] + [p for v in r.values() for p in _peaks(v)]
    return []


def update_variants(args: BenchArgs) -> list[tuple[str, str]]:
    """The (precision, compile) pairs timed beside the bench's own --precision and --compile."""
    pairs = [(p, c) for p in args.precisions or (args.precision,) for c in args.compile_modes or (args.compile,)]
    return [pair for pair in dict.fromkeys(pairs) if pair != (args.precision, args.compile)]


def variant_name(precision: str, compile: str) -> str:
    return f"{precision} compile {compile}"


def _tf32() -> dict[str, str | bool]:
    """How fp32 matrix products and convolutions run on a GPU: TF32 or not (torch's defaults: products in full fp32,
    convolutions in TF32)."""
    try:
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):  # torch 2.9 and later
            return {"matmul": torch.backends.cuda.matmul.fp32_precision, "conv": conv.fp32_precision}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32}
    except RuntimeError as e:  # torch refuses to read settings made through both of its interfaces
        return {"error": str(e)[:200]}


def run_bench(args: BenchArgs, progress: Callable[[dict], None] | None = None) -> dict:
    """All measurements as one dictionary (what `sacae bench` prints as JSON); `progress` gets the dictionary
    after each measurement."""
    for name in ("updates", "env_steps", "train_steps"):
        if getattr(args, name) < 1:
            raise SacaeError(f"--{name} must be at least 1 (got {getattr(args, name)}).")
    if "group" in args.only and not args.group_seeds:
        raise SacaeError("--only group needs --group_seeds (e.g. --group_seeds 1 4 10).")
    from sacae.trainer import select_device

    device = select_device(args.device)
    configure_process(args.num_threads)
    wanted = set(args.only or MEASUREMENTS)
    if not args.group_seeds:
        wanted.discard("group")
    result: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else processor_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "compile": args.compile,
        "task": args.task,
        "train_task": args.train_task or args.task,
        "batch_size": args.batch_size,
        "hidden_dim": args.hidden_dim,
        "measured": [m for m in MEASUREMENTS if m in wanted],
    }
    if device.type == "cuda":
        result["tf32"] = _tf32()

    def done(key: str, value) -> None:
        result[key] = value
        if progress is not None:
            progress(result)

    if "update" in wanted:
        done("update", {})
        for c in args.configurations:
            result["update"][c] = time_updates(args, c)
            done("update", result["update"])
        done("update_reference", {})
        if args.reference:
            done("update_reference", {"sac_ae": time_updates(args, "sac_ae", reference=True)})
        variants = update_variants(args)
        if variants:
            done("update_variants", {variant_name(p, m): {} for p, m in variants})
            # Configuration by configuration: a bench stopped early has every variant of the first ones.
            for c in args.configurations:
                for p, m in variants:
                    result["update_variants"][variant_name(p, m)][c] = time_updates(args, c, precision=p, compile=m)
                    done("update_variants", result["update_variants"])
    if "env" in wanted:
        done("env", time_env(args))
    if "train" in wanted:
        done("train", time_training(args, overlap="off"))
        done("train_overlap", time_training(args, overlap="on"))
    if "group" in wanted:
        done("group", {})
        for n in args.group_seeds:
            result["group"][str(n)] = time_group_seeds(args, n)
            done("group", result["group"])
    result["replay_bytes_per_transition"] = replay_bytes_per_transition(args)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if device.type == "cuda":  # the largest of the measurements' peaks
        peaks = [torch.cuda.max_memory_allocated(device) / 1e9, *_peaks(result)]
        result["gpu_peak_memory_gb"] = max(peaks)
    done("peak_rss_gb", result["peak_rss_gb"])
    return result


def _row(label: str, s: dict, scale: float = 1.0, digits: int = 5) -> str:
    values = (s[k] * scale for k in ("median_s", "min_s", "max_s"))
    return f"{label:<42}" + "".join(f"{v:>12.{digits}f}" for v in values)


def format_table(r: dict) -> str:
    lines = [
        f"sacae bench: {r['device']} ({r['device_name']}), torch {r['torch']}, {r['threads']} threads, "
        f"{r['precision']}, batch {r['batch_size']}, hidden {r['hidden_dim']}, task {r['task']}",
        f"{'measurement':<42}{'median':>12}{'min':>12}{'max':>12}",
    ]
    for name, s in r.get("update", {}).items():
        lines.append(_row(f"update {name} (s)", s))
    for name, s in r.get("update_reference", {}).items():
        lines.append(_row(f"update {name} authors' style (s)", s))
        if name in r.get("update", {}):
            speedup = s["median_s"] / r["update"][name]["median_s"]
            lines.append(f"{'speed-up of the ' + name + ' update':<42}{speedup:>11.2f}x")
    for variant, rows in r.get("update_variants", {}).items():
        for name, s in rows.items():
            lines.append(_row(f"update {name} {variant} (s)", s))
    if "env" in r:
        env = r["env"]
        for part in ("step", "physics", "render"):
            if part not in env:
                continue
            label = {
                "step": f"env step (x{env['action_repeat']} + render) (ms)",
                "physics": f"  physics inside it (x{env['action_repeat']}) (ms)",
                "render": "env render alone (ms)",
            }[part]
            lines.append(_row(label, env[part], 1e3, 2))
    if "train" in r:
        t = r["train"]
        task = t.get("task", r["task"])
        lines.append(f"{'training sac_ae agent steps/s':<42}{t['agent_steps_per_s']:>12.3f}")
        lines.append(f"{'training sac_ae env steps/s':<42}{t['env_steps_per_s']:>12.3f}")
        lines.append(f"{'  ms per agent step (' + task + ')':<42}{1e3 / t['agent_steps_per_s']:>12.2f}")
    if "train_overlap" in r:
        o, t = r["train_overlap"], r["train"]
        lines.append(f"{'  overlapped: agent steps/s':<42}{o['agent_steps_per_s']:>12.3f}")
        lines.append(f"{'  speed-up of the overlap':<42}{o['agent_steps_per_s'] / t['agent_steps_per_s']:>11.2f}x")
    for n, g in r.get("group", {}).items():
        lines.append(f"{f'{n} seeds in one process: agent steps/s':<42}{g['agent_steps_per_s']:>12.3f}")
    lines.append(f"{'replay bytes per pixel transition':<42}{r['replay_bytes_per_transition']:>12.0f}")
    lines.append(f"{'peak RSS (GB)':<42}{r['peak_rss_gb']:>12.2f}")
    if "gpu_peak_memory_gb" in r:
        lines.append(f"{'GPU peak memory (GB)':<42}{r['gpu_peak_memory_gb']:>12.2f}")
    return "\n".join(lines)


def _write_partial(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def bench(args: BenchArgs) -> dict:
    progress = None
    if args.partial is not None:
        path = args.partial
        progress = lambda result: _write_partial(path, result)  # noqa: E731
    result = run_bench(args, progress)
    print(format_table(result))
    print(json.dumps(result), flush=True)
    return result
