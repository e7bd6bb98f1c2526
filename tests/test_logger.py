import json
import re

from sacae.logger import Logger, format_console, read_jsonl

TRAIN_LINE = re.compile(
    r"^\| train \| E: \d+ \| S: \d+ \| D: \d+\.\d s \| R: -?\d+\.\d{4} \| BR: -?\d+\.\d{4} \| "
    r"ALOSS: -?\d+\.\d{4} \| CLOSS: -?\d+\.\d{4} \| RLOSS: -?\d+\.\d{4}$"
)
EVAL_LINE = re.compile(r"^\| eval \| S: \d+ \| ER: -?\d+\.\d{4}$")


def test_train_line_matches_the_seed_format():
    row = dict(episode=1, env_steps=1000, duration=0.8, episode_reward=0.0, batch_reward=0.0, actor_loss=0.0,
               critic_loss=0.0, ae_loss=0.0)  # fmt: skip
    assert format_console("train", row) == (
        "| train | E: 1 | S: 1000 | D: 0.8 s | R: 0.0000 | BR: 0.0000 | ALOSS: 0.0000 | CLOSS: 0.0000 | RLOSS: 0.0000"
    )


def test_eval_line_matches_the_seed_format():
    assert format_console("eval", {"env_steps": 0, "episode_reward": 21.16759}) == "| eval | S: 0 | ER: 21.1676"


def test_values_are_printed_not_defaulted():
    row = dict(episode=7, env_steps=56000, duration=12.345, episode_reward=123.45678, batch_reward=-0.5,
               actor_loss=-3.25, critic_loss=1.5, ae_loss=0.0123456)  # fmt: skip
    line = format_console("train", row)
    assert TRAIN_LINE.match(line)
    assert "E: 7 " in line and "S: 56000 " in line and "D: 12.3 s" in line and "R: 123.4568" in line
    assert "BR: -0.5000" in line and "ALOSS: -3.2500" in line and "CLOSS: 1.5000" in line
    assert line.endswith("RLOSS: 0.0123")


def test_missing_losses_print_as_zero_and_log_as_null(tmp_path):
    lines = []
    logger = Logger(tmp_path)
    logger.console_write = lines.append
    logger.log("train", dict(episode=1, env_steps=1000, agent_steps=125, duration=1.0, episode_reward=5.0,
                             batch_reward=None, actor_loss=None, critic_loss=None, ae_loss=float("nan")))  # fmt: skip
    logger.close()
    assert TRAIN_LINE.match(lines[0])
    assert "ALOSS: 0.0000" in lines[0]
    row = json.loads((tmp_path / "train.log").read_text())
    assert row["actor_loss"] is None and row["ae_loss"] is None and row["episode_reward"] == 5.0


def test_json_lines_append_and_tensorboard(tmp_path):
    logger = Logger(tmp_path, save_tb=True)
    logger.console_write = lambda line: None
    for i in range(3):
        logger.log("eval", {"episode": i, "env_steps": 1000 * i, "agent_steps": 125 * i, "episode_reward": float(i)})
    logger.close()
    rows = read_jsonl(tmp_path / "eval.log")
    assert [r["env_steps"] for r in rows] == [0, 1000, 2000]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("eval/episode_reward")
    assert [(e.step, e.value) for e in events] == [(0, 0.0), (1000, 1.0), (2000, 2.0)]


def test_read_jsonl_ignores_a_truncated_last_line(tmp_path):
    path = tmp_path / "train.log"
    path.write_text('{"episode": 1}\n{"episode": 2}\n{"epis')
    assert read_jsonl(path) == [{"episode": 1}, {"episode": 2}]
