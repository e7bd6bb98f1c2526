"""A group of seeds in one process (`sacae train-seeds`): killed at any moment and resumed, each seed writes what the
uninterrupted group writes, bit for bit; a seed whose numbers become non-finite stops alone."""

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sacae.config import TrainConfig
from sacae.errors import SacaeError
from sacae.trainer import Trainer
from tests.conftest import run_cli
from tests.test_resume import TINY, final_weights, kill_at_random_moments, log_rows

SEEDS = ("1", "2", "3")
_SEED = TINY.index("--seed")
GROUP = ["train-seeds", *TINY[1:_SEED], *TINY[_SEED + 2 :], "--seeds", *SEEDS]
FOLDER = Path("cartpole_swingup") / "sac_ae"


def train_group(runs: Path, kill_at: str | None = None, extra=()):
    env = {"SACAE_KILL_AT": kill_at} if kill_at else {}
    return run_cli([*GROUP, "--runs_dir", str(runs), *extra], cwd=runs.parent, env=env)


def assert_same_group(runs: Path, reference: Path) -> None:
    for seed in SEEDS:
        work, ref = runs / FOLDER / f"seed_{seed}", reference / FOLDER / f"seed_{seed}"
        for name in ("train.log", "eval.log"):
            assert log_rows(work / name) == log_rows(ref / name), (seed, name)
        ours, theirs = final_weights(work), final_weights(ref)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), (
            seed,
            [k for k in ours if not torch.equal(ours[k], theirs[k])],
        )
        for snapshot in sorted((ref / "model").glob("*.pt")):
            a = torch.load(snapshot, weights_only=True)["networks"]
            b = torch.load(work / "model" / snapshot.name, weights_only=True)["networks"]
            assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n]), (seed, snapshot.name)
        status = json.loads((work / "status.json").read_text())
        assert status["state"] == "finished" and status["seeds_in_process"] == [1, 2, 3]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("reference") / "runs"
    result = train_group(runs)
    assert result.returncode == 0, result.stderr[-3000:]
    for seed in SEEDS:
        work = runs / FOLDER / f"seed_{seed}"
        assert [r["env_steps"] for r in log_rows(work / "eval.log")] == [0, 800, 1600, 2000]
        assert json.loads((work / "config.json").read_text())["seed"] == int(seed)
    # The seeds differ: each has its own environment, replay and noise.
    a, b = (final_weights(runs / FOLDER / f"seed_{s}") for s in ("1", "2"))
    assert not torch.equal(a["critic.Q1.trunk.0.weight"], b["critic.Q1.trunk.0.weight"])
    return runs


