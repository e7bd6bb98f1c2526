"""The SAC+AE agent: acting, and one update of critic, actor, temperature, targets and autoencoder, for one seed
(`SacAeAgent`) or a group of seeds learning in lockstep (`GroupAgent`).

The update is the math of ALGORITHM.md in the authors' order (critic step; every 2nd update the actor and
temperature steps and the Polyak update; the autoencoder step), with the work that math makes redundant removed:
after the critic step the tied conv layers run ONCE on the batch, and that one pass serves the actor (detached),
the critic's Q in the actor loss (detached) and the autoencoder, because nothing between them changes the conv
weights. The losses are written once, as functions of one seed's networks (`critic_loss`, `actor_losses`,
`autoencoder_losses`); `Update` runs them in that order. One seed calls its modules; a group calls the same
functions through torch.func.functional_call and torch.vmap over parameters stacked on a leading seed axis, with
each seed's random draws made outside vmap from that seed's own generator. `tests/test_agent.py` checks the update
against a plain implementation of the same math, `tests/test_multiseed.py` the group against single seeds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from sacae.config import TrainConfig
from sacae.networks import MEMORY_FORMAT, Actor, Critic, PixelDecoder, make_encoder, normalise_frames, weight_init
from sacae.replay import Batch

METRIC_NAMES = ("batch_reward", "critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy", "ae_loss")


def part_metrics(parts: tuple[bool, bool, bool]) -> list[str]:
    """The metrics an update with these parts (see `Update.parts`) gives, in the order it gives them."""
    update_actor, _, update_ae = parts
    names = ["batch_reward", "critic_loss"]
    if update_actor:
        names += ["actor_loss", "alpha_loss", "alpha", "entropy"]
    if update_ae:
        names.append("ae_loss")
    return names


def preprocess_target(obs: torch.Tensor, bits: int = 5, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The autoencoder's target: the image reduced to `bits` bits, dequantised with uniform noise in [0, 1) (drawn
    from the global torch RNG unless given), in [-0.5, 0.5]."""
    bins = 2**bits
    if obs.dtype == torch.uint8:
        levels = (obs >> (8 - bits)).float()  # floor(obs / 2^(8 - bits)), exactly
    else:
        levels = torch.floor(obs.float() / 2 ** (8 - bits))
    noise = torch.rand_like(levels) if noise is None else noise
    # (levels + noise) / bins rounds like levels / bins + noise / bins: dividing by a power of two is exact.
    return (levels + noise).mul_(1.0 / bins).sub_(0.5)


