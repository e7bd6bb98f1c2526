"""Several seeds of one configuration trained in one process: `sacae train-seeds` is the training loop
(`sacae.trainer.Trainer`) run for a group of seeds, whose networks learn together in one `sacae.agent.GroupAgent`.
docs/multiseed.md gives the design, the tests and the figures."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from sacae.agent import GroupAgent, SacAeAgent, seed_generator, stack_batches
from sacae.config import CONFIGURATIONS, TrainConfig
from sacae.replay import Batch, random_batch
from sacae.trainer import Trainer, check_group_config, seed_dir, select_device

__all__ = ["check_multiseed_config", "seed_dir", "time_updates", "train_seeds"]

check_multiseed_config = check_group_config


def train_seeds(cfg: TrainConfig, seeds: Sequence[int], runs_dir: str | Path = "runs") -> None:
    """Train `seeds` of the configuration `cfg` in this process, into RUNS_DIR/<task>/<configuration>/seed_<i>/;
    running it again resumes them. With `cfg.resume` (a group's folder, or one seed's) the group there resumes from
    its saved configuration: `seeds` of it, or every seed there when `seeds` is empty."""
    Trainer(cfg, seeds=list(seeds), runs_dir=runs_dir).run()


def time_updates(
    configuration: str = "sac_states",
    num_seeds: int = 4,
    updates: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    obs_dim: int = 17,
    action_dim: int = 6,
    **overrides,
) -> dict[str, float]:
    """Median seconds of one SacAeAgent update and of one GroupAgent update of `num_seeds` seeds, timed in turn on
    random batches of the real shapes (state vectors of `obs_dim`, or 9x84x84 frame stacks; cheetah's sizes by
    default), and the seed-updates per second of each."""
    cfg = TrainConfig(**{**CONFIGURATIONS[configuration], **overrides})
    dev = select_device(device)
    obs_shape = (3 * cfg.frame_stack, cfg.image_size, cfg.image_size) if cfg.pixels else (obs_dim,)
    agents, generators = [], []
    for seed in range(1, num_seeds + 1):
        torch.manual_seed(seed)
        agents.append(SacAeAgent(obs_shape, action_dim, cfg, dev))
        generators.append(seed_generator(seed, dev))
    single = copy.deepcopy(agents[0])
    group = GroupAgent(agents, generators)

    def batch() -> Batch:
        return random_batch(cfg.pixels, obs_shape, action_dim, cfg.batch_size, dev)

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    single_s, group_s = [], []
    for i in range(warmup + updates):
        step = 1000 + i  # odd and even updates alike
        one, many = batch(), stack_batches([batch() for _ in range(num_seeds)])
        t_single = timed(lambda: single.update(one, step))  # noqa: B023 (called at once)
        t_group = timed(lambda: group.update(many, step))  # noqa: B023
        if i >= warmup:
            single_s.append(t_single)
            group_s.append(t_group)
    single_median, group_median = statistics.median(single_s), statistics.median(group_s)
    return {
        "num_seeds": num_seeds,
        "single_update_s": single_median,
        "group_update_s": group_median,
        "single_seed_updates_per_s": 1 / single_median,
        "group_seed_updates_per_s": num_seeds / group_median,
        "per_seed_speedup": num_seeds * single_median / group_median,
    }