def test_group_killed_at_five_points_and_resumed_is_identical(tmp_path, reference):
    """SIGKILL in the seed phase before any checkpoint, inside the update burst, mid-episode, during an evaluation,
    and between two seeds' checkpoint writes (the first seed's new checkpoint is complete, the others' are not: the
    group resumes from the step all three have). Each time the same command resumes the group."""
    runs = tmp_path / "runs"
    # env_step counts each seed's step (3 per agent step); checkpoint_write each seed's write (3 per checkpoint).
    kill_points = ["env_step:90", "update:20", "env_step:240", "eval_episode:1", "checkpoint_write:5"]
    for point in kill_points:
        result = train_group(runs, kill_at=point)
        assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stderr[-2000:])
    states = {s: sorted(p.name for p in (runs / FOLDER / f"seed_{s}" / "checkpoint").glob("state-*.pt")) for s in SEEDS}
    assert states["1"][-1] > states["2"][-1] == states["3"][-1], states  # killed between the seeds' writes
    result = train_group(runs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("resuming from") == 3
    assert_same_group(runs, reference)


def test_sigterm_checkpoints_every_seed(tmp_path, reference):
    runs = tmp_path / "runs"
    runs.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "sacae.cli", *GROUP, "--runs_dir", str(runs)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    seed3 = runs / FOLDER / "seed_3" / "checkpoint"
    while time.time() < deadline and len(list(seed3.glob("state-*.pt"))) < 1:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    for seed in SEEDS:
        status = json.loads((runs / FOLDER / f"seed_{seed}" / "status.json").read_text())
        assert status["state"] == "stopped" and "SIGTERM" in status["message"]
    result = train_group(runs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_group(runs, reference)


def test_a_seed_that_fails_stops_alone(tmp_path, capsys):
    """Seed 2's critic is driven to infinity (its slice of the group's weights made huge); seeds 1 and 3 finish,
    seed 2's status says which loss failed at which step, and the process exits 0 naming the failed seed."""
    cfg = TrainConfig(task="point_mass_easy", encoder_type="identity", decoder_type="identity", action_repeat=8,
                      num_train_steps=250, init_steps=125, eval_freq=250, num_eval_episodes=1, hidden_dim=32,
                      batch_size=16, num_threads=1, device="cpu")  # fmt: skip
    trainer = Trainer(cfg, seeds=[1, 2, 3], runs_dir=tmp_path)
    with torch.no_grad():
        trainer.agent.params["critic.Q1.trunk.4.weight"][1].fill_(1e38)
    trainer.run()
    err = capsys.readouterr().err
    assert "seed 2 failed (see its status.json); the other seeds finished." in err
    folder = tmp_path / "point_mass_easy" / "sac_states"
    for seed in (1, 3):
        status = json.loads((folder / f"seed_{seed}" / "status.json").read_text())
        assert status["state"] == "finished" and status["env_steps"] == 2000
        assert [r["env_steps"] for r in log_rows(folder / f"seed_{seed}" / "eval.log")] == [0, 2000]
    status = json.loads((folder / "seed_2" / "status.json").read_text())
    assert status["state"] == "failed"
    assert "The critic_loss became non-finite" in status["message"] and "agent step 125" in status["message"]
    # Its seed-phase episode ended before the first update; nothing after the failure was logged.
    assert [r["env_steps"] for r in log_rows(folder / "seed_2" / "train.log")] == [1000]
    # Run again: the failed seed is not resumed, the others are finished; nothing to do.
    again = Trainer(cfg, seeds=[1, 2, 3], runs_dir=tmp_path)
    again.run()
    assert "already failed" in capsys.readouterr().err


def test_every_seed_failing_exits_3(tmp_path):
    from sacae.cli import main

    runs = tmp_path / "runs"
    args = ["train-seeds", "--task", "point_mass_easy", "--encoder_type", "identity", "--decoder_type", "identity",
            "--action_repeat", "8", "--num_train_steps", "250", "--init_steps", "125", "--eval_freq", "250",
            "--num_eval_episodes", "1", "--hidden_dim", "32", "--batch_size", "16", "--num_threads", "1",
            "--critic_lr", "1e20", "--seeds", "1", "2", "--runs_dir", str(runs)]  # fmt: skip
    assert main(args) == 3
    for seed in (1, 2):
        status = json.loads((runs / "point_mass_easy" / "sac_states" / f"seed_{seed}" / "status.json").read_text())
        assert status["state"] == "failed" and "non-finite" in status["message"]


@pytest.mark.slow
def test_group_killed_at_twenty_random_moments_is_identical(tmp_path):
    """SIGKILL from outside at 20 random moments (each process lives a random 3-15 s), then the same command to the
    end; every seed equals the uninterrupted group's."""
    longer = ["--num_train_steps", "500"]
    reference, runs = tmp_path / "reference", tmp_path / "runs"
    assert train_group(reference, extra=longer).returncode == 0
    cmd = [sys.executable, "-m", "sacae.cli", *GROUP, *longer, "--runs_dir", str(runs)]
    assert kill_at_random_moments(cmd, tmp_path, times=20, seed=11, seconds=(3, 15)) == 20
    result = train_group(runs, extra=longer)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_group(runs, reference)


def tiny_group_config(overlap: str = "auto") -> TrainConfig:
    import tyro

    return tyro.cli(TrainConfig, args=[*GROUP[1:-4], "--overlap", overlap], use_underscores=True)


def test_the_group_steps_its_environments_in_pools(tmp_path, monkeypatch):
    """A pixel group's training and evaluation environments live in two pools of worker processes (seed i's are
    environment i of each), which the trainer closes; one seed's are its own environments, called here as a run of
    its own calls them; SACAE_ENV_WORKERS chooses the workers."""
    import multiprocessing

    from sacae.env_pool import RemoteEnv
    from sacae.envs import DMCEnv

    monkeypatch.delenv("SACAE_ENV_WORKERS", raising=False)
    cfg = tiny_group_config()
    trainer = Trainer(cfg, seeds=[1, 2], runs_dir=tmp_path / "group")
    try:
        assert trainer.env_pool.workers == trainer.eval_pool.workers == "processes"
        assert [run.env for run in trainer.runs] == trainer.env_pool.envs
        assert [run.eval_env for run in trainer.runs] == trainer.eval_pool.envs
        assert all(isinstance(run.env, RemoteEnv) for run in trainer.runs)
        assert len(multiprocessing.active_children()) >= 4
        trainer.step()  # the evaluation at step 0 and the first step, through the pools
        assert all(run.obs is not None and run.env.episode_env_steps == 8 for run in trainer.runs)
    finally:
        trainer.close()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("sacae-env")]

    single = Trainer(dataclasses.replace(cfg, seed=1, work_dir=str(tmp_path / "single")))
    try:
        assert single.env_pool.workers == "serial" and isinstance(single.runs[0].env, DMCEnv)
    finally:
        single.close()

    monkeypatch.setenv("SACAE_ENV_WORKERS", "threads")
    threads = Trainer(cfg, seeds=[1, 2], runs_dir=tmp_path / "threads")
    try:
        assert threads.env_pool.workers == threads.eval_pool.workers == "threads"
    finally:
        threads.close()
    monkeypatch.setenv("SACAE_ENV_WORKERS", "fibres")
    with pytest.raises(SacaeError, match="SACAE_ENV_WORKERS=fibres"):
        Trainer(cfg, seeds=[1, 2], runs_dir=tmp_path / "fibres")


# The reference steps its environments in worker processes, overlap off. Serial stepping with the overlap runs
# under -m slow: the two default cases already cover each way of stepping and the overlap.
@pytest.mark.parametrize(
    ("workers", "overlap"),
    [("serial", "off"), pytest.param("serial", "on", marks=pytest.mark.slow), ("processes", "on")],
)
def test_the_group_is_the_same_whichever_workers_step_its_environments(tmp_path, reference, workers, overlap):
    """The reference group steps its environments in worker processes (auto, 3 pixel seeds) without overlap; stepped
    one after another on the trainer's thread, or with the update overlapped (its own thread beside the workers or
    beside the serial stepping), every seed writes the same logs, snapshots and weights, bit for bit."""
    runs = tmp_path / "runs"
    env = {"SACAE_ENV_WORKERS": workers}
    result = run_cli([*GROUP, "--runs_dir", str(runs), "--overlap", overlap], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"overlap {overlap}" in result.stderr
    assert_same_group(runs, reference)
