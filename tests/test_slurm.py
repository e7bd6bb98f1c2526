"""run_cluster.sh and sacae sweep/status against a real one-node Slurm cluster (tools/slurm/start_slurm.sh).

The module starts the cluster (installing Slurm with apt-get the first time, as root) and stops it afterwards if
it was not already up. Where it cannot, the tests are skipped with the reason, except in CI (CI set), where that
is a failure.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sacae.status import collect_status
from sacae.sweep import slurm_jobs
from tests.conftest import ROOT, SMALL

SLURM_TOOLS = ROOT / "tools" / "slurm"
SLURM_DIR = Path(os.environ.get("SLURM_DIR", "/tmp/slurm-single-node"))
TASK = "cartpole_swingup"
# One 1000-env-step episode at action repeat 8, evaluated at the start and the end: ~6 s, mostly start-up.
TINY = [
    "--encoder_type", "identity", "--decoder_type", "identity", "--action_repeat", "8", "--num_train_steps", "125",
    "--init_steps", "50", "--eval_freq", "125", "--num_eval_episodes", "1", "--num_threads", "1", *SMALL,
]  # fmt: skip
# Twenty episodes: long enough to be signalled while it trains.
LONGER = [*TINY, "--num_train_steps", "2500", "--eval_freq", "625"]


def cluster_answers(env) -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def slurm_env():
    """The environment for commands that use the cluster (the sacct stand-in first on PATH)."""
    env = {**os.environ, "PATH": f"{SLURM_DIR / 'bin'}:{os.environ['PATH']}"}

    def unavailable(reason: str):
        if os.environ.get("CI"):
            pytest.fail(f"the Slurm tests must run in CI, but {reason}")
        pytest.skip(reason)

    if shutil.which("sbatch") and cluster_answers(env):
        yield env  # somebody else's cluster: use it, leave it up
        return
    if os.geteuid() != 0:
        unavailable("starting the one-node Slurm cluster (tools/slurm/start_slurm.sh) needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        unavailable("Slurm is not installed and there is no apt-get to install it")
    started = subprocess.run(
        ["bash", str(SLURM_TOOLS / "start_slurm.sh")], env={**env, "SLURM_ACCOUNTING": "none"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if started.returncode != 0 or not cluster_answers(env):
        unavailable(f"tools/slurm/start_slurm.sh failed: {(started.stdout + started.stderr)[-2000:]}")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SLURM_TOOLS / "stop_slurm.sh")], capture_output=True, timeout=120)


def run_cluster(cwd: Path, env, *flags: str, seeds: int = 2, **variables: str):
    variables = {"SEEDS": str(seeds), "EXECUTOR": "slurm", "RUNS_DIR": "runs", **variables}
    sacae = Path(sys.executable).parent / "sacae"  # the sacae of the Python running the tests
    if sacae.is_file():
        variables.setdefault("SACAE", str(sacae))
    return subprocess.run(
        [str(ROOT / "run_cluster.sh"), "cartpole", "swingup", *flags], cwd=cwd, env={**env, **variables},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def run_dirs(cwd: Path, seeds: int) -> list[Path]:
    return [cwd / "runs" / TASK / "sac_states" / f"seed_{i}" for i in range(1, seeds + 1)]


def job_id(d: Path) -> str:
    return (d / "id").read_text().strip()


def status_of(d: Path) -> dict:
    try:
        return json.loads((d / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(predicate, timeout: float, what: str, dirs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {d}/stderr\n{(d / 'stderr').read_text()[-2000:]}" for d in dirs if (d / "stderr").exists())
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")


def jobs_done(dirs: list[Path]) -> bool:
    jobs = slurm_jobs(job_id(d) for d in dirs) or {}
    return all(job_id(d) in jobs and not jobs[job_id(d)].live for d in dirs)


def cancel(dirs: list[Path], env) -> None:
    ids = [job_id(d) for d in dirs if (d / "id").exists()]
    if ids:
        subprocess.run(["scancel", *ids], env=env, capture_output=True, timeout=60)


def test_run_cluster_two_seeds(slurm_env, tmp_path):
    first = run_cluster(tmp_path, slurm_env, *TINY)
    assert first.returncode == 0, first.stdout + first.stderr
    dirs = run_dirs(tmp_path, 2)
    try:
        assert first.stdout.count("submitted as job") == 2, first.stdout
        wait_for(lambda: jobs_done(dirs), 300, "both jobs to end", dirs)
    finally:
        cancel(dirs, slurm_env)
    jobs = slurm_jobs(job_id(d) for d in dirs)
    for seed, d in enumerate(dirs, start=1):
        assert jobs[job_id(d)].state == "COMPLETED", (d / "stderr").read_text()[-3000:]
        for name in ("id", "stdout", "stderr", "run.sh", "run.slrm", "config.json", "eval.log", "train.log",
                     "status.json", "video/1000.mp4"):  # fmt: skip
            assert (d / name).is_file(), f"{d}/{name} is missing"
        assert any((d / "tb").iterdir())
        assert status_of(d)["state"] == "finished"
        assert f"--seed {seed} --work_dir {d}\n" in (d / "run.sh").read_text()
        slrm = (d / "run.slrm").read_text()
        assert f"#SBATCH --output={d}/stdout" in slrm and "#SBATCH --requeue" in slrm and "B:USR1@300" in slrm
        assert f"sacae sweep: job {job_id(d)} (restart 0) started" in (d / "stderr").read_text()
        assert "| eval | S: 1000 |" in (d / "stdout").read_text()
    assert [row.state for row in collect_status([tmp_path / "runs"])] == ["finished", "finished"]

    ids = [job_id(d) for d in dirs]
    again = run_cluster(tmp_path, slurm_env, *TINY)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished, skipped") == 2 and "submitted" not in again.stdout
    assert [job_id(d) for d in dirs] == ids


def test_queued_jobs_are_not_submitted_twice(slurm_env, tmp_path):
    held = run_cluster(tmp_path, slurm_env, *TINY, SBATCH_OPTIONS="hold")
    assert held.returncode == 0, held.stdout + held.stderr
    dirs = run_dirs(tmp_path, 2)
    try:
        ids = [job_id(d) for d in dirs]
        rows = collect_status([tmp_path / "runs"])
        assert [row.state for row in rows] == ["queued", "queued"]
        assert rows[0].detail == "waiting (JobHeldUser)"
        again = run_cluster(tmp_path, slurm_env, *TINY, SBATCH_OPTIONS="hold")
        assert again.returncode == 0, again.stderr
        assert again.stdout.count("is pending, left alone") == 2, again.stdout
        assert [job_id(d) for d in dirs] == ids
    finally:
        cancel(dirs, slurm_env)


def test_requeued_jobs_resume(slurm_env, tmp_path):
    """Both ways a job is requeued: Slurm's USR1 before the time limit (`--signal=B:USR1@...`, sent here at once
    with `scancel --signal=USR1 --batch`: the script asks the trainer to checkpoint, then requeues the job) and an
    admin's or preemption's requeue (`scontrol requeue`: the trainer gets SIGTERM and checkpoints). Each requeued
    job runs run.sh again, which resumes the run from its checkpoint (the trainer's resume contract)."""
    submitted = run_cluster(tmp_path, slurm_env, *LONGER, OUTPUTS="")  # no videos: rendering is slow on a CPU
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    dirs = run_dirs(tmp_path, 2)
    try:
        wait_for(lambda: all(status_of(d).get("env_steps", 0) >= 1000 for d in dirs), 180, "the first episodes", dirs)
        usr1 = ["scancel", "--signal=USR1", "--batch", job_id(dirs[0])]
        subprocess.run(usr1, env=slurm_env, check=True, timeout=60)
        subprocess.run(["scontrol", "requeue", job_id(dirs[1])], env=slurm_env, check=True, timeout=60)

        def requeued() -> bool:
            jobs = slurm_jobs(job_id(d) for d in dirs) or {}
            return all(jobs.get(job_id(d)) and jobs[job_id(d)].restarts == 1 for d in dirs)

        wait_for(requeued, 60, "both jobs to be requeued", dirs)
        states = {row.state for row in collect_status([tmp_path / "runs"])}
        assert states <= {"requeued", "running"}, states
        wait_for(lambda: jobs_done(dirs), 300, "the requeued jobs to end", dirs)
    finally:
        cancel(dirs, slurm_env)

    jobs = slurm_jobs(job_id(d) for d in dirs)
    stderr = [(d / "stderr").read_text() for d in dirs]
    assert "checkpoint written; requeueing job" in stderr[0]
    for d, err in zip(dirs, stderr, strict=True):
        job = jobs[job_id(d)]
        assert (job.state, job.restarts) == ("COMPLETED", 1), err[-3000:]
        assert f"sacae sweep: job {job.job_id} (restart 1) started" in err
        status = status_of(d)
        assert status["state"] == "finished" and status["env_steps"] == status["total_env_steps"] == 20000
        episodes = [json.loads(line)["episode"] for line in (d / "train.log").read_text().splitlines()]
        assert episodes == list(range(1, 21)), "the requeued job started over instead of resuming"
    assert [row.state for row in collect_status([tmp_path / "runs"])] == ["finished", "finished"]


def test_group_job_trains_its_seeds_and_resumes_after_usr1(slurm_env, tmp_path):
    """SEEDS_PER_PROCESS=2: one job trains both seeds with `sacae train-seeds`; USR1 before the time limit makes it
    checkpoint both seeds and requeue itself, and the requeued job resumes both; status shows each seed with the
    group's job, and the sweep run again skips the group."""
    submitted = run_cluster(tmp_path, slurm_env, *LONGER, OUTPUTS="", SEEDS_PER_PROCESS="2")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert submitted.stdout.count("submitted as job") == 1, submitted.stdout
    dirs = run_dirs(tmp_path, 2)
    assert job_id(dirs[0]) == job_id(dirs[1])
    try:
        wait_for(lambda: all(status_of(d).get("env_steps", 0) >= 1000 for d in dirs), 180, "the first episodes", dirs)
        assert [(r.state, r.job) for r in collect_status([tmp_path / "runs"])] == [("running", job_id(dirs[0]))] * 2
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id(dirs[0])], env=slurm_env, check=True, timeout=60)
        wait_for(lambda: jobs_done(dirs[:1]), 400, "the requeued group job to end", dirs[:1])
    finally:
        cancel(dirs[:1], slurm_env)

    job = slurm_jobs([job_id(dirs[0])])[job_id(dirs[0])]
    err = (dirs[0] / "stderr").read_text()
    assert (job.state, job.restarts) == ("COMPLETED", 1), err[-3000:]
    assert "checkpoint written; requeueing job" in err and f"job {job.job_id} (restart 1) started" in err
    assert os.readlink(dirs[1] / "stderr") == "../seed_1/stderr"
    for d in dirs:
        assert f"--seeds 1 2 --runs_dir {tmp_path / 'runs'}\n" in (d / "run.sh").read_text()
        assert f"#SBATCH --output={dirs[0]}/stdout" in (d / "run.slrm").read_text()
        status = status_of(d)
        assert status["state"] == "finished" and status["env_steps"] == status["total_env_steps"] == 20000
        episodes = [json.loads(line)["episode"] for line in (d / "train.log").read_text().splitlines()]
        assert episodes == list(range(1, 21)), "the requeued group started over instead of resuming"
    assert [(r.state, r.job) for r in collect_status([tmp_path / "runs"])] == [("finished", job.job_id)] * 2

    again = run_cluster(tmp_path, slurm_env, *LONGER, OUTPUTS="", SEEDS_PER_PROCESS="2")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished, skipped") == 2 and "submitted" not in again.stdout
