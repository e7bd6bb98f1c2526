"""The SAC+AE agent: acting, and one update of critic, actor, temperature, targets and autoencoder.

The update is the math of ALGORITHM.md in the authors' order (critic step; every 2nd update the actor and
temperature steps and the Polyak update; the autoencoder step), with the work that math makes redundant removed:
after the critic step the tied conv layers run ONCE on the batch, and that one pass serves the actor (detached),
the critic's Q in the actor loss (detached) and the autoencoder, because nothing between them changes the conv
weights. `tests/test_agent.py` checks the result against a plain implementation of the same math.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import numpy as np
import torch
import torch.nn.functional as F

from sacae.config import TrainConfig
from sacae.networks import MEMORY_FORMAT, Actor, Critic, PixelDecoder, make_encoder, normalise_frames, weight_init
from sacae.replay import Batch

METRIC_NAMES = ("batch_reward", "critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy", "ae_loss")


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
    diverging run is caught at the next read without any per-update host synchronisation.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.step = 0  # the update step the next values belong to
        self.first_nonfinite = torch.full((len(METRIC_NAMES),), -1.0, dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=self.device)

    def add(self, name: str, value: torch.Tensor) -> None:
        i = METRIC_NAMES.index(name)
        value = value.detach().to(torch.float64)
        self.sums[i] += value
        self.counts[i] += 1
        seen = self.first_nonfinite[i]
        self.first_nonfinite[i] = torch.where(torch.isfinite(value) | (seen >= 0), seen, float(self.step))

    def nonfinite(self) -> dict[str, int]:
        """{metric: first update step where it was NaN or infinite} (one host sync)."""
        steps = self.first_nonfinite.tolist()
        return {n: int(s) for n, s in zip(METRIC_NAMES, steps, strict=True) if s >= 0}

    def pop(self) -> dict[str, float | None]:
        sums, counts = torch.stack([self.sums, self.counts]).tolist()
        self.reset()
        return {n: (s / c if c else None) for n, s, c in zip(METRIC_NAMES, sums, counts, strict=True)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = ("sums", "counts", "first_nonfinite")
        return {name: getattr(self, name).clone() for name in names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("sums", "counts", "first_nonfinite"):
            setattr(self, name, state[name].to(device=self.device, dtype=torch.float64).clone())


class SacAeAgent:
    """Networks, optimizers and the update. `act` picks actions; `update` learns from one batch."""

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
        self.log_alpha = torch.tensor(np.log(cfg.init_temperature), dtype=torch.float32)
        self._place(device)

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

    def train(self, training: bool = True) -> None:
        self.training = training
        for net in self.networks().values():
            net.train(training)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_enabled)

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: np.ndarray, sample: bool) -> np.ndarray:
        """An action in [-1, 1]: tanh of the mean (evaluation) or a policy sample (collection)."""
        x = torch.as_tensor(obs, device=self.device).unsqueeze(0)
        with self._autocast():
            mu, pi, _, _ = self.actor(x, compute_pi=sample, compute_log_pi=False)
        return (pi if sample else mu).float().cpu().numpy()[0]

    # ---------------------------------------------------------------------------------------------------------
    def update(self, batch: Batch, step: int) -> None:
        """One SAC+AE update on `batch`; `step` decides which of the periodic parts run, as in ALGORITHM.md."""
        cfg = self.cfg
        obs, action, reward, next_obs, not_done = batch
        m = self.metrics
        m.step = step
        m.add("batch_reward", reward.mean())
        frames = obs
        if self.cfg.pixels:
            # Each batch is normalised once; the critic, the actor, the target critic and the conv pass after the
            # critic step would each do it again (four float copies of 31 MiB per update).
            obs, next_obs = normalise_frames(obs), normalise_frames(next_obs)
        with self._autocast():
            self._update_critic(obs, action, reward, next_obs, not_done)

            update_actor = step % cfg.actor_update_freq == 0
            update_ae = self.decoder is not None and step % cfg.decoder_update_freq == 0
            conv = None
            if update_actor or update_ae:
                # The critic step changed the conv weights; this pass, with the new weights, serves the rest of
                # the update (the actor step cannot change them: it sees the conv output detached).
                with torch.set_grad_enabled(update_ae):
                    conv = self.critic.encoder.forward_conv(obs)
            if update_actor:
                self._update_actor_and_alpha(conv.detach())
            if step % cfg.critic_target_update_freq == 0:
                self._update_targets()
            if update_ae:
                self._update_autoencoder(frames, conv)

    def _update_critic(self, obs, action, reward, next_obs, not_done) -> None:
        with torch.no_grad():
            _, next_action, next_log_pi, _ = self.actor(next_obs)
            target_q1, target_q2 = self.critic_target(next_obs, next_action)
            target_v = torch.min(target_q1, target_q2) - self.alpha.detach() * next_log_pi
            target_q = reward + not_done * self.discount * target_v
        q1, q2 = self.critic(obs, action)
        critic_loss = F.mse_loss(q1.float(), target_q.float()) + F.mse_loss(q2.float(), target_q.float())
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()
        self.metrics.add("critic_loss", critic_loss)

    def _update_actor_and_alpha(self, conv: torch.Tensor) -> None:
        features = self.actor.encoder.head(conv)
        _, pi, log_pi, log_std = self.actor.policy(features)
        with torch.no_grad():
            critic_features = self.critic.encoder.head(conv)
        # The Q heads' weights take no gradient from the actor loss: built without them, the graph's backward pass
        # skips their weight products (a custom autograd function cannot tell which gradients `inputs` will keep).
        with frozen(self._q_params):
            q1, q2 = self.critic.q(critic_features, pi)
        alpha = self.alpha.detach()
        actor_loss = (alpha * log_pi - torch.min(q1, q2)).float().mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        # Only the actor's own parameters: gradients the Q heads would get here are never used.
        torch.autograd.backward(actor_loss, inputs=self._actor_own_params)
        self.actor_optimizer.step()

        entropy = 0.5 * log_std.shape[1] * (1.0 + np.log(2 * np.pi)) + log_std.sum(dim=-1)
        alpha_loss = (self.alpha * (-log_pi - self.target_entropy).detach().float()).mean()
        self.log_alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.log_alpha_optimizer.step()
        m = self.metrics
        m.add("actor_loss", actor_loss)
        m.add("alpha_loss", alpha_loss)
        m.add("alpha", alpha)
        m.add("entropy", entropy.float().mean())

    @torch.no_grad()
    def _update_targets(self) -> None:
        polyak(self._q_target_params, self._q_params, self.cfg.critic_tau)
        polyak(self._enc_target_params, self._enc_params, self.cfg.encoder_tau)

    def _update_autoencoder(self, obs: torch.Tensor, conv: torch.Tensor) -> None:
        h = self.critic.encoder.head(conv)
        target = preprocess_target(obs)
        reconstruction = self.decoder(h)
        rec_loss = F.mse_loss(reconstruction.float(), target)
        latent_loss = (0.5 * h.float().pow(2).sum(1)).mean()
        loss = rec_loss + self.cfg.decoder_latent_lambda * latent_loss
        self.encoder_optimizer.zero_grad(set_to_none=True)
        self.decoder_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.encoder_optimizer.step()
        self.decoder_optimizer.step()
        self.metrics.add("ae_loss", rec_loss)

    # ---------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Networks, optimizers and temperature: everything needed to continue learning."""
        return {
            "networks": {k: v.state_dict() for k, v in self.networks().items()},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers().items()},
            "log_alpha": self.log_alpha.detach().clone(),
        }

    def nonfinite_parameters(self) -> list[str]:
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
