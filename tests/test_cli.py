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


def saved_run(tmp_path, **changes):
    """A work dir holding the config.json that `train --work_dir RUN *TINY` would write, plus `changes`."""
    from sacae.config import TrainConfig, resolve

    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(work_dir=str(run), num_train_steps=10, init_steps=5, num_eval_episodes=0, **changes)
    (run / "config.json").write_text(resolve(cfg).to_json())
    return run


def with_file(name: str, content: bytes, **changes):
    def setup(tmp_path):
        run = saved_run(tmp_path, **changes)
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(content)
        return ["--work_dir", str(run), *TINY]

    return setup


def flags(*argv):
    return lambda tmp_path: ["--work_dir", str(tmp_path / "run"), *TINY, *argv]


def without_a_gpu(*argv):
    def setup(tmp_path):
        if torch.cuda.is_available():
            pytest.skip("needs a machine without CUDA")
        return flags(*argv)(tmp_path)

    return setup


def a_file_as_work_dir(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    return ["--work_dir", str(tmp_path / "a_file" / "run"), *TINY]


def resume_from(content: str | None):
    def setup(tmp_path):
        (tmp_path / "old").mkdir()
        if content is not None:
            (tmp_path / "old" / "config.json").write_text(content)
        return ["--resume", str(tmp_path / "old")]

    return setup


# Each bad input: how to make it (a function of a fresh tmp_path returning the train flags) and the words its one
# sentence must hold. Flags, env names, config files, run dirs, checkpoints and permissions.
BAD_INPUTS = {
    "unknown domain": (flags("--domain_name", "cheeta"), "valid domains: acrobot, ball_in_cup"),
    "unknown task": (flags("--domain_name", "cheetah", "--task_name", "runn"), "valid tasks: run"),
    "unknown task shorthand": (flags("--task", "walker_fly"), "walker_walk"),
    "decoder without pixels": (
        flags("--encoder_type", "identity", "--decoder_type", "pixel"),
        "--decoder_type pixel needs --encoder_type pixel",
    ),
    "action repeat 0": (flags("--action_repeat", "0"), "--action_repeat must be at least 1"),
    "negative action repeat": (flags("--action_repeat", "-3"), "--action_repeat must be at least 1"),
    "image too small": (flags("--image_size", "10"), "--image_size 10 is too small for 4 conv layers"),
    "image too small for layers": (flags("--image_size", "20", "--num_layers", "6"), "too small for 6 conv layers"),
    "eval_freq 0": (flags("--eval_freq", "0"), "--eval_freq must be at least 1"),
    "batch 0": (flags("--batch_size", "0"), "--batch_size must be at least 1"),
    "negative steps": (flags("--num_train_steps", "-1"), "--num_train_steps must be non-negative"),
    "discount above 1": (flags("--discount", "1.5"), "--discount must lie in [0, 1]"),
    "zero learning rate": (flags("--critic_lr", "0"), "--critic_lr must be a positive number"),
    "empty replay": (flags("--replay_buffer_capacity", "0"), "--replay_buffer_capacity must be at least 1"),
    "log std bounds": (flags("--actor_log_std_min", "3"), "must be below --actor_log_std_max"),
    "negative checkpoint interval": (flags("--checkpoint_every", "-5"), "--checkpoint_every must be non-negative"),
    "force alone": (flags("--force"), "--force only applies with --no_resume"),
    "resume and no_resume": (flags("--resume", "x", "--no_resume"), "contradict each other"),
    "work dir is a file": (a_file_as_work_dir, "is not writable"),
    "work dir without permission": (
        lambda tmp_path: ["--work_dir", "/proc/sacae-run", *TINY],
        "The work dir /proc/sacae-run is not writable",
    ),
    "resume a missing dir": (
        lambda tmp_path: ["--resume", str(tmp_path / "nope")],
        "there is no such run directory",
    ),
    "resume a dir without config": (resume_from(None), "has no config.json"),
    "resume a config that is not JSON": (resume_from("{not json"), "is not valid JSON"),
    "resume a config with unknown keys": (resume_from('{"learning_rate": 3}'), "unknown keys: learning_rate"),
    "resume a config that is not an object": (resume_from("[1, 2]"), "does not hold a JSON object"),
    "work dir of another configuration": (
        lambda tmp_path: ["--work_dir", str(saved_run(tmp_path, seed=7)), *TINY],
        "holds a run with a different configuration (--seed 7 (now 1))",
    ),
    "logs without a config": (
        lambda tmp_path: (tmp_path / "train.log").write_text('{"episode": 1}\n') and ["--work_dir", str(tmp_path)],
        "holds logs but no config.json",
    ),
    "finished run started over without --force": (
        with_file("status.json", b'{"state": "finished"}'),
        "holds a finished run; add --force",
    ),
    "checkpoint that is not a checkpoint": (
        with_file("checkpoint/state-000000000005.pt", b"PK\x03\x04 torn"),
        "state-000000000005.pt is not a readable sacae snapshot",
    ),
    "replay that cannot fit": (
        flags("--replay_buffer_capacity", "100000000", "--num_train_steps", "100000000"),
        "lower --replay_buffer_capacity",
    ),
    "replay on the GPU of a CPU run": (
        flags("--replay_device", "cuda", "--device", "cpu"),
        "--replay_device cuda keeps the replay frames on the training GPU, but --device is cpu",
    ),
    "replay on a GPU that is not there": (
        without_a_gpu("--replay_device", "cuda"),
        "--replay_device cuda was asked for but PyTorch sees no CUDA GPU here",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(capsys, tmp_path, case):
    setup, expected = BAD_INPUTS[case]
    argv = setup(tmp_path)
    if case == "finished run started over without --force":
        argv = [*argv, "--no_resume"]
    line = one_sentence_error(capsys, ["train", *argv])
    assert expected in line, line


def test_replay_that_cannot_fit(capsys, tmp_path):
    argv = ["train", "--work_dir", str(tmp_path), "--replay_buffer_capacity", "100000000", "--num_train_steps",
            "100000000"]  # fmt: skip
    line = one_sentence_error(capsys, argv)
    assert "The replay buffer needs 2" in line and "GB for 100,000,000 transitions" in line
    assert not (tmp_path / "train.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(capsys, tmp_path):
    line = one_sentence_error(capsys, ["train", "--work_dir", str(tmp_path), *TINY, "--device", "cuda"])
    assert "sees no CUDA GPU" in line


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


def test_resume_takes_the_saved_config_and_only_the_execution_flags_given(tmp_path):
    from sacae.config import TrainConfig
    from sacae.trainer import load_resume_config

    run = saved_run(tmp_path, seed=3, device="cpu", overlap="off")
    given = TrainConfig(resume=str(run), seed=7, batch_size=4, num_threads=1, overlap="on")
    cfg = load_resume_config(given)
    assert (cfg.work_dir, cfg.seed, cfg.batch_size, cfg.num_train_steps) == (str(run), 3, 128, 10)
    # Set on the command line: replaces the saved value; left at its default: the saved value stays.
    assert (cfg.num_threads, cfg.overlap, cfg.device) == (1, "on", "cpu")


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