class Metrics:
    """Sums of per-update scalars kept on the device; read once (one host sync) when an episode is logged.

    Each metric also remembers the first update step at which it was not finite (-1 while all were), so a
    diverging run is caught at the next read without any per-update host synchronisation. A group keeps one row
    per seed (`num_seeds`); its values come one per seed, and every reader takes the seed's row.
    """

    def __init__(self, device: torch.device, num_seeds: int | None = None):
        self.device = device
        self.lead = () if num_seeds is None else (num_seeds,)
        self.step = 0  # the update step the next values belong to
        self._indices: dict[tuple[str, ...], torch.Tensor] = {}
        self.first_nonfinite = torch.full((*self.lead, len(METRIC_NAMES)), -1.0, dtype=torch.float64, device=device)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        shape = (*self.lead, len(METRIC_NAMES))
        if seed is None:
            self.sums = torch.zeros(shape, dtype=torch.float64, device=self.device)
            self.counts = torch.zeros(shape, dtype=torch.float64, device=self.device)
        else:
            self.sums[seed] = 0
            self.counts[seed] = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        self.add_all([name], [value])

    def add_all(self, names: Sequence[str], values: Sequence[torch.Tensor]) -> None:
        """One value of each metric in `names` (a group: one per seed), in a few kernels for all of them."""
        key = tuple(names)
        index = self._indices.get(key)
        if index is None:
            index = self._indices[key] = torch.tensor([METRIC_NAMES.index(n) for n in names], device=self.device)
        value = torch.stack([v.detach().to(torch.float64) for v in values], -1)  # (*lead, len(names))
        self.sums[..., index] += value
        self.counts[..., index] += 1
        seen = self.first_nonfinite[..., index]
        self.first_nonfinite[..., index] = torch.where(torch.isfinite(value) | (seen >= 0), seen, float(self.step))

    def _row(self, name: str, seed: int | None) -> torch.Tensor:
        return getattr(self, name) if seed is None else getattr(self, name)[seed]

    def nonfinite(self, seed: int | None = None) -> dict[str, int]:
        """{metric: first update step where it was NaN or infinite} (one host sync)."""
        steps = self._row("first_nonfinite", seed).tolist()
        return {n: int(s) for n, s in zip(METRIC_NAMES, steps, strict=True) if s >= 0}

    def pop(self, seed: int | None = None) -> dict[str, float | None]:
        sums, counts = torch.stack([self._row("sums", seed), self._row("counts", seed)]).tolist()
        self.reset(seed)
        return {n: (s / c if c else None) for n, s, c in zip(METRIC_NAMES, sums, counts, strict=True)}

    def state_dict(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        """One seed's sums, counts and first non-finite steps (a group's row in a single agent's format)."""
        names = ("sums", "counts", "first_nonfinite")
        return {name: self._row(name, seed).clone() for name in names}

    def load_state_dict(self, state: dict[str, torch.Tensor], seed: int | None = None) -> None:
        for name in ("sums", "counts", "first_nonfinite"):
            value = state[name].to(device=self.device, dtype=torch.float64)
            if seed is None:
                setattr(self, name, value.clone())
            else:
                getattr(self, name)[seed] = value

    def keep(self, seeds: Sequence[int]) -> None:
        """Only the rows of `seeds`, in that order (a group that lost seeds)."""
        index = torch.tensor(list(seeds), device=self.device)
        self.lead = (len(seeds),)
        for name in ("sums", "counts", "first_nonfinite"):
            setattr(self, name, getattr(self, name)[index].clone())


# ---------------------------------------------------------------------------------------------------------------
# The losses, once, as functions of ONE seed's networks (a `Networks`), its batch and its noise. A group runs the
# same functions under torch.vmap with each seed's parameters.


class Networks(nn.Module):
    """One seed's actor, critic, target critic and decoder. `forward(fn, *args)` is `fn(self, *args)`, so that
    torch.func.functional_call can run any loss function below with other parameters (a group's seed i)."""

    def __init__(self, actor: Actor, critic: Critic, critic_target: Critic, decoder: PixelDecoder | None):
        super().__init__()
        self.actor, self.critic, self.critic_target, self.decoder = actor, critic, critic_target, decoder

    def forward(self, fn: Callable, *args):
        return fn(self, *args)


def critic_loss(nets: Networks, obs, action, reward, next_obs, not_done, noise, log_alpha, *, discount: float):
    """MSE of both Q heads to r + not_done * discount * (min Q'(s', a') - alpha log pi(a'|s')), a' = pi(s') drawn
    with `noise`; the target without gradients."""
    with torch.no_grad():
        _, next_action, next_log_pi, _ = nets.actor(next_obs, noise=noise)
        target_q1, target_q2 = nets.critic_target(next_obs, next_action)
        target_v = torch.min(target_q1, target_q2) - log_alpha.exp() * next_log_pi
        target_q = reward + not_done * discount * target_v
    q1, q2 = nets.critic(obs, action)
    return F.mse_loss(q1.float(), target_q.float()) + F.mse_loss(q2.float(), target_q.float())


def conv_features(nets: Networks, obs: torch.Tensor) -> torch.Tensor:
    """The critic's (tied) conv layers on the batch: one pass serves the actor step and the autoencoder step."""
    return nets.critic.encoder.forward_conv(obs)


def actor_losses(nets: Networks, conv, noise, log_alpha, *, target_entropy: float):
    """(actor loss, temperature loss, alpha, mean entropy) on detached conv features; pi drawn with `noise`. The Q
    heads must be constants here (the caller freezes them): the actor loss trains the actor alone."""
    features = nets.actor.encoder.head(conv)
    _, pi, log_pi, log_std = nets.actor.policy(features, noise=noise)
    with torch.no_grad():
        critic_features = nets.critic.encoder.head(conv)
    q1, q2 = nets.critic.q(critic_features, pi)
    alpha = log_alpha.exp()
    actor_loss = (alpha.detach() * log_pi - torch.min(q1, q2)).float().mean()
    entropy = 0.5 * log_std.shape[1] * (1.0 + np.log(2 * np.pi)) + log_std.sum(dim=-1)
    alpha_loss = (alpha * (-log_pi - target_entropy).detach().float()).mean()
    return actor_loss, alpha_loss, alpha.detach(), entropy.float().mean()


def autoencoder_losses(nets: Networks, frames, conv, noise, *, latent_lambda: float):
    """(loss, reconstruction loss): the decoder's image of the critic's features against the 5-bit target of the
    frames (dequantised with `noise`), plus the latent penalty."""
    h = nets.critic.encoder.head(conv)
    target = preprocess_target(frames, noise=noise)
    reconstruction = nets.decoder(h)
    rec_loss = F.mse_loss(reconstruction.float(), target)
    latent_loss = (0.5 * h.float().pow(2).sum(1)).mean()
    return rec_loss + latent_lambda * latent_loss, rec_loss


def policy_action(nets: Networks, obs, noise, *, sample: bool) -> torch.Tensor:
    """A policy sample drawn with `noise` (sample) or tanh of the mean."""
    mu, pi, _, _ = nets.actor(obs, compute_pi=sample, compute_log_pi=False, noise=noise)
    return pi if sample else mu


Q_HEADS = ("critic.Q1.", "critic.Q2.")
# The loss functions of the update: what --compile compiles.
UPDATE_LOSSES = (critic_loss, conv_features, actor_losses, autoencoder_losses)


class Update:
    """The update's schedule and order over the loss functions above. Subclasses say how to call the networks
    (`_call`), where the noise comes from (`_normal`, `_uniform`) and how an optimizer steps on a loss (`_step`).

    Subclasses set: cfg, device, action_dim, discount, target_entropy, autocast_enabled, log_alpha, metrics,
    compiled (whether the update's losses run through torch.compile), _compiled and _compiled_parts, and the
    parameter lists _actor_own_params, _q_params, _q_target_params, _enc_params, _enc_target_params.
    """

    # ------------------------------------------------------------------ how to run a loss function (subclasses)
    def _call(self, fn: Callable, *args, constants: tuple[str, ...] = ()):
        raise NotImplementedError

    def _normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def _uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, names: tuple[str, ...], loss: torch.Tensor, inputs: list[torch.Tensor] | None = None) -> None:
        raise NotImplementedError

    def _seed_shape(self, t: torch.Tensor) -> tuple[int, ...]:
        """The shape of one seed's part of `t`."""
        raise NotImplementedError

    def _optimizer_list(self) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def _normalise(self, obs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_enabled)

    @property
    def _noise_dtype(self) -> torch.dtype:
        # The policy's mean is bf16 under autocast: its noise is drawn in the mean's dtype, as randn_like would.
        return torch.bfloat16 if self.autocast_enabled else torch.float32

    def parts(self, step: int) -> tuple[bool, bool, bool]:
        """Which periodic parts the update at `step` runs, as in ALGORITHM.md: (actor and temperature, target
        networks, autoencoder); the critic runs in every update."""
        cfg = self.cfg
        return (
            step % cfg.actor_update_freq == 0,
            step % cfg.critic_target_update_freq == 0,
            self.has_decoder and step % cfg.decoder_update_freq == 0,
        )

    def update(self, batch: Batch, step: int) -> None:
        """One SAC+AE update on `batch`; `step` decides which of the periodic parts run, as in ALGORITHM.md.

        The update's noise is drawn first, in the order and shapes in which the losses use it (critic, actor,
        autoencoder), from the same generator: nothing between the draws draws, so these are the values a draw at
        each loss would give. The rest, `_update_parts`, is then a function of tensors alone, which `--compile`
        captures."""
        parts = self.parts(step)
        update_actor, _, update_ae = parts
        obs, action = batch.obs, batch.action
        noise = [self._normal((*self._seed_shape(action)[:-1], self.action_dim))]
        if update_actor:
            noise.append(self._normal((*self._seed_shape(action)[:-1], self.action_dim)))
        if update_ae:
            noise.append(self._uniform(self._seed_shape(obs)))
        values = self._update_function(parts)(*batch, *noise)
        self.metrics.step = step
        self.metrics.add_all(part_metrics(parts), values)

    def _update_function(self, parts: tuple[bool, bool, bool]) -> Callable:
        """The update's tensor work for these parts. Compiled, each loss function runs through its compiled form
        (`_loss`); the first update of each set of parts compiles them, from a saved state to fall back to."""
        run = functools.partial(self._update_parts, parts)
        if not self.compiled or parts in self._compiled_parts:
            return run
        return functools.partial(self._first_compiled_call, parts, run)

    def _first_compiled_call(self, parts: tuple[bool, bool, bool], run: Callable, *args, fresh_cache: bool = False):
        saved = self._saved_state()
        try:
            values = run(*args)
        except Exception as e:  # noqa: BLE001 - any failure of the compiler, whatever library raised it
            # Some optimizer steps of this update may have run: start it again from the saved state.
            self._load_saved_state(saved)
            self._compiled.clear()
            if not fresh_cache:
                # A process killed while compiling leaves truncated files in Inductor's cache, which the next
                # compile loads and fails on: once more, in an empty cache.
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sacae-inductor-")
                torch._dynamo.reset()
                return self._first_compiled_call(parts, run, *args, fresh_cache=True)
            self.compiled = False
            print(f"sacae: torch.compile could not compile the update ({compile_error(e)}); training goes on "
                  f"without it (as with --compile off).", file=sys.stderr, flush=True)  # fmt: skip
            return run(*args)
        self._compiled_parts.add(parts)
        return values

    def _loss(self, fn: Callable, call: Callable, constants: tuple[str, ...]) -> Callable:
        """`call` (which runs the loss function `fn` on the networks), compiled once per loss function when the
        update is compiled: Inductor fuses its forward and backward passes, and on a GPU CUDA graphs replay them."""
        func = getattr(fn, "func", fn)
        if not self.compiled or func not in UPDATE_LOSSES:
            return call  # acting stays eager
        key = (func, tuple(sorted(getattr(fn, "keywords", {}).items())), constants)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = compile_update(call, self.device)
        return compiled

    def _saved_state(self) -> tuple[list, list]:
        """Copies of what an update changes: the parameters, the temperature and target networks, and every
        optimizer's state (which its first step creates)."""
        tensors = {id(t): t for t in [self.log_alpha, *self._parameters(), *self._q_target_params,
                                      *self._enc_target_params]}  # fmt: skip
        optimizers = [(opt, copy.deepcopy(opt.state_dict())) for opt in self._optimizer_list()]
        return [(t, t.detach().clone()) for t in tensors.values()], optimizers

    @staticmethod
    def _load_saved_state(saved: tuple[list, list]) -> None:
        tensors, optimizers = saved
        with torch.no_grad():
            for t, value in tensors:
                t.copy_(value)
        for opt, state in optimizers:
            opt.state.clear()
            opt.load_state_dict(state)
            match_optimizer_layout(opt)

    def _parameters(self) -> list[torch.Tensor]:
        return [p for opt in self._optimizer_list() for group in opt.param_groups for p in group["params"]]

    def _update_parts(self, parts: tuple[bool, bool, bool], obs, action, reward, next_obs, not_done, *noise):
        """The losses and optimizer steps of one update, given its batch and noise; returns the metrics' values in
        the order of part_metrics(parts)."""
        update_actor, update_targets, update_ae = parts
        noise = list(noise)
        values = [self._seed_mean(reward)]
        frames = obs
        if self.cfg.pixels:
            # Each batch is normalised once; the critic, the actor, the target critic and the conv pass after the
            # critic step would each do it again (four float copies of 31 MiB per update).
            obs, next_obs = self._normalise(obs), self._normalise(next_obs)
        with self._autocast():
            values.append(self._update_critic(obs, action, reward, next_obs, not_done, noise.pop(0)))
            conv = None
            if update_actor or update_ae:
                # The critic step changed the conv weights; this pass, with the new weights, serves the rest of
                # the update (the actor step cannot change them: it sees the conv output detached).
                with torch.set_grad_enabled(update_ae):
                    conv = self._call(conv_features, obs)
            if update_actor:
                values.extend(self._update_actor_and_alpha(conv.detach(), noise.pop(0)))
            if update_targets:
                self._update_targets()
            if update_ae:
                values.append(self._update_autoencoder(frames, conv, noise.pop(0)))
        return values

    # Each step draws its own noise when none is given (the tests drive the steps one at a time).
    def _update_critic(self, obs, action, reward, next_obs, not_done, noise=None) -> torch.Tensor:
        if noise is None:
            noise = self._normal((*self._seed_shape(action)[:-1], self.action_dim))
        fn = functools.partial(critic_loss, discount=self.discount)
        loss = self._call(fn, obs, action, reward, next_obs, not_done, noise, self.log_alpha.detach())
        self._step(("critic",), loss)
        return loss

    def _update_actor_and_alpha(self, conv: torch.Tensor, noise=None) -> tuple[torch.Tensor, ...]:
        if noise is None:
            noise = self._normal((*self._seed_shape(conv)[:-1], self.action_dim))
        fn = functools.partial(actor_losses, target_entropy=self.target_entropy)
        # The Q heads' weights take no gradient from the actor loss: built without them, the graph's backward pass
        # skips their weight products (a custom autograd function cannot tell which gradients `inputs` will keep).
        actor_loss, alpha_loss, alpha, entropy = self._call(fn, conv, noise, self.log_alpha, constants=Q_HEADS)
        # Only the actor's own parameters: gradients the Q heads would get here are never used. One backward pass
        # for both losses gives each its own gradients: the actor loss sees alpha detached and the temperature loss
        # log pi detached (and a compiled loss function's graph can be walked back only once).
        self._step(("actor", "log_alpha"), actor_loss + alpha_loss, inputs=[*self._actor_own_params, self.log_alpha])
        return actor_loss, alpha_loss, alpha, entropy

    @torch.no_grad()
    def _update_targets(self) -> None:
        polyak(self._q_target_params, self._q_params, self.cfg.critic_tau)
        polyak(self._enc_target_params, self._enc_params, self.cfg.encoder_tau)

    def _update_autoencoder(self, frames: torch.Tensor, conv: torch.Tensor, noise=None) -> torch.Tensor:
        if noise is None:
            noise = self._uniform(self._seed_shape(frames))
        fn = functools.partial(autoencoder_losses, latent_lambda=self.cfg.decoder_latent_lambda)
        loss, rec_loss = self._call(fn, frames, conv, noise)
        self._step(("encoder", "decoder"), loss)
        return rec_loss

    def _seed_mean(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SacAeAgent(Update):
    """One seed: networks, optimizers and the update. `act` picks actions; `update` learns from one batch."""

    num_seeds = 1

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.action_dim = action_dim
        self.discount = cfg.discount
        self.target_entropy = -float(action_dim)
        self.autocast_enabled = cfg.precision == "bf16"

        def encoder():
            return make_encoder(cfg.encoder_type, obs_shape, cfg.encoder_feature_dim, cfg.num_layers, cfg.num_filters)

        self.actor = Actor(encoder(), action_dim, cfg.hidden_dim, cfg.actor_log_std_min, cfg.actor_log_std_max)
        self.critic = Critic(encoder(), action_dim, cfg.hidden_dim)
        self.actor.apply(weight_init)
        self.critic.apply(weight_init)
        self.critic_target = copy.deepcopy(self.critic)
        if cfg.encoder_type == "pixel":
            # Tie the conv layers: the actor's are the critic's Parameter objects.
            self.actor.encoder.convs = self.critic.encoder.convs
        self.decoder = None
        if cfg.decoder_type == "pixel":
            self.decoder = PixelDecoder(obs_shape, cfg.encoder_feature_dim, cfg.num_layers, cfg.num_filters)
            self.decoder.apply(weight_init)
        self.has_decoder = self.decoder is not None
        self.log_alpha = torch.tensor(np.log(cfg.init_temperature), dtype=torch.float32)
        self._place(device)
        self.nets = Networks(self.actor, self.critic, self.critic_target, self.decoder)

        # Fused Adam on every device: the arithmetic of the one-tensor-at-a-time loop in one elementwise pass per
        # tensor (the same values to float rounding; tests/test_agent.py checks it). On a CPU the multi-tensor
        # (foreach) and loop implementations spend 5 ms per step on a 2M-parameter critic; fused, 0.6 ms.
        adam = functools.partial(torch.optim.Adam, fused=True)
        self.actor_optimizer = adam(self.actor.parameters(), lr=cfg.actor_lr, betas=(cfg.actor_beta, 0.999))
        self.critic_optimizer = adam(self.critic.parameters(), lr=cfg.critic_lr, betas=(cfg.critic_beta, 0.999))
        self.log_alpha_optimizer = adam([self.log_alpha], lr=cfg.alpha_lr, betas=(cfg.alpha_beta, 0.999))
        self.encoder_optimizer = None
        self.decoder_optimizer = None
        if self.decoder is not None:
            self.encoder_optimizer = adam(self.critic.encoder.parameters(), lr=cfg.encoder_lr)
            self.decoder_optimizer = adam(
                self.decoder.parameters(), lr=cfg.decoder_lr, weight_decay=cfg.decoder_weight_lambda
            )
        # The actor loss trains only the actor's own parameters (not the tied convs, which it sees detached).
        tied = {id(p) for p in self.critic.encoder.parameters()}
        self._actor_own_params = [p for p in self.actor.parameters() if id(p) not in tied]
        self._q_params = list(self.critic.Q1.parameters()) + list(self.critic.Q2.parameters())
        self._q_target_params = list(self.critic_target.Q1.parameters()) + list(self.critic_target.Q2.parameters())
        self._enc_params = list(self.critic.encoder.parameters())
        self._enc_target_params = list(self.critic_target.encoder.parameters())
        self.metrics = Metrics(device)
        self.compiled = compile_mode(cfg, device)
        self._compiled: dict[tuple, Callable] = {}  # loss function and constants -> its compiled call
        self._compiled_parts: set[tuple[bool, bool, bool]] = set()  # updates that have run compiled
        self.train(True)

    # ---------------------------------------------------------------------------------------------------------
    def _place(self, device: torch.device) -> None:
        """Move the networks and log_alpha to `device`; only before the optimizers are built (they hold these)."""
        for net in self.networks().values():
            net.to(device, memory_format=MEMORY_FORMAT)
        self.log_alpha = self.log_alpha.to(device).requires_grad_(True)

    def networks(self) -> dict[str, torch.nn.Module]:
        nets = {"actor": self.actor, "critic": self.critic, "critic_target": self.critic_target}
        if self.decoder is not None:
            nets["decoder"] = self.decoder
        return nets

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {
            "actor": self.actor_optimizer,
            "critic": self.critic_optimizer,
            "log_alpha": self.log_alpha_optimizer,
        }
        if self.decoder is not None:
            opts["encoder"] = self.encoder_optimizer
            opts["decoder"] = self.decoder_optimizer
        return opts

    def _optimizer_list(self) -> list[torch.optim.Optimizer]:
        return list(self.optimizers().values())

    def train(self, training: bool = True) -> None:
        self.training = training
        for net in self.networks().values():
            net.train(training)

    # ---------------------------------------------------------------------- the update's hooks: call the modules
    def _call(self, fn: Callable, *args, constants: tuple[str, ...] = ()):
        call = self._loss(fn, functools.partial(self.nets, fn), constants)
        if not constants:
            return call(*args)
        with frozen([p for name, p in self.nets.named_parameters() if name.startswith(constants)]):
            return call(*args)

    def _normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, dtype=self._noise_dtype, device=self.device)

    def _uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, device=self.device)

    def _step(self, names: tuple[str, ...], loss: torch.Tensor, inputs: list[torch.Tensor] | None = None) -> None:
        optimizers = [self.optimizers()[name] for name in names]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss, inputs=inputs)
        for opt in optimizers:
            opt.step()

    def _seed_shape(self, t: torch.Tensor) -> tuple[int, ...]:
        return tuple(t.shape)

    def _seed_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t.mean()

    def _normalise(self, obs: torch.Tensor) -> torch.Tensor:
        return normalise_frames(obs)

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: np.ndarray, sample: bool) -> np.ndarray:
        """An action in [-1, 1]: tanh of the mean (evaluation) or a policy sample (collection)."""
        x = torch.as_tensor(obs, device=self.device).unsqueeze(0)
        with self._autocast():
            noise = self._normal((1, self.action_dim)) if sample else None
            action = self._call(functools.partial(policy_action, sample=sample), x, noise)
        return action.float().cpu().numpy()[0]

    def act_seeds(self, obs: Sequence[np.ndarray], sample: bool) -> list[np.ndarray]:
        """One action per seed of the group (here one)."""
        return [self.act(obs[0], sample)]

    def update_seeds(self, batches: Sequence[Batch], step: int) -> None:
        """One update of every seed of the group (here one) on its own batch."""
        self.update(batches[0], step)

    # ---------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Networks, optimizers and temperature: everything needed to continue learning."""
        return {
            "networks": {k: v.state_dict() for k, v in self.networks().items()},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers().items()},
            "log_alpha": self.log_alpha.detach().clone(),
        }

    def seed_state_dict(self, seed: int = 0) -> dict:
        return self.state_dict()

    def nonfinite_parameters(self, seed: int = 0) -> list[str]:
        """Names of parameters (network.tensor) holding a NaN or infinity (one host sync)."""
        named = [(f"{k}.{n}", p) for k, net in self.networks().items() for n, p in net.state_dict().items()]
        named.append(("log_alpha", self.log_alpha))
        flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()
        return [name for (name, _), ok in zip(named, flags, strict=True) if not ok]

    def load_state_dict(self, state: dict) -> None:
        for k, net in self.networks().items():
            net.load_state_dict(state["networks"][k])
        for k, opt in self.optimizers().items():
            if k in state.get("optimizers", {}):
                opt.load_state_dict(state["optimizers"][k])
                match_optimizer_layout(opt)
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])


