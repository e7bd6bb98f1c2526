"""sacae.report on runs written with the trainer's own config and log writers: hand-computed table values, the
missing-seed rules and their notes, the pages and plots, and the CLI's errors."""

import io
import json
import math
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from sacae.cli import main
from sacae.config import EXECUTION_FIELDS, TrainConfig
from sacae.errors import SacaeError
from sacae.logger import Logger
from sacae.process import processor_name
from sacae.report import load_runs, summarize, write_report
from tests.conftest import run_cli

REPS = 200  # bootstrap resamples: enough for the checks, fast on 2 cores


def make_run(
    root: Path,
    task: str,
    configuration: str,
    seed: int,
    returns: dict[int, float],
    eval_freq: int = 1250,
    action_repeat: int = 8,
    num_train_steps: int = 62_500,
    **config: object,
) -> Path:
    """A run folder as the trainer writes it: config.json, eval.log with `returns` ({env_steps: return}) and one
    train.log row per 1000 env steps up to the last evaluation."""
    domain, task_name = task.split("_", 1)
    encoder, decoder = {"sac_ae": ("pixel", "pixel"), "sac_pixel": ("pixel", "identity")}.get(
        configuration, ("identity", "identity")
    )
    cfg = TrainConfig(domain_name=domain, task_name=task_name, action_repeat=action_repeat, seed=seed,
                      encoder_type=encoder, decoder_type=decoder, eval_freq=eval_freq,
                      num_train_steps=num_train_steps, **config)  # fmt: skip
    run_dir = root / task / configuration / f"seed_{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    logger = Logger(run_dir, console=io.StringIO())

    def counters(env_steps: int) -> dict[str, int]:
        return {"episode": env_steps // 1000, "env_steps": env_steps, "agent_steps": env_steps // action_repeat}

    for env_steps, value in returns.items():
        logger.log("eval", {**counters(env_steps), "episode_reward": value, "episode_reward_std": 1.0,
                            "episode_rewards": [value - 1, value + 1], "duration": 36.0})  # fmt: skip
    for env_steps in range(1000, max(returns) + 1, 1000):
        logger.log("train", {**counters(env_steps), "duration": 3.6, "episode_reward": 1.0, "batch_reward": 0.1,
                             "critic_loss": 1 / env_steps, "actor_loss": -env_steps / 1e4, "alpha_loss": 0.1,
                             "alpha": 0.1, "entropy": 1.0, "ae_loss": 0.5 if configuration == "sac_ae" else None,
                             "env_steps_per_second": 250.0})  # fmt: skip
    logger.close()
    return run_dir


def ramp(end: int, at_100k: float, at_500k: float, every: int = 10_000) -> dict[int, float]:
    """Returns every `every` env steps up to `end`, rising linearly, with the given values at 100k and 500k."""
    out = {s: at_100k * s / 100_000 if s <= 100_000 else at_100k + (at_500k - at_100k) * (s - 100_000) / 400_000
           for s in range(0, end + 1, every)}  # fmt: skip
    return out


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """cartpole_swingup: sac_ae with 3 seeds (seed_3 stops at 60k), sac_states with 4 full seeds."""
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "cartpole_swingup", "sac_ae", 1, ramp(500_000, 300, 700))
    # Resumed on other hardware: execution flags do not make it another experiment or another command.
    make_run(root, "cartpole_swingup", "sac_ae", 2, ramp(500_000, 330, 760), num_threads=2, device="cpu")
    make_run(root, "cartpole_swingup", "sac_ae", 3, ramp(60_000, 360, 800))
    for seed, (a, b) in enumerate([(100, 500), (200, 600), (300, 700), (1000, 900)], start=1):
        make_run(root, "cartpole_swingup", "sac_states", seed, ramp(500_000, a, b, every=10_000), eval_freq=10_000,
                 action_repeat=1, num_train_steps=500_000)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def summary(runs_root):
    return summarize(load_runs(runs_root), bootstrap_reps=REPS)


def cell(summary, configuration, env_steps):
    (found,) = [c for c in summary.cells if c.configuration == configuration and c.env_steps == env_steps]
    return found


