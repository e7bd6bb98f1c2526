"""Multi-seed training: the group agent against N single agents (updates, acting, Adam, the unstacked state), and a
short multi-seed run against single-seed runs of the same seeds.

Each seed's random draws are made equal in both paths by giving seed i's single agent the global RNG state of a
generator seeded like the stacked agent's generator i.
"""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from sacae import agent as agent_module
from sacae.agent import GroupAgent, SacAeAgent, stack_batches
from sacae.config import TrainConfig
from sacae.multiseed import check_multiseed_config
from sacae.replay import Batch
from sacae.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
N = 3
STATE_DIM = 6
ACTION_DIM = 2
BATCH = 8
IMAGE = 32
VARIANTS = {
    "sac_ae": dict(encoder_type="pixel", decoder_type="pixel"),
    "sac_pixel": dict(encoder_type="pixel", decoder_type="identity"),
    "sac_states": dict(encoder_type="identity", decoder_type="identity"),
}
# Every part of the update: odd steps (critic, autoencoder), even ones (actor and temperature, targets), the seed
# phase's burst of equal step numbers.
STEPS = (1000, 1000, 1001, 1002, 1003, 1004)
# The tolerance of tests/test_agent.py's fast-vs-reference check: batched kernels round differently from one seed's.
RTOL, ATOL = 1e-4, 1e-5
# Adam's eps in the comparison of parameters. Adam moves a parameter by about lr * g / (sqrt(v) + eps): with torch's
# eps 1e-8 that is lr times the sign of g wherever g is small, so a gradient that rounding alone decides (a sum that
# nearly cancels, or a ReLU decision at exactly its threshold in one path and not the other; the autoencoder's
# gradients are ~1e-7) moves a parameter by up to lr = 1e-3 differently in one step, in any two float32
# implementations. With eps 1e-3 a gradient difference moves a parameter by no more than itself, and the same code is
# compared to 1e-5; docs/multiseed.md shows the figures. Adam's own arithmetic at eps 1e-8 is compared bit for bit
# below, and the losses at eps 1e-8 update by update.
TIGHT_EPS = 1e-3
LR = 1e-3


def make_agent(variant, seed, image_size=IMAGE, **overrides):
    kw = dict(hidden_dim=32, batch_size=BATCH, image_size=image_size, num_filters=8, encoder_feature_dim=16, seed=seed)
    cfg = TrainConfig(**{**kw, **VARIANTS[variant], **overrides})
    torch.manual_seed(seed)
    obs_shape = (9, image_size, image_size) if cfg.encoder_type == "pixel" else (STATE_DIM,)
    return SacAeAgent(obs_shape, ACTION_DIM, cfg, CPU)


def make_batch(agent, seed):
    g = torch.Generator().manual_seed(seed)
    b, size = agent.cfg.batch_size, agent.cfg.image_size
    if agent.cfg.encoder_type == "pixel":
        obs, next_obs = (torch.randint(0, 256, (b, 9, size, size), dtype=torch.uint8, generator=g) for _ in "on")
    else:
        obs, next_obs = (torch.randn(b, STATE_DIM, generator=g) for _ in "on")
    action = torch.rand(b, ACTION_DIM, generator=g) * 2 - 1
    reward = torch.randn(b, 1, generator=g)
    not_done = (torch.rand(b, 1, generator=g) > 0.3).float()
    return Batch(obs, action, reward, next_obs, not_done)


def make_seeds(variant, image_size=IMAGE, adam_eps=None):
    """N agents that differ in more than their initialisation: target critics moved away from the critics,
    different temperatures, and one single update done already (so that some optimizers hold state)."""
    agents = []
    for i in range(N):
        agent = make_agent(variant, seed=10 + i, image_size=image_size)
        if adam_eps is not None:
            for opt in agent.optimizers().values():
                opt.param_groups[0]["eps"] = adam_eps
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in agent.critic_target.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            agent.log_alpha.fill_(math.log(0.2 + 0.05 * i))
        torch.manual_seed(30 + i)
        agent.update(make_batch(agent, seed=40 + i), 999)
        agent.metrics.pop()
        agents.append(agent)
    return agents


