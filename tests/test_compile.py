"""--compile: the update's loss functions through torch.compile (Inductor's C++ kernels on a CPU).

The compiled update gives the eager update's parameters, optimizer states and metrics to float tolerance (one seed
and a group); a compiled run killed and resumed writes what the uninterrupted compiled run writes, bit for bit; and
when compiling fails (no C++ compiler here), training goes on eagerly from the state before the failed update,
after one line on stderr, with the eager run's results.
"""

import copy
import json
import os
import shutil
import signal

import pytest
import torch

import sacae.agent
from sacae.agent import GroupAgent, stack_batches
from tests.conftest import run_cli
from tests.test_multiseed import assert_state_matches, generators, make_batch, make_seeds, single_update
from tests.test_resume import TINY, assert_same_run, log_rows

# Every part of the update: odd steps (critic, autoencoder) and even ones (actor and temperature, targets).
STEPS = (1000, 1001, 1002, 1003)
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    """One Inductor cache for the module (a fresh one, as on a clean machine), shared with its subprocesses."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    torch.set_num_threads(1)
    yield
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def assert_metrics_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, name
        else:
            assert got[name] == pytest.approx(value, rel=RTOL, abs=ATOL), name


def update_both(agent, check_metrics=None):
    """`agent` and a compiled copy of it, after the updates of STEPS on the same batches and noise."""
    eager, compiled = agent, copy.deepcopy(agent)
    compiled.compiled = True
    (g_eager,), (g_compiled,) = generators()[:1], generators()[:1]
    for i, step in enumerate(STEPS):
        batch = make_batch(eager, seed=i)
        single_update(eager, batch, step, g_eager)
        single_update(compiled, batch, step, g_compiled)
        if check_metrics is not None:
            check_metrics(compiled.metrics.pop(), eager.metrics.pop())
    return eager, compiled


@pytest.mark.parametrize("variant", ["sac_ae", "sac_pixel", "sac_states"])
def test_compiled_update_equals_eager_update(variant):
    eager, compiled = update_both(make_seeds(variant, adam_eps=1e-3)[0], assert_metrics_close)
    assert compiled.compiled  # it did not fall back
    assert compiled._compiled  # and its losses ran compiled
    assert_state_matches(compiled.state_dict(), eager)


@pytest.mark.slow  # vmap's graphs take Inductor minutes on two cores
def test_compiled_group_update_equals_eager_group_update():
    def group(compiled: bool) -> GroupAgent:
        agents = make_seeds("sac_ae", adam_eps=1e-3)
        for agent in agents:
            agent.compiled = compiled
        return GroupAgent(agents, generators())

    eager, compiled = group(False), group(True)
    for i, step in enumerate(STEPS):
        batches = [make_batch(eager.template, seed=10 * i + j) for j in range(eager.num_seeds)]
        eager.update(stack_batches(batches), step)
        compiled.update(stack_batches(batches), step)
        for seed in range(eager.num_seeds):
            assert_metrics_close(compiled.metrics.pop(seed), eager.metrics.pop(seed))
    assert compiled.compiled and compiled._compiled
    reference = make_seeds("sac_ae", adam_eps=1e-3)[0]
    for seed in range(eager.num_seeds):
        reference.load_state_dict(eager.seed_state_dict(seed))
        assert_state_matches(compiled.seed_state_dict(seed), reference)


def test_a_compiler_failure_inside_an_update_starts_it_again_eagerly(monkeypatch, capsys):
    """The compiler fails at the actor's loss, after the critic's step ran: the update starts again from the state
    before it, eagerly, and gives the eager agent's parameters and optimizer states bit for bit."""
    real = sacae.agent.compile_update

    def failing_compile(call, device):
        if getattr(call.args[0], "func", None) is sacae.agent.actor_losses:
            raise RuntimeError("Compiler: cc1plus not found\nmore detail")
        return real(call, device)

    monkeypatch.setattr(sacae.agent, "compile_update", failing_compile)
    eager, compiled = update_both(make_seeds("sac_ae")[0])
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("sacae: torch.compile could not compile the update (RuntimeError: Compiler: cc1plus not "
                          "found); training goes on without it")  # fmt: skip
    assert not compiled.compiled
    ours, theirs = compiled.state_dict(), eager.state_dict()
    for net, params in theirs["networks"].items():
        for name, p in params.items():
            assert torch.equal(ours["networks"][net][name], p), (net, name)
    assert torch.equal(ours["log_alpha"], theirs["log_alpha"])
    for name, opt in theirs["optimizers"].items():
        assert ours["optimizers"][name]["state"].keys() == opt["state"].keys(), name
        for j, s in opt["state"].items():
            for k, v in s.items():
                assert torch.equal(ours["optimizers"][name]["state"][j][k], v), (name, j, k)
    assert compiled.metrics.pop() == eager.metrics.pop()


