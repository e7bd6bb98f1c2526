"""Gymnasium runs through the tools around training: `sacae sweep` (local, dry run, rerun, Slurm script), `sacae
status`, `sacae report`, `sacae eval` and `sacae train-seeds`, with tiny state runs on Pendulum-v1."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from sacae.cli import main
from sacae.status import collect_status, format_table
from sacae.sweep import SweepArgs, plan_sweep, run_script, sbatch_lines, slurm_script
from tests.conftest import run_cli
from tests.test_sweep import sweep_twice

ENV = "gymnasium:Pendulum-v1"
FOLDER = "gymnasium-Pendulum-v1"
# 100-step episodes (Pendulum's own limit is 200): the runs' logs show that --env_kwargs reached them.
KWARGS = '{"max_episode_steps": 100}'
# Two 100-step episodes, evaluated at 0, 100 and 200 env steps: a few seconds per run, mostly start-up.
TINY = [
    "--encoder_type", "identity", "--decoder_type", "identity", "--num_train_steps", "200", "--init_steps", "100",
    "--eval_freq", "100", "--num_eval_episodes", "1", "--num_threads", "1", "--hidden_dim", "32", "--batch_size",
    "16", "--env_kwargs", KWARGS,
]  # fmt: skip


def run_dir(runs: Path, seed: int) -> Path:
    return runs / FOLDER / "sac_states" / f"seed_{seed}"


def local_sweep(runs: Path, *extra: str, train=TINY):
    args = ["sweep", "--executor", "local", "--tasks", ENV, "--runs_dir", str(runs), *extra, "--", *train]
    return run_cli(args, cwd=runs.parent, timeout=300)


def log_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one_sentence_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sacae: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """Two seeds of Pendulum-v1 run to the end by one local sweep (snapshots and videos saved), then the same sweep
    again."""
    runs = tmp_path_factory.mktemp("gym_sweep") / "runs"
    return sweep_twice(local_sweep, runs, [*TINY, "--save_model", "--save_video"])


def test_local_sweep_trains_gymnasium_runs(finished_sweep):
    runs, first, _, _ = finished_sweep
    assert f"{FOLDER}/sac_states/seed_1: started" in first.stdout
    assert [p.name for p in runs.iterdir()] == [FOLDER]
    for seed in (1, 2):
        d = run_dir(runs, seed)
        script = (d / "run.sh").read_text()
        assert f"train --env {ENV} " in script and "--task" not in script
        assert f"--env_kwargs '{KWARGS}'" in script and f"--seed {seed} --work_dir {d}\n" in script
        config = json.loads((d / "config.json").read_text())
        assert (config["env"], config["env_kwargs"], config["seed"]) == (ENV, KWARGS, seed)
        assert json.loads((d / "status.json").read_text())["state"] == "finished"
        # The kwargs' time limit: episodes of 100 steps, not Pendulum's 200.
        assert [r["env_steps"] for r in log_rows(d / "train.log")] == [100, 200]
        assert [r["env_steps"] for r in log_rows(d / "eval.log")] == [0, 100, 200]
        assert (d / "video" / "200.mp4").stat().st_size > 0
    assert (run_dir(runs, 1) / "eval.log").read_text() != (run_dir(runs, 2) / "eval.log").read_text()


def test_second_sweep_skips_finished_runs(finished_sweep):
    runs, _, second, snapshot = finished_sweep
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("finished, skipped") == 2 and "started" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == snapshot


def test_dry_run_shows_env_commands(capsys, tmp_path):
    runs = tmp_path / "runs"
    argv = ["sweep", "--executor", "local", "--dry_run", "--tasks", ENV, "cartpole_swingup", "--num_seeds", "2",
            "--runs_dir", str(runs), "--", "--encoder_type", "identity", "--decoder_type", "identity"]  # fmt: skip
    assert main(argv) == 0
    lines = [
        line.split("would start: ", 1)[1] for line in capsys.readouterr().out.splitlines() if "would start" in line
    ]
    assert len(lines) == 4
    for seed, line in zip((1, 2), lines[:2], strict=True):
        assert f" train --env {ENV} --encoder_type identity" in line and "--task" not in line
        assert line.endswith(f"--seed {seed} --work_dir {run_dir(runs, seed)}")
    for seed, line in zip((1, 2), lines[2:], strict=True):
        assert " train --task cartpole_swingup " in line and "--env" not in line
        assert line.endswith(f"--work_dir {runs / 'cartpole_swingup' / 'sac_states' / f'seed_{seed}'}")
    assert not runs.exists()


def test_sweep_refuses_env_flags_it_cannot_pass_on(capsys, tmp_path, finished_sweep):
    runs, _, _, _ = finished_sweep
    base = ["sweep", "--executor", "local", "--dry_run", "--num_seeds", "2", "--runs_dir"]
    # --env_kwargs goes to every run: not to a dm_control task.
    line = one_sentence_error(capsys, [*base, str(tmp_path), "--tasks", ENV, "cartpole_swingup", "--", *TINY])
    assert "--env_kwargs goes to every run of the sweep, and cartpole_swingup is a dm_control task" in line
    line = one_sentence_error(capsys, [*base, str(tmp_path), "--tasks", ENV, "--", "--env", ENV])
    assert "The sweep sets --env itself" in line
    line = one_sentence_error(capsys, [*base, str(tmp_path), "--tasks", "gymnasium:Pendulum-v99"])
    assert "Unknown Gymnasium environment 'Pendulum-v99'" in line
    # The same id with other kwargs would resume these runs with a different environment.
    other = [*TINY[:-1], '{"max_episode_steps": 50}']
    line = one_sentence_error(capsys, [*base, str(runs), "--tasks", ENV, "--", *other])
    assert "holds a run started with other training flags" in line and '{"max_episode_steps": 100}' in line


def test_slurm_script_of_a_gymnasium_run(tmp_path):
    args = SweepArgs(tasks=(ENV,), train_args=tuple(TINY), num_seeds=1, runs_dir="r")
    [plan] = plan_sweep(args, tmp_path)
    assert plan.run_dir == run_dir(tmp_path / "r", 1) and plan.name == f"{FOLDER}/sac_states/seed_1"
    lines = sbatch_lines(args, plan)
    assert f"--job-name={FOLDER}.sac_states.seed_1" in lines
    assert not any(line.startswith("--gres") for line in lines)  # a state run asks for no GPU
    # 200 transitions: the memory of a run (2 GiB), plus 1 GiB.
    assert "--mem=4G" in lines
    assert f"bash {plan.run_dir}/run.sh &" in slurm_script(args, plan)
    assert f"train --env {ENV} " in run_script(plan, tmp_path)


def test_status_of_gymnasium_runs(finished_sweep, tmp_path):
    runs, _, _, _ = finished_sweep
    rows = collect_status([runs])
    assert [(r.task, r.configuration, r.seed, r.state) for r in rows] == [
        (FOLDER, "sac_states", "1", "finished"),
        (FOLDER, "sac_states", "2", "finished"),
    ]
    for row in rows:
        last = log_rows(Path(row.path) / "eval.log")[-1]
        assert (row.env_steps, row.total_env_steps, row.eval_return) == (200, 200, last["episode_reward"])
    assert format_table(rows).splitlines()[1].split()[:5] == [FOLDER, "sac_states", "1", "finished", "200/200"]
    # Out of the sweep's layout the labels come from config.json: the env name, not its default domain and task.
    lone = tmp_path / "lone"
    shutil.copytree(run_dir(runs, 2), lone)
    [row] = collect_status([lone])
    assert (row.task, row.configuration, row.seed) == (FOLDER, "sac_states", "2")


def test_report_of_gymnasium_runs(finished_sweep, tmp_path):
    runs, _, _, _ = finished_sweep
    out = tmp_path / "report"
    result = run_cli(["report", str(runs), "--out", str(out), "--at", "200", "--bootstrap_reps", "50"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = (out / "report.md").read_text()
    returns = [log_rows(run_dir(runs, seed) / "eval.log")[-1]["episode_reward"] for seed in (1, 2)]
    mean = sum(returns) / 2
    assert f"| {FOLDER} (no published numbers) | {mean:.0f} ± " in page and "(2 seeds) |" in page
    assert f"## {FOLDER}" in page and "cheetah" not in page
    assert f"`sacae train --env {ENV} " in page and "--env_kwargs" in page
    for kind in ("returns", "losses"):
        assert (out / f"{FOLDER}_{kind}.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert {run["task"] for run in summary["runs"]} == {FOLDER}


def test_eval_of_a_gymnasium_run(finished_sweep, tmp_path):
    runs, _, _, _ = finished_sweep
    d = tmp_path / "seed_1"
    shutil.copytree(run_dir(runs, 1), d)  # a copy: the sweep's folders stay as the rerun test saw them
    result = run_cli(["eval", str(d), "--num_episodes", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("| eval | S: 200 | ER: ")
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["snapshot"] == str(d / "model" / "200.pt") and summary["env_steps"] == 200
    assert len(summary["episode_rewards"]) == 1 and all(math.isfinite(r) for r in summary["episode_rewards"])
    assert summary["video"] == str(d / "video" / "eval_200.mp4") and Path(summary["video"]).stat().st_size > 0


def test_train_seeds_on_gymnasium(finished_sweep, tmp_path):
    runs, _, _, _ = finished_sweep
    stacked = tmp_path / "stacked"
    result = run_cli(["train-seeds", "--env", ENV, "--seeds", "1", "2", "--runs_dir", str(stacked), *TINY],
                     cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [r.state for r in collect_status([stacked])] == ["finished", "finished"]
    for seed in (1, 2):
        config = json.loads((run_dir(stacked, seed) / "config.json").read_text())
        assert (config["env"], config["env_kwargs"]) == (ENV, KWARGS)
        ours = log_rows(run_dir(stacked, seed) / "eval.log")
        alone = log_rows(run_dir(runs, seed) / "eval.log")
        assert [r["env_steps"] for r in ours] == [0, 100, 200]
        # Each seed computes what its own `sacae train` run computed, up to float rounding.
        assert [r["episode_reward"] for r in ours] == pytest.approx([r["episode_reward"] for r in alone], rel=1e-3)
