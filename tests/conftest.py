"""Shared test helpers: small configurations that exercise the real code paths quickly on 2 CPU cores."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Unexpected errors show their traceback in every command the tests run (see sacae.cli.run_guarded): a bug never
# hides behind the one sentence a user gets.
os.environ["SACAE_DEBUG"] = "1"

# Small networks: the code paths of the defaults at a fraction of the cost.
SMALL = [
    "--hidden_dim", "64", "--num_filters", "8", "--batch_size", "16", "--encoder_feature_dim", "16",
]  # fmt: skip


def run_cli(args, cwd, env=None, timeout=600):
    """Run `python -m sacae.cli ARGS` (or train.py when args[0] == 'train.py') as a user would."""
    full_env = {**os.environ, **(env or {})}
    if args and args[0] == "train.py":
        cmd = [sys.executable, str(ROOT / "train.py"), *args[1:]]
    else:
        cmd = [sys.executable, "-m", "sacae.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def small_args():
    return list(SMALL)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