# ------------------------------------------------------------------------------------------------------------
def train(work, compile_mode, kill_at=None, env=None):
    env = {**(env or {}), **({"SACAE_KILL_AT": kill_at} if kill_at else {})}
    return run_cli([*TINY, "--work_dir", str(work), "--compile", compile_mode], cwd=work.parent, env=env)


@pytest.fixture(scope="module")
def compiled_reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("compiled") / "run"
    result = train(work, "on")
    assert result.returncode == 0, result.stderr
    assert "torch.compile" not in result.stderr  # it compiled
    return work


def test_a_compiled_run_killed_and_resumed_is_identical(tmp_path, compiled_reference):
    """Killed inside the seed phase's burst (after the first compiled updates), mid-episode and inside a checkpoint
    write; each process compiles again where it starts. The end equals the uninterrupted compiled run."""
    work = tmp_path / "run"
    for point in ["update:20", "env_step:80", "checkpoint_write:2"]:
        result = train(work, "on", kill_at=point)
        assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stderr[-2000:])
    result = train(work, "on")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    assert_same_run(work, compiled_reference)


@pytest.mark.slow  # a whole compiled run, compiled anew
def test_a_compiled_run_recompiles_over_a_cache_that_a_killed_compile_left(tmp_path, compiled_reference):
    """A process killed while compiling leaves truncated kernels in Inductor's cache. A run that finds them compiles
    again in an empty cache, silently, and trains compiled to the end (to rounding what the compiled run writes:
    the kernels compiled after a failed compile in the same process are not bit for bit those of a fresh one)."""
    cache = tmp_path / "cache"
    shutil.copytree(os.environ["TORCHINDUCTOR_CACHE_DIR"], cache)
    libraries = [path for path in cache.rglob("*.so") if path.is_file()]
    assert libraries
    for path in libraries:
        path.write_bytes(b"")
    work = tmp_path / "run"
    result = train(work, "on", env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    assert "torch.compile" not in result.stderr  # no fallback to eager
    assert json.loads((work / "status.json").read_text())["state"] == "finished"
    ours, theirs = log_rows(work / "eval.log"), log_rows(compiled_reference / "eval.log")
    assert [r["env_steps"] for r in ours] == [r["env_steps"] for r in theirs]
    assert ours[0] == theirs[0]  # before any update
    first, reference = log_rows(work / "train.log")[0], log_rows(compiled_reference / "train.log")[0]
    assert first["critic_loss"] == pytest.approx(reference["critic_loss"], rel=0.05)


def test_without_a_compiler_a_compiled_run_trains_eagerly(tmp_path, compiled_reference):
    """No C++ compiler for Inductor (and no cached kernels): one line on stderr, and the run writes what the eager
    run writes. The compiled run's results differ from the eager one's in rounding only."""
    eager = tmp_path / "eager"
    assert train(eager, "off").returncode == 0
    work = tmp_path / "run"
    env = {"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = train(work, "on", env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "torch.compile" in line]
    assert len(lines) == 1 and "training goes on without it" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert_same_run(work, eager)
    compiled_rows, eager_rows = log_rows(compiled_reference / "eval.log"), log_rows(eager / "eval.log")
    assert [r["env_steps"] for r in compiled_rows] == [r["env_steps"] for r in eager_rows]
    assert compiled_rows[0] == eager_rows[0]  # before any update
