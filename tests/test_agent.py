"""The SAC+AE agent's update against ALGORITHM.md: the critic target by hand, which loss moves which parameters, the
Polyak rule, and the fast update against a plain reference update written in the style of the authors' release.

Constants below are ALGORITHM.md's, written here independently of sacae.config.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sacae import networks
from sacae.agent import SacAeAgent, preprocess_target
from sacae.config import TrainConfig
from sacae.reference import reference_update
from sacae.replay import Batch

CPU = torch.device("cpu")


# Tiny networks: one thread is as fast, and immune to OpenMP spinning on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ALGORITHM.md
DISCOUNT = 0.99
CRITIC_TAU = 0.01
ENCODER_TAU = 0.05
INIT_ALPHA = 0.1
LATENT_LAMBDA = 1e-6
LOG_STD_MIN, LOG_STD_MAX = -10.0, 2.0
ADAM_EPS = 1e-8

IMAGE = 64
STATE_DIM = 6
ACTION_DIM = 2
BATCH = 8

VARIANTS = {
    "sac_ae": dict(encoder_type="pixel", decoder_type="pixel"),
    "sac_pixel": dict(encoder_type="pixel", decoder_type="identity"),
    "sac_states": dict(encoder_type="identity", decoder_type="identity"),
}


def make_agent(variant, seed=0, **overrides):
    kw = dict(hidden_dim=32, batch_size=BATCH, image_size=IMAGE, num_filters=8, **VARIANTS[variant])
    kw.update(overrides)
    cfg = TrainConfig(**kw)
    assert cfg.configuration == variant
    torch.manual_seed(seed)
    obs_shape = (9, cfg.image_size, cfg.image_size) if cfg.encoder_type == "pixel" else (STATE_DIM,)
    return SacAeAgent(obs_shape, ACTION_DIM, cfg, CPU)


def make_batch(agent, seed, not_done=None):
    g = torch.Generator().manual_seed(seed)
    b, size = agent.cfg.batch_size, agent.cfg.image_size
    if agent.cfg.encoder_type == "pixel":
        obs = torch.randint(0, 256, (b, 9, size, size), dtype=torch.uint8, generator=g)
        next_obs = torch.randint(0, 256, (b, 9, size, size), dtype=torch.uint8, generator=g)
    else:
        obs = torch.randn(b, STATE_DIM, generator=g)
        next_obs = torch.randn(b, STATE_DIM, generator=g)
    action = torch.rand(b, ACTION_DIM, generator=g) * 2 - 1
    reward = torch.randn(b, 1, generator=g)
    if not_done is None:
        not_done = (torch.rand(b, 1, generator=g) > 0.3).float()
        not_done[0] = 0.0
        not_done[1] = 1.0
    else:
        not_done = torch.full((b, 1), float(not_done))
    return Batch(obs, action, reward, next_obs, not_done)


def snapshot(agent):
    params = {
        f"{net_name}.{name}": p.detach().clone()
        for net_name, net in agent.networks().items()
        for name, p in net.named_parameters()
    }
    params["log_alpha"] = agent.log_alpha.detach().clone()
    return params


def changed_keys(before, agent):
    after = snapshot(agent)
    return {k for k in before if not torch.equal(before[k], after[k])}


def keys_with(before, *prefixes):
    return {k for k in before if k.startswith(prefixes)}


def np_mlp(seq, x):
    """Float64 numpy forward of Linear-ReLU-Linear-ReLU-Linear."""
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        x = x @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
        if i < len(linears) - 1:
            x = np.maximum(x, 0.0)
    return x


def perturb(module, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------------------------
# Construction


def test_run_defaults_follow_algorithm_md_and_the_release():
    cfg = TrainConfig()
    # ALGORITHM.md: networks, replay, schedule and evaluation.
    assert (cfg.image_size, cfg.frame_stack, cfg.num_layers, cfg.num_filters) == (84, 3, 4, 32)
    assert (cfg.encoder_feature_dim, cfg.hidden_dim, cfg.batch_size) == (50, 1024, 128)
    assert (cfg.replay_buffer_capacity, cfg.init_steps, cfg.seed_updates) == (1_000_000, 1000, "burst")
    assert (cfg.eval_freq, cfg.num_eval_episodes) == (10_000, 10)
    assert (cfg.configuration, cfg.precision) == ("sac_ae", "fp32")
    # The release's README: output goes to ./save unless --work_dir says otherwise.
    assert cfg.work_dir == "./save"


def test_temperature_target_entropy_and_optimizers_follow_algorithm_md():
    agent = make_agent("sac_ae")
    assert agent.alpha.item() == pytest.approx(INIT_ALPHA, rel=1e-6)
    assert agent.target_entropy == -ACTION_DIM
    assert agent.discount == DISCOUNT
    assert agent.cfg.critic_tau == CRITIC_TAU and agent.cfg.encoder_tau == ENCODER_TAU
    assert agent.cfg.decoder_latent_lambda == LATENT_LAMBDA
    assert agent.cfg.actor_update_freq == agent.cfg.critic_target_update_freq == 2

    def ids(params):
        return {id(p) for p in params}

    def opt_params(opt):
        return [p for group in opt.param_groups for p in group["params"]]

    expected = {
        # name: (optimizer, parameters it must hold, lr, beta1, weight decay)
        "critic": (agent.critic_optimizer, agent.critic.parameters(), 1e-3, 0.9, 0.0),
        "actor": (agent.actor_optimizer, agent.actor.parameters(), 1e-3, 0.9, 0.0),
        "encoder": (agent.encoder_optimizer, agent.critic.encoder.parameters(), 1e-3, 0.9, 0.0),
        "decoder": (agent.decoder_optimizer, agent.decoder.parameters(), 1e-3, 0.9, 1e-7),
        "log_alpha": (agent.log_alpha_optimizer, [agent.log_alpha], 1e-4, 0.5, 0.0),
    }
    for name, (opt, params, lr, beta1, wd) in expected.items():
        assert isinstance(opt, torch.optim.Adam), name
        assert ids(opt_params(opt)) == ids(params), name
        for group in opt.param_groups:
            assert group["lr"] == lr and group["betas"] == (beta1, 0.999) and group["weight_decay"] == wd, name
    # The critic optimizer includes the encoder; the actor optimizer includes the tied convs.
    conv_ids = ids(agent.critic.encoder.convs.parameters())
    assert conv_ids <= ids(opt_params(agent.critic_optimizer))
    assert conv_ids <= ids(opt_params(agent.actor_optimizer))
    assert ids(agent.critic.Q1.parameters()).isdisjoint(ids(opt_params(agent.encoder_optimizer)))


# ---------------------------------------------------------------------------------------------------------------
# The critic target by hand (state SAC: every network is a small MLP that numpy can evaluate)


def hand_critic_loss_and_target(agent, batch, seed):
    """ALGORITHM.md's critic loss in float64 numpy; a' uses the noise torch.randn draws right after `seed`."""
    obs, action, reward, next_obs, not_done = (x.double().numpy() for x in batch)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        noise = torch.randn(obs.shape[0], ACTION_DIM).double().numpy()
    out = np_mlp(agent.actor.trunk, next_obs)
    mu, raw = out[:, :ACTION_DIM], out[:, ACTION_DIM:]
    log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (np.tanh(raw) + 1)
    u = mu + noise * np.exp(log_std)
    next_action = np.tanh(u)
    log_pi = (-0.5 * noise**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(1, keepdims=True)
    log_pi -= np.log(np.maximum(1 - next_action**2, 0) + 1e-6).sum(1, keepdims=True)
    x_next = np.concatenate([next_obs, next_action], 1)
    q1_next = np_mlp(agent.critic_target.Q1.trunk, x_next)
    q2_next = np_mlp(agent.critic_target.Q2.trunk, x_next)
    alpha = math.exp(agent.log_alpha.item())
    target = reward + not_done * DISCOUNT * (np.minimum(q1_next, q2_next) - alpha * log_pi)
    x = np.concatenate([obs, action], 1)
    q1, q2 = np_mlp(agent.critic.Q1.trunk, x), np_mlp(agent.critic.Q2.trunk, x)
    loss = np.mean((q1 - target) ** 2) + np.mean((q2 - target) ** 2)
    return loss, target


@pytest.mark.parametrize("step", [1, 2])
def test_critic_loss_and_step_match_hand_computed_target(step):
    agent = make_agent("sac_states", seed=3)
    # The target critic must differ from the critic, or using the wrong one would go unnoticed.
    perturb(agent.critic_target, 0.2, seed=11)
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.3))  # a temperature the code cannot have hard-coded
    batch = make_batch(agent, seed=4)
    batch = batch._replace(obs=batch.obs * 0.5, next_obs=batch.next_obs * 0.5)
    loss, target = hand_critic_loss_and_target(agent, batch, seed=5)
    # The critic before the step, to replay its first Adam step by hand below.
    critic_before = copy.deepcopy(agent.critic)

    torch.manual_seed(5)
    agent.update(batch, step)
    metrics = agent.metrics.pop()
    assert metrics["critic_loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)

    # The critic's Q heads moved by one Adam step on that loss: the first Adam step is lr * g / (|g| + eps).
    q1, q2 = critic_before(batch.obs, batch.action)
    t = torch.tensor(target, dtype=torch.float32)
    (F.mse_loss(q1, t) + F.mse_loss(q2, t)).backward()
    for (name, p_old), p_new in zip(critic_before.named_parameters(), agent.critic.parameters(), strict=True):
        g = p_old.grad.double()
        expected = p_old.detach().double() - 1e-3 * g / (g.abs() + ADAM_EPS)
        assert torch.allclose(p_new.detach().double(), expected, atol=1e-5, rtol=0), name
        assert not torch.equal(p_new, p_old), name


def test_terminal_transitions_target_only_the_reward():
    agent = make_agent("sac_states", seed=1)
    # A target critic and temperature so large that any leak into the target would dominate the loss.
    perturb(agent.critic_target, 5.0, seed=2)
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(50.0))
    batch = make_batch(agent, seed=3, not_done=0.0)
    x = np.concatenate([batch.obs.double().numpy(), batch.action.double().numpy()], 1)
    r = batch.reward.double().numpy()
    q1, q2 = np_mlp(agent.critic.Q1.trunk, x), np_mlp(agent.critic.Q2.trunk, x)
    expected = np.mean((q1 - r) ** 2) + np.mean((q2 - r) ** 2)
    torch.manual_seed(0)
    agent.update(batch, step=1)
    assert agent.metrics.pop()["critic_loss"] == pytest.approx(expected, rel=1e-5)
    # With not_done = 1 the same batch gives a different loss: the bootstrap term is really there.
    agent2 = make_agent("sac_states", seed=1)
    perturb(agent2.critic_target, 5.0, seed=2)
    agent2.update(batch._replace(not_done=torch.ones_like(batch.not_done)), step=1)
    assert agent2.metrics.pop()["critic_loss"] != pytest.approx(expected, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Which loss moves which parameters (pixel SAC+AE)

CONVS = ("actor.encoder.convs.", "critic.encoder.convs.")
CRITIC_ENC_HEAD = ("critic.encoder.fc.", "critic.encoder.ln.")
ACTOR_ENC_HEAD = ("actor.encoder.fc.", "actor.encoder.ln.")
Q_HEADS = ("critic.Q1.", "critic.Q2.")


def test_critic_step_moves_the_critic_and_its_convs_only():
    agent = make_agent("sac_ae")
    batch = make_batch(agent, seed=0)
    before = snapshot(agent)
    agent._update_critic(*batch)
    assert changed_keys(before, agent) == keys_with(before, *CONVS, *CRITIC_ENC_HEAD, *Q_HEADS)


def test_actor_step_never_moves_the_convs_or_the_critic():
    agent = make_agent("sac_ae")
    batch = make_batch(agent, seed=0)
    before = snapshot(agent)
    conv = agent.critic.encoder.forward_conv(batch.obs).detach()
    agent._update_actor_and_alpha(conv)
    assert changed_keys(before, agent) == keys_with(before, "actor.trunk.", *ACTOR_ENC_HEAD, "log_alpha")
    assert all(p.grad is None for p in agent.critic.encoder.convs.parameters())


def test_autoencoder_step_moves_encoder_and_decoder_only():
    agent = make_agent("sac_ae")
    batch = make_batch(agent, seed=0)
    before = snapshot(agent)
    conv = agent.critic.encoder.forward_conv(batch.obs)
    agent._update_autoencoder(batch.obs, conv)
    assert changed_keys(before, agent) == keys_with(before, *CONVS, *CRITIC_ENC_HEAD, "decoder.")


@pytest.mark.parametrize("step", [3, 4])
def test_whole_update_moves_what_its_step_schedules(step):
    agent = make_agent("sac_ae")
    batch = make_batch(agent, seed=0)
    before = snapshot(agent)
    agent.update(batch, step)
    every_update = keys_with(before, *CONVS, *CRITIC_ENC_HEAD, *Q_HEADS, "decoder.")
    every_2nd = keys_with(before, "actor.trunk.", *ACTOR_ENC_HEAD, "log_alpha", "critic_target.")
    assert changed_keys(before, agent) == (every_update | every_2nd if step % 2 == 0 else every_update)


def test_actor_step_inside_a_whole_update_leaves_the_convs_alone():
    # sac_pixel: with no autoencoder, an even and an odd update differ only by the actor, temperature and target
    # steps; the critic (convs included) must come out bit-identical.
    odd = make_agent("sac_pixel")
    even = copy.deepcopy(odd)
    batch = make_batch(odd, seed=0)
    before = snapshot(odd)
    torch.manual_seed(1)
    odd.update(batch, 1001)
    torch.manual_seed(1)
    even.update(batch, 1002)
    for (name, p_odd), p_even in zip(odd.critic.named_parameters(), even.critic.parameters(), strict=True):
        assert torch.equal(p_odd, p_even), name
    assert not torch.equal(odd.actor.trunk[0].weight, even.actor.trunk[0].weight)
    assert torch.equal(odd.actor.trunk[0].weight, before["actor.trunk.0.weight"])


def test_actor_step_inside_a_sac_ae_update_leaves_encoder_and_decoder_alone():
    # An even sac_ae update vs. the critic and AE steps alone, with the actor's noise draw burnt so that the AE
    # target sees the same dequantisation noise: encoder and decoder must come out identical.
    agent = make_agent("sac_ae")
    other = copy.deepcopy(agent)
    batch = make_batch(agent, seed=0)
    torch.manual_seed(1)
    agent.update(batch, 1000)
    torch.manual_seed(1)
    other._update_critic(*batch)
    torch.randn(BATCH, ACTION_DIM)  # the actor's sample
    other._update_autoencoder(batch.obs, other.critic.encoder.forward_conv(batch.obs))
    for (name, p), q in zip(agent.critic.named_parameters(), other.critic.parameters(), strict=True):
        assert torch.equal(p, q), name
    for (name, p), q in zip(agent.decoder.named_parameters(), other.decoder.parameters(), strict=True):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------------------------
# Targets


def test_polyak_update_rule_and_rates():
    agent = make_agent("sac_ae")
    perturb(agent.critic, 0.5, seed=1)  # so that critic and target differ
    critic = {k: v.double() for k, v in snapshot(agent).items() if k.startswith("critic.")}
    target = {k: v.double() for k, v in snapshot(agent).items() if k.startswith("critic_target.")}
    agent._update_targets()
    after = snapshot(agent)
    assert len(target) > 0
    for key, t_old in target.items():
        c = critic["critic." + key[len("critic_target.") :]]
        tau = ENCODER_TAU if ".encoder." in key else CRITIC_TAU
        expected = tau * c + (1 - tau) * t_old
        assert torch.allclose(after[key].double(), expected, atol=1e-6), key
        assert not torch.allclose(after[key].double(), t_old, atol=1e-6), key
    for key, c in critic.items():
        assert torch.equal(after[key].double(), c), key


@pytest.mark.parametrize(("freq", "steps"), [(2, [1001, 1002, 1003, 1004]), (3, [4, 5, 6, 7, 9])])
def test_targets_move_only_on_multiples_of_the_update_freq(freq, steps):
    agent = make_agent("sac_pixel", critic_target_update_freq=freq)
    for i, step in enumerate(steps):
        batch = make_batch(agent, seed=i)
        target_before = {k: v.double() for k, v in snapshot(agent).items() if k.startswith("critic_target.")}
        agent.update(batch, step)
        now = snapshot(agent)
        for key, t_old in target_before.items():
            if step % freq:
                assert torch.equal(now[key].double(), t_old), (step, key)
            else:
                # sac_pixel: nothing after the Polyak step changes the critic, so its final value is the source.
                c = now["critic." + key[len("critic_target.") :]].double()
                tau = ENCODER_TAU if ".encoder." in key else CRITIC_TAU
                assert torch.allclose(now[key].double(), tau * c + (1 - tau) * t_old, atol=1e-6), (step, key)


def test_target_encoder_follows_the_critic_before_the_autoencoder_step():
    agent = make_agent("sac_ae")
    mid = copy.deepcopy(agent)
    batch = make_batch(agent, seed=0)
    target_before = copy.deepcopy(agent.critic_target.encoder)
    torch.manual_seed(2)
    mid._update_critic(*batch)
    torch.manual_seed(2)
    agent.update(batch, 2)
    for (name, t_new), t_old, c_mid, c_end in zip(
        agent.critic_target.encoder.named_parameters(),
        target_before.parameters(),
        mid.critic.encoder.parameters(),
        agent.critic.encoder.parameters(),
        strict=True,
    ):
        expected = ENCODER_TAU * c_mid.double() + (1 - ENCODER_TAU) * t_old.double()
        assert torch.allclose(t_new.double(), expected, atol=1e-7), name
        assert not torch.equal(c_mid, c_end), name  # the AE step did move the critic encoder afterwards


# ---------------------------------------------------------------------------------------------------------------
# Exactness against a plain reference update in the style of the authors' release


def all_parameters(agent):
    out = {}
    for net_name in ("actor", "critic", "critic_target", "decoder"):
        net = getattr(agent, net_name)
        if net is not None:
            out.update({f"{net_name}.{k}": p for k, p in net.named_parameters()})
    out["log_alpha"] = agent.log_alpha
    return out


def assert_same_state(fast, ref):
    pf, pr = all_parameters(fast), all_parameters(ref)
    assert pf.keys() == pr.keys()
    for key in pf:
        assert torch.allclose(pf[key], pr[key], atol=1e-5, rtol=1e-4), (
            f"{key}: max diff {(pf[key] - pr[key]).abs().max().item():.3g}"
        )
    for name, opt_f in fast.optimizers().items():
        opt_r = ref.optimizers()[name]
        params_f = [p for g in opt_f.param_groups for p in g["params"]]
        params_r = [p for g in opt_r.param_groups for p in g["params"]]
        for p_f, p_r in zip(params_f, params_r, strict=True):
            s_f, s_r = opt_f.state.get(p_f, {}), opt_r.state.get(p_r, {})
            assert s_f.keys() == s_r.keys(), name
            for k in s_f:
                assert torch.allclose(s_f[k], s_r[k], atol=1e-6, rtol=1e-4), (name, k)


def assert_independent_copy(agent, clone):
    """The deep copy shares nothing with the original, keeps the conv tie, and its optimizers hold its own params."""
    orig_ids = {id(p) for p in all_parameters(agent).values()}
    clone_params = all_parameters(clone)
    assert orig_ids.isdisjoint(id(p) for p in clone_params.values())
    assert {p.data_ptr() for p in all_parameters(agent).values()}.isdisjoint(
        p.data_ptr() for p in clone_params.values()
    )
    if clone.cfg.encoder_type == "pixel":
        for a, c in zip(clone.actor.encoder.convs.parameters(), clone.critic.encoder.convs.parameters(), strict=True):
            assert a is c
    owners = {
        "actor": clone.actor.parameters(),
        "critic": clone.critic.parameters(),
        "log_alpha": [clone.log_alpha],
        "encoder": clone.critic.encoder.parameters(),
        "decoder": clone.decoder.parameters() if clone.decoder is not None else [],
    }
    for name, opt in clone.optimizers().items():
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in owners[name]}, name


def update_like_reference(agent, ref, batch, step, seed):
    """One update of `agent` and one of the authors'-style reference on `batch`, both drawing their noise after
    torch.manual_seed(seed) (on a GPU too): the same state after it, and the same losses."""
    torch.manual_seed(seed)
    agent.update(batch, step)
    torch.manual_seed(seed)
    ref_losses = reference_update(ref, batch, step)
    assert_same_state(agent, ref)
    metrics = agent.metrics.pop()
    assert metrics["critic_loss"] == pytest.approx(ref_losses["critic_loss"], rel=1e-4, abs=1e-6)
    for name in ("actor_loss", "alpha_loss", "ae_loss"):
        if name in ref_losses:
            assert metrics[name] == pytest.approx(ref_losses[name], rel=1e-4, abs=1e-4), name
        else:
            assert metrics[name] is None, name


def check_fast_update_equals_reference_update(agent, steps):
    # A target critic and a temperature away from their initial values, so that one update already tells the
    # target critic from the critic and log_alpha from the initial temperature.
    perturb(agent.critic_target, 0.05, seed=3)
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.25))
    ref = copy.deepcopy(agent)
    assert_independent_copy(agent, ref)
    start = snapshot(agent)
    for i, step in enumerate(steps):
        update_like_reference(agent, ref, make_batch(agent, seed=100 + i), step, seed=1000 + i)
    # Not vacuous: the update moved the networks.
    moved = changed_keys(start, agent)
    assert keys_with(start, "critic.Q1.") <= moved
    if any(step % 2 == 0 for step in steps):
        assert keys_with(start, "actor.trunk.", "critic_target.Q1.", "log_alpha") <= moved
    if agent.decoder is not None:
        assert keys_with(start, "decoder.") <= moved


@pytest.mark.parametrize("variant", ["sac_ae", "sac_pixel", "sac_states"])
@pytest.mark.parametrize("steps", [(1000,), (1001,), (1000, 1000, 1001, 1002)], ids=["even", "odd", "sequence"])
def test_fast_update_equals_reference_update(variant, steps):
    check_fast_update_equals_reference_update(make_agent(variant, seed=7), steps)


def test_fast_update_equals_reference_update_at_the_default_image_and_filter_size():
    agent = make_agent("sac_ae", seed=8, image_size=84, num_filters=32, batch_size=4)
    assert agent.critic.encoder.conv_side == 35
    check_fast_update_equals_reference_update(agent, (1000, 1001))


def test_deep_copy_updates_do_not_touch_the_original():
    agent = make_agent("sac_ae")
    before = snapshot(agent)
    clone = copy.deepcopy(agent)
    clone.update(make_batch(agent, seed=0), 2)
    assert changed_keys(before, agent) == set()
    assert len(changed_keys(before, clone)) > 0
    # ... and the clone's actor still sees its critic's (updated) convs.
    for a, c in zip(clone.actor.encoder.convs.parameters(), clone.critic.encoder.convs.parameters(), strict=True):
        assert a is c


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_report_what_ran_and_reset_on_pop():
    agent = make_agent("sac_ae")
    b1, b2 = make_batch(agent, seed=1), make_batch(agent, seed=2)
    agent.update(b1, 2)
    m = agent.metrics.pop()
    assert m["batch_reward"] == pytest.approx(float(np.mean(b1.reward.numpy().astype(np.float64))), rel=1e-6)
    for name in ("critic_loss", "actor_loss", "alpha_loss", "ae_loss", "entropy"):
        assert m[name] is not None and math.isfinite(m[name]), name
    assert m["ae_loss"] > 0
    assert m["alpha"] == pytest.approx(INIT_ALPHA, rel=1e-3)
    assert all(v is None for v in agent.metrics.pop().values())

    agent.update(b1, 3)
    agent.update(b2, 5)
    m = agent.metrics.pop()
    assert m["actor_loss"] is None and m["alpha_loss"] is None and m["alpha"] is None
    assert math.isfinite(m["critic_loss"]) and m["ae_loss"] > 0
    # Averages over the updates since the last pop.
    expected_reward = (b1.reward.double().mean() + b2.reward.double().mean()).item() / 2
    assert m["batch_reward"] == pytest.approx(expected_reward, rel=1e-6)


def test_metrics_have_no_ae_loss_without_a_decoder():
    agent = make_agent("sac_pixel")
    agent.update(make_batch(agent, seed=1), 2)
    m = agent.metrics.pop()
    assert m["ae_loss"] is None
    assert math.isfinite(m["critic_loss"]) and math.isfinite(m["actor_loss"])


# ---------------------------------------------------------------------------------------------------------------
# Acting


def test_deterministic_action_is_tanh_of_the_mean():
    agent = make_agent("sac_states", seed=2)
    obs = np.random.default_rng(0).standard_normal(STATE_DIM).astype(np.float32)
    a1 = agent.act(obs, sample=False)
    a2 = agent.act(obs, sample=False)
    assert a1.shape == (ACTION_DIM,)
    np.testing.assert_array_equal(a1, a2)
    expected = np.tanh(np_mlp(agent.actor.trunk, obs[None].astype(np.float64))[0, :ACTION_DIM])
    np.testing.assert_allclose(a1, expected, atol=1e-6)


@pytest.mark.parametrize("variant", ["sac_ae", "sac_states"])
def test_act_bounds_and_sampling(variant):
    agent = make_agent(variant, seed=2)
    if agent.cfg.encoder_type == "pixel":
        obs = np.random.default_rng(0).integers(0, 256, (9, IMAGE, IMAGE), dtype=np.uint8)
    else:
        obs = np.random.default_rng(0).standard_normal(STATE_DIM).astype(np.float32)
    # Push the policy to the edge: a large mean and log-std make tanh saturate.
    with torch.no_grad():
        agent.actor.trunk[-1].bias.add_(torch.tensor([5.0, -5.0, 3.0, 3.0]))
    det = agent.act(obs, sample=False)
    np.testing.assert_array_equal(det, agent.act(obs, sample=False))
    samples = np.stack([agent.act(obs, sample=True) for _ in range(20)])
    assert samples.shape == (20, ACTION_DIM)
    for a in (det[None], samples):
        assert np.all(a >= -1.0) and np.all(a <= 1.0)
    assert len({tuple(s) for s in samples}) > 1  # sampling varies
    torch.manual_seed(3)
    s1 = agent.act(obs, sample=True)
    torch.manual_seed(3)
    np.testing.assert_array_equal(s1, agent.act(obs, sample=True))


def small_pixel_agent_and_batch() -> tuple[SacAeAgent, Batch]:
    """A small SAC+AE agent on 64x64 frames (seeded) and one batch of 8 random transitions for it."""
    torch.manual_seed(0)
    cfg = TrainConfig(action_repeat=8, hidden_dim=32, num_filters=8, batch_size=8, encoder_feature_dim=8)
    agent = SacAeAgent((9, 64, 64), 2, cfg, torch.device("cpu"))
    b = 8
    obs, next_obs = (torch.randint(0, 256, (b, 9, 64, 64), dtype=torch.uint8) for _ in range(2))
    return agent, Batch(obs, torch.rand(b, 2) * 2 - 1, torch.rand(b, 1), next_obs, torch.ones(b, 1))


def test_fused_adam_gives_the_single_tensor_loops_parameters():
    """Each of four updates, from the same state (Adam's moments and step count included), with the fused optimizers
    and with the single-tensor loop. Compared update by update: over several updates at Adam's eps 1e-8 a rounding
    difference in a near-zero gradient can turn into a step of lr in either implementation."""
    agent, batch = small_pixel_agent_and_batch()
    start = copy.deepcopy(agent)
    assert all(g["fused"] for opt in agent.optimizers().values() for g in opt.param_groups)
    for step in (0, 1, 2, 3):
        loop = copy.deepcopy(agent)
        for opt in loop.optimizers().values():
            for group in opt.param_groups:
                group["fused"] = None
                group["foreach"] = False
        torch.manual_seed(step)
        agent.update(batch, step)
        torch.manual_seed(step)
        loop.update(batch, step)
        for name in ("actor", "critic", "critic_target", "decoder"):
            pairs = zip(getattr(agent, name).named_parameters(), getattr(loop, name).named_parameters(), strict=True)
            for (key, p), (_, q) in pairs:
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"update {step}: {name}.{key}")
        torch.testing.assert_close(agent.log_alpha, loop.log_alpha, rtol=1e-6, atol=1e-7)
    # Four Adam steps of lr 1e-3 move a trained weight by about 4e-3, far beyond the tolerance above.
    assert not torch.allclose(agent.critic.Q1.trunk[0].weight, start.critic.Q1.trunk[0].weight, atol=1e-4)


def test_moments_saved_in_another_layout_load_in_the_parameters_layout():
    """Fused Adam reads parameter, gradient and moments as flat memory: a state whose moments were saved contiguous
    must still update a channels-last conv weight element by element."""
    agent, batch = small_pixel_agent_and_batch()
    agent.update(batch, 1)
    state = copy.deepcopy(agent.state_dict())
    conv = agent.critic.encoder.convs[1].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for opt_state in state["optimizers"]["critic"]["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            opt_state[key] = opt_state[key].contiguous()
    other = copy.deepcopy(agent)
    other.load_state_dict(state)
    torch.manual_seed(5)
    agent.update(batch, 3)
    torch.manual_seed(5)
    other.update(batch, 3)
    assert torch.equal(agent.critic.encoder.convs[1].weight, other.critic.encoder.convs[1].weight)


def test_the_actor_step_computes_no_gradient_for_the_q_heads_weights(monkeypatch):
    """The actor loss reaches the Q heads only as a function of the action: their weights are constants there, so
    the backward pass makes no weight-gradient product for them (each would cost as much as a forward product)."""
    torch.manual_seed(0)
    cfg = TrainConfig(encoder_type="identity", decoder_type="identity", hidden_dim=32, batch_size=8)
    agent = SacAeAgent((STATE_DIM,), ACTION_DIM, cfg, torch.device("cpu"))
    obs = torch.randn(8, STATE_DIM)
    batch = Batch(obs, torch.rand(8, ACTION_DIM) * 2 - 1, torch.rand(8, 1), torch.randn(8, STATE_DIM), torch.ones(8, 1))
    agent.update(batch, 1)  # critic step only: leaves the Q heads' gradients
    q_grads = [p.grad.clone() for p in agent._q_params]
    actor_before = [p.detach().clone() for p in agent._actor_own_params]
    products = []
    matmul = networks._onednn_matmul
    monkeypatch.setattr(networks, "_onednn_matmul", lambda *a: products.append(out := matmul(*a)) or out)
    agent._update_actor_and_alpha(agent.critic.encoder.forward_conv(obs).detach())
    if networks.onednn_linear_enabled():
        shapes = {tuple(p.shape) for p in products}
        # The Q heads' first and last weights have shapes no actor weight has.
        assert (32, STATE_DIM + ACTION_DIM) not in shapes and (1, 32) not in shapes
        assert (2 * ACTION_DIM, 32) in shapes  # the actor's last weight gradient was made
    assert all(p.requires_grad for p in agent._q_params)
    for p, g in zip(agent._q_params, q_grads, strict=True):
        assert torch.equal(p.grad, g)
    assert any(not torch.equal(p, q) for p, q in zip(agent._actor_own_params, actor_before, strict=True))


def test_autoencoder_target_is_the_5_bit_image_with_one_bins_noise_bit_for_bit():
    """ALGORITHM.md's target, floor(x / 8) / 32 + u / 32 - 0.5 with u uniform in [0, 1), written out in float32."""
    g = torch.Generator().manual_seed(0)
    frames = torch.arange(256, dtype=torch.uint8).repeat(40).view(10, 1, 32, 32)
    noise = torch.rand(frames.shape, generator=g)
    noise[0, 0, 0, :4] = torch.tensor([0.0, 0.5, 1 - 2**-24, 2**-24])
    expected = torch.floor(frames.float() / 8) / 32 + noise / 32 - 0.5
    assert torch.equal(preprocess_target(frames, noise=noise), expected)
    assert torch.equal(preprocess_target(frames.float(), noise=noise), expected)
    # Drawn from the global RNG like torch.rand_like on the float image.
    torch.manual_seed(3)
    drawn = preprocess_target(frames)
    torch.manual_seed(3)
    assert torch.equal(drawn, preprocess_target(frames, noise=torch.rand(frames.shape)))
    assert drawn.min() >= -0.5 and drawn.max() < 0.5