# ---------------------------------------------------------------------------------------------------------------
class GroupAgent(Update):
    """N seeds of one configuration learning in lockstep: `Update`'s losses and order run once for all seeds,
    under torch.vmap over their parameters stacked on a leading seed axis (torch.func.stack_module_state's layout),
    each seed's noise drawn from its own generator outside vmap in the order a single agent draws it.

    Built from N `SacAeAgent`s (their weights, optimizer states, temperatures) and N generators. Adam runs on the
    stacked tensors: torch's fused Adam is elementwise, so seed i's slice gets exactly what its own optimizer
    would compute. `update` takes a Batch whose tensors have the seed axis first; `act` one observation per seed;
    `seed_state_dict(i)` gives seed i's state in `SacAeAgent.state_dict()`'s format.
    """

    def __init__(self, agents: Sequence[SacAeAgent], generators: Sequence[torch.Generator]):
        if not agents or len(agents) != len(generators):
            raise ValueError("a group needs one generator per agent, and at least one agent")
        template = agents[0]
        cfg = template.cfg
        if any(dataclasses.replace(a.cfg, seed=cfg.seed, work_dir=cfg.work_dir) != cfg for a in agents[1:]):
            raise ValueError("the agents of a group must share one configuration (seeds aside)")
        self.cfg, self.device = cfg, template.device
        self.num_seeds = len(agents)
        self.action_dim, self.discount = template.action_dim, template.discount
        self.target_entropy, self.autocast_enabled = template.target_entropy, template.autocast_enabled
        self.has_decoder = template.has_decoder
        self.generators = list(generators)
        self.template = template
        names = {id(p): name for name, p in template.nets.named_parameters()}  # tied convs: one name
        self._names = names
        # Every name of every parameter (the tied convs under the actor's and the critic's) with its stacked
        # tensor's name.
        self._aliases = {name: names[id(p)] for name, p in template.nets.named_parameters(remove_duplicate=False)}
        self._layout = {
            k: [(n, names[id(p)]) for n, p in net.named_parameters()] for k, net in template.networks().items()
        }
        # One seed's modules: the structure functional_call fills with seed i's parameters. Untied: torch 2.13
        # restores a module reached by two paths wrongly after functional_call, so each path gets its own module
        # and the stacked conv tensors are given under both names.
        self.nets = copy.deepcopy(template.nets)
        if cfg.encoder_type == "pixel":
            self.nets.actor.encoder.convs = copy.deepcopy(self.nets.critic.encoder.convs)
        per_agent = [dict(a.nets.named_parameters()) for a in agents]
        self.params: dict[str, torch.Tensor] = {}
        for name in names.values():
            stacked = torch.stack([d[name].detach() for d in per_agent]).contiguous()
            self.params[name] = stacked.requires_grad_(not name.startswith("critic_target."))
        self.log_alpha = torch.stack([a.log_alpha.detach() for a in agents]).contiguous().requires_grad_(True)
        self._build_optimizers([a.optimizers() for a in agents])
        self.metrics = Metrics(self.device, self.num_seeds)
        self.compiled = template.compiled
        self._compiled: dict[tuple, Callable] = {}  # loss function and constants -> its compiled call
        self._compiled_parts: set[tuple[bool, bool, bool]] = set()  # updates that have run compiled
        self.training = True

    def _stacked(self, params) -> list[torch.Tensor]:
        """The group's tensors for the template agent's parameters `params`."""
        out = []
        for p in params:
            out.append(self.log_alpha if p is self.template.log_alpha else self.params[self._names[id(p)]])
        return out

    def _index_parameter_lists(self, t) -> None:
        """The stacked tensors of the template agent `t`'s parameter lists that the update steps through."""
        self._actor_own_params = self._stacked(t._actor_own_params)
        self._q_params = self._stacked(t._q_params)
        self._q_target_params = self._stacked(t._q_target_params)
        self._enc_params = self._stacked(t._enc_params)
        self._enc_target_params = self._stacked(t._enc_target_params)

    def _build_optimizers(self, per_seed: list[dict[str, torch.optim.Optimizer]]) -> None:
        """Fused Adam over the stacked tensors with the template's parameter sets and hyperparameters, holding the
        seeds' Adam states stacked (all at one step count: the seeds update in lockstep)."""
        t = self.template
        self.optimizer = {}
        for name, opt in t.optimizers().items():
            params = self._stacked(p for group in opt.param_groups for p in group["params"])
            (group,) = opt.param_groups
            adam = torch.optim.Adam(params, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                    weight_decay=group["weight_decay"], fused=True)  # fmt: skip
            states = [o[name].state_dict() for o in per_seed]
            stacked_state = {}
            for j, s in states[0]["state"].items():
                steps = {float(st["state"][j]["step"]) for st in states}
                if len(steps) != 1:
                    raise ValueError(f"the seeds' {name} optimizers are at different steps ({sorted(steps)})")
                stacked_state[j] = {
                    "step": s["step"].clone(),
                    "exp_avg": torch.stack([st["state"][j]["exp_avg"] for st in states]),
                    "exp_avg_sq": torch.stack([st["state"][j]["exp_avg_sq"] for st in states]),
                }
            adam.load_state_dict({"state": stacked_state, "param_groups": states[0]["param_groups"]})
            match_optimizer_layout(adam)
            self.optimizer[name] = adam
        self._index_parameter_lists(t)

    def _optimizer_list(self) -> list[torch.optim.Optimizer]:
        return list(self.optimizer.values())

    def train(self, training: bool = True) -> None:
        self.training = training  # the networks have no dropout or batch norm: the flag only mirrors SacAeAgent

    # ------------------------------------------------------- the update's hooks: vmap over the stacked parameters
    def _call(self, fn: Callable, *args, constants: tuple[str, ...] = ()):
        return self._loss(fn, functools.partial(self._vmapped, fn, constants), constants)(*args)

    def _vmapped(self, fn: Callable, constants: tuple[str, ...], *args):
        params = self.params
        if constants:
            params = {k: (v.detach() if k.startswith(constants) else v) for k, v in params.items()}
        params = {alias: params[name] for alias, name in self._aliases.items()}

        def one_seed(p, *a):
            return functional_call(self.nets, p, (fn, *a))

        return vmap(one_seed)(params, *args)

    def _draw(self, draw: Callable, shape: tuple[int, ...], **kw) -> torch.Tensor:
        return torch.stack([draw(shape, generator=g, device=self.device, **kw) for g in self.generators])

    def _normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(torch.randn, shape, dtype=self._noise_dtype)

    def _uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(torch.rand, shape)

    def _step(self, names: tuple[str, ...], loss: torch.Tensor, inputs: list[torch.Tensor] | None = None) -> None:
        # d(sum of the seeds' losses)/d(seed i's parameters) = d(loss i)/d(seed i's parameters): no seed's gradient
        # sees another seed.
        optimizers = [self.optimizer[name] for name in names]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss.sum(), inputs=inputs)
        for opt in optimizers:
            opt.step()

    def _seed_shape(self, t: torch.Tensor) -> tuple[int, ...]:
        return tuple(t.shape[1:])

    def _seed_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).mean(1)

    def _normalise(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.float().div_(255.0) if not obs.is_floating_point() else obs

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: np.ndarray, sample: bool) -> np.ndarray:
        """One action per seed, (N, action_dim), from one observation per seed (N, *obs_shape)."""
        x = torch.as_tensor(obs, device=self.device).unsqueeze(1)
        with self._autocast():
            if sample:
                noise = self._normal((1, self.action_dim))
                action = self._call(functools.partial(policy_action, sample=True), x, noise)
            else:
                action = self._call(lambda nets, o: policy_action(nets, o, None, sample=False), x)
        return action.float().cpu().numpy()[:, 0]

    def act_seeds(self, obs: Sequence[np.ndarray], sample: bool) -> list[np.ndarray]:
        return list(self.act(np.stack(obs), sample))

    def update_seeds(self, batches: Sequence[Batch], step: int) -> None:
        self.update(stack_batches(batches), step)

    # ---------------------------------------------------------------------------------------------------------
    def seed_state_dict(self, seed: int) -> dict:
        """Seed `seed`'s networks, optimizers and temperature in `SacAeAgent.state_dict()`'s format."""
        networks = {}
        for k, layout in self._layout.items():
            networks[k] = {n: self.params[name][seed].detach().clone() for n, name in layout}
        optimizers = {}
        for name, opt in self.optimizer.items():
            full = opt.state_dict()
            state = {}
            for j, s in full["state"].items():
                state[j] = {k: (v.clone() if k == "step" else v[seed].clone()) for k, v in s.items()}
            optimizers[name] = {"state": state, "param_groups": copy.deepcopy(full["param_groups"])}
        return {"networks": networks, "optimizers": optimizers, "log_alpha": self.log_alpha[seed].detach().clone()}

    def unstack(self) -> list[dict]:
        """Every seed's state, in `SacAeAgent.state_dict()`'s format."""
        return [self.seed_state_dict(i) for i in range(self.num_seeds)]

    def nonfinite_parameters(self, seed: int) -> list[str]:
        """Names of seed `seed`'s parameters (network.tensor) holding a NaN or infinity (one host sync)."""
        named = [(f"{k}.{n}", name) for k, layout in self._layout.items() for n, name in layout]
        flags = [torch.isfinite(self.params[name][seed].detach()).all() for _, name in named]
        flags.append(torch.isfinite(self.log_alpha[seed].detach()))
        ok = torch.stack(flags).tolist()
        return [name for name, fine in zip([n for n, _ in named] + ["log_alpha"], ok, strict=True) if not fine]

    def keep(self, seeds: Sequence[int]) -> None:
        """Go on with the seeds `seeds` only (indices into the group, in that order): every stacked tensor, Adam
        state, metrics row and generator of the others is dropped (a seed that failed)."""
        index = torch.tensor(list(seeds), device=self.device)
        states = {name: opt.state_dict() for name, opt in self.optimizer.items()}
        for name, t in list(self.params.items()):
            self.params[name] = t.detach()[index].clone().requires_grad_(t.requires_grad)
        self.log_alpha = self.log_alpha.detach()[index].clone().requires_grad_(True)
        self.num_seeds = len(seeds)
        self.generators = [self.generators[i] for i in seeds]
        self.metrics.keep(seeds)
        self._compiled_parts.clear()  # new tensors: the next updates compile again, from a saved state
        t = self.template
        self.optimizer = {}
        for name, opt in t.optimizers().items():
            params = self._stacked(p for group in opt.param_groups for p in group["params"])
            adam = torch.optim.Adam(params, fused=True)
            state = states[name]
            for s in state["state"].values():
                for k in ("exp_avg", "exp_avg_sq"):
                    s[k] = s[k][index].clone()
            adam.load_state_dict(state)
            match_optimizer_layout(adam)
            self.optimizer[name] = adam
        self._index_parameter_lists(t)


