"""When the training loop does what: act at random, update, evaluate, checkpoint, stop.

Everything here counts AGENT steps (decisions), the unit of --num_train_steps, --init_steps and --eval_freq, as in
the authors' release. One agent step is `action_repeat` environment steps; `Schedule.env_steps` is the one place the
loop turns its clock into the environment steps it prints and logs. The one schedule flag in environment steps,
--checkpoint_every, is turned into agent steps by `TrainConfig.checkpoint_agent_steps` before it reaches here.
"""

from __future__ import annotations

from dataclasses import dataclass

from sacae.config import TrainConfig


@dataclass(frozen=True)
class Until:
    """True before agent step `limit`: `Until(num_train_steps)(agent_steps)` while there is training left."""

    limit: int

    def __call__(self, agent_steps: int) -> bool:
        return agent_steps < self.limit


@dataclass(frozen=True)
class Every:
    """True at every multiple of `interval` agent steps, step 0 included; never for an interval of 0 (off)."""

    interval: int

    def __call__(self, agent_steps: int) -> bool:
        return self.interval > 0 and agent_steps % self.interval == 0


class Schedule:
    """The schedule of one configuration, as predicates of the agent step.

    `training(t)`: the loop has steps left. `seed_phase(t)`: a_t is uniformly random and no update runs.
    `evaluates(t)`: evaluate before acting at step t (step 0, then every eval_freq). `checkpoints(t)`: write a
    checkpoint before acting at step t (every checkpoint interval, not at step 0, where there is nothing to keep).
    `updates_at(t)`: how many updates step t runs.
    """

    def __init__(self, cfg: TrainConfig):
        self.action_repeat = cfg.action_repeat
        self.init_steps = cfg.init_steps
        self.seed_updates = cfg.seed_updates
        self.training = Until(cfg.num_train_steps)
        self.seed_phase = Until(cfg.init_steps)
        self.evaluates = Every(cfg.eval_freq)
        self._every_checkpoint = Every(cfg.checkpoint_agent_steps)

    def checkpoints(self, agent_steps: int) -> bool:
        return agent_steps > 0 and self._every_checkpoint(agent_steps)

    def env_steps(self, agent_steps: int) -> int:
        """Environment (simulator) steps done after `agent_steps` agent steps."""
        return agent_steps * self.action_repeat

    def updates_at(self, agent_steps: int) -> int:
        """How many updates run at this agent step: none in the seed phase (nor at step 0, with nothing stored yet);
        the init_steps updates the seed phase owes, either all at the first step after it ("burst", the authors'
        release) or as one extra update per step from there until they are made up ("spread"); then one per step."""
        init = self.init_steps
        if self.seed_phase(agent_steps) or agent_steps == 0:
            return 0
        if self.seed_updates == "burst":
            return init if agent_steps == init else 1
        return 2 if agent_steps < 2 * init - 1 else 1
