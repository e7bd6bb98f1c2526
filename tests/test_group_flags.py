"""What a single run offers, a group of seeds (`sacae train-seeds`) offers: `--resume` with the group's folder (or one
seed's), and a memory check that counts every seed's replay buffer and networks. The trackers of a group are tested
in tests/test_trackers.py."""

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sacae import placement as placement_module
from sacae.agent import SacAeAgent
from sacae.config import TrainConfig, resolve
from sacae.errors import SacaeError
from sacae.placement import (
    GPU_MEMORY_RESERVE_BYTES,
    MEMORY_RESERVE_BYTES,
    AgentMemory,
    agent_memory,
    check_fits,
    place_replay,
)
from sacae.replay import ReplayBuffer
from sacae.trainer import check_group_config, check_group_memory, load_group_resume_configs
from tests.conftest import run_cli

GB = 10**9
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
N = 1_000_000
AGENT = AgentMemory(network_bytes=2 * GB, activation_bytes=1 * GB, batch_size=128, largest="hidden_dim")


def refusal(*args, **kwargs) -> str:
    with pytest.raises(SacaeError) as e:
        place_replay(*args, **kwargs)
    return str(e.value)


# ------------------------------------------------------------------------------------------------------------
# The memory check of a group: the decision, with the amounts of memory given.


def test_one_seed_gives_the_sentences_and_numbers_of_a_single_run():
    """num_seeds=1 (the default) is the single run's check: these are its sentences, figure for figure."""
    assert refusal("cuda", CUDA, N, 21 * GB, 1 * GB, 100 * GB, 20 * GB, num_seeds=1) == (
        "The replay frames need 21.0 GB for 1,000,000 transitions but cuda has 20.0 GB free (keeping 4.3 GB for the "
        "networks); lower --replay_buffer_capacity to at most 747,858, train for fewer --num_train_steps or use "
        "--replay_device host."
    )
    assert refusal("auto", CUDA, N, 21 * GB, 1 * GB, 10 * GB, 12 * GB, num_seeds=1) == (
        "The replay buffer needs 22.0 GB for 1,000,000 transitions (22.0 KB each) but neither cuda (12.0 GB free, "
        "keeping 4.3 GB) nor this machine (10.0 GB available, keeping 2.1 GB free) can hold it; lower "
        "--replay_buffer_capacity to at most 366,906 or train for fewer --num_train_steps."
    )
    assert refusal("auto", CPU, N, 5 * GB, 1 * GB, 9 * GB, None, AGENT, num_seeds=1) == (
        "The replay buffer needs 6.0 GB for 1,000,000 transitions (6.0 KB each) but this machine has 9.0 GB "
        "available (keeping 2.1 GB free and 3.0 GB for the networks); lower --replay_buffer_capacity to at most "
        "642,086 or train for fewer --num_train_steps."
    )
    assert refusal("auto", CPU, 1000, 1, 1, 4_100_000_000, None, AGENT, num_seeds=1) == (
        "The networks and one update need 3.0 GB (2.0 GB of weights, gradients, Adam moments and target networks, "
        "1.0 GB of activations for batches of 128) but this machine has 4.1 GB available (keeping 2.1 GB free); "
        "lower --hidden_dim."
    )
    placed = place_replay("auto", CUDA, N, 21 * GB, 1 * GB, 100 * GB, 80 * GB, AGENT, num_seeds=1)
    assert placed.describe() == "frames on the GPU (21.00 GB; the GPU has 80.0 GB free, 7.3 GB kept for the networks)"
    assert placed == place_replay("auto", CUDA, N, 21 * GB, 1 * GB, 100 * GB, 80 * GB, AGENT)


