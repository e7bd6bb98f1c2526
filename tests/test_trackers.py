"""Experiment trackers: a run logged to TensorBoard, wandb (offline) and MLflow (a file store in the run folder) holds
in each the scalars of train.log and eval.log at the same env steps, its configuration and its videos, read back with
each library's own reader; a run killed and resumed continues the same tracker runs with every step once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sacae.trackers import IDS_FILE, Trackers
from tests.conftest import run_cli

# A state SAC run small enough for CI: 150 agent steps of cartpole (one 125-step episode), a 25-update burst, and
# with --eval_freq 50 evaluations (and checkpoints) at agent steps 0, 50, 100 and 150 = env steps 0, 400, 800, 1200.
TINY = ["train", "--task", "cartpole_swingup", "--encoder_type", "identity", "--decoder_type", "identity",
        "--action_repeat", "8", "--hidden_dim", "32", "--batch_size", "16", "--num_train_steps", "150",
        "--init_steps", "25", "--num_eval_episodes", "1", "--num_threads", "1"]  # fmt: skip
ALL_TRACKERS = ["--seed", "3", "--logger", "tensorboard,wandb,mlflow"]
WALL_CLOCK_KEYS = ("duration", "env_steps_per_second")


def train(work: Path, kill_at: str | None = None, eval_freq: int = 50, extra=()) -> subprocess.CompletedProcess:
    env = {"SACAE_KILL_AT": kill_at} if kill_at else {}
    args = [*TINY, *ALL_TRACKERS, "--eval_freq", str(eval_freq), "--work_dir", str(work), *extra]
    return run_cli(args, cwd=work.parent, env=env)


def logged(work: Path) -> dict[str, list[tuple[int, float]]]:
    """(env_steps, value) of every number in train.log and eval.log, under TensorBoard's names."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for kind in ("train", "eval"):
        for line in (work / f"{kind}.log").read_text().splitlines():
            row = json.loads(line)
            for key, value in row.items():
                if key != "env_steps" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    scalars.setdefault(f"{kind}/{key}", []).append((row["env_steps"], value))
    return scalars


def wandb_records(path: Path) -> list[dict]:
    """The records of a .wandb file, read by wandb's own reader (`wandb leet inspect --json`)."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    return [json.loads(line) for line in out.stdout.splitlines()]


def wandb_run(work: Path) -> tuple[list[dict], list[tuple[int, dict]]]:
    """The run records and the history rows (step, values) of every offline session of the run, oldest first."""
    run_id = json.loads((work / IDS_FILE).read_text())["wandb"]["id"]
    sessions = sorted((work / "wandb").glob("offline-run-*"))
    assert all(folder.name.endswith(f"-{run_id}") for folder in sessions), sessions
    runs, history = [], []
    for folder in sessions:
        for record in wandb_records(folder / f"run-{run_id}.wandb"):
            if record["type"] == "run":
                runs.append(record["run"])
            elif record["type"] == "history":
                item = record["history"]["item"]
                history.append((item.get("_step", 0), {k: v for k, v in item.items() if not k.startswith("_")}))
    return runs, history


def by_key(history: list[tuple[int, dict]]) -> dict[str, list[tuple[int, float]]]:
    scalars: dict[str, list[tuple[int, float]]] = {}
    for step, values in history:
        for key, value in values.items():
            if not key.startswith("eval/video"):
                scalars.setdefault(key, []).append((step, value))
    return scalars


def mlflow_run(work: Path):
    from mlflow.tracking import MlflowClient

    ids = json.loads((work / IDS_FILE).read_text())["mlflow"]
    assert ids["tracking_uri"] == (work / "mlruns").resolve().as_uri()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    run = client.get_run(ids["run_id"])
    metrics = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in
               run.data.metrics}  # fmt: skip
    return client, run, metrics


def without_wall_clock(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """Each key's steps in order; the values too, except the wall-clock ones (a resumed session measures anew)."""
    return {
        key: [(step, None if key.endswith(WALL_CLOCK_KEYS) else value) for step, value in sorted(points)]
        for key, points in scalars.items()
    }