def generators(seed=500):
    return [torch.Generator().manual_seed(seed + i) for i in range(N)]


def single_update(agent, batch, step, generator):
    """agent.update drawing from `generator` (through the global RNG, which SacAeAgent uses)."""
    torch.set_rng_state(generator.get_state())
    agent.update(batch, step)
    generator.set_state(torch.get_rng_state())


def assert_close_in_norm(got, expected, rtol, message):
    """|got - expected| <= rtol |expected| over the whole tensor: blind to one element that a rounding-decided ReLU
    changed, not to a wrong formula."""
    assert torch.linalg.vector_norm(got - expected) <= rtol * torch.linalg.vector_norm(expected) + 1e-30, message


def assert_state_matches(state, agent):
    """A state from GroupAgent.unstack() against a SacAeAgent: parameters, temperature, optimizer states."""
    expected = agent.state_dict()
    assert state["networks"].keys() == expected["networks"].keys()
    for net, params in expected["networks"].items():
        assert state["networks"][net].keys() == params.keys(), net
        for name, p in params.items():
            q = state["networks"][net][name]
            assert q.shape == p.shape, (net, name)
            assert torch.allclose(q, p, rtol=RTOL, atol=ATOL), f"{net}.{name}: max diff {(q - p).abs().max():.3g}"
    assert torch.allclose(state["log_alpha"], expected["log_alpha"], rtol=RTOL, atol=ATOL)
    assert state["optimizers"].keys() == expected["optimizers"].keys()
    for name, opt in expected["optimizers"].items():
        got = state["optimizers"][name]
        assert got["param_groups"] == opt["param_groups"], name
        assert got["state"].keys() == opt["state"].keys(), name
        for j, s in opt["state"].items():
            assert got["state"][j].keys() == s.keys(), (name, j)
            assert torch.equal(got["state"][j]["step"], s["step"]), (name, j)
            for k in ("exp_avg", "exp_avg_sq"):
                assert_close_in_norm(got["state"][j][k], s[k], 1e-2, (name, j, k))


def run_both(singles, steps, check_metrics):
    """The same updates on a GroupAgent of `singles` and on `singles` themselves; returns the group agent."""
    stacked = GroupAgent(copy.deepcopy(singles), generators())
    single_generators = generators()
    for k, step in enumerate(steps):
        batches = [make_batch(a, seed=100 * i + k) for i, a in enumerate(singles)]
        stacked.update(stack_batches(batches), step)
        for agent, batch, g in zip(singles, batches, single_generators, strict=True):
            single_update(agent, batch, step, g)
        for i, agent in enumerate(singles):
            check_metrics(stacked.metrics.pop(i), agent.metrics.pop(), (step, i))
    return stacked


# ---------------------------------------------------------------------------------------------------------------
# The group agent against single agents


@pytest.mark.parametrize(
    ("variant", "image_size"),
    [
        ("sac_ae", IMAGE),
        ("sac_ae", IMAGE + 1),  # odd image: the decoder's last layer without output padding
        ("sac_pixel", IMAGE),
        ("sac_states", IMAGE),
    ],
)
def test_group_updates_equal_single_agent_updates(variant, image_size):
    singles = make_seeds(variant, image_size, TIGHT_EPS)
    start = copy.deepcopy(singles[0].state_dict()["networks"])

    def check_metrics(got, expected, where):
        for name, value in expected.items():
            if value is None:
                assert got[name] is None, (where, name)
            else:
                assert got[name] == pytest.approx(value, rel=RTOL, abs=1e-6), (where, name)

    stacked = run_both(singles, STEPS, check_metrics)
    for state, agent in zip(stacked.unstack(), singles, strict=True):
        assert_state_matches(state, agent)
    # Not vacuous: every network moved, and the seeds stayed different from each other.
    for net in ("actor", "critic", "critic_target") + (("decoder",) if variant == "sac_ae" else ()):
        for name, p in singles[0].state_dict()["networks"][net].items():
            assert not torch.equal(p, start[net][name]), (net, name)
    assert not torch.allclose(singles[0].actor.trunk[0].weight, singles[1].actor.trunk[0].weight)


