"""Several seeds of one configuration trained in one process: one stacked agent learns for all of them.

Each seed keeps what a run of its own has (environments, replay buffer, random streams, run folder); the networks
of all seeds are stacked along a leading seed axis, so one batched kernel (batched matmul, grouped convolution)
serves every seed where a single run launches one per layer. Seed i's slice follows the math of `SacAeAgent`'s
update on seed i's batch, and its random draws come from seed i's own generator in the order a single run makes
them. docs/multiseed.md gives the design, the test and the figures.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sacae.agent import METRIC_NAMES, SacAeAgent, like_param, polyak, preprocess_target
from sacae.config import TrainConfig, resolve
from sacae.envs import make_env
from sacae.errors import NumericalError, RunStopped, SacaeError
from sacae.logger import Logger
from sacae.networks import MEMORY_FORMAT, tanh_gaussian
from sacae.placement import MEMORY_RESERVE_BYTES, available_memory_bytes, replay_transitions
from sacae.process import configure_process, describe_session
from sacae.replay import Batch, ReplayBuffer
from sacae.rundir import RUN_OUTPUTS, WorkDirLock, foreign_entries, is_run, remove_outputs, run_finished, write_status
from sacae.storage import check_writable, save_torch_atomic, write_text_atomic, writing
from sacae.trainer import (
    STOP_SIGNALS,
    eval_seed,
    new_replay,
    seed_everything,
    select_device,
)
from sacae.video import VideoRecorder

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Stacked layers: every tensor has the seed axis first; activations are (N, B, ...) between layers.


def stacked_linear(x: torch.Tensor, p: Params, name: str) -> torch.Tensor:
    """Per seed x @ W.T + b: (N, B, I) -> (N, B, O), as (W @ x.T + b).T, one batched matmul with the bias as its
    starting value (as addmm does). In this order the weight's gradient comes out contiguous, like the weight."""
    return linear_t(x.transpose(1, 2), p, name).transpose(1, 2)


def linear_t(x_t: torch.Tensor, p: Params, name: str) -> torch.Tensor:
    """stacked_linear on transposed activations: (N, I, B) -> (N, O, B)."""
    return torch.baddbmm(p[f"{name}.bias"].unsqueeze(2), p[f"{name}.weight"], x_t)


def stacked_sequential(x: torch.Tensor, p: Params, prefix: str, layers: nn.Sequential) -> torch.Tensor:
    """The Linear/ReLU stack `layers` (one seed's module, for its structure) with the seeds' parameters `p`:
    (N, B, I) -> (N, B, O); in between, the activations stay transposed (N, features, B)."""
    h = x.transpose(1, 2)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            h = linear_t(h, p, f"{prefix}.{i}")
        elif isinstance(layer, nn.ReLU):
            h = torch.relu(h)
        else:
            raise TypeError(f"no stacked form of {type(layer).__name__}")
    return h.transpose(1, 2)


def stacked_layer_norm(x: torch.Tensor, p: Params, name: str, eps: float) -> torch.Tensor:
    normalized = F.layer_norm(x, x.shape[-1:], eps=eps)
    return torch.addcmul(p[f"{name}.bias"].unsqueeze(1), normalized, p[f"{name}.weight"].unsqueeze(1))


def to_groups(x: torch.Tensor) -> torch.Tensor:
    """(N, B, C, H, W) -> (B, N*C, H, W), channels-last: the input of a convolution with one group per seed."""
    n, b, c, h, w = x.shape
    # One copy: (B, H, W, N, C) in memory is (B, N*C, H, W) channels-last.
    return x.permute(1, 3, 4, 0, 2).reshape(b, h, w, n * c).permute(0, 3, 1, 2)


def from_groups(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N*C, H, W) -> (N, B, C, H, W) (a view)."""
    b, nc, h, w = x.shape
    return x.view(b, n, nc // n, h, w).transpose(0, 1)


def convolve(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, layer: nn.Conv2d | nn.ConvTranspose2d,
             groups: int = 1) -> torch.Tensor:  # fmt: skip
    """`layer`'s (transposed) convolution with the given weight and bias."""
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, bias, layer.stride, layer.padding, layer.output_padding, groups,
                                  layer.dilation)  # fmt: skip
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, groups)


ConvLayers = list[tuple[str, nn.Conv2d | nn.ConvTranspose2d, bool]]  # (parameter name, layer, ReLU after it)


def stacked_convs(x: torch.Tensor, p: Params, layers: ConvLayers, grouped: bool) -> torch.Tensor:
    """Convolution layers of every seed: (N, B, C, H, W) -> (N, B, C', H', W'). Grouped: one convolution per layer
    with one group per seed, on (B, N*C, H, W); else one convolution per seed and layer."""
    n = x.shape[0]
    if grouped:
        h = to_groups(x)
        for name, layer, relu in layers:
            h = convolve(h, p[f"{name}.weight"].flatten(0, 1), p[f"{name}.bias"].flatten(), layer, groups=n)
            h = torch.relu(h) if relu else h
        return from_groups(h, n)
    out = []
    for seed in range(n):
        h = x[seed].contiguous(memory_format=MEMORY_FORMAT)
        for name, layer, relu in layers:
            h = convolve(h, p[f"{name}.weight"][seed], p[f"{name}.bias"][seed], layer)
            h = torch.relu(h) if relu else h
        out.append(h)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
