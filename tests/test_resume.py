"""Never lose a run: a run killed at any moment and resumed writes exactly what the uninterrupted run writes.

The end-to-end tests run the real command in subprocesses and kill them with SIGKILL (at chosen points through
SACAE_KILL_AT, or at random moments in the slow test), stop them with SIGTERM, damage their checkpoints and fill
their disk, then compare every output with an uninterrupted reference run of the same command.
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sacae.checkpoint import CheckpointStore
from sacae.envs import DMCEnv
from sacae.process import processor_name
from sacae.replay import ReplayBuffer
from sacae.storage import load_torch
from tests.conftest import run_cli

# A pixel SAC+AE run small enough for CI: 250 agent steps = two 125-step cartpole episodes, a 50-update burst at
# agent step 50, evaluations at 0, 100, 200, 250 and a checkpoint every 50 agent steps.
TINY = ["train", "--task", "cartpole_swingup", "--action_repeat", "8", "--image_size", "32", "--hidden_dim", "32",
        "--num_filters", "4", "--batch_size", "16", "--encoder_feature_dim", "8", "--num_train_steps", "250",
        "--init_steps", "50", "--eval_freq", "100", "--num_eval_episodes", "1", "--checkpoint_every", "400",
        "--seed", "3", "--num_threads", "1", "--save_tb", "--save_model"]  # fmt: skip
WALL_CLOCK_KEYS = ("duration", "env_steps_per_second")


def train(work: Path, kill_at: str | None = None, extra=()):
    env = {"SACAE_KILL_AT": kill_at} if kill_at else {}
    return run_cli([*TINY, "--work_dir", str(work), *extra], cwd=work.parent, env=env)


def log_rows(path: Path) -> list[dict]:
    """A JSON-lines log without its wall-clock fields (the only values two identical runs may differ in)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_KEYS} for row in rows]


def tb_scalars(work: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "tb"), purge_orphaned_data=True)
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if not tag.endswith(WALL_CLOCK_KEYS)
    }


def final_weights(work: Path) -> dict[str, torch.Tensor]:
    state = load_torch(CheckpointStore(work).states()[0])
    assert state["finished"]
    flat = {}
    for net, params in state["agent"]["networks"].items():
        flat.update({f"{net}.{k}": v for k, v in params.items()})
    flat["log_alpha"] = state["agent"]["log_alpha"]
    return flat


def assert_same_run(work: Path, reference: Path) -> None:
    for name in ("train.log", "eval.log"):
        assert log_rows(work / name) == log_rows(reference / name), name
    ours, theirs = final_weights(work), final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
    for snapshot in sorted((reference / "model").glob("*.pt")):
        a = torch.load(snapshot, weights_only=True)["networks"]
        b = torch.load(work / "model" / snapshot.name, weights_only=True)["networks"]
        assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n]), snapshot.name
    assert tb_scalars(work) == tb_scalars(reference)
    assert json.loads((work / "status.json").read_text())["state"] == "finished"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("reference") / "run"
    result = train(work)
    assert result.returncode == 0, result.stderr
    assert [r["env_steps"] for r in log_rows(work / "eval.log")] == [0, 800, 1600, 2000]
    assert [r["env_steps"] for r in log_rows(work / "train.log")] == [1000, 2000]
    return work


# ------------------------------------------------------------------------------------------------------------
def test_killed_at_five_points_and_resumed_is_identical(tmp_path, reference):
    """One run killed five times (each process counts its own events): in the seed phase before any checkpoint,
    inside the update burst, mid-episode, during an evaluation and between a checkpoint's replay chunk and its
    state file. Each time the same command resumes it; the end result equals the uninterrupted run."""
    work = tmp_path / "run"
    kill_points = ["env_step:30", "update:20", "env_step:80", "eval_episode:1", "checkpoint_write:2"]
    for point in kill_points:
        result = train(work, kill_at=point)
        assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stderr[-2000:])
    result = train(work)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    assert_same_run(work, reference)
    status = json.loads((work / "status.json").read_text())
    assert status["resumes"] == 4  # the first kill came before any checkpoint: that attempt started over
    # One record per session whose work a checkpoint kept, each taking the run on from where the last one's
    # checkpoint left it, all on this machine with the thread count asked for.
    sessions = status["sessions"]
    assert len(sessions) == status["resumes"] + 1
    assert sessions[0]["from_env_steps"] == 0 and sessions[-1]["to_env_steps"] == 2000
    assert all(a["to_env_steps"] == b["from_env_steps"] for a, b in zip(sessions, sessions[1:], strict=False))
    assert all(a["to_env_steps"] > a["from_env_steps"] for a in sessions)
    assert {(s["processor"], s["device"], s["threads"], s["gpu"]) for s in sessions} == {
        (processor_name(), "cpu", 1, None)
    }

    again = train(work)  # a finished run, run again: said, exit 0, nothing changed
    assert again.returncode == 0 and "already finished" in again.stderr
    assert_same_run(work, reference)
    assert json.loads((work / "status.json").read_text())["sessions"] == sessions