@pytest.mark.parametrize("variant", ["sac_ae", "sac_pixel", "sac_states"])
def test_at_torchs_adam_eps_the_losses_agree_update_by_update(variant):
    singles = make_seeds(variant)
    assert all(opt.param_groups[0]["eps"] == 1e-8 for opt in singles[0].optimizers().values())

    def check_metrics(got, expected, where):
        for name, value in expected.items():
            if value is not None:
                assert got[name] == pytest.approx(value, rel=1e-3, abs=1e-5), (where, name)

    stacked = run_both(singles, STEPS, check_metrics)
    # Parameters within the bound of Adam steps (about lr each) that rounding can make differ.
    for state, agent in zip(stacked.unstack(), singles, strict=True):
        for net, params in agent.state_dict()["networks"].items():
            for name, p in params.items():
                assert torch.allclose(state["networks"][net][name], p, rtol=0, atol=2 * LR * len(STEPS)), (net, name)


@pytest.mark.parametrize("variant", ["sac_ae", "sac_states"])
def test_act_equals_single_agents(variant):
    singles = make_seeds(variant)
    stacked = GroupAgent(copy.deepcopy(singles), generators())
    single_generators = generators()
    rng = np.random.default_rng(0)
    if variant == "sac_ae":
        obs = rng.integers(0, 256, (N, 9, IMAGE, IMAGE), dtype=np.uint8)
    else:
        obs = rng.standard_normal((N, STATE_DIM)).astype(np.float32)
    for sample in (False, True, True):
        actions = stacked.act(obs, sample=sample)
        assert actions.shape == (N, ACTION_DIM)
        for i, (agent, g) in enumerate(zip(singles, single_generators, strict=True)):
            torch.set_rng_state(g.get_state())
            expected = agent.act(obs[i], sample=sample)
            g.set_state(torch.get_rng_state())
            np.testing.assert_allclose(actions[i], expected, rtol=RTOL, atol=1e-6)


def test_unstacked_state_loads_into_an_agent_that_continues_like_the_single_agent():
    singles = make_seeds("sac_ae", adam_eps=TIGHT_EPS)
    stacked = run_both(singles, (1001, 1002), lambda got, expected, where: None)
    for i, state in enumerate(stacked.unstack()):
        loaded = make_agent("sac_ae", seed=99)
        loaded.load_state_dict(state)
        assert all(opt.param_groups[0]["eps"] == TIGHT_EPS for opt in loaded.optimizers().values())
        batch = make_batch(loaded, seed=7)
        single_update(loaded, batch, 1004, torch.Generator().manual_seed(3))
        single_update(singles[i], batch, 1004, torch.Generator().manual_seed(3))
        assert_state_matches(loaded.state_dict(), singles[i])


def test_adam_on_stacked_tensors_is_bit_identical_to_torch_fused_adam_per_seed():
    """The group's optimizers are torch's fused Adam over the stacked tensors: elementwise, so each seed's slice gets
    bit for bit what its own optimizer computes."""
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 3, 3, 3), (1001,), (64, 37)]  # sizes off and on vector widths
    stacked = [torch.randn(N, *s) for s in shapes]
    for lr, betas, wd in ((1e-3, (0.9, 0.999), 1e-7), (1e-4, (0.5, 0.999), 0.0)):
        params = [p.clone().requires_grad_(True) for p in stacked]
        adam = torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd, fused=True)
        opts = [
            torch.optim.Adam([p[i].clone().requires_grad_(True) for p in stacked], lr=lr, betas=betas,
                             weight_decay=wd, fused=True)
            for i in range(N)
        ]  # fmt: skip
        for _ in range(5):
            grads = [torch.randn(p.shape) for p in params]
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad.clone()
            adam.step()
            for i, opt in enumerate(opts):
                for p, grad in zip(opt.param_groups[0]["params"], grads, strict=True):
                    p.grad = torch.empty_like(p).copy_(grad[i])  # as AccumulateGrad lays .grad out
                opt.step()
        for i, opt in enumerate(opts):
            for p, q in zip(params, opt.param_groups[0]["params"], strict=True):
                assert torch.equal(p[i].detach(), q.detach()), (lr, betas, wd)