class StackedAdam:
    """torch.optim.Adam (fused, L2 weight decay added to the gradient, no amsgrad) on stacked parameters.

    The same fused kernel as the agent's own optimizers (`torch._fused_adam_`) with the same scalars: the kernel is
    elementwise, so seed i's slice gets exactly, bit for bit, what that seed's own optimizer computes. All parameters
    of one optimizer step together, so one step count serves them all.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):  # fmt: skip
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.steps = 0
        # torch keeps the step count in a float32 tensor beside the parameters; one serves every parameter here.
        self._step = torch.zeros((), dtype=torch.float32, device=params[0].device if params else None)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        self._step.fill_(float(self.steps))
        n = len(self.params)
        # Gradients from torch.autograd.grad come in whatever layout the backward pass made; the kernel needs the
        # parameter's (see sacae.agent.like_param).
        grads = [like_param(g, p) for g, p in zip(grads, self.params, strict=True)]
        torch._fused_adam_(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], [self._step] * n,
                           lr=self.lr, beta1=beta1, beta2=beta2, weight_decay=self.weight_decay, eps=self.eps,
                           amsgrad=False, maximize=False)  # fmt: skip


class StackedMetrics:
    """The agent's per-update metrics (sums on the device, first non-finite step) with one row per seed."""

    def __init__(self, num_seeds: int, device: torch.device):
        self.num_seeds, self.device = num_seeds, device
        self.step = 0
        shape = (num_seeds, len(METRIC_NAMES))
        self.first_nonfinite = torch.full(shape, -1.0, dtype=torch.float64, device=device)
        self.sums = torch.zeros(shape, dtype=torch.float64, device=device)
        self.counts = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, name: str, values: torch.Tensor) -> None:
        """One value per seed, shape (N,)."""
        i = METRIC_NAMES.index(name)
        values = values.detach().to(torch.float64)
        self.sums[:, i] += values
        self.counts[:, i] += 1
        seen = self.first_nonfinite[:, i]
        self.first_nonfinite[:, i] = torch.where(torch.isfinite(values) | (seen >= 0), seen, float(self.step))

    def pop(self, seed_index: int) -> dict[str, float | None]:
        """Seed `seed_index`'s averages since its last pop, as `Metrics.pop` gives them; resets that seed's row."""
        sums, counts = torch.stack([self.sums[seed_index], self.counts[seed_index]]).tolist()
        self.sums[seed_index] = 0
        self.counts[seed_index] = 0
        return {n: (s / c if c else None) for n, s, c in zip(METRIC_NAMES, sums, counts, strict=True)}

    def nonfinite(self) -> list[dict[str, int]]:
        """Per seed {metric: first update step where it was NaN or infinite} (one host sync)."""
        rows = self.first_nonfinite.tolist()
        return [{n: int(s) for n, s in zip(METRIC_NAMES, row, strict=True) if s >= 0} for row in rows]


def seed_generator(seed: int, device: torch.device) -> torch.Generator:
    """The stream a single run of `seed` draws its policy and autoencoder noise from, right after its agent is built
    (torch.manual_seed(seed), then the networks' initialisation on the CPU): on a CPU the global generator as it
    stands now, on a GPU the device's generator as torch.manual_seed(seed) leaves it."""
    generator = torch.Generator(device=device)
    if device.type == "cpu":
        generator.set_state(torch.get_rng_state())
    else:
        generator.manual_seed(seed)
    return generator


def build_seed_agent(obs_shape, action_dim: int, cfg: TrainConfig, device: torch.device, seed: int):
    """(SacAeAgent, generator) of `seed`, both as a single run of that seed has them before its first step."""
    torch.manual_seed(seed)
    agent = SacAeAgent(obs_shape, action_dim, cfg, device)
    return agent, seed_generator(seed, device)


