"""No traceback from any input: every `sacae train` flag and every config.json field, at and beyond its range and of
the wrong type, is refused with one sentence (exit status 2) before anything is written; valid values still run.

The fields come from dataclasses.fields(TrainConfig), so a new field is covered as soon as it exists. Most values go
through `sacae.cli.main` in this process (the entry the command uses); a few run as real processes."""

import collections
import dataclasses
import json
import math
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from sacae.cli import main
from sacae.config import FIELD_BOUNDS, RUN_CONTROL_FIELDS, TrainConfig, field_types, resolve
from sacae.errors import SacaeError
from sacae.placement import AgentMemory, agent_memory, check_agent_fits, check_replay_device, place_replay
from tests.conftest import run_cli

GB = 10**9

# A tiny pixel SAC+AE run: should a bad value ever get through, it trains for seconds rather than hours.
BASE_VALUES = {
    "domain_name": "cartpole", "task_name": "swingup", "device": "cpu", "num_threads": 1, "image_size": 32,
    "action_repeat": 8, "num_filters": 4, "hidden_dim": 16, "encoder_feature_dim": 8, "batch_size": 4,
    "num_train_steps": 2, "init_steps": 1, "num_eval_episodes": 0,
}  # fmt: skip
BASE = {name: str(value) for name, value in BASE_VALUES.items()}

# Text fields whose valid values are open-ended: values each one's own check refuses. Any other text field gets
# a NUL character, which no name, path or list may hold.
FREE_TEXT = {
    "domain_name": ["nope"],
    "task_name": ["nope"],
    "task": ["nope_nope", ""],
    "work_dir": [""],
    "device": ["tpu", "", "cuda:x", "cuda:-1"],
    "resume": [""],
    "env": ["gymnasium:NoSuchEnv-v0"],
    "env_kwargs": ["{not json"],
    "logger": ["nosuch"],
}
# Numbers every numeric field is tried with; those its range accepts are left out (see accepted_by_range).
INT_VALUES = [0, -1, 10**30, -(10**30), 2**63]
FLOAT_VALUES = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e30, -1e30]
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
SAVED_FIELDS = [name for name in FIELDS if name not in RUN_CONTROL_FIELDS]


def members(name: str) -> tuple:
    tp = field_types()[name]
    return typing.get_args(tp) if typing.get_origin(tp) is not typing.Literal and typing.get_args(tp) else (tp,)


def is_literal(name: str) -> bool:
    return typing.get_origin(field_types()[name]) is typing.Literal


def accepted_by_range(name: str, value) -> bool:
    bounds = FIELD_BOUNDS.get(name)
    if bounds is None:  # fields without their own bounds: 64-bit integers, finite floats
        return math.isfinite(value) if isinstance(value, float) else -(2**63) <= value < 2**63
    return bounds.problem(value) is None


def out_of_range(name: str) -> list:
    """Numbers beyond the field's range: the common ones, and just past each end of its bounds."""
    if int in members(name):
        candidates = list(INT_VALUES)
        bounds = FIELD_BOUNDS.get(name)
        if bounds is not None:
            candidates += [int(bounds.low) - 1] + ([int(bounds.high) + 1] if bounds.high is not None else [])
    elif float in members(name):
        candidates = list(FLOAT_VALUES)
        bounds = FIELD_BOUNDS.get(name)
        if bounds is not None:
            candidates.append(bounds.low if bounds.low_open else bounds.low - 1e-6)
            if bounds.high is not None:
                candidates.append(bounds.high if bounds.high_open else bounds.high + 1e-6)
    else:
        return []
    return [v for v in candidates if not accepted_by_range(name, v)]


def cli_bad_values(name: str) -> list[list[str]]:
    """The flag words of each bad value of `name` the command line can be given."""
    flag = f"--{name}"
    if bool in members(name):
        return [[flag, "maybe"]]  # a switch takes no value: a usage error
    if is_literal(name):
        return [[flag, "bogus"]]
    if str in members(name):
        return [[flag, v] for v in FREE_TEXT.get(name, ["a\x00b"])]
    words = [[flag, repr(v) if isinstance(v, float) else str(v)] for v in out_of_range(name)]
    return [*words, [flag, "2.5" if int in members(name) else "x"]]  # the wrong type: refused by the parser