def test_load_runs_groups_by_task_configuration_and_seed(runs_root):
    runs = load_runs(runs_root)
    assert [(r.task, r.configuration, r.seed) for r in runs] == [
        ("cartpole_swingup", "sac_ae", "seed_1"),
        ("cartpole_swingup", "sac_ae", "seed_2"),
        ("cartpole_swingup", "sac_ae", "seed_3"),
        *[("cartpole_swingup", "sac_states", f"seed_{i}") for i in range(1, 5)],
    ]
    assert load_runs(runs_root / "cartpole_swingup" / "sac_states")[0].method == "sac_states"
    seed_1 = runs[0]
    assert seed_1.eval_interval == 10_000 and seed_1.planned_env_steps == 500_000
    assert math.isclose(seed_1.wall_clock_hours, (51 * 36.0 + 500 * 3.6) / 3600)


def test_mean_and_std_are_the_hand_computed_ones(summary):
    at_100k = cell(summary, "sac_ae", 100_000)
    assert at_100k.values == {"seed_1": 300, "seed_2": 330}
    assert at_100k.mean == pytest.approx(315.0)
    assert at_100k.std == pytest.approx(math.sqrt(((300 - 315) ** 2 + (330 - 315) ** 2) / 1))
    states = cell(summary, "sac_states", 500_000)
    assert states.mean == pytest.approx(675.0)
    assert states.std == pytest.approx(np.std([500, 600, 700, 900], ddof=1))


def test_iqm_drops_the_outer_quartiles_and_lies_in_its_ci(summary):
    states = cell(summary, "sac_states", 100_000)  # 100, 200, 300, 1000
    assert states.iqm == pytest.approx(250.0)
    assert states.mean == pytest.approx(400.0)
    low, high = states.iqm_ci
    assert 100 <= low <= states.iqm <= high <= 1000
    assert states.mean_ci[0] <= states.mean <= states.mean_ci[1]


def test_a_short_seed_is_left_out_and_said(summary):
    at_100k = cell(summary, "sac_ae", 100_000)
    assert at_100k.n == 2 and at_100k.seeds == ("seed_1", "seed_2", "seed_3")
    notes = " ".join(summary.notes["cartpole_swingup"])
    assert "At 100k, sac_ae uses 2 of 3 seeds: seed_3 stops at 60k env steps." in notes
    assert "At 500k, sac_ae uses 2 of 3 seeds" in notes
    assert "sac_ae: the seeds' last evaluations are at different env steps" in notes
    assert "unequal numbers of seeds: sac_ae 3, sac_states 4" in notes


def test_value_at_takes_the_last_evaluation_only_within_one_interval(tmp_path):
    # Action repeat 8, eval_freq 1000: evaluations every 8k env steps, so none at exactly 100k.
    every_8k = {s: float(s) for s in range(0, 104_001, 8000)}
    make_run(tmp_path, "cartpole_swingup", "sac_ae", 1, every_8k, eval_freq=1000)
    make_run(tmp_path, "cartpole_swingup", "sac_ae", 2, {s: float(s) for s in range(0, 88_001, 8000)}, eval_freq=1000)
    runs = load_runs(tmp_path)
    assert runs[0].value_at(100_000) == (96_000, 96_000.0)
    assert runs[1].value_at(100_000) is None  # its last evaluation (88k) is 12k before: more than one interval
    assert runs[1].value_at(88_000) == (88_000, 88_000.0)
    found = summarize(runs, at=(100_000,), bootstrap_reps=REPS)
    notes = " ".join(found.notes["cartpole_swingup"])
    assert "At 100k, sac_ae seed_1 counts its evaluation at 96k env steps (none at exactly 100k)." in notes
    assert "At 100k, sac_ae uses 1 of 2 seeds: seed_2 stops at 88k env steps." in notes


def test_published_numbers_sit_beside_ours(summary):
    published = {(p.method, p.source, p.env_steps): p.mean for p in summary.published}
    assert published[("sac_ae", "curl", 100_000)] == 311
    assert published[("sac_state", "curl", 500_000)] == 848
    labels = {r["configuration"] for r in summary.rows() if r["env_steps"] == 100_000}
    assert {"sac_ae", "sac_states", "published SAC+AE (CURL Table 1)", "published state SAC (CURL Table 1)"} <= labels


