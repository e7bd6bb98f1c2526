"""A run folder has one writer, guards trust the most reliable record, sacae deletes only what it wrote, every write
that fails says so in one sentence, and an unexpected error is one sentence too (with the traceback on request)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from sacae.checkpoint import CheckpointStore
from sacae.rundir import remove_outputs
from tests.conftest import run_cli
from tests.test_sweep import background_cli, status_of, wait_for

# State SAC on cartpole: 125-step episodes, evaluations (and snapshots) at agent steps 0, 100, 200 and 250,
# checkpoints every 50 agent steps. Fast enough to run to the end many times.
STATES = ["train", "--task", "cartpole_swingup", "--encoder_type", "identity", "--decoder_type", "identity",
          "--action_repeat", "8", "--hidden_dim", "32", "--batch_size", "16", "--num_train_steps", "250",
          "--init_steps", "50", "--eval_freq", "100", "--num_eval_episodes", "1", "--checkpoint_every", "400",
          "--num_threads", "1", "--save_model", "--save_tb"]  # fmt: skip


def train(work: Path, *extra: str, env: dict | None = None):
    return run_cli([*STATES, "--work_dir", str(work), *extra], cwd=work.parent, env=env)


def one_error_line(result, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sacae: error: "), result.stderr[-3000:]
    return last


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its bytes (links as their target)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def env_steps(log: Path) -> list[int]:
    return [json.loads(line)["env_steps"] for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("finished") / "run"
    result = train(work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A run SIGKILLed at agent step 120: checkpoints at 50 and 100, the train log's row at 125 and the evaluation
    and snapshot at 200 still to come."""
    work = tmp_path_factory.mktemp("killed") / "run"
    result = train(work, "--save_video", env={"SACAE_KILL_AT": "env_step:120"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert len(CheckpointStore(work).states()) == 2
    return work


def copy_run(run: Path, tmp_path: Path) -> Path:
    work = tmp_path / "run"
    shutil.copytree(run, work, symlinks=True)
    return work


# ------------------------------------------------------------------------------------------------------------
# 1. One writer per work dir.


def test_a_second_process_in_the_same_work_dir_is_refused_and_a_killed_ones_lock_is_not_left(tmp_path):
    work = tmp_path / "run"
    long_run = [*STATES, "--num_train_steps", "100000", "--work_dir", str(work)]
    with background_cli(long_run, tmp_path) as first:
        wait_for(lambda: env_steps_done(work) >= 1000, 600, "the first run's first episodes")
        second = run_cli(long_run, cwd=tmp_path)
        line = one_error_line(second)
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"is in use by another sacae process (pid {first.pid} on {socket.gethostname()})" in line, line
        assert first.poll() is None, "the first run must go on"
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = env_steps(work / "train.log")
    assert steps == sorted(set(steps)), steps  # one writer: no env step twice
    # The kernel dropped the killed process's lock: the same command resumes at once.
    with background_cli(long_run, tmp_path) as again:
        wait_for(lambda: status_of(work).get("pid") == again.pid, 600, "the resumed run's status")
        again.send_signal(signal.SIGTERM)
        out, _ = again.communicate(timeout=120)
        assert again.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert "resuming from" in out


def env_steps_done(work: Path) -> int:
    return status_of(work).get("env_steps", 0)


# ------------------------------------------------------------------------------------------------------------
# 2. The finished-run guard reads the checkpoint, not only status.json.


@pytest.mark.parametrize(
    "damage",
    ["status.json deleted", "status.json not JSON", "status.json says running", "status.json of wrong types"],
)
def test_starting_over_a_finished_run_needs_force_whatever_status_json_says(finished_run, tmp_path, damage):
    work = copy_run(finished_run, tmp_path)
    status = work / "status.json"
    if damage == "status.json deleted":
        status.unlink()
    elif damage == "status.json not JSON":
        status.write_text("finished?")
    elif damage == "status.json says running":
        status.write_text('{"state": "running"}')
    else:
        status.write_text('{"state": 3, "env_steps": "many"}')
    before = tree(work)
    line = one_error_line(train(work, "--no_resume"))
    assert "holds a finished run; add --force" in line, line
    assert tree(work) == before


def test_a_run_whose_state_cannot_be_read_is_not_discarded_without_force(finished_run, tmp_path):
    work = copy_run(finished_run, tmp_path)
    shutil.rmtree(work / "checkpoint")
    (work / "status.json").unlink()
    before = tree(work)
    line = one_error_line(train(work, "--no_resume"))
    assert "cannot be read" in line and "--force" in line, line
    assert tree(work) == before
    forced = train(work, "--no_resume", "--force", "--num_train_steps", "60")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert env_steps(work / "eval.log")[-1] == 480


# ------------------------------------------------------------------------------------------------------------
# 3. sacae deletes only what it wrote.


@pytest.mark.parametrize("extra", [(), ("--no_resume",), ("--no_resume", "--force")])
def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(tmp_path, extra):
    work = tmp_path / "notes"
    for name, text in {"tb/notes.txt": "mine", "model/weights.pt": "mine", "video/talk.mp4": "mine"}.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    before = tree(work)
    line = one_error_line(train(work, *extra))
    assert "no config.json: it is not a sacae run (it holds model/, tb/, video/)" in line, line
    assert tree(work) == before


def test_starting_over_removes_only_the_files_sacae_wrote(finished_run, tmp_path):
    work = copy_run(finished_run, tmp_path)
    own = {"tb/notes.txt", "model/README", "video/keep.txt", "checkpoint/mine.txt", "plots/loss.png"}
    for name in own:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("the user's")
    old_events = {p.name for p in (work / "tb").glob("events.out.tfevents.*")}
    result = train(work, "--no_resume", "--force", "--num_train_steps", "60")
    assert result.returncode == 0, result.stderr[-3000:]
    assert all((work / name).read_text() == "the user's" for name in own)
    assert not old_events & {p.name for p in (work / "tb").glob("events.out.tfevents.*")}
    assert sorted(p.name for p in (work / "model").glob("*.pt")) == ["0.pt", "480.pt"]  # this run's only
    assert "kept what sacae did not write there" in result.stderr


def test_remove_outputs_keeps_foreign_files_and_removes_emptied_folders(tmp_path):
    (tmp_path / "checkpoint" / "replay").mkdir(parents=True)
    (tmp_path / "checkpoint" / "replay" / "chunk-000000000000-000000000010.npz").write_bytes(b"x")
    (tmp_path / "checkpoint" / "state-000000000010.pt").write_bytes(b"x")
    (tmp_path / "video").mkdir()
    (tmp_path / "video" / "800.mp4").write_bytes(b"x")
    (tmp_path / "video" / "holiday.mp4").write_bytes(b"x")
    (tmp_path / "train.log").write_text("{}\n")
    left = remove_outputs(tmp_path)
    assert left == ["video/holiday.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video"]


# ------------------------------------------------------------------------------------------------------------
# 4. A write that fails: one sentence, status.json says failed, nothing half-written.


@contextlib.contextmanager
def on_small_disk(path: Path, read_only: bool = False):
    """Move `path` (a file or folder) onto a small tmpfs left full (or read-only), with a link in its place."""
    mount = path.parent.parent / f"disk-{path.name}"
    mount.mkdir()
    files = [path] if path.is_file() else list(path.rglob("*")) if path.exists() else []
    size_kb = 256 + sum(p.stat().st_size for p in files if p.is_file()) // 1024 * 2
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode().strip()})")
    try:
        if path.exists():
            shutil.move(str(path), str(mount / path.name))
        elif path.suffix:
            (mount / path.name).touch()
        else:
            (mount / path.name).mkdir()
        path.symlink_to(mount / path.name)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        else:
            with contextlib.suppress(OSError), open(mount / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def assert_failed_cleanly(work: Path, result, words: str) -> str:
    line = one_error_line(result)
    assert words in line, line
    status = json.loads((work / "status.json").read_text())
    assert status["state"] == "failed" and words in status["message"], status
    for log in ("train.log", "eval.log"):
        text = (work / log).read_text()
        assert text == "" or text.endswith("\n"), f"{log} ends in half a line"
    assert not [p for p in work.rglob("*") if ".tmp" in p.name], "a temporary file was left"
    return line


@pytest.mark.parametrize(
    ("target", "what"),
    [
        ("train.log", "writing the train log"),
        ("model", "writing a snapshot of the networks"),
        ("video", "writing an evaluation video"),
        ("tb", "the TensorBoard events"),
    ],
)
def test_a_full_disk_under_any_output_stops_the_run_with_one_sentence(killed_run, tmp_path, target, what):
    work = copy_run(killed_run, tmp_path)
    with on_small_disk(work / target):
        result = train(work, "--save_video")
        line = assert_failed_cleanly(work, result, what)
    if target != "tb":
        assert "The disk is full" in line and "MB are free" in line, line
    # With the space back, the same command resumes the run to its end.
    (work / target).unlink()
    shutil.copytree(killed_run / target, work / target) if (killed_run / target).is_dir() else shutil.copy(
        killed_run / target, work / target
    )
    again = train(work, "--save_video")
    assert again.returncode == 0, again.stderr[-3000:]
    assert env_steps(work / "eval.log") == [0, 800, 1600, 2000]


def test_a_read_only_snapshot_folder_stops_the_run_with_one_sentence(killed_run, tmp_path):
    work = copy_run(killed_run, tmp_path)
    with on_small_disk(work / "model", read_only=True):
        line = assert_failed_cleanly(work, train(work, "--save_video"), "Could not write a snapshot of the networks")
    assert "Read-only file system" in line, line


def test_the_status_file_records_the_failure_even_on_a_full_disk(killed_run, tmp_path):
    work = copy_run(killed_run, tmp_path)
    # The whole run folder on the full disk: status.json cannot be replaced by a new file, only rewritten in place.
    with on_small_disk(work):
        result = train(work, "--save_video")
        line = one_error_line(result)
        assert "The disk is full" in line, line
        status = json.loads((work / "status.json").read_text())
        assert status["state"] == "failed" and "The disk is full" in status["message"], (status, result.stderr[-3000:])


def test_sacae_eval_on_a_full_disk_writes_no_half_video(finished_run, tmp_path):
    work = copy_run(finished_run, tmp_path)
    with on_small_disk(work / "video"):
        result = run_cli(["eval", str(work), "--num_episodes", "1"], cwd=tmp_path)
        line = one_error_line(result)
        assert "writing an evaluation video" in line and "The disk is full" in line, line
        assert not [p for p in (work / "video").iterdir() if p.suffix == ".mp4"]


# ------------------------------------------------------------------------------------------------------------
# An unexpected exception: one sentence, the traceback on request, status.json says failed.


def test_an_unexpected_error_is_one_sentence_and_the_traceback_comes_with_debug(killed_run, tmp_path):
    work = copy_run(killed_run, tmp_path)
    quiet = {"SACAE_DEBUG": "0", "SACAE_RAISE_AT": "env_step:10"}
    result = train(work, "--save_video", env=quiet)
    line = one_error_line(result, code=1)
    assert "sacae train failed unexpectedly (RuntimeError: fault injected at env_step" in line, line
    assert "--debug (or SACAE_DEBUG=1)" in line, line
    status = json.loads((work / "status.json").read_text())
    assert status["state"] == "failed" and "fault injected" in status["message"]
    loud = train(work, "--save_video", "--debug", env=quiet)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "fault injected" in loud.stderr


def test_the_test_suite_sees_tracebacks():
    """The suite runs with SACAE_DEBUG=1 (conftest), so that no bug hides behind the one-sentence message."""
    assert os.environ.get("SACAE_DEBUG") == "1"