def refusal(capsys, argv: list[str]) -> tuple[str, bool]:
    """Run `sacae ARGV` here; assert exit status 2 and no traceback. Returns stderr and whether the parser itself
    refused (its usage message) rather than sacae (one sentence)."""
    try:
        code, by_parser = main(argv), False
    except SystemExit as e:
        code, by_parser = e.code, True
    out, err = capsys.readouterr()
    assert code == 2, (argv, code, out, err)
    assert "Traceback" not in err, err
    if not by_parser:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("sacae: error: "), (argv, err)
    return err, by_parser


def train_argv(work: Path, name: str, words: list[str]) -> list[str]:
    """`train` with the BASE flags in `work`, the flags of field `name` replaced by `words`."""
    flags = {"work_dir": str(work), **BASE}
    flags = {k: v for k, v in flags.items() if k != name and not (name == "task" and k in ("domain_name", "task_name"))}
    return ["train", *[w for k, v in flags.items() for w in (f"--{k}", v)], *words]


# ------------------------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize("name", FIELDS)
def test_every_flag_refuses_values_beyond_its_range_before_writing(capsys, tmp_path, name):
    cases = cli_bad_values(name)
    assert cases, f"no bad value for --{name}"
    work = tmp_path / "run"
    for words in cases:
        err, by_parser = refusal(capsys, train_argv(work, name, words))
        if not by_parser and name not in ("domain_name", "task_name", "task", "device", "env", "env_kwargs"):
            assert f"--{name}" in err, (words, err)
        assert not work.exists(), (words, sorted(p.name for p in work.iterdir()))


@pytest.mark.parametrize(
    ("flag", "value"),
    [("hidden_dim", 10**9), ("batch_size", 10**10), ("num_filters", 10**6), ("encoder_feature_dim", 10**11)],
)
def test_networks_too_large_for_memory_are_refused_naming_the_flag(capsys, tmp_path, flag, value):
    work = tmp_path / "run"
    err, _ = refusal(capsys, train_argv(work, flag, [f"--{flag}", str(value)]))
    assert "The networks and one update need" in err and err.strip().endswith(f"lower --{flag}."), err
    assert not work.exists()


def test_images_beyond_the_models_framebuffer_are_refused_and_the_limit_is_dm_controls():
    from sacae.envs import DMCEnv

    cfg = TrainConfig(task="cheetah_run")
    assert resolve(dataclasses.replace(cfg, image_size=480)).image_size == 480
    with pytest.raises(SacaeError, match=r"--image_size 481 is larger than MuJoCo renders off screen for cheetah_run "
                       r"\(its model's framebuffer is 640x480\); lower --image_size to at most 480\."):  # fmt: skip
        resolve(dataclasses.replace(cfg, image_size=481))
    # State runs render nothing at that size.
    resolve(dataclasses.replace(cfg, image_size=481, encoder_type="identity", decoder_type="identity"))
    env = DMCEnv("cheetah", "run", seed=0, image_size=480, frame_stack=1)
    assert env.spec.frame_shape == (3, 480, 480)
    with pytest.raises(ValueError):  # what the check spares users: dm_control's own refusal, deep in a run
        env.physics.render(481, 481)