# ---------------------------------------------------------------------------------------------------------------
class StackedAgent:
    """N agents of one configuration as one: stacked parameters, one batched update, per-seed Adam and noise.

    Built from N `SacAeAgent`s (their parameters, optimizer states and temperatures) and N generators, one per seed,
    from which each seed's policy samples and autoencoder noise are drawn in the order `SacAeAgent` draws them from
    the global RNG. `update` takes a Batch whose tensors have the seed axis first; `act` one observation per seed;
    `unstack` gives back each seed's state in `SacAeAgent.state_dict()`'s format.
    """

    def __init__(
        self,
        agents: Sequence[SacAeAgent],
        generators: Sequence[torch.Generator],
        grouped_convs: bool | None = None,
    ):
        if not agents or len(agents) != len(generators):
            raise ValueError("a stacked agent needs one generator per agent, and at least one agent")
        template = agents[0]
        cfg = template.cfg
        if cfg.precision != "fp32":
            raise SacaeError("Multi-seed training runs in fp32 only; drop --precision bf16.")
        if any(dataclasses.replace(a.cfg, seed=cfg.seed, work_dir=cfg.work_dir) != cfg for a in agents[1:]):
            raise ValueError("the stacked agents must share one configuration (seeds aside)")
        self.cfg, self.device = cfg, template.device
        self.num_seeds = len(agents)
        self.action_dim = template.action_dim
        self.discount = template.discount
        self.target_entropy = template.target_entropy
        self.generators = list(generators)
        # One seed's modules: the structure (layer types, strides, names) the stacked parameters fill in.
        self.template = copy.deepcopy(template.networks())
        self.pixel = cfg.encoder_type == "pixel"
        # One grouped convolution per layer for all seeds where kernel launches cost (a GPU); on a CPU oneDNN runs
        # N plain convolutions faster than one grouped one (docs/multiseed.md).
        self.grouped_convs = self.device.type == "cuda" if grouped_convs is None else grouped_convs
        self.has_decoder = template.decoder is not None

        # Stacked parameters by network and name; the actor's conv layers are the critic's tensors, as in the agent.
        stacked: dict[int, torch.Tensor] = {}
        self.params: dict[str, Params] = {}
        nets = [a.networks() for a in agents]
        for net_name, net in template.networks().items():
            assert set(net.state_dict()) == {n for n, _ in net.named_parameters()}, "networks hold no buffers"
            named = dict(net.named_parameters())
            per_agent = [dict(n[net_name].named_parameters()) for n in nets]
            self.params[net_name] = {}
            for name, p in named.items():
                if id(p) not in stacked:
                    t = torch.stack([d[name].detach() for d in per_agent]).contiguous()
                    stacked[id(p)] = t.requires_grad_(net_name != "critic_target")
                self.params[net_name][name] = stacked[id(p)]
        self.log_alpha = torch.stack([a.log_alpha.detach() for a in agents]).contiguous().requires_grad_(True)
        stacked[id(template.log_alpha)] = self.log_alpha

        # Optimizers: the agent's parameter sets, hyperparameters and states.
        tied = {id(p) for p in template.critic.encoder.parameters()}
        self.optimizers: dict[str, StackedAdam] = {}
        self._optimizer_params: dict[str, list[int]] = {}  # indices into the agent optimizer's parameter list
        for opt_name, opt in template.optimizers().items():
            (group,) = opt.param_groups
            if group["amsgrad"] or group["maximize"] or group.get("decoupled_weight_decay", False):
                raise ValueError(f"the {opt_name} optimizer uses an Adam variant the stacked agent does not have")
            hyper = ("lr", "betas", "eps", "weight_decay")
            if any(a.optimizers()[opt_name].param_groups[0][k] != group[k] for a in agents for k in hyper):
                raise ValueError(f"the seeds' {opt_name} optimizers differ in {', '.join(hyper)}")
            indices = [j for j, p in enumerate(group["params"]) if not (opt_name == "actor" and id(p) in tied)]
            params = [stacked[id(group["params"][j])] for j in indices]
            adam = StackedAdam(params, group["lr"], group["betas"], group["eps"], group["weight_decay"])
            self._load_optimizer_state(adam, [a.optimizers()[opt_name] for a in agents], indices, opt_name)
            self.optimizers[opt_name] = adam
            self._optimizer_params[opt_name] = indices
        self._param_groups = {k: opt.state_dict()["param_groups"] for k, opt in template.optimizers().items()}

        critic, target = self.params["critic"], self.params["critic_target"]
        self._q_params = [critic[n] for n in critic if n.startswith(("Q1.", "Q2."))]
        self._q_target_params = [target[n] for n in target if n.startswith(("Q1.", "Q2."))]
        self._enc_params = [critic[n] for n in critic if n.startswith("encoder.")]
        self._enc_target_params = [target[n] for n in target if n.startswith("encoder.")]
        self.metrics = StackedMetrics(self.num_seeds, self.device)
        self.training = True

    @staticmethod
    def _load_optimizer_state(adam: StackedAdam, optimizers, indices: list[int], name: str) -> None:
        """Stack the seeds' Adam states (all empty, or all at one step count)."""
        steps = set()
        for opt in optimizers:
            params = opt.param_groups[0]["params"]
            for j in indices:
                state = opt.state.get(params[j], {})
                steps.add(int(state["step"]) if state else 0)
        if len(steps) != 1:
            raise ValueError(f"the seeds' {name} optimizers are at different steps ({sorted(steps)})")
        (adam.steps,) = steps
        if adam.steps == 0:
            return
        with torch.no_grad():
            for k, j in enumerate(indices):
                states = [opt.state[opt.param_groups[0]["params"][j]] for opt in optimizers]
                adam.exp_avgs[k].copy_(torch.stack([s["exp_avg"] for s in states]))
                adam.exp_avg_sqs[k].copy_(torch.stack([s["exp_avg_sq"] for s in states]))

    # ---------------------------------------------------------------------------------------------------------
    def train(self, training: bool = True) -> None:
        self.training = training  # the networks have no dropout or batch norm: the flag only mirrors SacAeAgent

    def _normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(N, *shape) standard normal noise, seed i's from generator i."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.generators])

    def _uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.generators])

    # ---------------------------------------------------------------------------------------------------------
    # The networks, stacked: the same layers as sacae.networks, every seed at once.
    def _conv(self, obs: torch.Tensor, p: Params) -> torch.Tensor:
        """PixelEncoder.forward_conv: (N, B, C, H, W) images -> (N, B, D); identity for state vectors."""
        if not self.pixel:
            return obs
        convs = self.template["critic"].encoder.convs
        layers = [(f"encoder.convs.{i}", conv, True) for i, conv in enumerate(convs)]
        return stacked_convs(obs.float() / 255.0, p, layers, self.grouped_convs).flatten(2)

    def _head(self, conv: torch.Tensor, p: Params) -> torch.Tensor:
        """PixelEncoder.head: Linear, LayerNorm, tanh; identity for state vectors."""
        if not self.pixel:
            return conv
        eps = self.template["critic"].encoder.ln.eps
        return torch.tanh(stacked_layer_norm(stacked_linear(conv, p, "encoder.fc"), p, "encoder.ln", eps))

    def _policy(self, features: torch.Tensor, compute_pi: bool = True, compute_log_pi: bool = True):
        """Actor.policy with each seed's noise from its own generator."""
        actor = self.template["actor"]
        out = stacked_sequential(features, self.params["actor"], "trunk", actor.trunk)
        noise = self._normal(out.shape[1:-1] + (self.action_dim,)) if compute_pi else None
        return tanh_gaussian(out, actor.log_std_min, actor.log_std_max, compute_pi, compute_log_pi, noise)

    def _q(self, features: torch.Tensor, action: torch.Tensor, p: Params):
        """Critic.q: both Q heads on features and action."""
        critic = self.template["critic"]
        x = torch.cat([features, action], dim=-1)
        q1 = stacked_sequential(x, p, "Q1.trunk", critic.Q1.trunk)
        return q1, stacked_sequential(x, p, "Q2.trunk", critic.Q2.trunk)

    def _decode(self, h: torch.Tensor) -> torch.Tensor:
        """PixelDecoder.forward: (N, B, feature_dim) -> (N, B, C, H, W)."""
        decoder, p, n = self.template["decoder"], self.params["decoder"], self.num_seeds
        x = torch.relu(stacked_linear(h, p, "fc"))
        x = x.view(n, x.shape[1], decoder.num_filters, decoder.side, decoder.side)
        last = len(decoder.deconvs) - 1
        layers = [(f"deconvs.{i}", deconv, i < last) for i, deconv in enumerate(decoder.deconvs)]
        return stacked_convs(x, p, layers, self.grouped_convs)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: np.ndarray, sample: bool) -> np.ndarray:
        """One action per seed, (N, action_dim), from one observation per seed (N, *obs_shape)."""
        x = torch.as_tensor(obs, device=self.device).unsqueeze(1)
        actor = self.params["actor"]
        mu, pi, _, _ = self._policy(self._head(self._conv(x, actor), actor), compute_pi=sample, compute_log_pi=False)
        return (pi if sample else mu).cpu().numpy()[:, 0]

    def update(self, batch: Batch, step: int) -> None:
        """One SAC+AE update of every seed, seed i on batch[:, i]: SacAeAgent.update's math and order."""
        cfg = self.cfg
        obs, action, reward, next_obs, not_done = batch
        m = self.metrics
        m.step = step
        m.add("batch_reward", reward.mean(dim=(1, 2)))
        self._update_critic(obs, action, reward, next_obs, not_done)
        update_actor = step % cfg.actor_update_freq == 0
        update_ae = self.has_decoder and step % cfg.decoder_update_freq == 0
        conv = None
        if update_actor or update_ae:
            # One conv pass with the weights the critic step left serves the actor and the autoencoder.
            with torch.set_grad_enabled(update_ae):
                conv = self._conv(obs, self.params["critic"])
        if update_actor:
            self._update_actor_and_alpha(conv.detach())
        if step % cfg.critic_target_update_freq == 0:
            self._update_targets()
        if update_ae:
            self._update_autoencoder(obs, conv)

    def _update_critic(self, obs, action, reward, next_obs, not_done) -> None:
        actor, critic, target = self.params["actor"], self.params["critic"], self.params["critic_target"]
        with torch.no_grad():
            _, next_action, next_log_pi, _ = self._policy(self._head(self._conv(next_obs, actor), actor))
            target_q1, target_q2 = self._q(self._head(self._conv(next_obs, target), target), next_action, target)
            target_v = torch.min(target_q1, target_q2) - self.alpha.detach().view(-1, 1, 1) * next_log_pi
            target_q = reward + not_done * self.discount * target_v
        q1, q2 = self._q(self._head(self._conv(obs, critic), critic), action, critic)
        critic_loss = mse(q1, target_q) + mse(q2, target_q)
        adam = self.optimizers["critic"]
        adam.step(torch.autograd.grad(critic_loss.sum(), adam.params))
        self.metrics.add("critic_loss", critic_loss)

    def _update_actor_and_alpha(self, conv: torch.Tensor) -> None:
        actor, critic = self.params["actor"], self.params["critic"]
        _, pi, log_pi, log_std = self._policy(self._head(conv, actor))
        with torch.no_grad():
            critic_features = self._head(conv, critic)
        q1, q2 = self._q(critic_features, pi, critic)
        alpha = self.alpha.detach().view(-1, 1, 1)
        actor_loss = (alpha * log_pi - torch.min(q1, q2)).mean(dim=(1, 2))
        adam = self.optimizers["actor"]
        adam.step(torch.autograd.grad(actor_loss.sum(), adam.params))

        entropy = 0.5 * log_std.shape[-1] * (1.0 + np.log(2 * np.pi)) + log_std.sum(dim=-1)
        alpha_loss = (self.alpha.view(-1, 1, 1) * (-log_pi - self.target_entropy).detach()).mean(dim=(1, 2))
        adam = self.optimizers["log_alpha"]
        adam.step(torch.autograd.grad(alpha_loss.sum(), adam.params))
        m = self.metrics
        m.add("actor_loss", actor_loss)
        m.add("alpha_loss", alpha_loss)
        m.add("alpha", alpha.view(-1))
        m.add("entropy", entropy.mean(dim=1))

    @torch.no_grad()
    def _update_targets(self) -> None:
        polyak(self._q_target_params, self._q_params, self.cfg.critic_tau)
        polyak(self._enc_target_params, self._enc_params, self.cfg.encoder_tau)

    def _update_autoencoder(self, obs: torch.Tensor, conv: torch.Tensor) -> None:
        h = self._head(conv, self.params["critic"])
        target = preprocess_target(obs, noise=self._uniform(tuple(obs.shape[1:])))
        rec_loss = mse(self._decode(h), target)
        latent_loss = (0.5 * h.pow(2).sum(-1)).mean(dim=1)
        loss = rec_loss + self.cfg.decoder_latent_lambda * latent_loss
        encoder, decoder = self.optimizers["encoder"], self.optimizers["decoder"]
        grads = torch.autograd.grad(loss.sum(), encoder.params + decoder.params)
        encoder.step(grads[: len(encoder.params)])
        decoder.step(grads[len(encoder.params) :])
        self.metrics.add("ae_loss", rec_loss)

    # ---------------------------------------------------------------------------------------------------------
    def unstack(self, optimizers: bool = True) -> list[dict]:
        """Each seed's networks, optimizers and temperature in `SacAeAgent.state_dict()`'s format."""
        states = []
        for i in range(self.num_seeds):
            state: dict[str, Any] = {
                "networks": {k: {n: t[i].detach().clone() for n, t in p.items()} for k, p in self.params.items()},
                "log_alpha": self.log_alpha[i].detach().clone(),
            }
            if optimizers:
                state["optimizers"] = {k: self._optimizer_state(k, i) for k in self.optimizers}
            states.append(state)
        return states

    def _optimizer_state(self, name: str, i: int) -> dict:
        adam = self.optimizers[name]
        state = {}
        if adam.steps:
            for k, j in enumerate(self._optimizer_params[name]):
                state[j] = {
                    "step": torch.tensor(float(adam.steps), dtype=torch.float32),
                    "exp_avg": adam.exp_avgs[k][i].clone(),
                    "exp_avg_sq": adam.exp_avg_sqs[k][i].clone(),
                }
        return {"state": state, "param_groups": copy.deepcopy(self._param_groups[name])}

    def nonfinite_parameters(self) -> list[list[str]]:
        """Per seed, the names of its parameters (network.tensor) holding a NaN or infinity (one host sync)."""
        named = [(f"{k}.{n}", t) for k, p in self.params.items() for n, t in p.items()]
        named.append(("log_alpha", self.log_alpha.unsqueeze(1)))
        finite = torch.stack([torch.isfinite(t.detach()).flatten(1).all(dim=1) for _, t in named], dim=1).tolist()
        return [[name for (name, _), ok in zip(named, row, strict=True) if not ok] for row in finite]


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F.mse_loss of each seed: (N, ...) -> (N,)."""
    return (x - y).pow(2).flatten(1).mean(dim=1)


def stack_batches(batches: Sequence[Batch]) -> Batch:
    """N batches -> one Batch whose tensors have the seed axis first."""
    return Batch(*(torch.stack(parts) for parts in zip(*batches, strict=True)))


# ---------------------------------------------------------------------------------------------------------------
# The multi-seed training loop


@dataclass
class SeedRun:
    """What one seed's run owns: its configuration and folder, environments, replay, action RNG, logs, episode."""

    cfg: TrainConfig
    work_dir: Path
    env: Any = None
    eval_env: Any = None
    replay: ReplayBuffer | None = None
    action_rng: np.random.Generator | None = None
    logger: Any = None
    video: Any = None
    obs: np.ndarray | None = None
    episode: int = 0
    episode_reward: float = 0.0
    episode_start: float = field(default_factory=time.time)
    eval_seconds: float = 0.0
    done: bool = False  # the last step ended the episode


