#!/usr/bin/env python
"""The authors' release's command line: `python train.py --domain_name cheetah --task_name run ...`.

Accepts the old flags with their old meanings; step flags (--num_train_steps, --init_steps, --eval_freq) count
agent steps. It is the same configuration as `sacae train`.
"""

import os
import sys

import tyro

from sacae.cli import DEBUG_VARIABLE, run_guarded, train
from sacae.config import TrainConfig

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--debug" in args:
        args.remove("--debug")
        os.environ[DEBUG_VARIABLE] = "1"
    cfg = tyro.cli(TrainConfig, args=args, use_underscores=True, prog="train.py")
    sys.exit(run_guarded(lambda: train(cfg), "train.py"))