@pytest.mark.parametrize(
    "flags",
    [
        # No update ever runs: the seed phase outlasts the run; the largest seed every library takes.
        ["--num_train_steps", "10", "--init_steps", "20", "--seed", str(2**32 - 1)],
        # Only the evaluation at step 0; seed 0.
        ["--num_train_steps", "0", "--seed", "0"],
        # Updates from the first step, spread; every float at the edge of its range.
        [
            "--num_train_steps",
            "4",
            "--init_steps",
            "0",
            "--seed_updates",
            "spread",
            "--critic_beta",
            "0",
            "--critic_tau",
            "1",
            "--encoder_tau",
            "0",
            "--discount",
            "0",
            "--actor_log_std_min",
            "-88",
            "--actor_log_std_max",
            "88",
            "--checkpoint_every",
            "1",
            "--eval_freq",
            "1",
        ],
    ],  # fmt: skip
    ids=["init_steps beyond the run", "no steps", "edges"],
)
def test_edge_combinations_run_to_the_end(capsys, tmp_path, flags):
    states = ["--encoder_type", "identity", "--decoder_type", "identity", "--hidden_dim", "8", "--batch_size", "4"]
    argv = ["train", "--task", "cartpole_swingup", "--work_dir", str(tmp_path / "run"), "--device", "cpu",
            "--num_threads", "1", "--num_eval_episodes", "1", *states, *flags]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"


def test_valid_values_stay_valid():
    resolve(TrainConfig())
    resolve(TrainConfig(**BASE_VALUES))  # what the refusals above change one flag of
    for path in Path(__file__).resolve().parents[1].glob("docs/**/config.json"):
        resolve(TrainConfig.load(path))
    boundaries = {
        "seed": [0, 2**32 - 1], "critic_beta": [0.0, 0.999], "discount": [0.0, 1.0], "num_threads": [1, 1024],
        "decoder_weight_lambda": [0.0], "frame_stack": [1, 1000], "action_repeat": [1, 1000],
        "checkpoint_every": [0, None], "init_steps": [0], "num_train_steps": [0], "num_eval_episodes": [0],
    }  # fmt: skip
    for name, values in boundaries.items():
        for value in values:
            resolve(dataclasses.replace(TrainConfig(task="cartpole_swingup"), **{name: value}))


def library_refusals():
    """(field, value, what the library underneath does with it): each raises deep inside a run."""
    param = torch.zeros(1, requires_grad=True)
    return [
        ("critic_beta", 1.0, lambda: torch.optim.Adam([param], betas=(1.0, 0.999))),
        ("actor_beta", -0.1, lambda: torch.optim.Adam([param], betas=(-0.1, 0.999))),
        ("alpha_lr", -1e-4, lambda: torch.optim.Adam([param], lr=-1e-4)),
        ("decoder_weight_lambda", -1e-7, lambda: torch.optim.Adam([param], weight_decay=-1e-7)),
        ("seed", -3, lambda: np.random.SeedSequence(-3)),
        ("seed", 2**32, lambda: np.random.RandomState(2**32)),  # dm_control seeds each task's RandomState
        ("num_threads", 0, lambda: torch.set_num_threads(0)),
        ("frame_stack", 10**30, lambda: collections.deque(maxlen=10**30)),
        ("num_train_steps", 10**30, lambda: np.zeros(1, dtype=np.int64) + 10**30),
    ]


@pytest.mark.parametrize("case", range(len(library_refusals())))
def test_values_the_libraries_refuse_are_refused_first(case):
    name, value, use = library_refusals()[case]
    with pytest.raises((ValueError, RuntimeError, OverflowError, TypeError)):
        use()
    with pytest.raises(SacaeError, match=f"--{name} must"):
        resolve(dataclasses.replace(TrainConfig(task="cartpole_swingup"), **{name: value}))