def test_resumes_come_from_status_json_or_logs_that_go_back(tmp_path):
    resumed = make_run(tmp_path, "cartpole_swingup", "sac_ae", 1, {0: 1.0, 10_000: 2.0})
    (resumed / "status.json").write_text(json.dumps({"state": "running", "resumes": 2, "elapsed_seconds": 7200}))
    restarted = make_run(tmp_path, "cartpole_swingup", "sac_ae", 2, {0: 1.0, 10_000: 2.0})
    with open(restarted / "eval.log", "a") as f:
        f.write(json.dumps({"episode": 0, "env_steps": 0, "agent_steps": 0, "episode_reward": 5.0}) + "\n")
    make_run(tmp_path, "cartpole_swingup", "sac_ae", 3, {0: 1.0, 10_000: 2.0})
    by_seed = {r.seed: r for r in load_runs(tmp_path)}
    assert (by_seed["seed_1"].resumes, by_seed["seed_1"].resumed, by_seed["seed_1"].state) == (2, True, "running")
    assert by_seed["seed_1"].wall_clock_hours == pytest.approx(2.0)
    assert by_seed["seed_2"].resumed and by_seed["seed_2"].eval_curve()[1][0] == 5.0  # the later row wins
    assert not by_seed["seed_3"].resumed and by_seed["seed_3"].resumes is None


def test_machines_come_from_the_sessions_in_status_json(tmp_path):
    """Each distinct machine once, first use first; sessions before the first recorded one are said to be unknown."""
    gpu = {"gpu": "NVIDIA H100 80GB HBM3", "device": "cuda:0", "threads": 8, "torch": "2.11.0"}
    cpu = {"processor": "AMD EPYC", "cpu_count": 2, "threads": 1, "gpu": None, "device": "cpu", "torch": "2.13.0"}
    sessions = [{**cpu, "from_env_steps": 5000, "to_env_steps": 9000}, {**gpu, "from_env_steps": 9000},
                {**cpu, "from_env_steps": 12000}]  # fmt: skip
    partly = make_run(tmp_path, "cartpole_swingup", "sac_ae", 1, {0: 1.0})
    (partly / "status.json").write_text(json.dumps({"state": "finished", "sessions": sessions}))
    fully = make_run(tmp_path, "cartpole_swingup", "sac_ae", 2, {0: 1.0})
    (fully / "status.json").write_text(json.dumps({"state": "finished", "sessions": [{**cpu, "from_env_steps": 0}]}))
    make_run(tmp_path, "cartpole_swingup", "sac_ae", 3, {0: 1.0})
    by_seed = {r.seed: r for r in load_runs(tmp_path)}
    assert by_seed["seed_1"].machines == [
        "before 5k env steps: not recorded",
        "AMD EPYC (2 cores), 1 thread, torch 2.13.0",
        "NVIDIA H100 80GB HBM3 (cuda:0), torch 2.11.0",
    ]
    assert by_seed["seed_2"].machines == ["AMD EPYC (2 cores), 1 thread, torch 2.13.0"]
    assert by_seed["seed_3"].machines == ["not recorded"]


def test_runs_table_names_each_runs_precision(tmp_path):
    """bf16 runs are told apart from fp32 ones; a config written before the setting existed counts as fp32."""
    make_run(tmp_path, "cartpole_swingup", "sac_pixel", 1, {0: 1.0, 10_000: 2.0}, precision="bf16")
    older = make_run(tmp_path, "cartpole_swingup", "sac_pixel", 2, {0: 1.0, 10_000: 2.0})
    config = json.loads((older / "config.json").read_text())
    del config["precision"]
    (older / "config.json").write_text(json.dumps(config))
    out = write_report(tmp_path, tmp_path / "report", bootstrap_reps=REPS)
    markdown = (out / "report.md").read_text()
    assert "| configuration | seed | precision | last eval (env steps) |" in markdown
    assert "| sac_pixel | seed_1 | bf16 | 10k |" in markdown
    assert "| sac_pixel | seed_2 | fp32 | 10k |" in markdown
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [(r["seed"], r["precision"]) for r in runs] == [("seed_1", "bf16"), ("seed_2", "fp32")]
    assert "seed_2 differs from seed_1 in more than the seed: precision='fp32' (seed_1: 'bf16')." in markdown


