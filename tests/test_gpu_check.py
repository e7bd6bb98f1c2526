"""tools/gpu/check.sh, the one command that takes every GPU figure, run here on the CPU at tiny sizes (--device cpu
--tiny): every part runs under its own limit and reports a status, a part that fails or runs out of time does not
stop the later ones, and the summary (a table and one JSON line, also OUT/summary.json) holds each part's figures.
The figures prove the plumbing only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHECK = ROOT / "tools" / "gpu" / "check.sh"
PARTS = ["pytest", "bench", "bench_compiled", "group", "learning"]
LOGS = {"config.json", "train.log", "eval.log", "status.json"}


def run_check(out: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 900):
    """check.sh --device cpu --tiny ARGS with OUT=out and this Python; returns the process, the summary JSON (the
    last line of its output) and the table before it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SACAE_CHECK_", "SACAE_CUDA_TESTS_ON_CPU"))}
    full_env.update({"OUT": str(out), "PYTHON": sys.executable, **(env or {})})
    result = subprocess.run(["bash", str(CHECK), "--device", "cpu", "--tiny", *args], cwd=ROOT, env=full_env,
                            capture_output=True, text=True, timeout=timeout)  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    summary = json.loads(lines[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    return result, summary, "\n".join(lines[:-1])


def archive_names(out: Path) -> list[str]:
    with tarfile.open(out / "learning.tgz") as tar:
        return tar.getnames()


def assert_learning_logs(out: Path, summary: dict, seeds=(1, 2)) -> None:
    """Each seed's logs (and nothing else) in learning.tgz; only those stay under OUT."""
    names = archive_names(out)
    for seed in seeds:
        folder = f"./cartpole_swingup/sac_ae/seed_{seed}"
        assert {f"{folder}/{name}" for name in LOGS} <= set(names), names
    assert {Path(name).name for name in names} <= LOGS, names
    assert {p.name for p in (out / "runs").rglob("*") if p.is_file()} <= LOGS
    f = summary["parts"]["learning"]["figures"]
    assert f["seeds"] == f["seeds_with_eval"] == f["archive_eval_logs"] == len(seeds)
    assert f["env_steps_min"] > 0 and "0" in f["eval_mean_by_env_steps"]


def test_a_failing_or_slow_part_is_reported_and_the_later_parts_still_run(tmp_path):
    out = tmp_path / "out"
    env = {"SACAE_CHECK_FAIL": "pytest,bench_compiled,group", "SACAE_CHECK_LIMIT_BENCH": "1"}
    result, summary, table = run_check(out, "--budget", "400", env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    parts = summary["parts"]
    assert list(parts) == PARTS
    statuses = {name: parts[name]["status"] for name in PARTS}
    assert statuses == {"pytest": "failed", "bench": "timeout", "bench_compiled": "failed", "group": "failed",
                        "learning": "ok"}, statuses  # fmt: skip
    assert "failed on purpose" in parts["pytest"]["error"]
    assert parts["bench"]["rc"] == 124 and parts["bench"]["limit_s"] == 1 and parts["bench"]["seconds"] < 20
    for name in PARTS:
        assert (out / f"{name}.out").exists() and (out / f"{name}.err").exists(), name
        assert any(line.split()[:2] == [name, statuses[name]] for line in table.splitlines()), (name, table)
    # The learning run after them: two seeds, 320 env steps each, finished; their logs packed.
    learning = parts["learning"]
    assert learning["rc"] == 0 and learning["figures"]["finished_seeds"] == 2
    assert learning["figures"]["env_steps_min"] == learning["figures"]["env_steps_max"] == 320
    assert_learning_logs(out, summary)
    assert summary["check"] == {**summary["check"], "device": "cpu", "tiny": True, "budget_s": 400}
    assert "plumbing" in summary["note"] and "targets:" in table
    assert [t["met"] for t in summary["targets"]][1:3] == [None, None]  # cheetah_run and the group: not measured


@pytest.mark.slow
def test_every_part_runs_at_tiny_sizes_and_reports_its_figures(tmp_path):
    """All five parts at tiny sizes; the learning run (made longer than the budget) is stopped by SIGTERM before the
    budget ends, checkpoints and exits 143. Takes the whole budget: 300 s."""
    out = tmp_path / "out"
    result, summary, table = run_check(out, "--budget", "300", env={"SACAE_CHECK_LEARN_STEPS": "100000"})
    parts = summary["parts"]
    assert {name: parts[name]["status"] for name in PARTS} == dict.fromkeys(PARTS, "ok"), result.stderr[-3000:]
    assert result.returncode == 0
    for name in PARTS:
        e = parts[name]
        assert 0 < e["seconds"] <= e["limit_s"] + 16 and e["limit_s"] > 0, name
    assert sum(parts[name]["seconds"] for name in PARTS) < 300

    f = parts["pytest"]["figures"]  # no GPU here: the CUDA tests are collected and skip, saying why
    assert f["collected"] > 0 and f["skipped"] == f["collected"] and "CUDA" in f["skip_reasons"][0]

    f = parts["bench"]["figures"]
    assert not f["partial"]
    assert set(f["update_ms"]) == {f"{c} {p} compile off" for c in ("sac_ae", "sac_pixel", "sac_states")
                                   for p in ("fp32", "bf16")}  # fmt: skip
    assert all(v > 0 for v in f["update_ms"].values()) and f["update_reference_ms"]["sac_ae fp32"] > 0
    assert f["env_step_ms"] > 0 and 0 < f["env_physics_ms"] < f["env_step_ms"] and f["env_render_ms"] > 0
    assert f["train_task"] == f["train_overlap_task"] == "cheetah_run"
    for key in ("train_agent_steps_per_s", "train_ms_per_agent_step", "train_overlap_ms_per_agent_step"):
        assert f[key] > 0, key
    assert f["peak_rss_gb"] > 0

    f = parts["bench_compiled"]["figures"]
    assert set(f["update_ms"]) == {"sac_ae fp32 compile on"} and f["update_ms"]["sac_ae fp32 compile on"] > 0

    f = parts["group"]["figures"]
    assert set(f["group_agent_steps_per_s"]) == {"1", "2"} and all(v > 0 for v in f["group_agent_steps_per_s"].values())

    learning = parts["learning"]
    assert learning["rc"] == 143 and learning["figures"]["states"] == ["stopped"]
    assert_learning_logs(out, summary)

    lines = table.splitlines()
    assert [line.split()[0] for line in lines[2:7]] == PARTS
    assert lines[7] == "targets:" and len(lines) == 12
