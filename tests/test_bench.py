"""A smoke run of `sacae bench` at tiny sizes: it measures every figure it promises (benchmarks are not timed here)."""

import json
import sys
import types

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


def test_bench_times_update_variants_the_physics_and_training_on_another_task(tmp_path, capsys):
    partial = tmp_path / "partial.json"
    args = [*TINY, "--image_size", "32", "--configurations", "sac_states", "--no_reference", "--compile", "off",
            "--precisions", "fp32", "bf16", "--compile_modes", "off", "--train_task", "cheetah_run",
            "--partial", str(partial)]  # fmt: skip
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    table = "\n".join(out[:-1])
    assert result["compile"] == "off" and result["measured"] == ["update", "env", "train"]
    assert set(result["update"]) == {"sac_states"} and result["update_reference"] == {}
    # The bench's own precision and compile setting is "update"; the other combinations are variants.
    assert set(result["update_variants"]) == {"bf16 compile off"}
    bf16 = result["update_variants"]["bf16 compile off"]["sac_states"]
    assert bf16["n"] == 3 and 0 < bf16["min_s"] <= bf16["median_s"] and "update sac_states bf16 compile off" in table
    env = result["env"]
    assert env["physics"]["n"] == 3 and 0 < env["physics"]["median_s"] and "physics inside it" in table
    assert result["train"]["task"] == result["train_overlap"]["task"] == "cheetah_run"
    assert result["train"]["action_repeat"] == 4 and result["train_task"] == "cheetah_run"
    assert "ms per agent step (cheetah_run)" in table
    assert json.loads(partial.read_text()) == result


def test_bench_group_seeds_call_the_group_bench(monkeypatch, capsys):
    """--group_seeds times each seed count with sacae.group_bench.time_group (replaced here by a stand-in that
    records its calls); --only takes that measurement alone."""
    calls = []

    def time_group(cfg, num_seeds, steps=10, warmup=3):
        calls.append((cfg.configuration, cfg.env_name, cfg.batch_size, num_seeds, steps, warmup))
        return {"num_seeds": num_seeds, "agent_steps_per_s": 10.0 * num_seeds, "env_steps_per_s": 40.0 * num_seeds,
                "seconds_per_group_step": 0.1}  # fmt: skip

    monkeypatch.setitem(sys.modules, "sacae.group_bench", types.SimpleNamespace(time_group=time_group))
    args = [*TINY, "--only", "group", "--group_seeds", "1", "3", "--train_task", "cheetah_run"]
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert calls == [("sac_ae", "cheetah_run", 8, 1, 2, 1), ("sac_ae", "cheetah_run", 8, 3, 2, 1)]
    assert result["measured"] == ["group"] and "update" not in result and "train" not in result
    assert result["group"]["3"]["agent_steps_per_s"] == 30.0
    assert "3 seeds in one process: agent steps/s" in "\n".join(out[:-1])


def test_bench_only_group_needs_group_seeds(capsys):
    assert main(["bench", "--only", "group"]) == 2
    assert "--only group needs --group_seeds" in capsys.readouterr().err