def test_real_processes_refuse_with_one_sentence(tmp_path):
    run = saved_run(tmp_path)
    (run / "config.json").write_text((run / "config.json").read_text().replace('"seed": 1', '"seed": "3"'))
    cases = {
        "--seed -3": ["train", "--work_dir", str(tmp_path / "a"), "--seed", "-3"],
        "--hidden_dim 10**9": [
            "train",
            "--work_dir",
            str(tmp_path / "c"),
            "--task",
            "cartpole_swingup",
            "--device",
            "cpu",
            "--hidden_dim",
            "1000000000",
        ],  # fmt: skip
        "a config.json field of the wrong type": ["train", "--resume", str(run)],
    }
    before = folder_state(run)
    for case, argv in cases.items():
        result = run_cli(argv, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("sacae: error: "), (case, result)
        assert "Traceback" not in result.stderr
    assert not any((tmp_path / name).exists() for name in "ac")
    assert "seed must be an integer" in lines[0] and str(run / "config.json") in lines[0]
    assert folder_state(run) == before


# ------------------------------------------------------------------------------------------------------------
# config.json


def saved_run(tmp_path: Path) -> Path:
    """A folder holding the config.json of the BASE run, as training writes it."""
    run = tmp_path / "saved"
    run.mkdir()
    cfg = TrainConfig(**BASE_VALUES, work_dir=str(run))
    (run / "config.json").write_text(resolve(cfg).to_json())
    return run


def folder_state(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def file_bad_values(name: str) -> list:
    """Values of the wrong type for the field, then values of its type out of its range."""
    kinds = members(name)
    wrong: list = [[1], {"a": 1}]
    if type(None) not in kinds:
        wrong.append(None)
    if is_literal(name):
        wrong += ["bogus", 1]
    elif bool in kinds:
        wrong += [1, "true"]
    elif int in kinds:
        wrong += ["3", 2.0, True]
    elif float in kinds:
        wrong += ["0.5", True]
    elif str in kinds:
        wrong += [3, True]
        # The device is checked where it is opened, by name rather than as a field of the file.
        wrong += [] if name == "device" else FREE_TEXT.get(name, ["a\x00b"])
    return wrong + out_of_range(name)


@pytest.mark.parametrize("name", SAVED_FIELDS)
def test_every_config_field_is_checked_when_a_run_is_resumed(capsys, tmp_path, name):
    run = saved_run(tmp_path)
    good = json.loads((run / "config.json").read_text())
    assert name in good
    for value in file_bad_values(name):
        (run / "config.json").write_text(json.dumps({**good, name: value}))
        before = folder_state(run)
        err, by_parser = refusal(capsys, ["train", "--resume", str(run)])
        assert not by_parser
        assert str(run / "config.json") in err, (value, err)
        assert name in err or name.split("_")[0] in err, (value, err)
        assert folder_state(run) == before, value


def test_a_bad_config_in_a_work_dir_or_an_evaluated_run_is_named(capsys, tmp_path):
    run = saved_run(tmp_path)
    good = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**good, "critic_beta": 1.0}))
    before = folder_state(run)
    err, _ = refusal(capsys, ["train", "--work_dir", str(run)])
    assert f"In the config file {run / 'config.json'}, critic_beta must lie in [0, 1) (got 1.0)." in err
    err, _ = refusal(capsys, ["eval", str(run)])
    assert "critic_beta must lie in [0, 1) (got 1.0)." in err
    assert folder_state(run) == before


def test_config_numbers_take_their_fields_types():
    cfg = TrainConfig.from_dict({"discount": 1, "seed": 3})
    assert isinstance(cfg.discount, float) and cfg.discount == 1.0 and cfg.seed == 3
    for value, words in [(3.0, "seed must be an integer (got 3.0)"), (True, "seed must be an integer (got true)")]:
        with pytest.raises(SacaeError, match=re_escape(f"In the config, {words}.")):
            TrainConfig.from_dict({"seed": value})
    with pytest.raises(SacaeError, match="discount must be a finite number"):
        TrainConfig.from_dict({"discount": 10**400})


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# ------------------------------------------------------------------------------------------------------------
# Memory: the networks and their update