def compile_mode(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the update runs compiled: --compile on, or auto where it has been measured exact and faster (nowhere
    yet: see docs/performance.md)."""
    return cfg.compile == "on"


def compile_update(fn: Callable, device: torch.device) -> Callable:
    """`fn` under torch.compile: Inductor's kernels, and on a GPU CUDA graphs (mode reduce-overhead) that replay the
    update's kernels without launching them one by one. Shapes are static (one batch size per run).

    torch.compile wraps every callable that is not a plain function in one shared wrapper, whose compiled forms
    share one cache: four loss functions per agent, and several agents in one process (a benchmark, a test), need
    more than its default 8 entries, beyond which Dynamo would run the losses uncompiled."""
    limit = 16 * len(UPDATE_LOSSES)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    return torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


def compile_error(e: BaseException) -> str:
    """An exception of the compiler in one short line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def stack_batches(batches: Sequence[Batch]) -> Batch:
    """N batches -> one Batch whose tensors have the seed axis first."""
    return Batch(*(torch.stack(parts) for parts in zip(*batches, strict=True)))


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


def like_param(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`t` with `param`'s strides (itself when they already agree). Fused Adam walks parameter, gradient and moments
    as flat memory, so all of them must share one layout (channels-last conv weights included): torch does not check
    this on a CPU and would silently pair up different elements."""
    if t.stride() == param.stride():
        return t
    return torch.empty_like(param, dtype=t.dtype).copy_(t)


def match_optimizer_layout(opt: torch.optim.Optimizer) -> None:
    """Give every loaded moment its parameter's layout (a state saved from differently laid-out tensors loads as
    saved). Gradients need nothing: autograd accumulates .grad in the parameter's layout."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = like_param(state[key], p)


@contextlib.contextmanager
def frozen(params: list[torch.Tensor]):
    """Parameters that operations inside the block treat as constants (requires_grad off, then as it was)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def polyak(target: list[torch.Tensor], source: list[torch.Tensor], tau: float) -> None:
    """target <- tau * source + (1 - tau) * target, for whole lists at once."""
    if not target:
        return
    torch._foreach_mul_(target, 1.0 - tau)
    torch._foreach_add_(target, source, alpha=tau)
