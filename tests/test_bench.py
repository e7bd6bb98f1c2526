"""A smoke run of `sacae bench` at tiny sizes: it measures every figure it promises (benchmarks are not timed here)."""

import json

from sacae.bench import BenchArgs
from sacae.cli import main

TINY = ["--updates", "3", "--warmup", "1", "--env_steps", "3", "--train_steps", "2", "--batch_size", "8",
        "--hidden_dim", "16", "--num_filters", "4"]  # fmt: skip


def test_bench_prints_a_table_and_a_json_line(capsys):
    assert main(["bench", *TINY]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    table = "\n".join(out[:-1])
    assert set(result["update"]) == {"sac_ae", "sac_pixel", "sac_states"}
    for name, s in result["update"].items():
        assert s["n"] == 3 and 0 < s["min_s"] <= s["median_s"] <= s["max_s"], name
        assert f"update {name} (s)" in table
    assert result["update_reference"]["sac_ae"]["n"] == 3 and "authors' style" in table and "speed-up" in table
    assert result["env"]["step"]["n"] == 3 and result["env"]["render"]["median_s"] > 0
    assert result["env"]["action_repeat"] == 8
    assert result["train"]["agent_steps_per_s"] > 0
    assert result["train"]["env_steps_per_s"] == result["train"]["agent_steps_per_s"] * 8
    assert 21_168 < result["replay_bytes_per_transition"] < 21_400
    assert result["peak_rss_gb"] > 0 and result["threads"] >= 1 and result["precision"] == "fp32"
    assert result["device"] == "cpu" or result["device"].startswith("cuda")


def test_bench_rejects_zero_updates(capsys):
    assert main(["bench", "--updates", "0"]) == 2
    assert "--updates must be at least 1" in capsys.readouterr().err


def test_defaults_are_the_algorithm_sizes():
    args = BenchArgs()
    assert (args.batch_size, args.hidden_dim, args.num_filters, args.image_size) == (128, 1024, 32, 84)
    assert args.updates >= 20