@pytest.mark.parametrize("requested", ["auto", "host", "cuda"])
@pytest.mark.parametrize("seeds", [2, 3, 10])
def test_a_group_decides_as_one_buffer_of_all_its_seeds_bytes(requested, seeds):
    """Without the networks, N seeds' buffers are placed (and refused) as one buffer of N times the bytes would be."""
    for frames, other, host, gpu in [
        (7 * GB, GB // 3, 30 * GB, 26 * GB),
        (GB, GB, 9 * GB, 80 * GB),
        (3, 1, None, None),
    ]:
        group = alone = None
        try:
            group = place_replay(requested, CUDA, N, frames, other, host, gpu, num_seeds=seeds).frames_device
        except SacaeError:
            pass
        try:
            alone = place_replay(requested, CUDA, N, seeds * frames, seeds * other, host, gpu).frames_device
        except SacaeError:
            pass
        assert group == alone, (frames, other, host, gpu)


def test_auto_puts_a_groups_frames_on_the_gpu_only_when_every_seeds_fit():
    frames, other, seeds = 10 * GB, 1 * GB, 3
    exactly = seeds * frames + GPU_MEMORY_RESERVE_BYTES + seeds * AGENT.total
    placed = place_replay("auto", CUDA, N, frames, other, 100 * GB, exactly, AGENT, num_seeds=seeds)
    assert placed.frames_device == CUDA and placed.num_seeds == 3 and placed.needed == frames + other  # one seed's
    assert placed.gpu_reserve == GPU_MEMORY_RESERVE_BYTES + seeds * AGENT.total
    assert "frames on the GPU (3 x 10.00 GB; the GPU has 43.3 GB free" in placed.describe()
    assert (
        place_replay("auto", CUDA, N, frames, other, 100 * GB, exactly - 1, AGENT, num_seeds=seeds).frames_device == CPU
    )
    # One seed's frames would fit on that GPU many times over.
    assert place_replay("auto", CUDA, N, frames, other, 100 * GB, exactly - 1, AGENT).frames_device == CUDA


def test_a_group_that_does_not_fit_is_refused_naming_the_seeds():
    seeds, frames, other = 4, 10 * GB, 1 * GB
    # Frames asked on the GPU: 30 GB free less 4 GB less four agents of 3 GB leaves 14 GB for 40 GB of frames.
    message = refusal("cuda", CUDA, N, frames, other, 100 * GB, 30 * GB, AGENT, num_seeds=seeds)
    assert message.startswith("The replay frames of 4 seeds need 40.0 GB for 1,000,000 transitions per seed but cuda")
    fits = int((30 * GB - GPU_MEMORY_RESERVE_BYTES - seeds * AGENT.total) / (seeds * frames / N))
    assert message.endswith(
        f"lower --replay_buffer_capacity to at most {fits:,}, train for fewer --num_train_steps, train fewer seeds "
        f"at once or use --replay_device host."
    )
    # In host memory the buffers and the networks of every seed count.
    message = refusal("auto", CPU, N, frames, other, 50 * GB, None, AGENT, num_seeds=seeds)
    room = 50 * GB - MEMORY_RESERVE_BYTES - seeds * AGENT.total
    assert message == (
        "The 4 replay buffers need 44.0 GB for 1,000,000 transitions per seed (11.0 KB each) but this machine has "
        "50.0 GB available (keeping 2.1 GB free and 12.0 GB for the networks); lower --replay_buffer_capacity to at "
        f"most {int(room / (seeds * (frames + other) / N)):,}, train for fewer --num_train_steps or train fewer seeds "
        "at once."
    )
    assert place_replay("auto", CPU, N, frames, other, 50 * GB, None, AGENT, num_seeds=3).frames_device == CPU
    # Neither the GPU nor host memory.
    message = refusal("auto", CUDA, N, frames, other, 20 * GB, 30 * GB, AGENT, num_seeds=seeds)
    assert message.startswith("The 4 replay buffers need 44.0 GB") and "neither cuda (30.0 GB free, keeping" in message
    assert message.endswith(", train for fewer --num_train_steps or train fewer seeds at once.")
    # The networks alone: counted once per seed.
    assert place_replay("auto", CPU, 1000, 1, 1, 6 * GB, None, AGENT).frames_device == CPU
    assert refusal("auto", CPU, 1000, 1, 1, 6 * GB, None, AGENT, num_seeds=2) == (
        "The networks and one update of 2 seeds need 6.0 GB (4.0 GB of weights, gradients, Adam moments and target "
        "networks, 2.0 GB of activations for batches of 128) but this machine has 6.0 GB available (keeping 2.1 GB "
        "free); lower --hidden_dim or train fewer seeds at once."
    )
    assert "of 2 seeds need 6.0 GB" in refusal("auto", CUDA, 1000, 1, 1, 50 * GB, 5 * GB, AGENT, num_seeds=2)


def test_check_fits_reads_the_memory_available_and_counts_the_seeds(monkeypatch):
    cfg = resolve(TrainConfig(task="cartpole_swingup", replay_buffer_capacity=N, num_train_steps=N))
    frame_shape, action_dim = (3, 84, 84), 1
    frames, other = ReplayBuffer.estimate_parts(frame_shape, 1, action_dim, N, cfg.frame_stack, cfg.episode_agent_steps)
    agent = agent_memory(cfg, (9, 84, 84), action_dim)
    two_seeds = MEMORY_RESERVE_BYTES + 2 * (frames + other + agent.total)
    monkeypatch.setattr(placement_module, "available_memory_bytes", lambda: two_seeds)
    assert check_fits(cfg, CPU, frame_shape, 1, action_dim).frames_device == CPU
    assert check_fits(cfg, CPU, frame_shape, 1, action_dim, num_seeds=2).num_seeds == 2
    with pytest.raises(SacaeError, match=r"^The 3 replay buffers need .* or train fewer seeds at once\.$"):
        check_fits(cfg, CPU, frame_shape, 1, action_dim, num_seeds=3)
    # Memory the seeds' networks already hold counts as free: the estimate counts it.
    monkeypatch.setattr(placement_module, "available_memory_bytes", lambda: two_seeds - 1000)
    with pytest.raises(SacaeError, match="The 2 replay buffers need"):
        check_fits(cfg, CPU, frame_shape, 1, action_dim, num_seeds=2)
    assert check_fits(cfg, CPU, frame_shape, 1, action_dim, num_seeds=2, held_bytes=1000).host_available == two_seeds


def test_the_trainers_group_check_counts_every_seed_and_sets_their_placement(monkeypatch):
    cfg = resolve(TrainConfig(task="cartpole_swingup", encoder_type="identity", decoder_type="identity",
                              hidden_dim=32, replay_buffer_capacity=N, num_train_steps=N, device="cpu"))  # fmt: skip
    spec = SimpleNamespace(frame_shape=(5,), obs_dtype=np.float32, action_dim=1)

    def runs(k):
        return [SimpleNamespace(cfg=cfg, env=SimpleNamespace(spec=spec), agent=SacAeAgent((5,), 1, cfg, CPU),
                                placement=None) for _ in range(k)]  # fmt: skip

    frames, other = ReplayBuffer.estimate_parts((5,), 4, 1, N, 1, cfg.episode_agent_steps)
    agent = agent_memory(cfg, (5,), 1)
    built = sum(p.numel() * 4 for p in {id(p): p for n in runs(1)[0].agent.networks().values()
                                        for p in n.parameters()}.values())  # fmt: skip
    available = MEMORY_RESERVE_BYTES + 2 * (frames + other + agent.total) - 2 * built
    monkeypatch.setattr(placement_module, "available_memory_bytes", lambda: available)
    two = runs(2)
    placed = check_group_memory(two, CPU)
    assert placed.num_seeds == 2 and all(r.placement is placed for r in two)
    assert placed.host_available == available + 2 * built
    with pytest.raises(SacaeError, match=r"The 3 replay buffers need .* train fewer seeds at once\.$"):
        check_group_memory(runs(3), CPU)


# ------------------------------------------------------------------------------------------------------------
# --resume with a group's folder.

BASE = dict(task="cartpole_swingup", encoder_type="identity", decoder_type="identity", hidden_dim=32, batch_size=16)


def make_group(root: Path, seeds=(1, 2, 10), changes=None) -> tuple[Path, TrainConfig]:
    """RUNS/cartpole_swingup/sac_states/seed_<i>/config.json as `sacae train-seeds` writes them (no training)."""
    base = resolve(TrainConfig(**BASE))
    group = root / "runs" / base.env_name / base.configuration
    for s in seeds:
        folder = group / f"seed_{s}"
        folder.mkdir(parents=True)
        cfg = dataclasses.replace(base, seed=s, work_dir=os.fspath(folder), **(changes or {}).get(s, {}))
        (folder / "config.json").write_text(cfg.to_json())
    return group, base


def resume(folder: Path, seeds=(), **flags) -> list[TrainConfig]:
    return load_group_resume_configs(resolve(TrainConfig(resume=os.fspath(folder), **flags)), seeds)


def test_resume_takes_the_groups_seeds_and_their_saved_configuration(tmp_path):
    group, base = make_group(tmp_path)
    configs = resume(group)
    # The configurations `sacae train-seeds --seeds 1 2 10` makes: the group goes on as the same command would.
    assert configs == [dataclasses.replace(base, seed=s, work_dir=os.fspath(group / f"seed_{s}")) for s in (1, 2, 10)]
    assert [c.seed for c in resume(group, (10, 1))] == [10, 1]
    # A seed folder: that seed alone; with --seeds, those of its group.
    assert [(c.seed, c.work_dir) for c in resume(group / "seed_2")] == [(2, os.fspath(group / "seed_2"))]
    assert [c.seed for c in resume(group / "seed_2", (1, 10))] == [1, 10]
    # Execution flags set on the command line replace the saved ones; other flags are ignored.
    configs = resume(group, device="cpu", num_threads=1, batch_size=512, num_train_steps=10)
    assert {(c.device, c.num_threads, c.batch_size, c.num_train_steps) for c in configs} == {
        ("cpu", 1, 16, base.num_train_steps)
    }


def test_seeds_that_differ_are_refused_unless_in_execution_flags_given_anew(tmp_path):
    group, _ = make_group(tmp_path, changes={2: {"device": "cpu"}})
    with pytest.raises(SacaeError) as e:
        resume(group)
    assert str(e.value) == (
        f"--resume {group}: seed_1 and seed_2 last ran with different execution flags (--device auto (seed_2: cpu)); "
        f"give --device on this command line to choose the group's."
    )
    assert {c.device for c in resume(group, device="cpu")} == {"cpu"}
    assert [c.seed for c in resume(group, (1, 10))] == [1, 10]  # the seeds chosen agree

    group, _ = make_group(tmp_path / "other", changes={10: {"critic_lr": 0.01}})
    with pytest.raises(SacaeError, match=r"seed_1 and seed_10 hold different configurations \(--critic_lr 0.001 "
                                         r"\(seed_10: 0.01\)\), so they are not one group; resume each"):  # fmt: skip
        resume(group, device="cpu")


def test_bad_resume_folders_get_one_sentence(tmp_path):
    group, _ = make_group(tmp_path, seeds=(1, 2))
    cases = [
        (tmp_path / "nowhere", (), "there is no such folder."),
        (
            group.parent,
            (),
            "the folder holds no seed folders (subfolders with a config.json); its subfolders "
            "sac_states hold groups: name one, RUNS_DIR/<task>/<configuration>.",
        ),  # fmt: skip
        (
            group,
            (1, 3),
            "--seeds: the group in {group} has no seed 3 (it holds seeds 1 2); list only those, or drop "
            "--seeds to resume them all.",
        ),  # fmt: skip
        (group, (2, 2), "--seeds lists a seed twice (2 2)."),
    ]
    for folder, seeds, sentence in cases:
        with pytest.raises(SacaeError) as e:
            resume(folder, seeds)
        assert sentence.format(group=group) in str(e.value), str(e.value)
    # Two folders holding the same seed.
    (group / "copy").mkdir()
    (group / "copy" / "config.json").write_text((group / "seed_2" / "config.json").read_text())
    with pytest.raises(SacaeError, match="copy and seed_2 both hold a run of seed 2"):
        resume(group)
    # --resume among a sweep's training flags of a group still gets its sentence.
    with pytest.raises(SacaeError, match="same command runs again; drop --resume somewhere"):
        check_group_config(TrainConfig(resume="somewhere"), [1, 2])


TINY = ["--task", "cartpole_swingup", "--encoder_type", "identity", "--decoder_type", "identity", "--action_repeat",
        "8", "--hidden_dim", "32", "--batch_size", "16", "--num_train_steps", "150", "--init_steps", "25",
        "--num_eval_episodes", "1", "--eval_freq", "150", "--num_threads", "1"]  # fmt: skip


def test_train_seeds_resume_on_the_command_line(tmp_path):
    """A finished tiny group: `--resume GROUP_DIR` reopens each of its seeds (finished: nothing to do), a seed folder
    that seed alone; a seed that is not there gets one sentence and exit status 2."""
    runs = tmp_path / "runs"
    result = run_cli(["train-seeds", *TINY, "--seeds", "1", "2", "--runs_dir", str(runs)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    group = runs / "cartpole_swingup" / "sac_states"
    logs = {s: (group / f"seed_{s}" / "eval.log").read_text() for s in (1, 2)}

    result = run_cli(["train-seeds", "--resume", str(group)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if "already finished" in line] == [
        f"sacae: the run in {group / f'seed_{s}'} is already finished (1,200 env steps); nothing to do." for s in (1, 2)
    ]
    result = run_cli(["train-seeds", "--resume", str(group / "seed_2"), "--device", "cpu"], cwd=tmp_path)
    assert result.returncode == 0 and "seed_2 is already finished" in result.stderr and "seed_1" not in result.stderr
    assert json.loads((group / "seed_2" / "config.json").read_text())["device"] == "cpu"
    assert {s: (group / f"seed_{s}" / "eval.log").read_text() for s in (1, 2)} == logs

    result = run_cli(["train-seeds", "--resume", str(group), "--seeds", "3"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"sacae: error: --resume {group} --seeds: the group in {group} has no seed 3 (it holds seeds 1 2); list only "
        f"those, or drop --seeds to resume them all."
    )