# ------------------------------------------------------------------------------------------------------------
def test_trackers_hold_the_logged_scalars_the_config_and_the_videos(tmp_path):
    work = tmp_path / "run"
    result = train(work, eval_freq=100, extra=["--save_video"])  # two evaluations fewer: each renders a video
    assert result.returncode == 0, result.stderr[-3000:]
    expected = logged(work)
    assert [s for s, _ in expected["eval/episode_reward"]] == [0, 800, 1200]
    assert [s for s, _ in expected["train/episode_reward"]] == [1000]

    runs, history = wandb_run(work)
    assert by_key(history) == expected  # the same values at the same steps, each once
    assert len(runs) == 1 and runs[0]["config"]["update"]["configuration"] == "sac_states"
    assert runs[0]["config"]["update"]["num_train_steps"] == 150
    videos = {step: values["eval/video.path"] for step, values in history if "eval/video.path" in values}
    assert sorted(videos) == [0, 800, 1200]
    session = next((work / "wandb").glob("offline-run-*"))
    assert all((session / "files" / path).stat().st_size > 1000 for path in videos.values())

    client, run, metrics = mlflow_run(work)
    assert metrics == expected
    assert run.info.status == "FINISHED" and run.info.run_name == "cartpole_swingup/sac_states/seed_3"
    assert run.data.params["num_train_steps"] == "150" and run.data.params["logger"] == "tensorboard,wandb,mlflow"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "video")}
    assert artifacts == {f"video/{s}.mp4" for s in (0, 800, 1200)}
    assert (work / "tb").is_dir()