def test_sigterm_checkpoints_and_a_damaged_newest_checkpoint_falls_back(tmp_path, reference):
    work = tmp_path / "run"
    work.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "sacae.cli", *TINY, "--work_dir", str(work)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Stop it once it has trained past its second checkpoint (agent step 100), mid-run.
    deadline = time.time() + 300
    while time.time() < deadline and len(CheckpointStore(work).states()) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "run the same command again to resume" in err
    status = json.loads((work / "status.json").read_text())
    assert status["state"] == "stopped" and "SIGTERM" in status["message"]

    newest = CheckpointStore(work).states()[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    result = train(work)
    assert result.returncode == 0, result.stderr
    assert f"{newest}" in result.stderr and "using the older checkpoint" in result.stderr
    assert_same_run(work, reference)


def test_disk_full_during_a_checkpoint(tmp_path):
    """On a 1 MB filesystem the first checkpoint does not fit: one sentence with the space needed, a non-zero
    exit, no half-written file."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode().strip()})")
    try:
        work = mount / "run"
        # The replay chunk of the first checkpoint (51 frames of 84x84x3) does not fit in 1 MB.
        result = run_cli([*TINY, "--work_dir", str(work), "--image_size", "84"], cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith("sacae: error: The disk is full") and "needs about" in message, message
        assert "Traceback" not in result.stderr
        leftovers = [p.name for p in work.rglob("*") if ".tmp" in p.name]
        assert not leftovers and not CheckpointStore(work).states()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_nonfinite_loss_stops_the_run_naming_the_loss(tmp_path):
    work = tmp_path / "run"
    args = ["train", "--task", "cartpole_swingup", "--encoder_type", "identity", "--decoder_type", "identity",
            "--action_repeat", "8", "--hidden_dim", "32", "--batch_size", "16", "--num_train_steps", "250",
            "--init_steps", "50", "--eval_freq", "100", "--num_eval_episodes", "1", "--checkpoint_every", "400",
            "--critic_lr", "1e20", "--work_dir", str(work)]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "The critic_loss became non-finite" in message and "agent step 50 (env step 400)" in message
    assert "state-000000000050.pt is kept" in message
    state = load_torch(CheckpointStore(work).states()[0])
    assert all(torch.isfinite(v).all() for v in state["agent"]["networks"]["critic"].values())
    assert json.loads((work / "status.json").read_text())["state"] == "failed"


# ------------------------------------------------------------------------------------------------------------
def fill(buffer: ReplayBuffer, rng, episodes: int, length: int) -> None:
    for _ in range(episodes):
        buffer.start_episode(rng.integers(0, 255, (9, 8, 8), dtype=np.uint8))
        for t in range(length):
            buffer.add(rng.normal(size=2).astype(np.float32), float(rng.normal()),
                       rng.integers(0, 255, (9, 8, 8), dtype=np.uint8), 1.0 if t < length - 1 else 0.0)  # fmt: skip


def make_buffer(capacity=50):
    return ReplayBuffer((3, 8, 8), np.uint8, 2, capacity, frame_stack=3, episode_length=10, seed=5)


def test_replay_chunks_restore_the_buffer_across_wraparound(tmp_path):
    """Checkpoints every few episodes while the rings wrap around several times; the restored buffer samples
    exactly what the original samples, and chunks that left the buffer are deleted from disk."""
    rng = np.random.default_rng(0)
    buffer, store = make_buffer(), CheckpointStore(tmp_path)
    for _ in range(8):
        fill(buffer, rng, episodes=3, length=10)
        store.save({"agent_steps": buffer.transitions_written, "replay": buffer.state_dict()}, buffer,
                   buffer.transitions_written)  # fmt: skip
    assert buffer.transitions_written == 240 and buffer.full  # wrapped 4.8 times
    state, restored = CheckpointStore(tmp_path).load_latest(make_buffer)
    a, b = buffer.sample(64), restored.sample(64)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    on_disk = sorted(p.name for p in (tmp_path / "checkpoint" / "replay").iterdir())
    # The newest two checkpoints need the chunks overlapping their last 50 transitions / 60 frame slots.
    assert len(on_disk) <= 4 and len(store.states()) == 2, on_disk


def test_checkpoint_cost_grows_with_new_data_only(tmp_path):
    """The replay bytes written by a checkpoint are those added since the previous one, however full it is."""
    rng = np.random.default_rng(1)
    buffer, store = make_buffer(capacity=2000), CheckpointStore(tmp_path)
    written = []
    for _ in range(6):
        before = {p.name for p in store.replay_dir.glob("*.npz")} if store.replay_dir.exists() else set()
        fill(buffer, rng, episodes=20, length=10)
        store.save({"replay": buffer.state_dict()}, buffer, buffer.transitions_written)
        new = [p for p in store.replay_dir.glob("*.npz") if p.name not in before]
        written.append(sum(p.stat().st_size for p in new))
    assert max(written) - min(written) <= 0.01 * max(written), written


def test_environment_state_rebuilds_the_episode_in_progress():
    """reacher's target lives in the model, set at reset from the task's RNG: rebuilding the episode from the
    saved RNG state and its actions brings it back, and both copies then step identically."""
    a = DMCEnv("reacher", "easy", seed=3, pixels=True, image_size=32, action_repeat=4)
    b = DMCEnv("reacher", "easy", seed=99, pixels=True, image_size=32, action_repeat=4)
    rng = np.random.default_rng(0)
    obs, _ = a.reset()
    for _ in range(7):
        obs, *_ = a.step(a.sample_action(rng))
    assert np.array_equal(b.set_state(a.get_state()), obs)
    for _ in range(5):
        action = a.sample_action(rng)
        (oa, ra, *_), (ob, rb, *_) = a.step(action), b.step(action)
        assert np.array_equal(oa, ob) and ra == rb


def test_bad_chunk_is_reported_and_the_older_checkpoint_used(tmp_path, capsys):
    rng = np.random.default_rng(2)
    buffer, store = make_buffer(), CheckpointStore(tmp_path)
    for _ in range(2):
        fill(buffer, rng, episodes=1, length=10)
        store.save({"replay": buffer.state_dict(), "agent_steps": buffer.transitions_written}, buffer,
                   buffer.transitions_written)  # fmt: skip
    newest_chunk = sorted(store.replay_dir.iterdir())[-1]
    newest_chunk.write_bytes(b"not a zip file")
    state, restored = CheckpointStore(tmp_path).load_latest(make_buffer)
    assert state["agent_steps"] == 10 and restored.transitions_written == 10
    assert str(newest_chunk) in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
def kill_at_random_moments(cmd: list[str], cwd: Path, times: int, seed: int, seconds: tuple[float, float]) -> int:
    """Start `cmd` `times` times, SIGKILLing each process after a random number of `seconds` unless it ended first;
    returns how many were killed."""
    rng, kills = random.Random(seed), 0
    for _ in range(times):
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(*seconds))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
    return kills


@pytest.mark.slow
def test_killed_at_twenty_random_moments_is_identical(tmp_path):
    """SIGKILL from outside at 20 random moments of one run (each process lives a random 2-12 s), then the same
    command to the end; the result equals an uninterrupted run. 500 agent steps: too long to finish early."""
    longer = ["--num_train_steps", "500"]
    reference, work = tmp_path / "reference", tmp_path / "run"
    assert train(reference, extra=longer).returncode == 0
    cmd = [sys.executable, "-m", "sacae.cli", *TINY, *longer, "--work_dir", str(work)]
    assert kill_at_random_moments(cmd, tmp_path, times=20, seed=7, seconds=(2, 12)) == 20
    result = train(work, extra=longer)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(work, reference)
