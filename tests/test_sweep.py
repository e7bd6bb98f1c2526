"""sacae sweep on this machine (the local executor) and sacae status, with tiny state-based runs."""

import contextlib
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sacae import sweep as sweep_module
from sacae.cli import main
from sacae.status import collect_status, format_table, run_status, training_rate
from sacae.sweep import SlurmJob, SweepArgs, plan_sweep, sbatch_lines, slurm_script, sweep
from tests.conftest import SMALL, run_cli

# One 1000-env-step episode (125 agent steps at action repeat 8), evaluated at the end: ~6 s, mostly start-up.
TINY = [
    "--encoder_type", "identity", "--decoder_type", "identity", "--action_repeat", "8", "--num_train_steps", "125",
    "--init_steps", "50", "--eval_freq", "125", "--num_eval_episodes", "1", "--num_threads", "1", *SMALL,
]  # fmt: skip
TASK = "cartpole_swingup"


def run_dir(runs: Path, seed: int, configuration: str = "sac_states") -> Path:
    return runs / TASK / configuration / f"seed_{seed}"


def local_sweep(runs: Path, *extra: str, train=TINY, timeout=300):
    args = ["sweep", "--executor", "local", "--tasks", TASK, "--runs_dir", str(runs), *extra, "--", *train]
    return run_cli(args, cwd=runs.parent, timeout=timeout)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def background_cli(args: list[str], cwd: Path):
    """`python -m sacae.cli ARGS` in the background, its output captured; killed if the block leaves it running."""
    process = subprocess.Popen([sys.executable, "-m", "sacae.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def first_episode(d: Path) -> None:
    wait_for(lambda: status_of(d).get("env_steps", 0) >= 1000, 120, "the run's first episode")


def status_of(d: Path) -> dict:
    try:
        return json.loads((d / "status.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """Two seeds run to the end by one local sweep, then the same sweep again."""
    runs = tmp_path_factory.mktemp("sweep") / "runs"
    return sweep_twice(local_sweep, runs, [*TINY, "--save_tb", "--save_video"])


def sweep_twice(sweep, runs: Path, train: list[str]):
    """Two seeds swept to the end, then the same sweep again: (runs, first, second, files' mtimes in between)."""
    first = sweep(runs, "--num_seeds", "2", train=train)
    assert first.returncode == 0, first.stdout + first.stderr
    snapshot = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    second = sweep(runs, "--num_seeds", "2", train=train)
    return runs, first, second, snapshot


def test_local_sweep_writes_the_layout(finished_sweep):
    runs, first, _, _ = finished_sweep
    assert "2 run(s) on" in first.stdout and "2 at a time" in first.stdout
    for seed in (1, 2):
        d = run_dir(runs, seed)
        for name in ("id", "stdout", "stderr", "run.sh", "config.json", "train.log", "eval.log", "status.json"):
            assert (d / name).is_file(), f"{d}/{name} is missing"
        assert not (d / "run.slrm").exists()  # a local run is no Slurm job
        assert (d / "id").read_text().strip().isdigit()
        script = (d / "run.sh").read_text()
        assert f"--task {TASK} " in script and f"--seed {seed} --work_dir {d}\n" in script
        assert os.access(d / "run.sh", os.X_OK)
        assert status_of(d)["state"] == "finished"
        assert json.loads((d / "config.json").read_text())["seed"] == seed
        assert "| eval | S: 1000 |" in (d / "stdout").read_text()
        assert list((d / "tb").glob("events.out.tfevents.*")), f"{d}/tb has no TensorBoard events"
        assert (d / "video" / "1000.mp4").stat().st_size > 0  # the evaluation after 1000 env steps


def dry_run(cwd: Path, script: str, *args: str, **variables: str) -> list[str]:
    """A cluster script of the repository as a dry run on this machine: the sacae train commands it would start."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "SACAE": str(Path(sys.executable).parent / "sacae"),
           "EXECUTOR": "local", "DRY_RUN": "1", **variables}  # fmt: skip
    result = subprocess.run([str(root / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (cwd / "runs").exists()  # a dry run starts nothing and writes nothing
    return [line.split("would start: ", 1)[1] for line in result.stdout.splitlines() if "would start: " in line]


def test_run_all_schedules_ten_seeds_of_every_testbed_task(tmp_path):
    from sacae.testbed import TESTBED

    commands = dry_run(tmp_path, "run_all.sh")
    tasks = [c.split("--task ", 1)[1].split()[0] for c in commands]
    assert sorted(tasks) == sorted(task for task, _ in TESTBED for _ in range(10))
    for task, _ in TESTBED:
        for seed in range(1, 11):
            ends = f"--seed {seed} --work_dir {tmp_path / 'runs' / task / 'sac_ae' / f'seed_{seed}'}"
            assert sum(c.endswith(ends) for c in commands) == 1, ends
    # The action repeat is each configuration's own default (pixel: the testbed's, states: 1), so run_cluster.sh's
    # ACTION_REPEAT is the one place that changes it.
    assert not any("--action_repeat" in c for c in commands)


def test_run_cluster_variables_choose_the_configuration_and_action_repeat(tmp_path):
    variables = dict(SEEDS="1", ENCODER_TYPE="identity", DECODER_TYPE="identity", ACTION_REPEAT="2")
    [command] = dry_run(tmp_path, "run_cluster.sh", "walker", "walk", **variables)
    assert " --action_repeat 2 " in command and command.endswith(f"{tmp_path}/runs/walker_walk/sac_states/seed_1")


def test_second_sweep_starts_nothing(finished_sweep):
    runs, _, second, snapshot = finished_sweep
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("finished, skipped") == 2 and "started" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == snapshot


def test_status_of_finished_and_failed_runs(finished_sweep, capsys):
    runs, _, _, _ = finished_sweep
    # A flag that passes the sweep's checks but makes the trainer stop at once.
    failed = local_sweep(runs, "--seeds", "7", train=[*TINY, "--device", "nonsense"])
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "exited with status 2" in failed.stdout

    rows = {row.seed: row for row in collect_status([runs])}
    assert [rows[s].state for s in ("1", "2", "7")] == ["finished", "finished", "failed"]
    assert rows["1"].env_steps == rows["1"].total_env_steps == 1000
    assert rows["1"].eval_return is not None and rows["1"].steps_per_second > 0
    assert "--device nonsense is not a device name" in rows["7"].detail
    assert main(["status", str(runs)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["task", "configuration", "seed", "state"]
    assert "3 runs: 1 failed, 2 finished" in table


def test_running_run_is_left_alone_then_stopped_then_resumed(tmp_path):
    """A run that is running shows as running and a second sweep leaves it alone; Ctrl-C stops it with a
    checkpoint (stopped) and the next sweep resumes it to the end."""
    runs = tmp_path / "runs"
    longer = [*TINY, "--num_train_steps", "2500", "--eval_freq", "1250"]  # twenty episodes, ~15 s
    args = ["sweep", "--executor", "local", "--tasks", TASK, "--runs_dir", str(runs), "--num_seeds", "1", "--", *longer]
    d = run_dir(runs, 1)
    with background_cli(args, tmp_path) as background:
        first_episode(d)
        [row] = collect_status([runs])
        assert row.state == "running" and row.job == (d / "id").read_text().strip()
        lines: list[str] = []
        again = sweep(
            SweepArgs(tasks=(TASK,), train_args=tuple(longer), num_seeds=1, runs_dir=str(runs), executor="local"),
            say=lines.append,
            cwd=tmp_path,
        )
        assert again == {f"{TASK}/sac_states/seed_1": f"running {row.job}"}, lines
        background.send_signal(signal.SIGINT)
        out, _ = background.communicate(timeout=120)
    assert background.returncode == 130, out
    [row] = collect_status([runs])
    assert row.state == "stopped", (row, out)
    assert 0 < row.env_steps < 20000

    resumed = local_sweep(runs, "--num_seeds", "1", train=longer)
    assert resumed.returncode == 0, resumed.stdout + (d / "stderr").read_text()[-3000:]
    assert f"resumed at {row.env_steps} env steps" in resumed.stdout
    [row] = collect_status([runs])
    assert row.state == "finished" and row.env_steps == 20000
    episodes = [r["episode"] for r in map(json.loads, (d / "train.log").read_text().splitlines())]
    assert episodes == list(range(1, 21))  # resumed, not started over


def test_a_run_stopped_from_outside_is_reported_as_resumable(tmp_path, monkeypatch):
    """SIGTERM to a run (a cluster's preemption, a user's kill) makes it checkpoint and stop: the sweep says so and
    how to resume, rather than reporting a failure; its progress lines come when the runs move on, not every tick.
    A sweep of one run gives it every core as threads."""
    monkeypatch.setattr(sweep_module, "run_local", functools.partial(sweep_module.run_local, progress_seconds=0.1))
    runs = tmp_path / "runs"
    i = TINY.index("--num_threads")
    longer = [*TINY[:i], *TINY[i + 2 :], "--num_train_steps", "2500", "--eval_freq", "1250"]
    lines: list[tuple[float, str]] = []
    args = SweepArgs(tasks=(TASK,), train_args=tuple(longer), seeds=(1,), runs_dir=str(runs), executor="local")
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(sweep(args, say=lambda line: lines.append((time.time(), line)), cwd=tmp_path))
    )
    thread.start()
    d = run_dir(runs, 1)
    try:
        wait_for(lambda: status_of(d).get("env_steps", 0) >= 3000, 120, "the run's third episode")
        os.kill(int((d / "id").read_text()), signal.SIGTERM)
    finally:
        thread.join(timeout=120)
    status = status_of(d)
    steps = status["env_steps"]
    said = [line for _, line in lines]
    assert said[0].endswith(", 1 at a time"), said
    assert status["sessions"][0]["threads"] == len(os.sched_getaffinity(0))
    assert f"[1/1] {TASK}/sac_states/seed_1: stopped at {steps} env steps after" in said[-1], said
    assert said[-1].endswith("with a checkpoint; run the sweep again to resume")
    progress = [(t, line) for t, line in lines if " running (" in line]
    assert len(progress) >= 2, said
    for (t0, a), (t1, b) in itertools.pairwise(progress):
        assert a != b or t1 - t0 >= 0.95, (a, t1 - t0)  # the same line again only after ten intervals


def test_status_finds_a_run_started_by_sacae_train_itself(tmp_path):
    """No sweep, no `id` file, a relative --work_dir: status finds the process through status.json and shows it
    running (with its pid as the job) from another folder, then finished."""
    longer = [*TINY, "--num_train_steps", "2500", "--eval_freq", "1250"]
    (tmp_path / "elsewhere").mkdir()
    d = tmp_path / "elsewhere" / "runs" / "mine"
    with background_cli(["train", "--task", TASK, *longer, "--work_dir", "./runs/mine"], d.parent.parent) as train:
        first_episode(d)
        [row] = collect_status([d])
        assert (row.state, row.job) == ("running", str(train.pid)), row
        out, _ = train.communicate(timeout=120)
    assert train.returncode == 0, out
    [row] = collect_status([d])
    assert row.state == "finished"


def test_group_sweep_trains_its_seeds_in_one_process(tmp_path):
    """--seeds_per_process 2 over 2 seeds: one `sacae train-seeds` process trains both into the usual seed folders,
    status shows both finished (with the group's process as their job), and the sweep run again skips them."""
    runs = tmp_path / "runs"
    first = local_sweep(runs, "--num_seeds", "2", "--seeds_per_process", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 run(s) on" in first.stdout and "in 1 process(es), 1 at a time" in first.stdout
    assert first.stdout.count(": started, process") == 1, first.stdout
    assert f"{TASK}/sac_states/seeds_1_2: started, process" in first.stdout
    lead, other = run_dir(runs, 1), run_dir(runs, 2)
    pid = (lead / "id").read_text()
    for d in (lead, other):
        assert (d / "id").read_text() == pid
        script = (d / "run.sh").read_text()
        assert f" train-seeds --task {TASK} " in script and f"--seeds 1 2 --runs_dir {runs}\n" in script
        assert status_of(d)["state"] == "finished" and status_of(d)["seeds_in_process"] == [1, 2]
    assert os.readlink(other / "stdout") == "../seed_1/stdout" and (lead / "stdout").is_file()
    assert "| eval | S: 1000 |" in (other / "stdout").read_text()
    rows = collect_status([runs])
    assert [(r.seed, r.state, r.job) for r in rows] == [("1", "finished", pid.strip()), ("2", "finished", pid.strip())]

    snapshot = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    again = local_sweep(runs, "--num_seeds", "2", "--seeds_per_process", "2")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished, skipped") == 2 and "started" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == snapshot


def test_running_group_is_found_for_every_seed_then_stopped_then_resumed(tmp_path):
    """While a group's process trains, status shows each of its seeds running with that process and a second sweep
    leaves the group alone; Ctrl-C stops both seeds with a checkpoint and the next sweep resumes them to the end."""
    runs = tmp_path / "runs"
    longer = [*TINY, "--num_train_steps", "2500", "--eval_freq", "1250"]
    flags = ["--tasks", TASK, "--runs_dir", str(runs), "--num_seeds", "2", "--seeds_per_process", "2"]
    dirs = [run_dir(runs, 1), run_dir(runs, 2)]
    with background_cli(["sweep", "--executor", "local", *flags, "--", *longer], tmp_path) as background:
        for d in dirs:
            first_episode(d)
        pid = (dirs[0] / "id").read_text().strip()
        assert [(r.state, r.job) for r in collect_status([runs])] == [("running", pid)] * 2
        again = sweep(
            SweepArgs(tasks=(TASK,), train_args=tuple(longer), num_seeds=2, runs_dir=str(runs), executor="local",
                      seeds_per_process=2),
            say=lambda line: None, cwd=tmp_path,
        )  # fmt: skip
        assert again == {f"{TASK}/sac_states/seed_{s}": f"running {pid}" for s in (1, 2)}
        background.send_signal(signal.SIGINT)
        out, _ = background.communicate(timeout=120)
    assert background.returncode == 130, out
    rows = collect_status([runs])
    assert [r.state for r in rows] == ["stopped", "stopped"], (rows, out)

    resumed = local_sweep(runs, "--num_seeds", "2", "--seeds_per_process", "2", train=longer)
    assert resumed.returncode == 0, resumed.stdout + (dirs[0] / "stderr").read_text()[-3000:]
    assert f"seeds_1_2: resumed at {rows[0].env_steps} env steps" in resumed.stdout
    assert [(r.state, r.env_steps) for r in collect_status([runs])] == [("finished", 20000)] * 2
    for d in dirs:
        episodes = [r["episode"] for r in map(json.loads, (d / "train.log").read_text().splitlines())]
        assert episodes == list(range(1, 21))  # resumed, not started over


def test_training_rate_leaves_the_seed_phase_out_once_updates_begin():
    seed_phase = [{"env_steps": 1000 * i, "duration": 1.0, "critic_loss": None} for i in (1, 2)]
    training = [{"env_steps": 1000 * i, "duration": 10.0, "critic_loss": 0.5} for i in (3, 4, 5)]
    assert training_rate(seed_phase) == (1000.0, False)
    assert training_rate(seed_phase + training) == (100.0, True)
    assert training_rate([]) == (None, False)


def test_no_eta_during_the_seed_phase(tmp_path):
    d = fake_run(tmp_path, "running", job_id=None, slurm=False, pid=None, total_env_steps=100_000)
    (d / "config.json").write_text(json.dumps({"init_steps": 1000, "eval_freq": 1250, "action_repeat": 8}))
    (d / "train.log").write_text(json.dumps({"env_steps": 1000, "duration": 1.0, "critic_loss": None}) + "\n")
    assert run_status(d, {}).eta_seconds is None
    with open(d / "train.log", "a") as f:
        f.write(json.dumps({"env_steps": 2000, "duration": 10.0, "critic_loss": 0.5}) + "\n")
    assert run_status(d, {}).eta_seconds == pytest.approx(97_000 / 100)


# ---------------------------------------------------------------------------------------------------------------
# Without training


def one_sentence_error(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sacae: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--", "--seed", "3"], "The sweep sets --seed itself"),
        (["--", "--work-dir=x"], "The sweep sets --work_dir itself"),
        (["--", "--no_resume"], "The sweep sets --no_resume itself"),
        (["--", "--bogus_flag", "1"], "`sacae train` has no flag --bogus_flag"),
        (["--", "--encoder_type", "conv"], "are not valid for `sacae train`"),
        (["--", "--encoder_type", "identity"], "--decoder_type pixel needs --encoder_type pixel"),
        (["--num_seeds", "0"], "--num_seeds must be at least 1"),
        (["--seeds", "1", "1"], "--seeds lists a seed twice"),
        (["--max_parallel", "0"], "--max_parallel must be at least 1"),
        (["--seeds_per_process", "0"], "--seeds_per_process must lie in [1, 10], the number of seeds of each task"),
        (["--seeds_per_process", "-2"], "--seeds_per_process must lie in [1, 10]"),
        (["--seeds", "4", "5", "--seeds_per_process", "3"], "--seeds_per_process must lie in [1, 2]"),
    ],
)
def test_bad_sweeps(capsys, tmp_path, extra, expected):
    line = one_sentence_error(capsys, ["sweep", "--tasks", TASK, "--runs_dir", str(tmp_path), "--dry_run", *extra])
    assert expected in line
    assert not any(tmp_path.iterdir())


def test_seeds_in_one_process_take_every_tracker(capsys, tmp_path):
    """A group logs to wandb and MLflow as single runs do (each seed with runs of its own): the sweep passes the
    trackers on to every process of two seeds."""
    argv = ["sweep", "--tasks", TASK, "--runs_dir", str(tmp_path), "--dry_run", "--seeds_per_process", "2"]
    assert main([*argv, "--", "--logger", "wandb,mlflow"]) == 0
    out, _ = capsys.readouterr()
    starts = [line for line in out.splitlines() if "would start:" in line]
    assert len(starts) == 5 and all("train-seeds" in s and "--logger wandb,mlflow" in s for s in starts), out
    assert not any(tmp_path.iterdir())


def test_unknown_task(capsys, tmp_path):
    line = one_sentence_error(capsys, ["sweep", "--tasks", "walker_fly", "--runs_dir", str(tmp_path), "--dry_run"])
    assert "Unknown dm_control task 'walker_fly'" in line


def test_other_flags_in_a_started_run_folder(capsys, tmp_path):
    args = SweepArgs(tasks=(TASK,), train_args=tuple(TINY), num_seeds=1, runs_dir=str(tmp_path / "runs"))
    [plan] = plan_sweep(args, tmp_path)
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "run.sh").write_text(f"exec sacae train --task {TASK} --num_train_steps 99\n")
    (plan.run_dir / "status.json").write_text('{"state": "stopped"}')
    line = one_sentence_error(
        capsys, ["sweep", "--tasks", TASK, "--num_seeds", "1", "--runs_dir", str(tmp_path / "runs"), "--", *TINY]
    )
    assert "holds a run started with other training flags (it has --num_train_steps 99" in line


def test_configuration_folder_follows_the_flags(tmp_path):
    def configuration(*flags):
        args = SweepArgs(tasks=("walker_walk",), train_args=flags, num_seeds=1, runs_dir="r")
        return plan_sweep(args, tmp_path)[0].run_dir.relative_to(tmp_path / "r").parts[1]

    assert configuration() == "sac_ae"
    assert configuration("--decoder_type", "identity") == "sac_pixel"
    assert configuration("--encoder_type", "identity", "--decoder_type", "identity") == "sac_states"
    # The last of a repeated flag wins, as in `sacae train`.
    assert configuration("--decoder_type", "identity", "--decoder_type", "pixel") == "sac_ae"


def test_slurm_script(tmp_path):
    args = SweepArgs(
        tasks=("walker_walk",), num_seeds=1, runs_dir="r", partition="gpu", time="72:00:00", cpus_per_task=10,
        account="rl", sbatch_options=("qos=high", "--constraint=volta"), signal_seconds=600,
    )  # fmt: skip
    [plan] = plan_sweep(args, tmp_path)
    lines = sbatch_lines(args, plan)
    for expected in ("--requeue", "--open-mode=append", "--signal=B:USR1@600", "--partition=gpu", "--time=72:00:00",
                     "--cpus-per-task=10", "--gres=gpu:1", "--account=rl", "--qos=high", "--constraint=volta",
                     f"--output={plan.run_dir}/stdout", f"--error={plan.run_dir}/stderr"):  # fmt: skip
        assert expected in lines
    # sac_ae, 1M transitions of one 84x84x3 frame each: 19.8 GiB of replay, plus 3 GiB.
    assert "--mem=23G" in lines
    script = slurm_script(args, plan)
    assert script.startswith("#!/bin/bash\n#SBATCH ")
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and f"bash {plan.run_dir}/run.sh &" in script
    states = SweepArgs(tasks=("walker_walk",), train_args=("--encoder_type", "identity", "--decoder_type", "identity"),
                       num_seeds=1, runs_dir="r", mem="none")  # fmt: skip
    [plan] = plan_sweep(states, tmp_path)
    lines = sbatch_lines(states, plan)
    assert not any(line.startswith(("--gres", "--mem", "--partition", "--time")) for line in lines)


def test_group_dry_run_and_slurm_script(tmp_path):
    """run_cluster.sh passes SEEDS_PER_PROCESS on: one `train-seeds` command per group of consecutive seeds; a
    group's job writes to its first seed's folder and asks for the memory of all its seeds."""
    commands = dry_run(tmp_path, "run_cluster.sh", "cartpole", "swingup", SEEDS="3", SEEDS_PER_PROCESS="2")
    assert len(commands) == 2 and all(" train-seeds --task cartpole_swingup " in c for c in commands)
    assert commands[0].endswith(f"--seeds 1 2 --runs_dir {tmp_path / 'runs'}")
    assert commands[1].endswith(f"--seeds 3 --runs_dir {tmp_path / 'runs'}")

    args = SweepArgs(tasks=("walker_walk",), num_seeds=3, seeds_per_process=2, runs_dir="r")
    first, second, third = plan_sweep(args, tmp_path)
    assert first.command == second.command and first.group == second.group == (1, 2) and third.group == (3,)
    lines = sbatch_lines(args, second)
    lead = tmp_path / "r" / "walker_walk" / "sac_ae" / "seed_1"
    for expected in ("--job-name=walker_walk.sac_ae.seeds_1_2", f"--output={lead}/stdout", f"--error={lead}/stderr",
                     "--gres=gpu:1", "--requeue", "--signal=B:USR1@300"):  # fmt: skip
        assert expected in lines
    # Two sac_ae seeds of 1M transitions: twice (19.8 GiB of replay plus 2 GiB), plus 1 GiB; one seed alone 23G.
    assert "--mem=45G" in lines and "--mem=23G" in sbatch_lines(args, third)
    assert f"bash {lead}/run.sh &" in slurm_script(args, second)


def test_a_started_run_keeps_its_grouping(capsys, tmp_path):
    """A run started alone (or in another group) is not resumed in a group: a group resumes from a checkpoint that
    all its seeds have."""
    args = SweepArgs(tasks=(TASK,), train_args=tuple(TINY), num_seeds=2, runs_dir=str(tmp_path / "runs"))
    plans = plan_sweep(args, tmp_path)
    d = plans[1].run_dir
    d.mkdir(parents=True)
    (d / "run.sh").write_text(f"exec {' '.join(plans[1].command)}\n")
    (d / "status.json").write_text('{"state": "stopped"}')
    flags = ["--tasks", TASK, "--num_seeds", "2", "--runs_dir", str(tmp_path / "runs"), "--dry_run"]
    line = one_sentence_error(capsys, ["sweep", *flags, "--seeds_per_process", "2", "--", *TINY])
    assert f"{d} was started in a process of its own and this sweep would resume it with seeds 1 2" in line
    assert main(["sweep", *flags, "--", *TINY]) == 0  # the grouping it was started with
    assert "seed_2: would resume" in capsys.readouterr().out


def test_auto_executor_without_sbatch(monkeypatch):
    monkeypatch.setattr(sweep_module.shutil, "which", lambda name: None)
    said: list[str] = []
    assert sweep_module.choose_executor("auto", said.append) == "local"
    assert said == ["sbatch is not on PATH: running the sweep on this machine (--executor local), in the foreground"]
    with pytest.raises(sweep_module.SacaeError, match="--executor slurm needs sbatch on PATH"):
        sweep_module.choose_executor("slurm", said.append)


def fake_run(tmp_path: Path, state: str | None = None, job_id: str | None = "41", slurm: bool = True, **status):
    d = tmp_path / TASK / "sac_states" / "seed_1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.sh").write_text("exec sacae train\n")
    if slurm:
        (d / "run.slrm").write_text("#!/bin/bash\n")
    if job_id:
        (d / "id").write_text(job_id + "\n")
    if state:
        (d / "status.json").write_text(json.dumps({"state": state, "env_steps": 3000, "total_env_steps": 10000,
                                                   "host": "somewhere", **status}))  # fmt: skip
    return d


@pytest.mark.parametrize(
    ("state", "job", "expected", "detail"),
    [
        (None, SlurmJob("41", "PENDING", "Priority", 0), "queued", "waiting (Priority)"),
        (None, SlurmJob("41", "RUNNING", "None", 0), "running", "starting"),
        ("running", SlurmJob("41", "RUNNING", "None", 1), "running", "restarts 1"),
        ("stopped", SlurmJob("41", "PENDING", "BeginTime", 1), "requeued", "restarts 1, waiting (BeginTime)"),
        ("running", SlurmJob("41", "REQUEUED", "None", 2), "requeued", "restarts 2"),
        ("running", SlurmJob("41", "SUSPENDED", "None", 0), "suspended", ""),
        ("finished", SlurmJob("41", "COMPLETING", "None", 0), "finished", ""),
        ("stopped", None, "stopped", "stopped by SIGTERM"),
        ("failed", None, "failed", "stopped by SIGTERM"),
        ("running", SlurmJob("41", "OUT_OF_MEMORY", "None", 0), "failed", "Slurm: OUT_OF_MEMORY, ended without a word"),
    ],
)
def test_status_of_slurm_runs(tmp_path, state, job, expected, detail):
    d = fake_run(tmp_path, state, message="stopped by SIGTERM")
    row = run_status(d, {"41": job} if job else {})
    assert (row.state, row.detail) == (expected, detail)
    assert (row.task, row.configuration, row.seed, row.job) == (TASK, "sac_states", "1", "41")


def test_status_without_squeue_and_of_dead_local_runs(tmp_path):
    d = fake_run(tmp_path, "running")
    row = run_status(d, None)
    assert row.state == "running" and row.detail.startswith("Slurm cannot be asked from here")

    d = fake_run(tmp_path / "local", "running", job_id="999999999", slurm=False, host=os.uname().nodename)
    (d / "stderr").write_text("sacae: seed-phase updates 10/10\nKilled\n")
    row = run_status(d, {})
    assert row.state == "failed" and row.detail == "ended without a word: Killed"

    d = fake_run(tmp_path / "new", job_id=None, slurm=False)
    assert run_status(d, {}).state == "new"


def test_table_format():
    from sacae.status import RunStatus

    row = RunStatus("p", TASK, "sac_ae", "3", "running", 123_000, 500_000, 812.34, 120_000, 210.4, 3725.0, "77", "")
    table = format_table([row])
    header, line, summary = table.splitlines()
    assert line.split() == [TASK, "sac_ae", "3", "running", "123k/500k", "812.3", "210", "1h02m", "77"]
    assert header.index("env steps") == line.index("123k/500k")
    assert table.endswith("1 run: 1 running")