@pytest.mark.parametrize("variant", ["sac_ae", "sac_pixel", "sac_states"])
def test_the_network_estimate_counts_the_agents_real_tensors(variant):
    from sacae.agent import SacAeAgent
    from sacae.replay import Batch

    types_ = {"sac_ae": ("pixel", "pixel"), "sac_pixel": ("pixel", "identity"), "sac_states": ("identity", "identity")}
    encoder, decoder = types_[variant]
    cfg = TrainConfig(encoder_type=encoder, decoder_type=decoder, hidden_dim=16, num_filters=4, encoder_feature_dim=8,
                      batch_size=4, num_layers=2, image_size=24, action_repeat=8)  # fmt: skip
    obs_shape, action_dim = ((9, 24, 24) if encoder == "pixel" else (5,)), 2
    agent = SacAeAgent(obs_shape, action_dim, cfg, torch.device("cpu"))
    obs = torch.randint(0, 255, (4, *obs_shape), dtype=torch.uint8) if encoder == "pixel" else torch.randn(4, 5)
    agent.update(Batch(obs, torch.zeros(4, 2), torch.zeros(4, 1), obs.clone(), torch.ones(4, 1)), 0)
    # Every parameter (target networks included), a gradient for each one an optimizer trains (not all of them are
    # alive between updates, all are within one), and each optimizer's moments.
    params = {id(p): p for net in agent.networks().values() for p in net.parameters()}
    trained = {id(p): p for opt in agent.optimizers().values() for group in opt.param_groups for p in group["params"]}
    moments = [
        t for opt in agent.optimizers().values() for s in opt.state.values() for k, t in s.items() if k != "step"
    ]
    real = sum(t.numel() * t.element_size() for t in [*params.values(), *trained.values(), *moments])
    estimate = agent_memory(cfg, obs_shape, action_dim)
    assert estimate.network_bytes == pytest.approx(real, rel=0.01)


def test_the_largest_part_names_the_flag_to_lower():
    cfg = TrainConfig()
    assert agent_memory(dataclasses.replace(cfg, hidden_dim=10**6), (9, 84, 84), 6).largest == "hidden_dim"
    assert agent_memory(dataclasses.replace(cfg, batch_size=10**5), (9, 84, 84), 6).largest == "batch_size"
    default = agent_memory(cfg, (9, 84, 84), 6)
    assert 0.1 * GB < default.total < 2 * GB  # the paper's networks, with a batch of 128: measured ~1 GB at peak


def test_networks_that_do_not_fit_are_refused_before_the_replay():
    agent = AgentMemory(network_bytes=2 * GB, activation_bytes=1 * GB, batch_size=128, largest="hidden_dim")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(SacaeError, match=r"need 3.0 GB .* but this machine has 4.1 GB available .*lower --hidden_dim"):
        place_replay("auto", cpu, 1000, 1, 1, host_available=4_100_000_000, gpu_free=None, agent=agent)
    with pytest.raises(SacaeError, match=r"but cuda has 2.0 GB free; lower --hidden_dim"):
        place_replay("auto", cuda, 1000, 1, 1, host_available=100 * GB, gpu_free=2 * GB, agent=agent)
    # The networks fit, the replay beside them does not: the replay's sentence counts them.
    with pytest.raises(SacaeError, match=r"keeping 2.1 GB free and 3.0 GB for the networks\); lower --replay"):
        place_replay("auto", cpu, 1000, 5 * GB, 0, host_available=9 * GB, gpu_free=None, agent=agent)
    # On a GPU the networks take GPU memory, so the frames go to host memory when both do not fit there.
    placed = place_replay("auto", cuda, 1000, 10 * GB, 0, host_available=100 * GB, gpu_free=15 * GB, agent=agent)
    assert placed.frames_device == torch.device("cpu")


def test_an_agent_alone_is_checked_too():
    cpu = torch.device("cpu")
    assert check_agent_fits(TrainConfig(), cpu, (9, 84, 84), 6).largest == "batch_size"
    with pytest.raises(SacaeError, match=r"The networks and one update need .* lower --hidden_dim\.$"):
        check_agent_fits(TrainConfig(hidden_dim=10**9), cpu, (9, 84, 84), 6)


def test_a_gpu_index_that_is_not_there_is_refused():
    with pytest.raises(SacaeError, match="--device cuda:64 names a GPU that is not there: PyTorch sees"):
        check_replay_device(TrainConfig(), torch.device("cuda:64"))