def test_notes_page_and_title_place_the_markdown_elsewhere(runs_root, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("## What was checked\n\nThe schedule, against\n[ALGORITHM.md](ALGORITHM.md).\n\n"
                     "- first point\n  continued here\n- second `point`\n\n"
                     "| machine | `sac_ae` update |\n|---|---:|\n| A \\| B | 0.62 s |\n| C |\n")  # fmt: skip
    out, page = tmp_path / "results" / "figures", tmp_path / "results.md"
    argv = ["report", str(runs_root), "--out", str(out), "--bootstrap_reps", str(REPS), "--at", "100000",
            "--notes", str(notes), "--page", str(page), "--title", "Results & more"]  # fmt: skip
    assert main(argv) == 0
    markdown = page.read_text()
    assert not (out / "report.md").exists()
    assert markdown.startswith("# Results & more\n")
    assert f"--notes {notes} --page {page} --title 'Results & more'`" in markdown
    expected = ("## What was checked\n\nThe schedule, against [ALGORITHM.md](ALGORITHM.md).\n\n"
                "- first point continued here\n- second `point`\n\n"
                "| machine | `sac_ae` update |\n|---|---|\n| A \\| B | 0.62 s |\n| C |  |\n\n"
                "## cartpole_swingup")  # fmt: skip
    assert expected in markdown
    assert "![cartpole_swingup returns](results/figures/cartpole_swingup_returns.png)" in markdown
    assert (page.parent / "results/figures/cartpole_swingup_returns.png").is_file()
    html = (out / "report.html").read_text()
    assert "<title>Results &amp; more</title>" in html and "<h1>Results &amp; more</h1>" in html
    assert "<h2>What was checked</h2>" in html and '<a href="ALGORITHM.md">ALGORITHM.md</a>' in html
    assert "<li>second <code>point</code></li>" in html
    assert "<th><code>sac_ae</code> update</th>" in html
    assert '<tr><td>A | B</td><td class="num">0.62 s</td></tr>' in html  # numbers right-aligned, words not


def test_a_missing_notes_file_is_one_sentence(capsys, runs_root, tmp_path):
    line = error_line(capsys, ["report", str(runs_root), "--out", str(tmp_path), "--notes", str(tmp_path / "n.md")])
    assert f"The notes file {tmp_path / 'n.md'} cannot be read" in line
    assert not (tmp_path / "report.md").exists()


def test_a_truncated_last_log_line_is_ignored(tmp_path):
    run_dir = make_run(tmp_path, "cartpole_swingup", "sac_ae", 1, {0: 1.0, 10_000: 2.0})
    with open(run_dir / "eval.log", "a") as f:
        f.write('{"episode": 3, "env_st')
    assert list(load_runs(tmp_path)[0].eval_curve()[0]) == [0, 10_000]


@pytest.fixture(scope="module")
def report_dir(runs_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(runs_root), "--out", str(out), "--bootstrap_reps", str(REPS)]) == 0
    return out