def updates_at(cfg: TrainConfig, agent_steps: int) -> int:
    """How many updates run at this agent step: Trainer.updates_at's schedule (seed-phase burst or spread)."""
    init = cfg.init_steps
    if agent_steps < init or agent_steps == 0:
        return 0
    if cfg.seed_updates == "burst":
        return init if agent_steps == init else 1
    return 2 if agent_steps < 2 * init - 1 else 1


def seed_dir(runs_dir: str | Path, cfg: TrainConfig, seed: int) -> Path:
    """RUNS_DIR/<task>/<configuration>/seed_<seed>, the layout of `sacae sweep` and `sacae report`."""
    return Path(runs_dir) / cfg.env_name / cfg.configuration / f"seed_{seed}"


def check_multiseed_config(cfg: TrainConfig, seeds: Sequence[int]) -> None:
    """SacaeError for what a multi-seed run does not do (yet): resume, checkpoints, bf16, overlap."""
    if not seeds:
        raise SacaeError("--seeds needs at least one seed.")
    if len(set(seeds)) != len(seeds):
        raise SacaeError(f"--seeds lists a seed twice ({' '.join(map(str, seeds))}).")
    if cfg.resume is not None:
        raise SacaeError("Multi-seed runs cannot be resumed (they write no checkpoint); drop --resume.")
    if cfg.checkpoint_every is not None:
        raise SacaeError(
            "Multi-seed runs write no checkpoint; drop --checkpoint_every (or train each seed with `sacae train`)."
        )
    if cfg.precision != "fp32":
        raise SacaeError("Multi-seed training runs in fp32 only; drop --precision bf16.")
    if getattr(cfg, "overlap", "off") == "on":
        raise SacaeError("Multi-seed training does not overlap updates with environment steps; drop --overlap on.")
    if getattr(cfg, "replay_device", "host") == "cuda":
        raise SacaeError("Multi-seed runs keep the replay frames in host memory; drop --replay_device cuda.")
    trackers = [name for name in getattr(cfg, "trackers", ()) if name != "tensorboard"]
    if trackers:
        raise SacaeError(
            f"Multi-seed runs log to TensorBoard only; drop --logger {trackers[0]} (or train each seed with "
            f"`sacae train`)."
        )


