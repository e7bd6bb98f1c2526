"""The loop's schedule against hand-written expectations (no environment is built)."""

from __future__ import annotations

from sacae.config import TrainConfig
from sacae.schedule import Every, Schedule, Until


def schedule(**overrides) -> Schedule:
    base = dict(task="cartpole_swingup", action_repeat=8, num_train_steps=20, init_steps=4, eval_freq=5)
    return Schedule(TrainConfig(**{**base, **overrides}))


def test_every_and_until():
    assert [t for t in range(13) if Every(4)(t)] == [0, 4, 8, 12]
    assert [t for t in range(5) if Every(1)(t)] == [0, 1, 2, 3, 4]
    assert not any(Every(0)(t) for t in range(5))  # an interval of 0 is off
    assert [Until(3)(t) for t in range(5)] == [True, True, True, False, False]
    assert not Until(0)(0)


def test_training_seed_phase_and_env_steps():
    s = schedule()
    assert [t for t in range(25) if s.training(t)] == list(range(20))
    assert [t for t in range(10) if s.seed_phase(t)] == [0, 1, 2, 3]
    assert [s.env_steps(t) for t in (0, 1, 20)] == [0, 8, 160]


def test_evaluates_at_zero_and_every_eval_freq():
    assert [t for t in range(21) if schedule().evaluates(t)] == [0, 5, 10, 15, 20]


def test_checkpoints_in_agent_steps_from_env_step_flag():
    # Default: at each evaluation but the first (nothing to keep at step 0).
    assert [t for t in range(21) if schedule().checkpoints(t)] == [5, 10, 15, 20]
    # --checkpoint_every counts environment steps: 24 env steps at action repeat 8 are 3 agent steps.
    assert [t for t in range(13) if schedule(checkpoint_every=24).checkpoints(t)] == [3, 6, 9, 12]
    # Fewer env steps than one agent step: every agent step.
    assert [t for t in range(4) if schedule(checkpoint_every=5).checkpoints(t)] == [1, 2, 3]
    # 0: only at the end and when stopped (not by the schedule).
    assert not any(schedule(checkpoint_every=0).checkpoints(t) for t in range(21))


def test_updates_at_burst_and_spread():
    assert [schedule().updates_at(t) for t in range(8)] == [0, 0, 0, 0, 4, 1, 1, 1]
    # The 3 extra updates the burst makes at step 4, one per step from step 4 on.
    assert [schedule(seed_updates="spread").updates_at(t) for t in range(10)] == [0, 0, 0, 0, 2, 2, 2, 1, 1, 1]
    for mode in ("burst", "spread"):  # without a seed phase, nothing to learn from at step 0
        assert [schedule(init_steps=0, seed_updates=mode).updates_at(t) for t in range(3)] == [0, 1, 1]
        assert [schedule(init_steps=1, seed_updates=mode).updates_at(t) for t in range(3)] == [0, 1, 1]
