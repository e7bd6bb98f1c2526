"""Aggregate training speed of a group of N seeds in one process (`sacae train-seeds`), and of N separate processes:
`python -m sacae.group_bench [--num_seeds 1 2 4] [--separate] [--device cuda] [--repeats 3]`.

For each N it builds the group's `Trainer` (seeds 1..N, no seed phase, no evaluation) in a temporary folder, runs
`--warmup` agent steps through `Trainer.step`, then times `--steps` more: collection, the group's update and the
environments stepped through their pools, as in training. The figure is agent steps/s summed over the seeds (the
group's agent steps/s x N). With `--separate` it also starts N processes at once, each timing one seed's `sacae
train` trainer (`--single`): each builds its trainer and warms up, then all wait for a start file and time the same
number of steps side by side; their agent steps/s are summed. Over `--repeats` the two measurements alternate (in
process first, then separate first, ...); the table gives the medians and the median of the per-repeat ratios. It
prints a table and one JSON line (`--json`: the JSON line only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sacae.config import CONFIGURATIONS, TrainConfig, resolve

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the environments' worker processes import this module when it is the main one
# (`python -m sacae.group_bench`), and need no torch.

# How long the processes of a separate measurement may take to build their trainers and warm up.
READY_TIMEOUT_S = 1800.0


def bench_config(
    configuration: str = "sac_ae",
    task: str = "cartpole_swingup",
    device: str = "auto",
    overlap: str = "auto",
    precision: str = "fp32",
    compile: str = "auto",
    image_size: int = 84,
    num_filters: int = 32,
    hidden_dim: int = 1024,
    batch_size: int = 128,
    num_threads: int | None = None,
) -> TrainConfig:
    """The TrainConfig of the measurement (the project's defaults where not given)."""
    return resolve(
        TrainConfig(
            task=task, device=device, overlap=overlap, precision=precision, compile=compile, image_size=image_size,
            num_filters=num_filters, hidden_dim=hidden_dim, batch_size=batch_size, num_threads=num_threads,
            **CONFIGURATIONS[configuration],
        )
    )  # fmt: skip


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wait_for(path: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s")
        time.sleep(0.002)


def time_group(
    cfg: TrainConfig,
    num_seeds: int,
    steps: int = 10,
    warmup: int = 3,
    *,
    single: bool = False,
    ready_file: str | Path | None = None,
    start_file: str | Path | None = None,
) -> dict:
    """Steady-state speed of training `num_seeds` seeds (1..N) in one process through `Trainer.step`: `warmup`
    untimed agent steps (after the first, which evaluates nothing and starts the episodes), then `steps` timed
    ones. `agent_steps_per_s` is summed over the seeds (group agent steps/s x N). `single`: one seed's `sacae
    train` trainer (SacAeAgent) instead of a group of one. With `start_file`, write `ready_file` after the warm-up
    and wait for `start_file` to exist before timing (the start barrier of `time_separate`)."""
    import torch

    from sacae.trainer import Trainer

    if num_seeds < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"num_seeds and steps must be at least 1, warmup at least 0 (got {num_seeds}, {steps}, "
                         f"{warmup})")  # fmt: skip
    if single and num_seeds != 1:
        raise ValueError("single times one seed's trainer: num_seeds must be 1")
    with tempfile.TemporaryDirectory(prefix="sacae-group-bench-") as runs_dir:
        cfg = dataclasses.replace(
            cfg, init_steps=0, eval_freq=10**9, num_eval_episodes=0, num_train_steps=warmup + steps + 1,
            save_tb=False, save_model=False, save_video=False, logger="", resume=None, no_resume=False,
            work_dir=os.path.join(runs_dir, "single"),
        )  # fmt: skip
        trainer = Trainer(cfg) if single else Trainer(cfg, seeds=list(range(1, num_seeds + 1)), runs_dir=runs_dir)
        try:
            for run in trainer.runs:
                run.logger.console_write = lambda line: None
            for _ in range(warmup + 1):
                trainer.step()
            _sync(trainer.device)
            if trainer.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(trainer.device)  # the peak of the timed steps
            if start_file is not None:
                Path(ready_file).touch()
                _wait_for(Path(start_file))
            started = time.time()
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            _sync(trainer.device)
            elapsed = time.perf_counter() - t0
            ended = time.time()
            workers = trainer.env_pool.workers
            overlap, device, threads = trainer.overlap, str(trainer.device), torch.get_num_threads()
        finally:
            trainer.close()
    group_steps_per_s = steps / elapsed
    return {
        "num_seeds": num_seeds,
        "agent_steps_per_s": group_steps_per_s * num_seeds,
        "env_steps_per_s": group_steps_per_s * num_seeds * cfg.action_repeat,
        "seconds_per_group_step": elapsed / steps,
        "steps": steps,
        "warmup": warmup,
        "action_repeat": cfg.action_repeat,
        "configuration": cfg.configuration,
        "device": device,
        "overlap": overlap,
        "threads": threads,
        "env_workers": workers,
        "trainer": "single" if single else "group",
        "start_time": started,
        "end_time": ended,
    }


def _child_command(args: argparse.Namespace, ready: Path, start: Path) -> list[str]:
    command = [sys.executable, "-m", "sacae.group_bench", "--num_seeds", "1", "--single", "--json",
               "--ready_file", os.fspath(ready), "--start_file", os.fspath(start)]  # fmt: skip
    for name in ("configuration", "task", "device", "overlap", "precision", "compile", "steps", "warmup",
                 "image_size", "num_filters", "hidden_dim", "batch_size", "num_threads"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name}", str(value)]
    return command


def time_separate(args: argparse.Namespace, num_seeds: int) -> dict:
    """`num_seeds` processes, each timing one seed's trainer (`--single`), started together: each builds and warms
    up, then all wait for one start file. Their agent steps/s summed, and the N x steps over the wall-clock time
    from the start to the last process's end."""
    with tempfile.TemporaryDirectory(prefix="sacae-group-bench-start-") as folder:
        start = Path(folder) / "start"
        ready = [Path(folder) / f"ready-{i}" for i in range(num_seeds)]
        procs = [
            subprocess.Popen(
                _child_command(args, ready[i], start), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )  # fmt: skip
            for i in range(num_seeds)
        ]
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not all(path.exists() for path in ready):
                failed = [p for p in procs if p.poll() is not None]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            start.touch()
            outputs = [p.communicate() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    rows = []
    for p, (out, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"a separate process ended with exit code {p.returncode}:\n{err[-3000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1])["runs"][0]["in_process"])
    wall = max(r["end_time"] for r in rows) - min(r["start_time"] for r in rows)
    return {
        "num_seeds": num_seeds,
        "agent_steps_per_s": sum(r["agent_steps_per_s"] for r in rows),
        "env_steps_per_s": sum(r["env_steps_per_s"] for r in rows),
        "agent_steps_per_s_wall": num_seeds * rows[0]["steps"] / wall,
        "processes": [{k: r[k] for k in ("agent_steps_per_s", "seconds_per_group_step")} for r in rows],
    }


def measure(args: argparse.Namespace, num_seeds: int) -> dict:
    """In-process (and with --separate, separate-process) figures for N seeds over the repeats, alternating."""
    cfg = bench_config(
        args.configuration, args.task, args.device, args.overlap, args.precision, args.compile, args.image_size,
        args.num_filters, args.hidden_dim, args.batch_size, args.num_threads,
    )  # fmt: skip
    in_process: list[dict] = []
    separate: list[dict] = []
    for repeat in range(args.repeats):
        order = ("in", "separate") if repeat % 2 == 0 else ("separate", "in")
        for kind in order:
            if kind == "in":
                in_process.append(time_group(cfg, num_seeds, args.steps, args.warmup, single=args.single,
                                             ready_file=args.ready_file, start_file=args.start_file))  # fmt: skip
            elif args.separate:
                separate.append(time_separate(args, num_seeds))
    row: dict = {"num_seeds": num_seeds, "in_process": _median_row(in_process), "in_process_all": in_process}
    if separate:
        row["separate"] = _median_row(separate)
        row["separate_all"] = separate
        ratios = [a["agent_steps_per_s"] / b["agent_steps_per_s"] for a, b in zip(in_process, separate, strict=True)]
        row["in_process_over_separate"] = statistics.median(ratios)
    return row


def _median_row(rows: list[dict]) -> dict:
    """The first row with each of its figures replaced by the median over `rows`."""
    keys = ("agent_steps_per_s", "env_steps_per_s", "seconds_per_group_step", "agent_steps_per_s_wall")
    return {**rows[0], **{k: statistics.median(r[k] for r in rows) for k in keys if k in rows[0]}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_seeds", type=int, nargs="+", default=[1, 2, 4], help="group sizes N to time")
    parser.add_argument("--configuration", choices=tuple(CONFIGURATIONS), default="sac_ae")
    parser.add_argument("--task", default="cartpole_swingup")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--overlap", choices=("on", "off", "auto"), default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--steps", type=int, default=10, help="timed agent steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed agent steps first")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per N (alternating with --separate)")
    parser.add_argument("--separate", action="store_true", help="also time N separate single-seed processes")
    parser.add_argument("--image_size", type=int, default=84)
    parser.add_argument("--num_filters", type=int, default=32)
    parser.add_argument("--hidden_dim", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    # The processes of a separate measurement.
    parser.add_argument("--single", action="store_true", help="time one seed's `sacae train` trainer (N = 1)")
    parser.add_argument("--ready_file", help=argparse.SUPPRESS)
    parser.add_argument("--start_file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single and args.num_seeds != [1]:
        parser.error("--single times one seed: give --num_seeds 1")
    if args.single and args.separate:
        parser.error("--single and --separate exclude each other")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or min(args.num_seeds) < 1:
        parser.error("--steps, --repeats and --num_seeds must be at least 1, --warmup at least 0")
    return args


def format_table(result: dict) -> str:
    lines = [
        f"sacae group bench: {result['configuration']} on {result['task']}, device {result['device']}, "
        f"load average {' '.join(f'{x:.2f}' for x in result['load_average'])}",
        f"{'N':>3} {'workers':>9} {'agent steps/s':>14} {'env steps/s':>12} {'s/group step':>13}"
        + (f" {'separate':>14} {'in/separate':>12}" if result["separate"] else ""),
    ]
    for row in result["runs"]:
        r = row["in_process"]
        line = (f"{row['num_seeds']:>3} {r['env_workers']:>9} {r['agent_steps_per_s']:>14.3f} "
                f"{r['env_steps_per_s']:>12.2f} {r['seconds_per_group_step']:>13.3f}")  # fmt: skip
        if "separate" in row:
            line += f" {row['separate']['agent_steps_per_s']:>14.3f} {row['in_process_over_separate']:>12.2f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import torch

    args = parse_args(argv)
    load_before = os.getloadavg()
    runs = []
    for n in args.num_seeds:
        runs.append(measure(args, n))
        if not args.json:  # as it goes: the figures of each N (JSON) on stderr
            print(f"N = {n}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    first = runs[0]["in_process"]
    result = {
        "configuration": args.configuration,
        "task": args.task,
        "device": first["device"],
        "overlap": first["overlap"],
        "threads": first["threads"],
        "precision": args.precision,
        "compile": args.compile,
        "image_size": args.image_size,
        "num_filters": args.num_filters,
        "hidden_dim": args.hidden_dim,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "separate": args.separate,
        "runs": runs,
        "torch": torch.__version__,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": load_before,
        "load_average_after": os.getloadavg(),
    }
    if not args.json:
        print(format_table(result))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
