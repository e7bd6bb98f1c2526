"""The GPU path on any machine: the overlapped loop computes exactly what the sequential one does (on the CPU, where
it can be checked bit for bit), and the replay frames are placed where they fit.

The overlap runs use test_resume's tiny pixel SAC+AE run: 250 agent steps, a 50-update burst at step 50, then one
update per step, each overlapped with the environment step.
"""

import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

from sacae.config import TrainConfig
from sacae.errors import SacaeError
from sacae.placement import GPU_MEMORY_RESERVE_BYTES, MEMORY_RESERVE_BYTES, place_replay
from sacae.replay import ReplayBuffer
from sacae.trainer import Trainer
from tests.test_resume import TINY, assert_same_run, train

GB = 10**9


def tiny_config(work: Path, overlap: str) -> TrainConfig:
    return tyro.cli(TrainConfig, args=[*TINY[1:], "--work_dir", str(work), "--overlap", overlap], use_underscores=True)


def run_in_process(work: Path, overlap: str) -> set[str]:
    """Train the tiny run here; returns the names of the threads its single updates ran in."""
    trainer = Trainer(tiny_config(work, overlap))
    update, threads = trainer.agent.update, set()

    def recorded_update(batch, step):
        threads.add(threading.current_thread().name)
        update(batch, step)

    trainer.agent.update = recorded_update
    trainer.run()
    return threads


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, one_torch_thread) -> Path:
    work = tmp_path_factory.mktemp("sequential") / "run"
    assert run_in_process(work, "off") == {threading.current_thread().name}
    return work


def test_overlapped_run_is_identical_to_the_sequential_one(tmp_path, sequential):
    work = tmp_path / "run"
    threads = run_in_process(work, "on")
    # The burst's updates run here; every later one in the worker thread.
    assert threading.current_thread().name in threads and any(t.startswith("sacae-update") for t in threads)
    assert_same_run(work, sequential)


def test_overlapped_run_killed_mid_step_and_resumed_is_identical(tmp_path, sequential):
    """SIGKILL during an environment step with an update in flight (the 120th step, after the checkpoint of step
    100, itself written by the overlapped loop), then the same command resumes it."""
    work = tmp_path / "run"
    killed = train(work, kill_at="env_step:120", extra=["--overlap", "on"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train(work, extra=["--overlap", "on"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "overlap on" in resumed.stderr and "frames in host memory" in resumed.stderr
    assert "resuming from" in resumed.stderr and "state-000000000100.pt" in resumed.stderr
    assert_same_run(work, sequential)


def test_a_gathered_batch_does_not_change_when_the_ring_overwrites_its_frames():
    """The overlapped update's batch is gathered before the step's transition is stored; storing it (and more)
    overwrites frame slots of a full ring without touching the batch."""
    buf = ReplayBuffer((3, 4, 4), np.uint8, 1, capacity=8, frame_stack=3, episode_length=4, seed=0)
    rng = np.random.default_rng(0)

    def frame():
        return rng.integers(0, 256, (9, 4, 4), dtype=np.uint8)

    for _ in range(3):
        buf.start_episode(frame())
        for _ in range(4):
            buf.add(rng.uniform(-1, 1, 1).astype(np.float32), float(rng.random()), frame(), 1.0)
    idx = buf.sample_indices(16)
    batch = buf.gather(idx)
    kept = [t.clone() for t in batch]
    for _ in range(buf.num_slots):
        buf.add(rng.uniform(-1, 1, 1).astype(np.float32), float(rng.random()), frame(), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(batch, kept, strict=True))


# ------------------------------------------------------------------------------------------------------------
# Replay placement: the decision, with the amounts of memory given.
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
N = 1_000_000


def place(requested="auto", device=CUDA, frames=21 * GB, other=1 * GB, host=100 * GB, gpu=80 * GB):
    return place_replay(requested, device, N, frames, other, host, gpu)


def test_frames_go_to_the_gpu_when_they_fit():
    placement = place()
    assert placement.frames_device == CUDA and placement.needed == 22 * GB
    assert "frames on the GPU (21.00 GB; the GPU has 80.0 GB free" in placement.describe()


def test_frames_stay_in_host_memory_when_the_gpu_is_too_small_or_host_is_asked_for():
    just_too_small = 21 * GB + GPU_MEMORY_RESERVE_BYTES - 1
    assert place(gpu=just_too_small).frames_device == CPU
    assert place(gpu=just_too_small + 1).frames_device == CUDA
    assert place("host").frames_device == CPU
    assert place(device=CPU, gpu=None).frames_device == CPU
    assert place(device=CPU, gpu=None).describe() == "frames in host memory"
    assert place(host=None, gpu=1 * GB).frames_device == CPU  # host memory unknown: no limit


def test_frames_on_the_gpu_need_only_the_transition_arrays_in_host_memory():
    assert place(host=10 * GB).frames_device == CUDA
    with pytest.raises(SacaeError, match="this machine has 10.0 GB available"):
        place("host", host=10 * GB)


def test_a_buffer_that_fits_nowhere_is_refused_with_both_amounts():
    with pytest.raises(SacaeError) as e:
        place(host=10 * GB, gpu=12 * GB)
    message = str(e.value)
    assert "neither cuda (12.0 GB free" in message and "nor this machine (10.0 GB available" in message
    # The larger of the two: the GPU's 12 GB less its reserve holds about 376,000 transitions' frames.
    fits = int((12 * GB - GPU_MEMORY_RESERVE_BYTES) / (21 * GB / N))
    assert fits > int((10 * GB - MEMORY_RESERVE_BYTES) / (22 * GB / N))
    assert f"--replay_buffer_capacity to at most {fits:,}" in message


def test_frames_asked_on_the_gpu_that_do_not_fit_are_refused():
    with pytest.raises(SacaeError, match="The replay frames need 21.0 GB .* or use --replay_device host"):
        place("cuda", gpu=20 * GB)