def test_a_killed_and_resumed_run_continues_the_same_tracker_runs(tmp_path):
    """Killed after the train row at env step 1000 (the checkpoint at 800: MLflow holds a row past it, wandb had
    written nothing to disk yet), then during the evaluation at 1200 (the checkpoint still at 800), then run to the
    end: each tracker has one run, under the same id, with every step of the logs once."""
    work = tmp_path / "run"
    ids = None
    for point in ["env_step:130", "eval_episode:1"]:
        result = train(work, kill_at=point)
        assert result.returncode == -9, (point, result.stderr[-3000:])
        now = json.loads((work / IDS_FILE).read_text())
        assert ids is None or now == ids
        ids = now
    result = train(work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and json.loads((work / IDS_FILE).read_text()) == ids
    expected = without_wall_clock(logged(work))

    assert_trackers_hold(work, ids["wandb"]["id"], expected)


def assert_trackers_hold(work, wandb_id, expected):
    """A run of three sessions (two killed): its wandb run and its MLflow run each hold every logged row once."""
    runs, history = wandb_run(work)
    # One offline folder per session, all of the same run (a killed session's folder may hold nothing yet).
    assert len(list((work / "wandb").glob("offline-run-*"))) == 3
    assert runs and {r["run_id"] for r in runs} == {wandb_id}
    steps = [step for step, _ in history]
    assert steps == sorted(set(steps)) == [0, 400, 800, 1000, 1200]  # across the sessions, each step once
    assert without_wall_clock(by_key(history)) == expected

    client, run, metrics = mlflow_run(work)
    assert without_wall_clock(metrics) == expected
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
    assert run.info.status == "FINISHED"
    return runs, run


def test_a_tracker_skips_the_rows_it_holds_and_gets_those_it_lacks(tmp_path):
    """A session that logged rows 0-3 and closed, then a session resumed from an earlier checkpoint (row 2): the
    rows it logs again are skipped, the newer ones are added, under the same runs."""

    def row(step: int) -> tuple[str, dict]:
        return ("eval", {"episode": step, "env_steps": step * 100, "episode_reward": step / 3, "episode_rewards": []})

    config = {"domain_name": "cartpole", "task_name": "swingup", "configuration": "sac_states", "seed": 1}
    first = Trackers(["wandb", "mlflow"], tmp_path, config)
    for kind, values in map(row, range(4)):
        first.log(kind, values)
    first.close(finished=False)
    _, run, _ = mlflow_run(tmp_path)
    assert run.info.status == "KILLED"

    second = Trackers(["tensorboard", "wandb", "mlflow"], tmp_path, config)
    second.catch_up(map(row, range(3)))
    for kind, values in map(row, range(2, 6)):
        second.log(kind, values)
    second.close()

    expected = {"eval/episode": [(s * 100, s) for s in range(6)], "eval/episode_reward": [(s * 100, s / 3) for s in
                range(6)]}  # fmt: skip
    runs, history = wandb_run(tmp_path)
    assert len(runs) == 2 and [s for s, _ in history] == [0, 100, 200, 300, 400, 500]
    assert by_key(history) == expected
    _, run, metrics = mlflow_run(tmp_path)
    assert metrics == expected and run.info.status == "FINISHED"


def test_an_unknown_tracker_or_a_missing_package_gets_one_sentence(tmp_path):
    work = tmp_path / "run"
    result = run_cli([*TINY, "--logger", "tensorboard,neptune", "--work_dir", str(work)], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "sacae: error: --logger tensorboard,neptune: neptune is not a tracker; choose from tensorboard, wandb, "
        "mlflow, comma-separated (e.g. --logger tensorboard,wandb)."
    )
    for name, command in [("wandb", "pip install wandb"), ("mlflow", "pip install mlflow-skinny")]:
        # The package as if it were not installed: `import wandb` raises ImportError.
        code = f"import sys; sys.modules[{name!r}] = None; from sacae.cli import main; sys.exit(main(sys.argv[1:]))"
        args = [*TINY[1:], "--logger", f"tensorboard,{name}", "--work_dir", str(work)]
        result = subprocess.run([sys.executable, "-c", code, "train", *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"sacae: error: --logger {name} needs the {name} package")
        assert command in lines[0]
    assert not work.exists()  # refused before anything was written


def test_each_seed_of_a_group_has_its_own_tracker_runs_resumed_with_it(tmp_path):
    """`sacae train-seeds --seeds 1 2` with wandb and MLflow, killed after the train rows at env step 1000, resumed
    with `--resume GROUP_DIR` and killed during the evaluation at 1200, then resumed to the end: each seed folder
    holds one wandb run and one MLflow run of its own, under the same ids throughout, with that seed's logs, each
    step once."""
    runs = tmp_path / "runs"
    group = runs / "cartpole_swingup" / "sac_states"
    first = ["--logger", "tensorboard,wandb,mlflow", "--eval_freq", "50", "--seeds", "1", "2", "--runs_dir", str(runs)]
    # env_step counts each seed's step (2 per agent step), eval_episode each seed's episode.
    sessions = [(first, "env_step:260"), (["--resume", str(group)], "eval_episode:1"), (["--resume", str(group)], None)]
    ids = None
    for args, kill_at in sessions:
        env = {"SACAE_KILL_AT": kill_at} if kill_at else {}
        result = run_cli(["train-seeds", *TINY[1:], *args], cwd=tmp_path, env=env)
        assert result.returncode == (-9 if kill_at else 0), (args, result.stderr[-3000:])
        now = {s: json.loads((group / f"seed_{s}" / IDS_FILE).read_text()) for s in (1, 2)}
        assert ids is None or now == ids
        ids = now
    assert result.stderr.count("resuming from") == 2
    assert ids[1]["wandb"]["id"] != ids[2]["wandb"]["id"] and ids[1]["mlflow"]["run_id"] != ids[2]["mlflow"]["run_id"]

    seen = []
    for seed in (1, 2):
        work = group / f"seed_{seed}"
        expected = without_wall_clock(logged(work))
        assert [s for s, _ in expected["eval/episode_reward"]] == [0, 400, 800, 1200]
        seen.append(expected)

        runs_of_seed, run = assert_trackers_hold(work, ids[seed]["wandb"]["id"], expected)
        assert all(r["config"]["update"]["seed"] == seed for r in runs_of_seed)
        assert run.info.run_name == f"cartpole_swingup/sac_states/seed_{seed}"
        assert run.data.params["seed"] == str(seed)
    assert seen[0]["train/episode_reward"] != seen[1]["train/episode_reward"]  # each seed's own numbers


@pytest.fixture(autouse=True)
def _no_tracker_settings(monkeypatch):
    """The trackers' defaults: whatever this machine's environment sets for wandb or MLflow is left out, and so is
    the wandb-core service that a test running wandb in this process started (WANDB_SERVICE, which wandb leaves in
    os.environ): a command run from here would use it, and it would keep a killed command's runs open."""
    names = (
        "WANDB_MODE",
        "WANDB_DIR",
        "WANDB_PROJECT",
        "WANDB_SERVICE",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
    )
    for name in names:
        monkeypatch.delenv(name, raising=False)