def test_report_writes_pages_plots_and_summary(report_dir, runs_root):
    names = sorted(p.name for p in report_dir.iterdir())
    assert names == ["cartpole_swingup_losses.png", "cartpole_swingup_returns.png", "report.html", "report.md",
                     "summary.json"]  # fmt: skip
    for png in report_dir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (report_dir / "report.md").read_text()
    command = f"sacae report {runs_root} --out {report_dir} --bootstrap_reps {REPS}"
    assert f"Generated by `{command}`" in markdown
    assert "![cartpole_swingup returns](cartpole_swingup_returns.png)" in markdown
    assert "| sac_ae | 2 of 3 | 315.0 | 21.2 | 315.0 [" in markdown
    assert "| published SAC+AE (CURL Table 1) |  | 311 | 11 |  |" in markdown
    assert "seed_3 stops at 60k env steps" in markdown
    assert ("- sac_ae, seeds 1, 2, 3: `sacae train --task cartpole_swingup --num_train_steps 62500 --eval_freq 1250 "
            "--seed S --work_dir runs/cartpole_swingup/sac_ae/seed_S` for S in 1 2 3") in markdown  # fmt: skip
    html = (report_dir / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 2
    assert f"<code>{command}</code>" in html and "<table>" in html
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["generated_by"] == command
    assert {c["configuration"] for c in summary["cells"]} == {"sac_ae", "sac_states"}


OVERVIEW = """\
| task | 100k SAC+AE: sac_ae | 100k SAC+AE: published | 100k pixel SAC: published | 100k state SAC: sac_states \
| 100k state SAC: published | 500k SAC+AE: sac_ae | 500k SAC+AE: published | 500k state SAC: sac_states \
| 500k state SAC: published |
|---|---|---|---|---|---|---|---|---|---|
| cartpole_swingup | 315 ± 21 (2 of 3 seeds) | 311 ± 11 (CURL); 276 ± 38 (DrQ) | 419 ± 40 (CURL) | 400 ± 408 (4 seeds) \
| 835 ± 22 (CURL) | 730 ± 42 (2 of 3 seeds) | 735 ± 63 (CURL); 730 ± 152 (DrQ) | 675 ± 171 (4 seeds) | 848 ± 15 (CURL) |
"""


def test_the_page_opens_with_the_overview_table_then_the_return_plots(report_dir):
    """Every configuration at 100k and 500k beside the published numbers of its method, before the first figure and
    before the text on how the numbers are made."""
    markdown = (report_dir / "report.md").read_text()
    assert markdown.startswith("# Training report\n\n" + OVERVIEW + "\n")
    caption = markdown.index("Evaluation return at 100k and 500k env steps. Ours, named by configuration:")
    first_figure = markdown.index("![cartpole_swingup returns](cartpole_swingup_returns.png)")
    assert len(OVERVIEW) < caption < first_figure < markdown.index("## How the numbers are made")
    assert first_figure < markdown.index("Generated by ") < markdown.index("- Return: ") < markdown.index("### Runs")
    html = (report_dir / "report.html").read_text()
    assert html.index('<table class="overview"') < html.index("<img ") < html.index("<h2>How the numbers are made")
    # The grouped header: env steps over methods over ours and the published numbers, which are set apart.
    assert '<th colspan="5" class="g">at 100k env steps</th><th colspan="4" class="g">at 500k env steps</th>' in html
    assert '<th colspan="2" class="g">SAC+AE</th><th colspan="1" class="g">pixel SAC</th>' in html
    assert '<td class="g">315\u2009±\u200921<br><span class="n">2 of 3 seeds</span></td>' in html
    assert '<td class="pub">311\u2009±\u200911 <span class="n">CURL</span><br>276\u2009±\u200938 <span' in html


def test_the_overview_marks_what_is_missing(tmp_path):
    """A task without published numbers says so, a cell without a run is a dash, a configuration that reaches no
    column's env steps loses that column and the caption says so."""
    make_run(tmp_path, "cartpole_swingup", "sac_pixel", 1, ramp(100_000, 250, 0))
    make_run(tmp_path, "cartpole_swingup", "sac_ae", 1, ramp(60_000, 250, 0))
    make_run(tmp_path, "point_mass_easy", "sac_pixel", 1, ramp(100_000, 0.5, 0), action_repeat=4)
    make_run(tmp_path, "point_mass_easy", "sac_pixel", 2, ramp(50_000, 0.5, 0), action_repeat=4)
    out = write_report(tmp_path, tmp_path / "report", at=(100_000,), bootstrap_reps=REPS)
    markdown = (out / "report.md").read_text()
    assert (
        "| task | 100k SAC+AE: published | 100k pixel SAC: sac_pixel | 100k pixel SAC: published "
        "| 100k state SAC: published |\n|---|---|---|---|---|\n"
        "| cartpole_swingup | 311 ± 11 (CURL); 276 ± 38 (DrQ) | 250 (1 seed) | 419 ± 40 (CURL) | 835 ± 22 (CURL) |\n"
        "| point_mass_easy (no published numbers) | — | 0.500 (1 of 2 seeds) | — | — |\n"
    ) in markdown
    assert "Not reached at 100k env steps: `sac_ae`." in markdown
    html = (out / "report.html").read_text()
    assert '<th>point_mass_easy<br><span class="n">no published numbers</span></th>' in html


def test_default_output_folder_is_path_report(tmp_path):
    make_run(tmp_path, "cartpole_swingup", "sac_states", 1, {0: 1.0, 10_000: 2.0}, action_repeat=1)
    out = write_report(tmp_path / "cartpole_swingup", bootstrap_reps=REPS)
    assert out == tmp_path / "cartpole_swingup" / "report"
    assert "Generated by `sacae report " in (out / "report.md").read_text()
    assert len(load_runs(tmp_path)) == 1  # the report folder is not taken for a run


def error_line(capsys, argv) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sacae: error: ") and "Traceback" not in err, err
    return lines[0]


def test_cli_errors_are_one_sentence(capsys, tmp_path):
    assert "There is no folder at" in error_line(capsys, ["report", str(tmp_path / "missing")])
    assert "There are no runs under" in error_line(capsys, ["report", str(tmp_path)])
    broken = tmp_path / "cartpole_swingup" / "sac_ae" / "seed_1"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    assert f"The config file {broken / 'config.json'} cannot be read as JSON" in error_line(
        capsys, ["report", str(tmp_path)]
    )


def test_summarize_rejects_bad_arguments(runs_root):
    runs = load_runs(runs_root)
    with pytest.raises(SacaeError, match="must be positive"):
        summarize(runs, at=(0,))
    with pytest.raises(SacaeError, match="at least 1"):
        summarize(runs, bootstrap_reps=0)
    with pytest.raises(SacaeError, match="no runs"):
        summarize([])


def test_end_to_end_over_two_real_training_runs(tmp_path):
    """Two tiny state runs trained by `sacae train` (the second half as long), then `sacae report` over them."""
    tiny = ["--task", "cartpole_swingup", "--encoder_type", "identity", "--decoder_type", "identity",
            "--action_repeat", "8", "--init_steps", "20", "--eval_freq", "125", "--num_eval_episodes", "1",
            "--hidden_dim", "64", "--batch_size", "16", "--num_threads", "1"]  # fmt: skip
    for seed, agent_steps in ((1, 250), (2, 125)):
        work_dir = tmp_path / "runs" / "cartpole_swingup" / "sac_states" / f"seed_{seed}"
        done = run_cli(["train", *tiny, "--num_train_steps", str(agent_steps), "--seed", str(seed),
                        "--work_dir", str(work_dir)], cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr
    result = run_cli(["report", "runs", "--at", "2000", "--bootstrap_reps", str(REPS)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "runs" / "report" / "report.md").read_text()
    assert f"Generated by `sacae report runs --at 2000 --bootstrap_reps {REPS}`" in markdown
    assert "| sac_states | 2 of 2 |" in markdown
    assert "At 2k, sac_states seed_2 counts its evaluation at 1k env steps (its last; the run stops before 2k)." in (
        markdown
    )
    assert (
        "| sac_states | seed_1 | fp32 | 2k | 2k | 3 |" in markdown
        and "| sac_states | seed_2 | fp32 | 1k | 1k | 2 |" in markdown
    )
    first = load_runs(tmp_path / "runs" / "cartpole_swingup" / "sac_states")[0]
    assert list(first.train_curve("critic_loss")[0]) == [1000, 2000] and not first.resumed
    assert f"| 0 | {processor_name()} ({os.cpu_count()} cores), 1 thread, torch {torch.__version__} |" in markdown

    # The page's command for seed_2 (its own line: the seeds differ in length) trains the same run again.
    (line,) = [x for x in markdown.splitlines() if x.startswith("- sac_states seed_2: `")]
    again = tmp_path / "again"
    again.mkdir()
    done = run_cli(shlex.split(line.split("`")[1])[1:], cwd=again)
    assert done.returncode == 0, done.stderr
    ours = json.loads((again / "runs" / "cartpole_swingup" / "sac_states" / "seed_2" / "config.json").read_text())
    theirs = json.loads((tmp_path / "runs" / "cartpole_swingup" / "sac_states" / "seed_2" / "config.json").read_text())
    # Everything but the folder and how it executed (--num_threads 1, left out of the page's command) is the same.
    same = set(ours) - {"work_dir", *EXECUTION_FIELDS}
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same} and theirs["num_threads"] == 1


def test_runs_notebook_shows_the_reports_tables_notes_and_plots(runs_root, tmp_path):
    """runs.ipynb, executed cell by cell in a real Jupyter kernel, on a copy of the runs in ./runs (its RUNS)."""
    import shutil

    import nbformat
    from nbclient import NotebookClient

    shutil.copytree(runs_root, tmp_path / "runs")
    notebook = nbformat.read(Path(__file__).parents[1] / "runs.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = "\n".join(str(value) for o in outputs for value in o.get("data", {}).values())
    assert "At 100k, sac_ae uses 2 of 3 seeds: seed_3 stops at 60k env steps." in shown  # the notes
    assert "published SAC+AE" in shown and "seed_3" in shown  # the returns table, the runs table
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # returns and losses of the one task
    assert (tmp_path / "runs" / "report" / "report.md").read_text().startswith("# Training report\n")
