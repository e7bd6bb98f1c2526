"""The training process keeps the memory it frees: an update reuses what the previous one freed instead of faulting
fresh pages in."""

import json
import os
import subprocess
import sys

import pytest

# Pixel SAC+AE updates at the default sizes (batch 128 of 9 x 84 x 84: each float32 copy of it is 31 MiB) on random
# frames; the probe reports the page faults of the last two.
PROBE = """
import json, resource
import torch
from sacae.agent import SacAeAgent
from sacae.config import TrainConfig
from sacae.process import configure_process, keep_freed_memory
from sacae.replay import Batch

configure_process(1)
kept = keep_freed_memory()  # whether configure_process could keep freed memory (idempotent)
torch.manual_seed(0)
agent = SacAeAgent((9, 84, 84), 1, TrainConfig(hidden_dim=64), torch.device("cpu"))
obs, next_obs = (torch.randint(0, 256, (128, 9, 84, 84), dtype=torch.uint8) for _ in range(2))
batch = Batch(obs, torch.rand(128, 1) * 2 - 1, torch.rand(128, 1), next_obs, torch.ones(128, 1))
for step in range(2):
    agent.update(batch, step)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(2, 4):
    agent.update(batch, step)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2
print(json.dumps({"kept": kept, "faults": faults, "threads": torch.get_num_threads()}))
"""


def probe(**env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_batches_are_reused_without_page_faults():
    kept = probe()
    plain = probe(SACAE_KEEP_FREED_MEMORY="0")
    assert kept["kept"] and not plain["kept"]
    assert kept["threads"] == plain["threads"] == 1
    batch_pages = 128 * 9 * 84 * 84 * 4 // 4096  # 7,938 pages of 4 KiB
    # glibc's defaults hand freed batches back to the kernel: each update faults several batches in again.
    assert plain["faults"] > 2 * batch_pages
    # Kept, the memory freed by one update serves the next.
    assert kept["faults"] < plain["faults"] / 4
