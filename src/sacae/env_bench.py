"""How fast a group of N environments steps one after another and in parallel (`sacae.env_pool`) on this machine:
`python -m sacae.env_bench [--tasks cartpole_swingup cheetah_run] [--seeds 1 2 4] [--repeats 5]`.

For each task, observation kind (pixels: 84x84 renders, 3 stacked; states: physics only) and N, it builds one pool
of each kind of worker over the same seeds, then times `--steps` group steps (N agent steps at the domain's PlaNet
action repeat, one per environment) of each pool in turn, `--repeats` times, so that the machine's drift shows in
every kind alike. With `--update_ms`, each group step is `step_async`, that many milliseconds of Python work on the
calling thread (holding the GIL, as the launches of an update on a GPU do), then `step_wait`. Prints a table (median
milliseconds per group step, and serial / pool) and one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import numpy as np

from sacae.config import PLANET_ACTION_REPEAT
from sacae.env_pool import EnvPool
from sacae.envs import DMCEnv, split_task_name

WORKERS = ("serial", "threads", "processes")


def _busy(seconds: float) -> None:
    """Pure-Python work for `seconds`: it holds the GIL throughout, as a trainer's thread does while it launches
    kernels."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def time_group(
    task: str, pixels: bool, num_envs: int, steps: int, repeats: int, workers: tuple[str, ...], update_ms: float
) -> dict:
    """Seconds per group step of `num_envs` environments for each kind of worker, alternating the kinds."""
    domain, name = split_task_name(task)
    make = [
        functools.partial(
            DMCEnv, domain, name, seed=seed, pixels=pixels, action_repeat=PLANET_ACTION_REPEAT.get(domain, 1)
        )
        for seed in range(1, num_envs + 1)
    ]
    pools = {kind: EnvPool(make, workers=kind) for kind in workers}
    try:
        action_dim = pools[workers[0]].envs[0].spec.action_dim
        rng = np.random.default_rng(0)
        for pool in pools.values():
            pool.reset()
            pool.step([np.zeros(action_dim, np.float32)] * num_envs)  # first frames, caches
        seconds: dict[str, list[float]] = {kind: [] for kind in workers}
        for _ in range(repeats):
            actions = rng.uniform(-1, 1, (steps, num_envs, action_dim)).astype(np.float32)
            for kind, pool in pools.items():
                start = time.perf_counter()
                for k in range(steps):
                    pool.step_async(list(actions[k]))
                    if update_ms:
                        _busy(update_ms / 1e3)
                    if any(truncated or terminated for _, _, terminated, truncated, _ in pool.step_wait()):
                        pool.reset()
                seconds[kind].append((time.perf_counter() - start) / steps)
    finally:
        for pool in pools.values():
            pool.close()
    row = {"task": task, "observations": "pixels" if pixels else "states", "envs": num_envs, "update_ms": update_ms}
    for kind in workers:
        row[f"{kind}_ms"] = statistics.median(seconds[kind]) * 1e3
        row[f"{kind}_all_ms"] = [round(s * 1e3, 3) for s in seconds[kind]]
    for kind in workers:
        if kind != "serial" and "serial" in workers:
            # Per repeat, then the median: each ratio compares timings taken a few seconds apart.
            ratios = [a / b for a, b in zip(seconds["serial"], seconds[kind], strict=True)]
            row[f"serial_over_{kind}"] = statistics.median(ratios)
    return row


def machine() -> dict:
    from sacae.process import processor_name

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return {"processor": processor_name(), "cpus": cpus, "python": platform.python_version(),
            "mujoco_gl": os.environ.get("MUJOCO_GL"), "load_average": os.getloadavg()}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["cartpole_swingup", "cheetah_run"])
    parser.add_argument("--observations", nargs="+", choices=("pixels", "states"), default=["pixels", "states"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 4], help="group sizes N to time")
    parser.add_argument("--steps", type=int, default=10, help="timed group steps per repeat and kind of worker")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", nargs="+", choices=WORKERS, default=list(WORKERS))
    parser.add_argument("--update_ms", type=float, default=0.0, help="Python work between step_async and step_wait")
    args = parser.parse_args(argv)
    workers = tuple(args.workers)
    start = machine()
    rows = []
    header = f"{'task':<18} {'obs':<6} {'N':>2} " + " ".join(f"{k + ' ms':>13}" for k in workers)
    header += "".join(f" {'serial/' + k:>17}" for k in workers if k != "serial" and "serial" in workers)
    print(header, flush=True)
    for task in args.tasks:
        for observations in args.observations:
            for n in args.seeds:
                row = time_group(task, observations == "pixels", n, args.steps, args.repeats, workers, args.update_ms)
                rows.append(row)
                line = f"{task:<18} {observations:<6} {n:>2} " + " ".join(f"{row[k + '_ms']:>13.2f}" for k in workers)
                line += "".join(f" {row['serial_over_' + k]:>17.2f}" for k in workers if "serial_over_" + k in row)
                print(line, flush=True)
    print(json.dumps({"env_pool": rows, "machine": start, "load_average_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
