"""The task testbed and the published returns we compare against, as data shipped with the package.

The testbed is our choice of ten dm_control tasks: the six PlaNet tasks of the SAC+AE paper plus four more of
the same domains and difficulty, each with the action repeat its pixel runs use.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

TESTBED: tuple[tuple[str, int], ...] = (
    ("cartpole_swingup", 8),
    ("reacher_easy", 4),
    ("cheetah_run", 4),
    ("finger_spin", 2),
    ("ball_in_cup_catch", 4),
    ("walker_walk", 2),
    ("walker_run", 2),
    ("walker_stand", 2),
    ("hopper_stand", 4),
    ("reacher_hard", 4),
)


@dataclass(frozen=True)
class PublishedReturn:
    method: str  # sac_ae, sac_pixel or sac_state
    task: str
    action_repeat: int
    env_steps: int
    mean: float
    std: float
    source: str  # curl (Srinivas et al. 2020, Table 1) or drq (Kostrikov et al. 2021, Table 1)


def published_returns() -> list[PublishedReturn]:
    """Every row of the shipped table (evaluation returns at 100k and 500k environment steps)."""
    text = resources.files("sacae.data").joinpath("published_returns.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#"))
    return [
        PublishedReturn(
            r["method"],
            r["task"],
            int(r["action_repeat"]),
            int(r["env_steps"]),
            float(r["mean"]),
            float(r["std"]),
            r["source"],
        )  # fmt: skip
        for r in rows
    ]
