"""A plain SAC+AE update written as the authors' release writes it: every network pass run separately, losses
read back to the host each step. It is the yardstick for the agent's fast update: tests check that both give the
same parameters, and `sacae bench` times both on the same machine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sacae.agent import SacAeAgent
from sacae.replay import Batch


def reference_update(agent: SacAeAgent, batch: Batch, step: int) -> dict[str, float]:
    """One SAC+AE update on `agent`'s networks and optimizers, in the authors' order; returns its losses."""
    cfg = agent.cfg
    obs, action, reward, next_obs, not_done = batch
    losses = {}
    # critic
    with torch.no_grad():
        _, policy_action, log_pi, _ = agent.actor(next_obs)
        target_q1, target_q2 = agent.critic_target(next_obs, policy_action)
        target_v = torch.min(target_q1, target_q2) - agent.log_alpha.exp().detach() * log_pi
        target_q = reward + not_done * cfg.discount * target_v
    current_q1, current_q2 = agent.critic(obs, action)
    critic_loss = F.mse_loss(current_q1, target_q) + F.mse_loss(current_q2, target_q)
    agent.critic_optimizer.zero_grad()
    critic_loss.backward()
    agent.critic_optimizer.step()
    losses["critic_loss"] = critic_loss.item()
    # actor and temperature
    if step % cfg.actor_update_freq == 0:
        _, pi, log_pi, _ = agent.actor(obs, detach_encoder=True)
        actor_q1, actor_q2 = agent.critic(obs, pi, detach_encoder=True)
        actor_loss = (agent.log_alpha.exp().detach() * log_pi - torch.min(actor_q1, actor_q2)).mean()
        agent.actor_optimizer.zero_grad()
        actor_loss.backward()
        agent.actor_optimizer.step()
        agent.log_alpha_optimizer.zero_grad()
        alpha_loss = (agent.log_alpha.exp() * (-log_pi - agent.target_entropy).detach()).mean()
        alpha_loss.backward()
        agent.log_alpha_optimizer.step()
        losses["actor_loss"] = actor_loss.item()
        losses["alpha_loss"] = alpha_loss.item()
    # target critic
    if step % cfg.critic_target_update_freq == 0:
        for net, target_net, tau in (
            (agent.critic.Q1, agent.critic_target.Q1, cfg.critic_tau),
            (agent.critic.Q2, agent.critic_target.Q2, cfg.critic_tau),
            (agent.critic.encoder, agent.critic_target.encoder, cfg.encoder_tau),
        ):
            for param, target_param in zip(net.parameters(), target_net.parameters(), strict=True):
                target_param.data.copy_(tau * param.data + (1 - tau) * target_param.data)
    # autoencoder
    if agent.decoder is not None and step % cfg.decoder_update_freq == 0:
        h = agent.critic.encoder(obs)
        target_obs = torch.floor(obs.float() / 8) / 32  # 5 bits
        target_obs = target_obs + torch.rand_like(target_obs) / 32 - 0.5
        rec_loss = F.mse_loss(agent.decoder(h), target_obs)
        loss = rec_loss + cfg.decoder_latent_lambda * (0.5 * h.pow(2).sum(1)).mean()
        agent.encoder_optimizer.zero_grad()
        agent.decoder_optimizer.zero_grad()
        loss.backward()
        agent.encoder_optimizer.step()
        agent.decoder_optimizer.step()
        losses["ae_loss"] = rec_loss.item()
        losses["ae_total_loss"] = loss.item()
    return losses
