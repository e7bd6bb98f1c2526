#!/usr/bin/env python
"""The authors' release's command line: `python train.py --domain_name cheetah --task_name run ...`.

Accepts the old flags with their old meanings; step flags (--num_train_steps, --init_steps, --eval_freq) count
agent steps. It is the same configuration as `sacae train`.
"""

import sys

import tyro

from sacae.cli import run_guarded, train
from sacae.config import TrainConfig

if __name__ == "__main__":
    cfg = tyro.cli(TrainConfig, use_underscores=True, prog="train.py")
    sys.exit(run_guarded(lambda: train(cfg)))
