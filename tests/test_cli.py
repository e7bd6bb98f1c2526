"""Bad input gets one sentence on stderr and exit status 2, never a traceback."""

import pytest
import torch

from sacae.cli import main
from tests.conftest import run_cli

TINY = ["--num_train_steps", "10", "--init_steps", "5", "--num_eval_episodes", "0"]


def one_sentence_error(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sacae: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--domain_name", "cheeta"], "valid domains: acrobot, ball_in_cup"),
        (["--domain_name", "cheetah", "--task_name", "runn"], "valid tasks: run"),
        (["--task", "walker_fly"], "walker_walk"),
        (["--encoder_type", "identity", "--decoder_type", "pixel"], "--decoder_type pixel needs --encoder_type pixel"),
        (["--action_repeat", "0"], "--action_repeat must be at least 1"),
        (["--action_repeat", "-3"], "--action_repeat must be at least 1"),
        (["--image_size", "10"], "--image_size 10 is too small for 4 conv layers"),
        (["--image_size", "20", "--num_layers", "6"], "too small for 6 conv layers"),
        (["--eval_freq", "0"], "--eval_freq must be at least 1"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--num_train_steps", "-1"], "--num_train_steps must be non-negative"),
        (["--discount", "1.5"], "--discount must lie in [0, 1]"),
        (["--critic_lr", "0"], "--critic_lr must be a positive number"),
        (["--replay_buffer_capacity", "0"], "--replay_buffer_capacity must be at least 1"),
        (["--actor_log_std_min", "3"], "must be below --actor_log_std_max"),
    ],
)
def test_bad_flags(capsys, tmp_path, argv, expected):
    line = one_sentence_error(capsys, ["train", "--work_dir", str(tmp_path / "run"), *TINY, *argv])
    assert expected in line


def test_unwritable_work_dir(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = one_sentence_error(capsys, ["train", "--work_dir", str(blocker / "run"), *TINY])
    assert "is not writable" in line and str(blocker / "run") in line


def test_replay_that_cannot_fit(capsys, tmp_path):
    argv = ["train", "--work_dir", str(tmp_path), "--replay_buffer_capacity", "100000000", "--num_train_steps",
            "100000000"]  # fmt: skip
    line = one_sentence_error(capsys, argv)
    assert "The replay buffer needs 2" in line and "GB for 100,000,000 transitions" in line
    assert "lower --replay_buffer_capacity" in line
    assert not (tmp_path / "train.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(capsys, tmp_path):
    line = one_sentence_error(capsys, ["train", "--work_dir", str(tmp_path), *TINY, "--device", "cuda"])
    assert "sees no CUDA GPU" in line


def test_work_dir_with_a_run_in_it(capsys, tmp_path):
    (tmp_path / "train.log").write_text('{"episode": 1}\n')
    line = one_sentence_error(capsys, ["train", "--work_dir", str(tmp_path), *TINY])
    assert "already holds a run" in line


def test_eval_of_missing_and_empty_run_dirs(capsys, tmp_path):
    assert "There is no run directory" in one_sentence_error(capsys, ["eval", str(tmp_path / "nope")])
    assert "There is no config file" in one_sentence_error(capsys, ["eval", str(tmp_path)])


def test_eval_of_a_corrupt_snapshot(capsys, tmp_path):
    from sacae.config import TrainConfig

    (tmp_path / "config.json").write_text(TrainConfig(task="cartpole_swingup").to_json())
    (tmp_path / "model").mkdir()
    assert "has no snapshot" in one_sentence_error(capsys, ["eval", str(tmp_path)])
    (tmp_path / "model" / "1000.pt").write_bytes(b"PK\x03\x04 truncated")
    line = one_sentence_error(capsys, ["eval", str(tmp_path)])
    assert "1000.pt is not a readable sacae snapshot" in line


def test_unknown_flag_is_a_usage_error(tmp_path):
    result = run_cli(["train", "--no_such_flag", "3"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_no_rendering_backend_in_a_real_process(tmp_path):
    # OSMesa is not installed here, so asking for it is a machine without a working backend.
    import ctypes.util

    if ctypes.util.find_library("OSMesa"):
        pytest.skip("OSMesa is installed on this machine")
    result = run_cli(["train.py", "--work_dir", str(tmp_path), *TINY], cwd=tmp_path, env={"MUJOCO_GL": "osmesa"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "apt-get install libegl1" in lines[0], result.stderr


def test_unknown_task_through_train_py(tmp_path):
    result = run_cli(["train.py", "--domain_name", "cheetah", "--task_name", "fly", "--work_dir", str(tmp_path)],
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sacae: error: Unknown task 'fly' for domain 'cheetah'; valid tasks: run."
    ]
