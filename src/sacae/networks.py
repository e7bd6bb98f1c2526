"""Encoder, decoder, actor and critic networks of SAC+AE, with the initialisation of ALGORITHM.md."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import is_batchedtensor

from sacae.config import conv_output_size

# Convolutions run channels-last (NHWC): oneDNN (CPU) and cuDNN use their NHWC kernels without reordering.
MEMORY_FORMAT = torch.channels_last


ONEDNN_LINEAR_VARIABLE = "SACAE_ONEDNN_LINEAR"
"""Set to 0 to run fp32 linear layers on a CPU through torch's default BLAS (MKL) instead of oneDNN."""


def onednn_linear_enabled() -> bool:
    """Whether fp32 linear layers on a CPU go to oneDNN: torch has it (and its matmul operator), and it is not
    switched off."""
    return (
        os.environ.get(ONEDNN_LINEAR_VARIABLE, "1") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN's matmul primitive (dense tensors in, a dense tensor out)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """A linear layer whose three products (output, input gradient, weight gradient) run on oneDNN.

    The same products as F.linear, to float rounding (summation order). Why: torch's fp32 matrix products on a CPU
    go to MKL, which takes its AVX2 code on AMD processors; oneDNN uses AVX-512 where the CPU has it. On a 2-core
    AMD EPYC (Zen 5) a 128 x 1024 x 1024 product takes 0.65 ms against MKL's 1.44 ms (docs/performance.md).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_matmul(grad, weight.t(), None)  # grad @ weight
        if ctx.needs_input_grad[1]:
            grad_weight = _onednn_matmul(grad.t(), x.t(), None)  # grad.T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose fp32 products on a CPU run on oneDNN; elsewhere (a GPU,
    bf16 autocast, other dtypes, under torch.compile) it is nn.Linear itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and not is_batchedtensor(x)  # under torch.vmap (a group of seeds) the plain product batches itself
            and not is_batchedtensor(self.weight)
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()  # Inductor picks its own kernels for F.linear
            and onednn_linear_enabled()
        ):
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            out = _OneDnnLinear.apply(flat, self.weight, self.bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        return super().forward(x)


def weight_init(m: nn.Module) -> None:
    """Linear: orthogonal, bias 0. Conv and transposed conv: delta-orthogonal with ReLU gain, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight.data)
        m.bias.data.fill_(0.0)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        assert m.weight.size(2) == m.weight.size(3)
        m.weight.data.fill_(0.0)
        m.bias.data.fill_(0.0)
        mid = m.weight.size(2) // 2
        nn.init.orthogonal_(m.weight.data[:, :, mid, mid], nn.init.calculate_gain("relu"))


def normalise_frames(obs: torch.Tensor) -> torch.Tensor:
    """uint8 frames as the conv stack takes them: float32 in [0, 1] (x / 255), channels-last. Floating-point frames
    are taken as normalised already, so that an update can normalise a batch once for all the passes over it."""
    if is_batchedtensor(obs):  # torch.vmap over seeds has no memory formats
        return obs if obs.is_floating_point() else obs.float().div_(255.0)
    if obs.is_floating_point():
        return obs.contiguous(memory_format=MEMORY_FORMAT)
    # Reordered as uint8, a quarter of the bytes of the float copy; x / 255 is the same whatever the layout.
    return obs.contiguous(memory_format=MEMORY_FORMAT).float().div_(255.0)


class PixelEncoder(nn.Module):
    """uint8 images -> conv stack -> Linear -> LayerNorm -> tanh features.

    `forward_conv` and `head` are exposed separately so that one conv pass can serve several heads: the actor
    shares the critic's conv layers (the same Parameter objects) but has its own Linear and LayerNorm.
    """

    def __init__(self, obs_shape: tuple[int, ...], feature_dim: int, num_layers: int = 4, num_filters: int = 32):
        super().__init__()
        channels, size = obs_shape[0], obs_shape[-1]
        self.feature_dim = feature_dim
        self.convs = nn.ModuleList(
            [nn.Conv2d(channels, num_filters, 3, stride=2)]
            + [nn.Conv2d(num_filters, num_filters, 3, stride=1) for _ in range(num_layers - 1)]
        )
        self.conv_side = conv_output_size(size, num_layers)
        self.fc = Linear(num_filters * self.conv_side * self.conv_side, feature_dim)
        self.ln = nn.LayerNorm(feature_dim)

    def forward_conv(self, obs: torch.Tensor) -> torch.Tensor:
        """Conv features of uint8 frames, or of frames that `normalise_frames` has made floats already."""
        h = normalise_frames(obs)
        for conv in self.convs:
            h = torch.relu(conv(h))
        return h.flatten(1)

    def head(self, conv: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.ln(self.fc(conv)))

    def forward(self, obs: torch.Tensor, detach: bool = False) -> torch.Tensor:
        conv = self.forward_conv(obs)
        return self.head(conv.detach() if detach else conv)


class IdentityEncoder(nn.Module):
    """State vectors are their own features."""

    def __init__(self, obs_shape: tuple[int, ...], feature_dim: int | None = None, *_, **__):
        super().__init__()
        self.feature_dim = obs_shape[0]

    def forward_conv(self, obs: torch.Tensor) -> torch.Tensor:
        return obs

    def head(self, conv: torch.Tensor) -> torch.Tensor:
        return conv

    def forward(self, obs: torch.Tensor, detach: bool = False) -> torch.Tensor:
        return obs


def make_encoder(encoder_type: str, obs_shape, feature_dim: int, num_layers: int, num_filters: int) -> nn.Module:
    if encoder_type == "pixel":
        return PixelEncoder(obs_shape, feature_dim, num_layers, num_filters)
    return IdentityEncoder(obs_shape)


class PixelDecoder(nn.Module):
    """Features -> Linear -> ReLU -> transposed convs back to the observation's shape (no output activation)."""

    def __init__(self, obs_shape: tuple[int, ...], feature_dim: int, num_layers: int = 4, num_filters: int = 32):
        super().__init__()
        channels, size = obs_shape[0], obs_shape[-1]
        self.num_filters = num_filters
        self.side = conv_output_size(size, num_layers)
        self.fc = Linear(feature_dim, num_filters * self.side * self.side)
        # The stride-2 layer must give back exactly `size`, odd or even.
        output_padding = (size - 3) % 2
        self.deconvs = nn.ModuleList(
            [nn.ConvTranspose2d(num_filters, num_filters, 3, stride=1) for _ in range(num_layers - 1)]
            + [nn.ConvTranspose2d(num_filters, channels, 3, stride=2, output_padding=output_padding)]
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(h)).view(-1, self.num_filters, self.side, self.side)
        if not is_batchedtensor(x):  # torch.vmap over seeds has no memory formats
            x = x.contiguous(memory_format=MEMORY_FORMAT)
        for deconv in self.deconvs[:-1]:
            x = torch.relu(deconv(x))
        return self.deconvs[-1](x)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        Linear(in_dim, hidden_dim),
        nn.ReLU(),
        Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
        Linear(hidden_dim, out_dim),
    )