class MultiSeedTrainer:
    """N seeds of one configuration in one process: each seed's environments, replay buffer, action RNG, torch
    generator and run folder (config.json, train.log, eval.log, status.json, optional tb/, video/, model/), and one
    StackedAgent learning for all of them, step for step the schedule of `Trainer`.

    No checkpoints: an interrupted multi-seed run starts over (`--no_resume`).
    """

    def __init__(self, cfg: TrainConfig, seeds: Sequence[int], runs_dir: str | Path = "runs", console=None):
        base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
        cfg = resolve(TrainConfig(**base))
        seeds = list(seeds)
        check_multiseed_config(cfg, seeds)
        self.cfg, self.seeds = cfg, seeds
        self.device = select_device(cfg.device)
        configure_process(cfg.num_threads)
        self.runs: list[SeedRun] = []
        for seed in seeds:
            work_dir = seed_dir(runs_dir, cfg, seed)
            work_dir.mkdir(parents=True, exist_ok=True)
            run_cfg = dataclasses.replace(cfg, seed=seed, work_dir=os.fspath(work_dir))
            self.runs.append(SeedRun(run_cfg, check_writable(work_dir)))
        # One writer per seed folder, as for a single run, held until the run ends.
        self.locks: list[WorkDirLock] = []
        try:
            self.locks += [WorkDirLock(run.work_dir) for run in self.runs]
            # Every folder is checked before any is touched, and nothing is removed before the runs are built.
            start_over = [self._may_start_over(run) for run in self.runs]
        except BaseException:
            self.release()
            raise

        agents, generators = [], []
        for run in self.runs:
            # The order of a single run's construction, so that every random stream starts where it starts there.
            seed = run.cfg.seed
            seed_everything(seed)
            run.env = make_env(run.cfg, seed=seed)
            run.eval_env = make_env(run.cfg, seed=seed)
            if run is self.runs[0]:
                self.replay_bytes = self._check_memory(run.env.spec)
            spec = run.env.spec
            replay_seed, action_seed = np.random.SeedSequence(seed).spawn(2)
            run.replay = new_replay(cfg, run.env, self.device, replay_seed)
            run.action_rng = np.random.default_rng(action_seed)
            agent, generator = build_seed_agent(spec.obs_shape, spec.action_dim, run.cfg, self.device, seed)
            agents.append(agent)
            generators.append(generator)
        self.agent = StackedAgent(agents, generators)
        del agents

        for run, remove in zip(self.runs, start_over, strict=True):
            if remove:
                self._remove_outputs(run.work_dir)
            with writing(run.work_dir / "config.json", "the run's configuration"):
                write_text_atomic(run.work_dir / "config.json", run.cfg.to_json())
            run.logger = Logger(run.work_dir, save_tb=cfg.save_tb, console=console, trackers=cfg.trackers)
            run.logger.console_write = self._console(run, console)
            run.video = VideoRecorder(run.work_dir / "video" if cfg.save_video else None)
            if cfg.save_model:
                (run.work_dir / "model").mkdir(exist_ok=True)
        self.agent_steps = 0
        self.last_eval: int | None = None
        self.session_start = time.time()
        self.session = describe_session(self.device)
        self.progress = None
        self._stop_signal: int | None = None

    @staticmethod
    def _console(run: SeedRun, console):
        out = console if console is not None else sys.stdout
        label = f"seed {run.cfg.seed}"
        return lambda line: print(f"{label} {line}", file=out, flush=True)

    def _may_start_over(self, run: SeedRun) -> bool:
        """True when the seed's folder holds a run that --no_resume (and --force when finished) lets us discard;
        False when it holds none; SacaeError otherwise."""
        work, cfg = run.work_dir, self.cfg
        holds_run = is_run(work) or any(
            (work / name).exists() and (work / name).stat().st_size > 0 for name in ("train.log", "eval.log")
        )
        if not holds_run:
            foreign = foreign_entries(work)
            if foreign:
                raise SacaeError(
                    f"{work} holds files but no config.json: it is not a sacae run (it holds {', '.join(foreign[:6])}) "
                    f"and sacae only writes into a new, empty or run folder; choose another --runs_dir."
                )
            return False
        if not cfg.no_resume:
            raise SacaeError(
                f"{work} holds a run, and multi-seed runs cannot resume one; add --no_resume to start over there "
                f"(or choose another --runs_dir)."
            )
        finished = run_finished(work)
        if finished is None and not cfg.force:
            raise SacaeError(
                f"{work} holds a run whose state cannot be read (no readable checkpoint or status.json), so it may "
                f"be finished; add --force to discard it and start over."
            )
        if finished and not cfg.force:
            raise SacaeError(f"{work} holds a finished run; add --force to discard it and start over.")
        return True

    @staticmethod
    def _remove_outputs(work_dir: Path) -> None:
        remove_outputs(work_dir, (*RUN_OUTPUTS, "config.json"))

    def _check_memory(self, spec) -> int:
        """Bytes the N replay buffers need; SacaeError before training if this machine cannot hold them."""
        cfg, n = self.cfg, replay_transitions(self.cfg)
        stack = cfg.frame_stack if cfg.pixels else 1
        itemsize = np.dtype(spec.obs_dtype).itemsize
        one = ReplayBuffer.estimate_bytes(
            spec.frame_shape, itemsize, spec.action_dim, n, stack, cfg.episode_agent_steps
        )
        needed = one * len(self.seeds)
        available = available_memory_bytes()
        if available is not None and needed > available - MEMORY_RESERVE_BYTES:
            fits = max(0, int((available - MEMORY_RESERVE_BYTES) / (one / n) / len(self.seeds)))
            raise SacaeError(
                f"The {len(self.seeds)} replay buffers need {needed / 1e9:.1f} GB ({one / 1e9:.1f} GB each for {n:,} "
                f"transitions) but this machine has {available / 1e9:.1f} GB available (keeping "
                f"{MEMORY_RESERVE_BYTES / 1e9:.1f} GB free); lower --replay_buffer_capacity to at most {fits:,}, "
                f"train for fewer --num_train_steps or train fewer seeds at once."
            )
        return needed

    # ---------------------------------------------------------------------------------------------------------
    @property
    def env_steps(self) -> int:
        return self.agent_steps * self.cfg.action_repeat

    def describe(self) -> str:
        cfg = self.cfg
        return (
            f"sacae: {cfg.configuration} on {cfg.env_name} (action repeat {cfg.action_repeat}), seeds "
            f"{' '.join(map(str, self.seeds))} in one process, {cfg.num_train_steps:,} agent steps = "
            f"{cfg.num_train_steps * cfg.action_repeat:,} env steps each, device {self.device}, "
            f"{torch.get_num_threads()} threads; replay {self.replay_bytes / 1e9:.2f} GB in all; output in "
            f"{self.runs[0].work_dir.parent}"
        )

    def run(self) -> None:
        """Train every seed to the end (a stop signal ends all of them, without a checkpoint)."""
        cfg = self.cfg
        print(self.describe(), file=sys.stderr, flush=True)
        self.progress = tqdm(total=cfg.num_train_steps * cfg.action_repeat, unit=" env steps", unit_scale=True,
                             dynamic_ncols=True, file=sys.stderr, disable=not sys.stderr.isatty(),
                             desc=f"{cfg.configuration} {cfg.env_name} x{len(self.seeds)}")  # fmt: skip
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self.write_status("running")
            while self.agent_steps < cfg.num_train_steps:
                self.step()
                if self._stop_signal is not None:
                    self._stop()
            if self.last_eval != self.agent_steps:
                self.evaluate()
            self.write_status("finished")
        except RunStopped:
            raise
        except BaseException as e:
            message = str(e) if isinstance(e, SacaeError) else f"{type(e).__name__}: {e}"
            state = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
            if state == "stopped":
                message = "interrupted; multi-seed runs write no checkpoint: start over with --no_resume"
            self.write_status(state, message)
            raise
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            self.progress.close()
            for run in self.runs:
                run.logger.close()
            self.release()

    def release(self) -> None:
        """Let other processes train in the seed folders."""
        for lock in self.locks:
            lock.release()

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_signal = signum
        print(f"sacae: received {signal.Signals(signum).name}; stopping after the current step",
              file=sys.stderr, flush=True)  # fmt: skip

    def _stop(self) -> None:
        name = signal.Signals(self._stop_signal).name
        message = (
            f"stopped by {name} at env step {self.env_steps:,}; multi-seed runs write no checkpoint, so run the same "
            f"command with --no_resume to start over"
        )
        self.write_status("stopped", message)
        raise RunStopped(self._stop_signal, message)

    def step(self) -> None:
        """One agent step of every seed, in Trainer.step's order: evaluate if due, start episodes where needed,
        pick a_t, run the update(s) of step t (one stacked update on one batch per seed), step each environment,
        store each transition, log each seed's finished episode."""
        cfg, runs = self.cfg, self.runs
        t = self.agent_steps
        if t % cfg.eval_freq == 0 and self.last_eval != t:
            start = time.time()
            self.evaluate()
            for run in runs:
                run.eval_seconds += time.time() - start
        for run in runs:
            if run.obs is None:
                run.obs, _ = run.env.reset()
                run.replay.start_episode(run.obs)
                run.episode_reward, run.episode_start, run.eval_seconds = 0.0, time.time(), 0.0
                run.episode += 1
        if t < cfg.init_steps:
            actions = [run.env.sample_action(run.action_rng) for run in runs]
        else:
            actions = list(self.agent.act(np.stack([run.obs for run in runs]), sample=True))
            bad = [run.cfg.seed for run, a in zip(runs, actions, strict=True) if not np.isfinite(a).all()]
            if bad:
                self.check_finite()
                raise NumericalError(f"The policy of seed {bad[0]} produced a non-finite action at env step "
                                     f"{self.env_steps:,}.")  # fmt: skip
        self._run_updates(updates_at(cfg, t))
        for run, action in zip(runs, actions, strict=True):
            next_obs, reward, terminated, truncated, _ = run.env.step(action)
            run.episode_reward += reward
            # The time limit is a truncation: keep bootstrapping through it (not_done = 1).
            run.replay.add(action, reward, next_obs, 0.0 if terminated else 1.0)
            run.obs = next_obs
            run.done = terminated or truncated
        self.agent_steps += 1
        if self.progress is not None:
            self.progress.update(cfg.action_repeat)
        for i, run in enumerate(runs):
            if run.done:
                self._log_train_episode(i, run)
                run.obs = None

    def _run_updates(self, n: int) -> None:
        if n == 0:
            return
        bar = tqdm(total=n, desc="seed-phase updates", unit=" updates", leave=False, file=sys.stderr,
                   disable=n == 1 or not sys.stderr.isatty())  # fmt: skip
        every, start = max(1, n // 10), time.time()
        try:
            for i in range(1, n + 1):
                batch = stack_batches([run.replay.sample(self.cfg.batch_size) for run in self.runs])
                self.agent.update(batch, self.agent_steps)
                bar.update(1)
                if n > 1 and bar.disable and (i % every == 0 or i == n):
                    elapsed = time.time() - start
                    print(f"sacae: seed-phase updates {i}/{n}, {elapsed:.0f} s, about "
                          f"{elapsed / i * (n - i):.0f} s left", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            bar.close()

    def _log_train_episode(self, i: int, run: SeedRun) -> None:
        metrics = self.agent.metrics.pop(i)
        self.check_finite()
        duration = time.time() - run.episode_start - run.eval_seconds
        row: dict[str, Any] = {
            "episode": run.episode,
            "env_steps": self.env_steps,
            "agent_steps": self.agent_steps,
            "duration": duration,
            "episode_reward": run.episode_reward,
            **metrics,
            "env_steps_per_second": run.env.episode_env_steps / max(duration, 1e-9),
        }
        run.logger.log("train", row)
        self.write_status("running", runs=[run])

    def check_finite(self) -> None:
        """NumericalError naming the first seed and loss that became NaN or infinite."""
        for run, bad in zip(self.runs, self.agent.metrics.nonfinite(), strict=True):
            if bad:
                name, step = min(bad.items(), key=lambda kv: kv[1])
                raise NumericalError(
                    f"The {name} of seed {run.cfg.seed} became non-finite (NaN or infinite) in the update at agent "
                    f"step {step:,} (env step {step * self.cfg.action_repeat:,}); training of all seeds stopped."
                )

    def evaluate(self) -> None:
        """Every seed's evaluation at this step, the seeds' episodes run side by side: for each seed the episodes,
        environment seeds and deterministic actions of `evaluate_agent`."""
        cfg, runs = self.cfg, self.runs
        self.check_finite()
        start = time.time()
        self.last_eval = self.agent_steps
        self.agent.train(False)
        returns: list[list[float]] = [[] for _ in runs]
        for episode in range(cfg.num_eval_episodes):
            obs = []
            for run in runs:
                seed = eval_seed(run.cfg.seed, self.env_steps) if episode == 0 else None
                obs.append(run.eval_env.reset(seed=seed)[0])
                if episode == 0 and cfg.save_video:
                    run.video.init()
                    run.video.record(run.eval_env)
            totals, done = [0.0] * len(runs), [False] * len(runs)
            while not all(done):
                actions = self.agent.act(np.stack(obs), sample=False)
                for i, run in enumerate(runs):
                    if done[i]:
                        continue
                    obs[i], reward, terminated, truncated, _ = run.eval_env.step(actions[i])
                    totals[i] += reward
                    done[i] = terminated or truncated
                    if episode == 0 and cfg.save_video:
                        run.video.record(run.eval_env)
            for i, run in enumerate(runs):
                if episode == 0 and cfg.save_video:
                    run.video.save(str(self.env_steps))
                returns[i].append(totals[i])
        self.agent.train(True)
        duration = time.time() - start
        for run, seed_returns in zip(runs, returns, strict=True):
            row = {
                "episode": run.episode,
                "env_steps": self.env_steps,
                "agent_steps": self.agent_steps,
                "episode_reward": float(np.mean(seed_returns)) if seed_returns else None,
                "episode_reward_std": float(np.std(seed_returns)) if seed_returns else None,
                "episode_rewards": seed_returns,
                "duration": duration,
            }
            run.logger.log("eval", row)
        if cfg.save_model:
            self.save_snapshots()

    def save_snapshots(self) -> None:
        """model/<env_steps>.pt in each seed's folder, in the format of a single run's snapshots."""
        for run, state in zip(self.runs, self.agent.unstack(optimizers=False), strict=True):
            snapshot = {
                "config": run.cfg.to_dict(),
                "env_steps": self.env_steps,
                "agent_steps": self.agent_steps,
                "networks": state["networks"],
                "log_alpha": state["log_alpha"],
            }
            path = run.work_dir / "model" / f"{self.env_steps}.pt"
            with writing(path, "a snapshot of the networks"):
                save_torch_atomic(snapshot, path)

    def write_status(self, state: str, message: str = "", runs: Sequence[SeedRun] | None = None) -> None:
        """Each seed's status.json, in the format `sacae status` and `sacae report` read."""
        elapsed = time.time() - self.session_start
        for run in self.runs if runs is None else runs:
            status = {
                "state": state,
                "env_steps": self.env_steps,
                "total_env_steps": self.cfg.num_train_steps * self.cfg.action_repeat,
                "agent_steps": self.agent_steps,
                "elapsed_seconds": round(elapsed, 3),
                "session_env_steps_per_second": round(self.env_steps / elapsed, 3) if self.env_steps else None,
                "resumes": 0,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "time": time.time(),
                "message": message,
                "seeds_in_process": self.seeds,
                "sessions": [
                    {**self.session, "from_env_steps": 0, "to_env_steps": self.env_steps, "seconds": round(elapsed, 1)}
                ],  # fmt: skip
            }
            write_status(run.work_dir, status)


def train_seeds(cfg: TrainConfig, seeds: Sequence[int], runs_dir: str | Path = "runs") -> None:
    """Train `seeds` of the configuration `cfg` in this process, into RUNS_DIR/<task>/<configuration>/seed_<i>/."""
    MultiSeedTrainer(cfg, seeds, runs_dir).run()


# ---------------------------------------------------------------------------------------------------------------
def time_updates(
    configuration: str = "sac_states",
    num_seeds: int = 4,
    updates: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    obs_dim: int = 17,
    action_dim: int = 6,
    grouped_convs: bool | None = None,
    **overrides,
) -> dict[str, float]:
    """Median seconds of one SacAeAgent update and of one StackedAgent update of `num_seeds` seeds, timed in turn
    on random batches of the real shapes (state vectors of `obs_dim`, or 9x84x84 frame stacks; cheetah's sizes by
    default), and the seed-updates per second of each: what one process gains by stacking N seeds over
    running their updates one after the other."""
    import statistics

    variants = {
        "sac_ae": dict(encoder_type="pixel", decoder_type="pixel"),
        "sac_pixel": dict(encoder_type="pixel", decoder_type="identity"),
        "sac_states": dict(encoder_type="identity", decoder_type="identity"),
    }
    cfg = TrainConfig(**{**variants[configuration], **overrides})
    dev = select_device(device)
    obs_shape = (3 * cfg.frame_stack, cfg.image_size, cfg.image_size) if cfg.pixels else (obs_dim,)
    seeds = list(range(1, num_seeds + 1))
    built = [build_seed_agent(obs_shape, action_dim, cfg, dev, s) for s in seeds]
    single = copy.deepcopy(built[0][0])
    stacked = StackedAgent([a for a, _ in built], [g for _, g in built], grouped_convs)
    del built

    def batch() -> Batch:
        b = cfg.batch_size
        if cfg.pixels:
            obs, next_obs = (torch.randint(0, 256, (b, *obs_shape), dtype=torch.uint8, device=dev) for _ in "on")
        else:
            obs, next_obs = (torch.randn(b, *obs_shape, device=dev) for _ in "on")
        action = torch.rand(b, action_dim, device=dev) * 2 - 1
        return Batch(obs, action, torch.randn(b, 1, device=dev), next_obs, torch.ones(b, 1, device=dev))

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    single_s, stacked_s = [], []
    for i in range(warmup + updates):
        step = 1000 + i  # odd and even updates alike
        one, many = batch(), [batch() for _ in seeds]
        t_single = timed(lambda: single.update(one, step))  # noqa: B023 (called at once)
        t_stacked = timed(lambda: stacked.update(stack_batches(many), step))  # noqa: B023
        if i >= warmup:
            single_s.append(t_single)
            stacked_s.append(t_stacked)
    single_median, stacked_median = statistics.median(single_s), statistics.median(stacked_s)
    return {
        "num_seeds": num_seeds,
        "grouped_convs": stacked.grouped_convs,
        "single_update_s": single_median,
        "stacked_update_s": stacked_median,
        "single_seed_updates_per_s": 1 / single_median,
        "stacked_seed_updates_per_s": num_seeds / stacked_median,
        "per_seed_speedup": num_seeds * single_median / stacked_median,
    }
