"""The `sacae` command (train, train-seeds, eval, bench, sweep, status, report): a thin layer over functions a user
can import."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import tyro

from sacae.bench import BenchArgs
from sacae.config import TrainConfig
from sacae.errors import RunStopped, SacaeError
from sacae.report import ReportArgs
from sacae.status import StatusArgs
from sacae.sweep import SweepArgs


@dataclass(frozen=True)
class EvalArgs:
    """Evaluate a run's latest (or a chosen) snapshot with the deterministic policy and write a video."""

    run_dir: Annotated[str, tyro.conf.Positional]
    """A training work dir (holding config.json and model/)."""
    snapshot: str | None = None
    """Snapshot file to load (default: the latest in RUN_DIR/model)."""
    num_episodes: int | None = None
    """Episodes to run (default: the run's --num_eval_episodes)."""
    save_video: bool = True
    """Write the first episode to RUN_DIR/video/eval_<env_steps>.mp4."""
    device: str = "auto"
    seed: int = 0
    """Seed of the evaluation environment."""


@dataclass(frozen=True)
class TrainSeedsArgs(TrainConfig):
    """Train several seeds of one configuration in one process (one GPU): each seed has its own environments,
    replay buffer, random streams and run folder, RUNS_DIR/<task>/<configuration>/seed_<i>/, and computes what its
    own `sacae train` run computes, up to float rounding; the seeds' networks are stacked so that each kernel serves
    all of them. Running the same command again resumes the seeds, and so does --resume with the group's folder; a
    seed that fails stops alone (exit status 3 only when every seed failed). See docs/multiseed.md.
    """

    seed: tyro.conf.Suppress[int] = 1
    work_dir: tyro.conf.Suppress[str] = "./save"
    resume: str | None = None
    """Resume the group in this folder, RUNS_DIR/<task>/<configuration> (every seed_<i>/ there that holds a
    config.json, or those of --seeds), from the seeds' saved config.json; a seed folder resumes that seed alone.
    Other flags are ignored, except --device, --num_threads, --overlap, --replay_device and --compile when set away
    from their defaults."""
    seeds: tuple[int, ...] | None = None
    """The seeds to train, e.g. --seeds 1 2 3 4 5 6 7 8 9 10 (default: 1 2 3; with --resume, every seed there)."""
    runs_dir: str = "runs"
    """Folder that holds <task>/<configuration>/seed_<i>/ (the layout of sacae sweep and sacae report)."""


DEFAULT_SEEDS = (1, 2, 3)


def train(cfg: TrainConfig) -> None:
    from sacae.trainer import Trainer  # heavy imports (dm_control, torch) only once the flags are valid

    Trainer(cfg).run()


def train_seeds(args: TrainSeedsArgs) -> None:
    from sacae.multiseed import train_seeds as train_group

    seeds = args.seeds if args.seeds is not None else (() if args.resume is not None else DEFAULT_SEEDS)
    train_group(args, seeds, args.runs_dir)


def evaluate(args: EvalArgs) -> None:
    from sacae.trainer import evaluate_run

    if args.num_episodes is not None and args.num_episodes < 1:
        raise SacaeError(f"--num_episodes must be at least 1 (got {args.num_episodes}).")
    result = evaluate_run(args.run_dir, args.snapshot, args.num_episodes, args.save_video, args.device, args.seed)
    print(f"| eval | S: {result['env_steps']} | ER: {result['episode_reward']:.4f}")
    print(json.dumps(result))


DEBUG_VARIABLE = "SACAE_DEBUG"
"""Set to 1 (or pass --debug) to see the full traceback of an unexpected error instead of its one sentence."""
UNEXPECTED_EXIT_CODE = 1


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0")


def run_guarded(fn: Callable[[], None], command: str = "sacae") -> int:
    """Run `fn`, turning a SacaeError into one sentence on stderr and exit status 2, and any other exception into
    one sentence that names it and says how to see its traceback (exit status 1)."""
    try:
        fn()
    except SacaeError as e:
        print(f"sacae: error: {e}", file=sys.stderr)
        return e.exit_code
    except RunStopped as e:
        print(f"sacae: {e}.", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sacae: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debugging():
            raise
        what = f"{type(e).__name__}: {e}".strip().rstrip(":").splitlines()[0]
        print(f"sacae: error: {command} failed unexpectedly ({what}); run it again with --debug (or "
              f"{DEBUG_VARIABLE}=1) for the full traceback.", file=sys.stderr)  # fmt: skip
        return UNEXPECTED_EXIT_CODE
    return 0


def run_sweep(args: SweepArgs) -> int:
    """Exit status 1 when a local run of the sweep failed, as well as the usual 2 for bad input."""
    from sacae.sweep import sweep

    outcome: dict[str, str] = {}
    code = run_guarded(lambda: outcome.update(sweep(args)), "sacae sweep")
    if code == 0 and any(v.startswith("exited") for v in outcome.values()):
        return 1
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # accepted anywhere on the line, for every command
        argv.remove("--debug")
        os.environ[DEBUG_VARIABLE] = "1"
    args = tyro.extras.subcommand_cli_from_dict(
        {
            "train": TrainConfig,
            "train-seeds": TrainSeedsArgs,
            "eval": EvalArgs,
            "bench": BenchArgs,
            "sweep": SweepArgs,
            "status": StatusArgs,
            "report": ReportArgs,
        },
        prog="sacae",
        description="SAC+AE for the DeepMind Control Suite. Add --debug to any command to see the full traceback "
        "of an unexpected error.",
        args=argv,
        use_underscores=True,
    )
    if isinstance(args, TrainSeedsArgs):
        return run_guarded(lambda: train_seeds(args), "sacae train-seeds")
    if isinstance(args, TrainConfig):
        return run_guarded(lambda: train(args), "sacae train")
    if isinstance(args, SweepArgs):
        return run_sweep(args)
    if isinstance(args, StatusArgs):
        from sacae.status import show_status

        return run_guarded(lambda: show_status(args), "sacae status")
    if isinstance(args, ReportArgs):
        from sacae.report import report

        return run_guarded(lambda: report(args), "sacae report")
    if isinstance(args, BenchArgs):
        from sacae.bench import bench

        return run_guarded(lambda: bench(args), "sacae bench")
    return run_guarded(lambda: evaluate(args), "sacae eval")


if __name__ == "__main__":
    sys.exit(main())