def gaussian_logprob(noise: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    residual = (-0.5 * noise.pow(2) - log_std).sum(-1, keepdim=True)
    return residual - 0.5 * math.log(2 * math.pi) * noise.size(-1)


def squash(mu: torch.Tensor, pi: torch.Tensor, log_pi: torch.Tensor | None):
    """tanh-squash the mean and sample and correct the log-probability for the change of variables."""
    mu = torch.tanh(mu)
    pi = torch.tanh(pi)
    if log_pi is not None:
        log_pi = log_pi - torch.log(F.relu(1 - pi.pow(2)) + 1e-6).sum(-1, keepdim=True)
    return mu, pi, log_pi


def tanh_gaussian(
    out: torch.Tensor,
    log_std_min: float,
    log_std_max: float,
    compute_pi: bool = True,
    compute_log_pi: bool = True,
    noise: torch.Tensor | None = None,
):
    """The policy from the actor trunk's output (mean and log-std along the last axis): (tanh(mu), tanh(pi), log_pi,
    log_std). pi = mu + noise * std with standard normal `noise`, drawn from the global torch RNG unless given (a group
    of seeds draws each seed's from its own generator)."""
    mu, log_std = out.chunk(2, dim=-1)
    log_std = torch.tanh(log_std)
    log_std = log_std_min + 0.5 * (log_std_max - log_std_min) * (log_std + 1)
    if not compute_pi:
        return torch.tanh(mu), None, None, log_std
    noise = torch.randn_like(mu) if noise is None else noise
    pi = mu + noise * log_std.exp()
    log_pi = gaussian_logprob(noise, log_std) if compute_log_pi else None
    mu, pi, log_pi = squash(mu, pi, log_pi)
    return mu, pi, log_pi, log_std


class Actor(nn.Module):
    """Tanh-Gaussian policy on encoder features."""

    def __init__(self, encoder: nn.Module, action_dim: int, hidden_dim: int, log_std_min: float, log_std_max: float):
        super().__init__()
        self.encoder = encoder
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        self.trunk = mlp(encoder.feature_dim, hidden_dim, 2 * action_dim)

    def policy(
        self,
        features: torch.Tensor,
        compute_pi: bool = True,
        compute_log_pi: bool = True,
        noise: torch.Tensor | None = None,
    ):
        """(tanh(mu), tanh(pi), log_pi, log_std) from features; pi uses `noise`, or the global torch RNG."""
        out = self.trunk(features)
        return tanh_gaussian(out, self.log_std_min, self.log_std_max, compute_pi, compute_log_pi, noise)

    def forward(
        self,
        obs: torch.Tensor,
        compute_pi: bool = True,
        compute_log_pi: bool = True,
        detach_encoder: bool = False,
        noise: torch.Tensor | None = None,
    ):
        return self.policy(self.encoder(obs, detach=detach_encoder), compute_pi, compute_log_pi, noise)


class QFunction(nn.Module):
    def __init__(self, feature_dim: int, action_dim: int, hidden_dim: int):
        super().__init__()
        self.trunk = mlp(feature_dim + action_dim, hidden_dim, 1)

    def forward(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.trunk(torch.cat([features, action], dim=1))


class Critic(nn.Module):
    """Encoder and two Q heads."""

    def __init__(self, encoder: nn.Module, action_dim: int, hidden_dim: int):
        super().__init__()
        self.encoder = encoder
        self.Q1 = QFunction(encoder.feature_dim, action_dim, hidden_dim)
        self.Q2 = QFunction(encoder.feature_dim, action_dim, hidden_dim)

    def q(self, features: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.Q1(features, action), self.Q2(features, action)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, detach_encoder: bool = False):
        return self.q(self.encoder(obs, detach=detach_encoder), action)
