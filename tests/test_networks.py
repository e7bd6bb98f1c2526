"""Networks of SAC+AE: shapes for any image size, the initialisation, the tanh-Gaussian policy and the tied convs.

Expected values come from ALGORITHM.md (sizes, gains, bounds) or are computed by hand here with math/numpy.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from sacae import networks
from sacae.agent import SacAeAgent
from sacae.config import TrainConfig
from sacae.networks import Actor, Critic, IdentityEncoder, PixelDecoder, PixelEncoder, weight_init

CPU = torch.device("cpu")
RELU_GAIN = math.sqrt(2.0)


# Tiny networks: one thread is as fast, and immune to OpenMP spinning on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_images(batch, size, channels=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=g)


def conv_sides(encoder, obs):
    """Spatial side after each conv layer, measured by running the layers."""
    sides = []
    h = obs.float() / 255.0
    for conv in encoder.convs:
        h = torch.relu(conv(h))
        assert h.shape[-1] == h.shape[-2]
        sides.append(h.shape[-1])
    return sides


# ---------------------------------------------------------------------------------------------------------------
# Shapes


def test_default_encoder_is_the_papers_84_to_35_stack():
    enc = PixelEncoder((9, 84, 84), 50)
    enc.apply(weight_init)
    obs = random_images(3, 84)
    # ALGORITHM.md: 4 conv layers, 32 filters, 3x3, first stride 2, no padding: 84 -> 41 -> 39 -> 37 -> 35.
    assert len(enc.convs) == 4
    for i, conv in enumerate(enc.convs):
        assert conv.kernel_size == (3, 3)
        assert conv.stride == ((2, 2) if i == 0 else (1, 1))
        assert conv.padding == (0, 0)
        assert conv.out_channels == 32
    assert enc.convs[0].in_channels == 9
    assert conv_sides(enc, obs) == [41, 39, 37, 35]
    assert enc.conv_side == 35
    assert enc.forward_conv(obs).shape == (3, 32 * 35 * 35)
    assert enc.fc.in_features == 32 * 35 * 35 and enc.fc.out_features == 50
    features = enc(obs)
    assert features.shape == (3, 50)
    assert torch.all(features.abs() <= 1.0)
    # LayerNorm then tanh: per row the pre-tanh values have mean 0, std 1 (LayerNorm at its initial affine).
    pre = torch.atanh(features.clamp(-1 + 1e-6, 1 - 1e-6))
    assert torch.allclose(pre.mean(1), torch.zeros(3), atol=1e-3)


def test_encoder_output_is_tanh_of_layernorm_of_fc_of_flattened_convs():
    torch.manual_seed(0)
    enc = PixelEncoder((9, 36, 36), 7, num_layers=2, num_filters=4)
    enc.apply(weight_init)
    obs = random_images(2, 36, seed=1)
    # Independent forward in float64 with torch.nn.functional only.
    x = obs.double() / 255.0
    for conv in enc.convs:
        x = torch.relu(nn.functional.conv2d(x, conv.weight.double(), conv.bias.double(), stride=conv.stride))
    x = x.flatten(1) @ enc.fc.weight.double().T + enc.fc.bias.double()
    x = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
    x = torch.tanh(x * enc.ln.weight.double() + enc.ln.bias.double())
    assert torch.allclose(enc(obs).double(), x, atol=1e-5)


@pytest.mark.parametrize(
    ("size", "num_layers"), [(64, 4), (65, 4), (100, 4), (85, 4), (84, 1), (65, 2), (100, 5), (64, 3)]
)
def test_conv_side_follows_the_formula_and_decoder_gives_back_the_input_size(size, num_layers):
    expected_side = (size - 3) // 2 + 1 - 2 * (num_layers - 1)
    enc = PixelEncoder((9, size, size), 6, num_layers=num_layers, num_filters=4)
    dec = PixelDecoder((9, size, size), 6, num_layers=num_layers, num_filters=4)
    enc.apply(weight_init)
    dec.apply(weight_init)
    obs = random_images(2, size)
    sides = conv_sides(enc, obs)
    assert len(sides) == num_layers
    assert sides[-1] == expected_side == enc.conv_side
    assert enc.forward_conv(obs).shape == (2, 4 * expected_side**2)
    h = enc(obs)
    assert h.shape == (2, 6)
    rec = dec(h)
    assert rec.shape == (2, 9, size, size)
    # The decoder mirrors the encoder: the sides after each transposed conv are the encoder's in reverse.
    x = torch.relu(dec.fc(h)).view(2, 4, expected_side, expected_side)
    dec_sides = []
    for deconv in dec.deconvs[:-1]:
        x = torch.relu(deconv(x))
        dec_sides.append(x.shape[-1])
    assert dec_sides == sides[::-1][1:]
    assert dec.deconvs[-1].stride == (2, 2)
    assert all(d.stride == (1, 1) for d in dec.deconvs[:-1])


def test_default_decoder_is_the_papers_35_to_84_stack():
    dec = PixelDecoder((9, 84, 84), 50)
    assert dec.fc.in_features == 50 and dec.fc.out_features == 32 * 35 * 35
    assert len(dec.deconvs) == 4
    assert dec.deconvs[-1].out_channels == 9
    assert dec.deconvs[-1].output_padding == (1, 1)
    h = torch.tanh(torch.randn(2, 50))
    out = dec(h)
    assert out.shape == (2, 9, 84, 84)


def test_decoder_has_no_output_activation():
    torch.manual_seed(0)
    dec = PixelDecoder((3, 20, 20), 5, num_layers=1, num_filters=4)
    nn.init.normal_(dec.deconvs[-1].weight)
    dec.deconvs[-1].bias.data.fill_(-3.0)  # a ReLU/sigmoid/tanh output could not reach values below -1
    out = dec(torch.randn(4, 5))
    assert out.min() < -1.0


def test_detach_stops_gradient_at_the_conv_output_only():
    enc = PixelEncoder((9, 30, 30), 5, num_layers=2, num_filters=4)
    enc.apply(weight_init)
    obs = random_images(2, 30)
    enc(obs, detach=True).pow(2).sum().backward()
    assert all(c.weight.grad is None for c in enc.convs)
    assert enc.fc.weight.grad is not None and enc.fc.weight.grad.abs().sum() > 0
    assert enc.ln.weight.grad is not None
    enc.zero_grad(set_to_none=True)
    enc(obs).pow(2).sum().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in enc.convs)


# ---------------------------------------------------------------------------------------------------------------
# Initialisation


def assert_orthogonal(m, gain=1.0, atol=1e-5):
    m = m.detach().double()
    rows, cols = m.shape
    gram = m @ m.T if rows <= cols else m.T @ m
    assert torch.allclose(gram, gain**2 * torch.eye(min(rows, cols), dtype=torch.float64), atol=atol), (
        f"not orthogonal with gain {gain}: max deviation {(gram - gain**2 * torch.eye(min(rows, cols))).abs().max()}"
    )


@pytest.mark.parametrize("shape", [(5, 12), (12, 5), (7, 7)])
def test_linear_init_is_orthogonal_with_zero_bias(shape):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0])
    weight_init(lin)
    assert_orthogonal(lin.weight)
    assert torch.all(lin.bias == 0)


@pytest.mark.parametrize("cls", [nn.Conv2d, nn.ConvTranspose2d])
@pytest.mark.parametrize("channels", [(9, 4), (4, 9), (6, 6)])
def test_conv_init_is_delta_orthogonal_with_relu_gain(cls, channels):
    torch.manual_seed(0)
    conv = cls(channels[0], channels[1], 3, stride=2)
    weight_init(conv)
    w = conv.weight.detach()
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1, 1] = True
    assert torch.all(w[:, :, ~mask] == 0), "only the kernel centre may be non-zero"
    assert_orthogonal(w[:, :, 1, 1], gain=RELU_GAIN)
    assert torch.all(conv.bias == 0)


def small_pixel_cfg(**kw):
    base = dict(hidden_dim=32, batch_size=8, image_size=64, num_filters=8)
    base.update(kw)
    return TrainConfig(**base)


def test_every_layer_of_an_agent_is_initialised_as_algorithm_md_says():
    torch.manual_seed(0)
    agent = SacAeAgent((9, 64, 64), 3, small_pixel_cfg(), CPU)
    counts = {"linear": 0, "conv": 0}
    for name, net in agent.networks().items():
        for mod_name, mod in net.named_modules():
            if isinstance(mod, nn.Linear):
                counts["linear"] += 1
                assert_orthogonal(mod.weight)
                assert torch.all(mod.bias == 0), f"{name}.{mod_name}"
            elif isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                counts["conv"] += 1
                w = mod.weight.detach().clone()
                centre = w[:, :, 1, 1].clone()
                w[:, :, 1, 1] = 0
                assert torch.all(w == 0), f"{name}.{mod_name}"
                assert_orthogonal(centre, gain=RELU_GAIN)
                assert torch.all(mod.bias == 0), f"{name}.{mod_name}"
    # actor: fc + 3 trunk; critic and target: fc + 2 x 3; decoder: fc.  Convs: 4 (tied, actor) + 4 + 4 + 4 deconvs.
    assert counts == {"linear": 4 + 7 + 7 + 1, "conv": 4 + 4 + 4 + 4}


# ---------------------------------------------------------------------------------------------------------------
# The tanh-Gaussian policy


def hand_log_pi(mu, log_std, noise):
    """log pi of tanh(mu + noise * std) by hand, per row: log N(u; mu, std) - sum log(1 - tanh(u)^2 + 1e-6)."""
    out = []
    for m_row, ls_row, n_row in zip(mu, log_std, noise, strict=True):
        total = 0.0
        for m, ls, n in zip(m_row, ls_row, n_row, strict=True):
            std = math.exp(ls)
            u = m + n * std
            log_normal = -0.5 * ((u - m) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
            total += log_normal - math.log(max(0.0, 1.0 - math.tanh(u) ** 2) + 1e-6)
        out.append(total)
    return np.array(out)[:, None]


def test_gaussian_logprob_and_squash_match_hand_computation():
    mu = [[0.3, -1.2, 0.0], [2.0, 0.5, -0.7]]
    log_std = [[-0.5, 0.2, -2.0], [0.0, 1.0, -4.0]]
    noise = [[1.1, -0.4, 0.25], [-2.0, 1.0, 0.0]]  # |u| < 4: float32 keeps 1 - tanh^2 accurate
    mu_t, ls_t, n_t = (torch.tensor(x, dtype=torch.float32) for x in (mu, log_std, noise))
    pi_t = mu_t + n_t * ls_t.exp()
    log_pi = networks.gaussian_logprob(n_t, ls_t)
    # The Gaussian part alone against an independent implementation.
    normal = torch.distributions.Normal(mu_t.double(), ls_t.double().exp()).log_prob(pi_t.double()).sum(-1, True)
    assert torch.allclose(log_pi.double(), normal, atol=1e-5)
    mu_sq, pi_sq, log_pi_sq = networks.squash(mu_t, pi_t, log_pi)
    np.testing.assert_allclose(log_pi_sq.numpy(), hand_log_pi(mu, log_std, noise), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(mu_sq.numpy(), np.tanh(np.array(mu)), atol=1e-6)
    np.testing.assert_allclose(pi_sq.numpy(), np.tanh(pi_t.double().numpy()), atol=1e-6)
    assert log_pi_sq.shape == (2, 1)


def test_squash_correction_is_floored_at_log_1e_minus_6_for_saturated_samples():
    mu = torch.tensor([[20.0]])
    pi = torch.tensor([[20.0]])  # tanh(20) == 1 in float32: 1 - tanh^2 = 0, the correction is -log(1e-6)
    _, _, log_pi = networks.squash(mu, pi, torch.zeros(1, 1))
    assert torch.isfinite(log_pi).all()
    assert log_pi.item() == pytest.approx(-math.log(1e-6), rel=1e-5)
    _, _, none = networks.squash(mu, pi, None)
    assert none is None


def set_trunk_output(actor, bias):
    """Zero every trunk weight and set the last bias: the trunk then outputs `bias` for any features."""
    with torch.no_grad():
        for layer in actor.trunk:
            if isinstance(layer, nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        actor.trunk[-1].bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_zero_trunk_gives_mean_zero_and_log_std_minus_four():
    actor = Actor(IdentityEncoder((5,)), 3, 8, -10.0, 2.0)
    set_trunk_output(actor, [0.0] * 6)
    mu, pi, log_pi, log_std = actor.policy(torch.randn(4, 5), compute_pi=False)
    assert pi is None and log_pi is None
    assert torch.all(mu == 0)
    # -10 + 0.5 * (2 - -10) * (tanh(0) + 1) = -4
    assert torch.allclose(log_std, torch.full((4, 3), -4.0))


def test_log_std_is_tanh_rescaled_into_its_bounds():
    raw = [-100.0, 0.5, 100.0, -0.3]
    for lo, hi in [(-10.0, 2.0), (-5.0, 1.0)]:
        actor = Actor(IdentityEncoder((5,)), 4, 8, lo, hi)
        set_trunk_output(actor, [0.0] * 4 + raw)
        _, _, _, log_std = actor.policy(torch.randn(2, 5), compute_pi=False)
        expected = [lo + 0.5 * (hi - lo) * (math.tanh(r) + 1) for r in raw]
        assert expected[0] == pytest.approx(lo) and expected[2] == pytest.approx(hi)
        np.testing.assert_allclose(log_std.detach().numpy(), np.tile(expected, (2, 1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bounds", [(-10.0, 2.0), (-5.0, 1.0)])
def test_policy_sample_and_log_pi_match_hand_computation(bounds):
    lo, hi = bounds
    raw = [-100.0, 0.5, -1.0]
    mu = [0.4, -0.3, 1.5]
    actor = Actor(IdentityEncoder((5,)), 3, 8, lo, hi)
    set_trunk_output(actor, mu + raw)
    features = torch.randn(4, 5)
    torch.manual_seed(7)
    out_mu, pi, log_pi, log_std = actor.policy(features)
    # The sample uses the global RNG: the same seed gives the same standard normal noise.
    torch.manual_seed(7)
    noise = torch.randn(4, 3).double().numpy()
    mu_rows = np.tile(mu, (4, 1))
    ls_rows = np.tile([lo + 0.5 * (hi - lo) * (math.tanh(r) + 1) for r in raw], (4, 1))
    u = mu_rows + noise * np.exp(ls_rows)
    np.testing.assert_allclose(out_mu.detach().numpy(), np.tanh(mu_rows), atol=1e-6)
    np.testing.assert_allclose(log_std.detach().numpy(), ls_rows, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pi.detach().numpy(), np.tanh(u), atol=1e-5)
    np.testing.assert_allclose(log_pi.detach().numpy(), hand_log_pi(mu_rows, ls_rows, noise), rtol=1e-5, atol=1e-4)


def test_actor_and_critic_mlps_have_the_documented_sizes():
    actor = Actor(IdentityEncoder((50,)), 6, 1024, -10.0, 2.0)
    linears = [m for m in actor.trunk if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(50, 1024), (1024, 1024), (1024, 12)]
    assert sum(isinstance(m, nn.ReLU) for m in actor.trunk) == 2
    critic = Critic(IdentityEncoder((50,)), 6, 1024)
    for q in (critic.Q1, critic.Q2):
        linears = [m for m in q.trunk if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(56, 1024), (1024, 1024), (1024, 1)]
    q1, q2 = critic(torch.randn(3, 50), torch.rand(3, 6) * 2 - 1)
    assert q1.shape == q2.shape == (3, 1)
    assert not torch.allclose(q1, q2)  # two independent heads


# ---------------------------------------------------------------------------------------------------------------
# Tied convs


def test_actor_and_critic_share_convs_but_not_fc_ln_and_target_is_separate():
    torch.manual_seed(0)
    agent = SacAeAgent((9, 64, 64), 2, small_pixel_cfg(), CPU)
    a, c, t = agent.actor.encoder, agent.critic.encoder, agent.critic_target.encoder
    assert len(a.convs) == len(c.convs) == len(t.convs) == 4
    for ac, cc, tc in zip(a.convs, c.convs, t.convs, strict=True):
        for name in ("weight", "bias"):
            pa, pc, pt = getattr(ac, name), getattr(cc, name), getattr(tc, name)
            assert pa is pc
            assert pt is not pc and pt.data_ptr() != pc.data_ptr()
            assert torch.equal(pt, pc)  # the target starts as a copy of the critic
    for name in ("fc", "ln"):
        for pname in ("weight", "bias"):
            pa, pc = getattr(getattr(a, name), pname), getattr(getattr(c, name), pname)
            assert pa is not pc and pa.data_ptr() != pc.data_ptr()
    assert not torch.equal(a.fc.weight, c.fc.weight)  # separately initialised
    for qc, qt in ((agent.critic.Q1, agent.critic_target.Q1), (agent.critic.Q2, agent.critic_target.Q2)):
        for pc, pt in zip(qc.parameters(), qt.parameters(), strict=True):
            assert pc is not pt and torch.equal(pc, pt)
    # Writing to the critic's conv is seen by the actor, not by the target.
    with torch.no_grad():
        c.convs[0].weight.add_(1.0)
    assert torch.equal(a.convs[0].weight, c.convs[0].weight)
    assert not torch.equal(t.convs[0].weight, c.convs[0].weight)
    # The actor's parameter list contains the tied convs exactly once.
    actor_ids = [id(p) for p in agent.actor.parameters()]
    assert len(actor_ids) == len(set(actor_ids))
    assert id(c.convs[0].weight) in actor_ids


# ---------------------------------------------------------------------------------------------------------------
# Linear layers on oneDNN


def linear_pass(layer, x, grad, use_onednn, monkeypatch):
    """Output and the gradients of input, weight and bias of one forward and backward pass."""
    monkeypatch.setenv(networks.ONEDNN_LINEAR_VARIABLE, "1" if use_onednn else "0")
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x)
    y.backward(grad)
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return [y.detach()] + [g for g in grads if g is not None]


@pytest.mark.skipif(not networks.onednn_linear_enabled(), reason="torch built without oneDNN")
@pytest.mark.parametrize(
    ("shape", "out_features", "bias", "input_grad"),
    [((128, 64), 96, True, True), ((1, 50), 33, True, False), ((4, 5, 24), 7, False, True), ((16, 300), 1, True, True)],
)
def test_onednn_linear_gives_nn_linears_output_and_gradients(shape, out_features, bias, input_grad, monkeypatch):
    torch.manual_seed(0)
    layer = networks.Linear(shape[-1], out_features, bias=bias)
    x = torch.randn(shape).requires_grad_(input_grad)
    grad = torch.randn(*shape[:-1], out_features)
    onednn = linear_pass(layer, x, grad, True, monkeypatch)
    blas = linear_pass(layer, x, grad, False, monkeypatch)
    assert len(onednn) == len(blas) == 2 + bias + input_grad
    for a, b in zip(onednn, blas, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Switched off, it is nn.Linear exactly.
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(blas[0], expected.detach())


def test_linear_under_bf16_autocast_is_nn_linear():
    torch.manual_seed(0)
    layer = networks.Linear(32, 8)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected)


def test_linear_keeps_nn_linears_state_dict():
    torch.manual_seed(0)
    layer = networks.Linear(6, 3)
    plain = nn.Linear(6, 3)
    plain.load_state_dict(layer.state_dict())
    assert layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-6, atol=1e-6)