def test_the_group_runs_the_single_agents_loss_functions(monkeypatch):
    """One implementation of the math: every loss of a group update comes from the functions the single agent
    calls, so a change to a loss changes both."""
    called = []
    for name in ("critic_loss", "actor_losses", "autoencoder_losses", "conv_features"):
        original = getattr(agent_module, name)

        def recorded(*args, _original=original, _name=name, **kwargs):
            called.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(agent_module, name, recorded)
    singles = make_seeds("sac_ae")
    group = GroupAgent(copy.deepcopy(singles), generators())
    called.clear()
    group.update(stack_batches([make_batch(a, seed=i) for i, a in enumerate(singles)]), 1000)
    assert called == ["critic_loss", "conv_features", "actor_losses", "autoencoder_losses"]
    called.clear()
    singles[0].update(make_batch(singles[0], seed=0), 1000)
    assert called == ["critic_loss", "conv_features", "actor_losses", "autoencoder_losses"]


def test_a_group_that_drops_a_seed_goes_on_like_the_others_alone():
    singles = make_seeds("sac_ae", adam_eps=TIGHT_EPS)
    group = GroupAgent(copy.deepcopy(singles), generators())
    group.keep([0, 2])
    kept = [singles[0], singles[2]]
    gens = generators()
    single_generators = [gens[0], gens[2]]
    for k, step in enumerate((1001, 1002)):
        batches = [make_batch(a, seed=100 * i + k) for i, a in enumerate(kept)]
        group.update(stack_batches(batches), step)
        for agent, batch, g in zip(kept, batches, single_generators, strict=True):
            single_update(agent, batch, step, g)
    assert group.num_seeds == 2
    for state, agent in zip(group.unstack(), kept, strict=True):
        assert_state_matches(state, agent)


def test_group_agent_rejects_mismatched_inputs():
    singles = make_seeds("sac_states")
    with pytest.raises(ValueError, match="one generator per agent"):
        GroupAgent(singles, generators()[:2])
    other = make_agent("sac_states", seed=5, hidden_dim=16)
    with pytest.raises(ValueError, match="one configuration"):
        GroupAgent([singles[0], other], generators()[:2])


# ---------------------------------------------------------------------------------------------------------------
# The multi-seed run


def test_what_a_group_cannot_do_is_refused():
    from sacae.errors import SacaeError

    with pytest.raises(SacaeError, match="same command runs again; drop --resume"):
        check_multiseed_config(TrainConfig(resume="somewhere"), [1, 2])
    with pytest.raises(SacaeError, match="twice"):
        check_multiseed_config(TrainConfig(), [1, 1])
    # What the single run offers, a group offers: checkpoints, bf16, overlap.
    check_multiseed_config(TrainConfig(checkpoint_every=1000, precision="bf16", overlap="on"), [1, 2])


TINY = [
    "--task", "point_mass_easy", "--encoder_type", "identity", "--decoder_type", "identity", "--action_repeat", "8",
    "--num_train_steps", "250", "--init_steps", "125", "--eval_freq", "250", "--num_eval_episodes", "1",
    "--hidden_dim", "32", "--batch_size", "16", "--num_threads", "1", "--device", "cpu", "--save_model",
]  # fmt: skip
WALL_CLOCK = ("duration", "env_steps_per_second")


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_rows(rows, expected):
    """Equal logs but for the wall-clock fields. Floats to 1e-3: batched kernels round differently, and 250 updates
    and 1000-step episodes carry that on (six seeds of this run stay within 2e-7; docs/multiseed.md)."""
    assert len(rows) == len(expected) > 0
    for row, exp in zip(rows, expected, strict=True):
        assert row.keys() == exp.keys()
        for key, value in exp.items():
            if key in WALL_CLOCK:
                continue
            if isinstance(value, (float, list)):
                assert row[key] == pytest.approx(value, rel=1e-3, abs=1e-5), (row["env_steps"], key)
            else:
                assert row[key] == value, (row["env_steps"], key)


