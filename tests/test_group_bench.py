"""`python -m sacae.group_bench`: a group's aggregate agent steps/s in one process and in separate processes, at
tiny sizes."""

import json
import subprocess
import sys

from sacae.group_bench import bench_config, time_group

TINY = ["--image_size", "32", "--num_filters", "4", "--hidden_dim", "32", "--batch_size", "16", "--num_threads", "1"]


def test_time_group_in_process():
    cfg = bench_config(image_size=32, num_filters=4, hidden_dim=32, batch_size=16, num_threads=1, device="cpu")
    one = time_group(cfg, 1, steps=2, warmup=1)
    assert one["num_seeds"] == 1 and one["env_workers"] == "serial" and one["trainer"] == "group"
    assert one["agent_steps_per_s"] > 0 and one["seconds_per_group_step"] > 0
    assert one["env_steps_per_s"] == one["agent_steps_per_s"] * cfg.action_repeat


def test_group_bench_command_in_process_and_separate(tmp_path):
    """N = 2 in one process (its environments in worker processes) and as two separate processes started together;
    --json prints one line that parses."""
    cmd = [sys.executable, "-m", "sacae.group_bench", "--num_seeds", "2", "--separate", "--json", "--steps", "2",
           "--warmup", "1", "--device", "cpu", *TINY]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    (row,) = out["runs"]
    group, separate = row["in_process"], row["separate"]
    assert group["num_seeds"] == 2 and group["env_workers"] == "processes"
    assert group["agent_steps_per_s"] > 0 and group["seconds_per_group_step"] > 0
    assert separate["agent_steps_per_s"] > 0 and separate["agent_steps_per_s_wall"] > 0
    assert len(separate["processes"]) == 2 and all(p["agent_steps_per_s"] > 0 for p in separate["processes"])
    assert row["in_process_over_separate"] > 0
