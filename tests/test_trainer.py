"""The training loop end to end: every output the seed describes, the schedule, and learning itself."""

import json
import re

import numpy as np
import torch

from sacae.config import TrainConfig
from sacae.logger import read_jsonl
from sacae.trainer import Trainer
from sacae.video import video_codec
from tests.conftest import SMALL, run_cli
from tests.test_logger import EVAL_LINE, TRAIN_LINE


def test_seed_command_writes_every_output(tmp_path):
    """The seed's command line (old flags, agent-step counts) through train.py, with small networks."""
    work = tmp_path / "log"
    args = ["train.py", "--domain_name", "cartpole", "--task_name", "swingup", "--encoder_type", "pixel",
            "--decoder_type", "pixel", "--action_repeat", "8", "--save_video", "--save_tb", "--save_model",
            "--work_dir", str(work), "--seed", "1", "--num_train_steps", "200", "--init_steps", "100",
            "--eval_freq", "100", "--num_eval_episodes", "1", *SMALL]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    lines = result.stdout.strip().splitlines()
    train_lines = [line for line in lines if line.startswith("| train")]
    eval_lines = [line for line in lines if line.startswith("| eval")]
    assert len(train_lines) == 1 and all(TRAIN_LINE.match(line) for line in train_lines)
    assert all(EVAL_LINE.match(line) for line in eval_lines)
    # S counts environment steps: evaluations at agent steps 0, 100 and the end (200), x action repeat 8.
    assert [int(re.search(r"S: (\d+)", line).group(1)) for line in eval_lines] == [0, 800, 1600]
    assert "| train | E: 1 | S: 1000 |" in train_lines[0]

    cfg = json.loads((work / "config.json").read_text())
    assert cfg["configuration"] == "sac_ae" and cfg["action_repeat"] == 8 and cfg["domain_name"] == "cartpole"

    train = read_jsonl(work / "train.log")
    assert len(train) == 1
    row = train[0]
    for key in ("episode", "env_steps", "agent_steps", "duration", "episode_reward", "batch_reward", "actor_loss",
                "critic_loss", "ae_loss", "alpha", "entropy"):  # fmt: skip
        assert key in row, key
    assert (row["episode"], row["env_steps"], row["agent_steps"]) == (1, 1000, 125)
    # Updates ran from agent step 100 on: the losses are real numbers, the reconstruction loss is not 0.
    assert row["ae_loss"] > 0 and row["critic_loss"] > 0 and row["actor_loss"] is not None
    assert row["episode_reward"] > 0
    assert f"RLOSS: {row['ae_loss']:.4f}" in train_lines[0] and row["ae_loss"] >= 1e-4

    evals = read_jsonl(work / "eval.log")
    assert [e["env_steps"] for e in evals] == [0, 800, 1600]
    assert all(len(e["episode_rewards"]) == 1 for e in evals)

    for steps in (0, 800, 1600):
        video = work / "video" / f"{steps}.mp4"
        assert video.stat().st_size > 1000
        assert video_codec(video) == "h264"
        snapshot = torch.load(work / "model" / f"{steps}.pt", weights_only=True)
        assert snapshot["env_steps"] == steps and "decoder" in snapshot["networks"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/episode_reward")] == [0, 800, 1600]
    assert [e.step for e in acc.Scalars("train/ae_loss")] == [1000]

    # `sacae eval` loads the latest snapshot and writes a video.
    result = run_cli(["eval", str(work), "--num_episodes", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["env_steps"] == 1600 and summary["snapshot"].endswith("1600.pt")
    assert video_codec(work / "video" / "eval_1600.mp4") == "h264"


def small_config(tmp_path, **overrides) -> TrainConfig:
    base = dict(task="cartpole_swingup", hidden_dim=32, num_filters=8, batch_size=8, encoder_feature_dim=8,
                num_eval_episodes=0, work_dir=str(tmp_path), action_repeat=8)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def test_updates_schedule_burst_and_spread(tmp_path):
    burst = Trainer(small_config(tmp_path / "a", encoder_type="identity", decoder_type="identity", init_steps=50))
    spread = Trainer(small_config(tmp_path / "b", encoder_type="identity", decoder_type="identity", init_steps=50,
                                  seed_updates="spread"))  # fmt: skip
    b = [burst.updates_at(t) for t in range(300)]
    s = [spread.updates_at(t) for t in range(300)]
    assert b[:50] == [0] * 50 and b[50] == 50 and b[51:] == [1] * 249
    assert s[:50] == [0] * 50 and max(s) == 2
    assert np.cumsum(b)[-1] == np.cumsum(s)[-1]
    assert all(np.cumsum(s)[100:] == np.cumsum(b)[100:])
    # Without a seed phase there is nothing to learn from at step 0, whichever the mode.
    for mode in ("burst", "spread"):
        trainer = Trainer(small_config(tmp_path / mode, encoder_type="identity", decoder_type="identity",
                                       init_steps=0, seed_updates=mode))  # fmt: skip
        assert [trainer.updates_at(t) for t in range(3)] == [0, 1, 1]


def test_state_run_stores_truncation_as_not_done(tmp_path):
    cfg = small_config(tmp_path, encoder_type="identity", decoder_type="identity", num_train_steps=260,
                       init_steps=20, eval_freq=1000)  # fmt: skip
    trainer = Trainer(cfg)
    trainer.logger.console_write = lambda line: None
    trainer.run()
    assert trainer.agent_steps == 260 and trainer.episode == 3
    assert len(trainer.replay) == 260
    # cartpole never terminates: the time limit is a truncation, so every transition bootstraps.
    assert np.all(trainer.replay.not_dones[:260] == 1.0)
    train = read_jsonl(tmp_path / "train.log")
    assert [r["env_steps"] for r in train] == [1000, 2000]
    assert train[0]["critic_loss"] is not None and train[0]["ae_loss"] is None


def test_same_seed_same_run(tmp_path):
    logs = []
    for name in ("a", "b"):
        cfg = small_config(tmp_path / name, num_train_steps=140, init_steps=60, eval_freq=70, num_eval_episodes=1)
        trainer = Trainer(cfg)
        trainer.logger.console_write = lambda line: None
        trainer.run()
        drop = ("duration", "env_steps_per_second")
        logs.append([{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(tmp_path / name / "eval.log")
                     + read_jsonl(tmp_path / name / "train.log")])  # fmt: skip
    assert logs[0] == logs[1]


# Measured on 2 cores (`sacae train --task cartpole_swingup --encoder_type identity --decoder_type identity
# --action_repeat 8 --num_train_steps 3000 --init_steps 500 --eval_freq 500 --num_eval_episodes 5 --seed 1`, ~3 min):
# uniformly random actions return 146 +- 79 (max 342 over 20 episodes), the untrained deterministic policy 4;
# the evaluations at 20k and 24k environment steps returned 519 and 732.
LEARNING_TASK = "cartpole_swingup"
LEARNING_STEPS = 3000
LEARNING_THRESHOLD = 400.0


def test_sac_states_learns(tmp_path):
    cfg = TrainConfig(task=LEARNING_TASK, encoder_type="identity", decoder_type="identity", action_repeat=8,
                      num_train_steps=LEARNING_STEPS, init_steps=500, eval_freq=500, num_eval_episodes=5, seed=1,
                      work_dir=str(tmp_path))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.logger.console_write = lambda line: None
    trainer.run()
    evals = read_jsonl(tmp_path / "eval.log")
    first, best_late = evals[0]["episode_reward"], max(e["episode_reward"] for e in evals[-2:])
    assert first < 50
    assert best_late > LEARNING_THRESHOLD, [e["episode_reward"] for e in evals]


def test_seed_phase_burst_reports_progress_without_a_terminal(tmp_path, capsys):
    cfg = small_config(tmp_path, encoder_type="identity", decoder_type="identity", num_train_steps=30,
                       init_steps=20, eval_freq=1000)  # fmt: skip
    trainer = Trainer(cfg)
    trainer.logger.console_write = lambda line: None
    trainer.run()
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if line.startswith("sacae: seed-phase updates")]
    assert [line.split()[3].rstrip(",") for line in progress] == [f"{i}/20" for i in range(2, 21, 2)]
    assert progress[-1].endswith("about 0 s left")