def test_two_seeds_in_one_process_log_what_each_seed_logs_alone(tmp_path, capsys):
    from sacae.cli import main

    runs = tmp_path / "runs"
    assert main(["train-seeds", "--seeds", "1", "2", "--runs_dir", str(runs), *TINY]) == 0
    assert "seed 2 | train | E: 2 | S: 2000" in capsys.readouterr().out
    for seed in (1, 2):
        run_dir = runs / "point_mass_easy" / "sac_states" / f"seed_{seed}"
        assert {p.name for p in run_dir.iterdir()} >= {"config.json", "train.log", "eval.log", "status.json", "model"}
        assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
        alone = tmp_path / f"alone_{seed}"
        assert main(["train", "--seed", str(seed), "--work_dir", str(alone), *TINY]) == 0
        config, expected = (
            json.loads((run_dir / "config.json").read_text()),
            json.loads((alone / "config.json").read_text()),
        )
        assert config.pop("work_dir") == str(run_dir)
        expected.pop("work_dir")
        assert config == expected
        train, train_alone = read_log(run_dir / "train.log"), read_log(alone / "train.log")
        assert [r["env_steps"] for r in train] == [1000, 2000]
        # The first episode is the seed phase: the same environment and the same uniform actions, to the bit.
        assert train[0]["episode_reward"] == train_alone[0]["episode_reward"] > 0
        assert_same_rows(train, train_alone)
        evals = read_log(run_dir / "eval.log")
        assert [r["env_steps"] for r in evals] == [0, 2000]
        assert_same_rows(evals, read_log(alone / "eval.log"))
        # Snapshots in a single run's format, with the single run's weights.
        snapshot = torch.load(run_dir / "model" / "2000.pt", weights_only=True)
        expected = torch.load(alone / "model" / "2000.pt", weights_only=True)
        assert snapshot.keys() == expected.keys()
        assert snapshot["env_steps"] == 2000 and snapshot["config"]["seed"] == seed
        agent = SacAeAgent((4,), 2, TrainConfig(**VARIANTS["sac_states"], hidden_dim=32), CPU)
        agent.load_state_dict({"networks": snapshot["networks"], "log_alpha": snapshot["log_alpha"]})
        for net, params in expected["networks"].items():
            for name, p in params.items():
                assert torch.allclose(snapshot["networks"][net][name], p, rtol=RTOL, atol=ATOL), (net, name)


def test_a_seed_folder_holding_a_run_is_refused_unless_started_over(tmp_path):
    from sacae.errors import SacaeError

    cfg = TrainConfig(task="point_mass_easy", encoder_type="identity", decoder_type="identity", hidden_dim=32,
                      num_train_steps=100)  # fmt: skip
    run_dir = tmp_path / "point_mass_easy" / "sac_states" / "seed_2"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "train.log").write_text("{}\n")
    with pytest.raises(SacaeError, match="--no_resume"):
        Trainer(cfg, seeds=[1, 2], runs_dir=tmp_path)
    (run_dir / "status.json").write_text('{"state": "finished"}')
    with pytest.raises(SacaeError, match="--force"):
        Trainer(dataclasses.replace(cfg, no_resume=True), seeds=[1, 2], runs_dir=tmp_path)
    assert not (tmp_path / "point_mass_easy" / "sac_states" / "seed_1").exists()  # refused before any write
    trainer = Trainer(dataclasses.replace(cfg, no_resume=True, force=True), seeds=[1, 2], runs_dir=tmp_path)
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 2
    assert not (run_dir / "status.json").exists() and (run_dir / "train.log").read_text() == ""
    trainer.close()
