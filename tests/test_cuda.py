"""The GPU path on a GPU: the CPU tests' checks of the update, the overlap, the multi-seed group, a resume and the
compiled update, run with --device cuda.

All are marked `cuda` (`pytest -m cuda tests/test_cuda.py`; tools/gpu/check.sh runs them) and skip where
torch.cuda.is_available() is False, as in CI. SACAE_CUDA_TESTS_ON_CPU=1 runs them on the CPU instead: a check of
their plumbing on a machine without a GPU, not of the GPU.

Two things differ from the CPU tests, both for reasons of the GPU and not of the code under test:
- The exactness tests (update, group, compile) turn TF32 off: torch convolves fp32 in TF32 on a GPU by default
  (10-bit mantissas), which alone makes two computations of the same math differ by ~1e-3.
- Their Adam eps is 1e-3 (tests/test_multiseed.py's TIGHT_EPS, which explains it): at torch's 1e-8 Adam moves a
  parameter by about lr times the sign of its gradient wherever the gradient is tiny, so gradients that rounding
  alone decides (and GPU kernels sum in an unspecified order) differ in effect by lr per step.
The overlap and resume tests compare whole runs bit for bit, in processes with torch.use_deterministic_algorithms
and CUBLAS_WORKSPACE_CONFIG=:4096:8.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sacae.agent import GroupAgent, SacAeAgent, stack_batches
from sacae.config import TrainConfig
from sacae.replay import Batch
from tests import test_agent, test_multiseed
from tests.conftest import ROOT
from tests.test_resume import TINY, assert_same_run

ON_CPU = os.environ.get("SACAE_CUDA_TESTS_ON_CPU", "0") not in ("", "0")
DEVICE = torch.device("cpu" if ON_CPU else "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not ON_CPU and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); SACAE_CUDA_TESTS_ON_CPU=1 runs these tests "
        "on the CPU to check their plumbing",
    ),
]

TIGHT_EPS = test_multiseed.TIGHT_EPS
RTOL, ATOL = 1e-4, 1e-5  # tests/test_agent.py's parameter tolerance


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 matrix products and convolutions in full fp32 (no TF32) for the duration of a test; on the CPU, one torch
    thread (as the CPU tests use)."""
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch 2.9 and later
        saved = (torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        yield
        torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision = saved
    else:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch.set_num_threads(threads)


def on_device(batch: Batch) -> Batch:
    return Batch(*(t.to(DEVICE) for t in batch))


def tight_adam(agent: SacAeAgent) -> SacAeAgent:
    for opt in agent.optimizers().values():
        for group in opt.param_groups:
            group["eps"] = TIGHT_EPS
    return agent


def perturb(module: torch.nn.Module, scale: float, seed: int) -> None:
    """tests/test_agent.py's perturb, for parameters on any device (the noise is drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.device))


# ---------------------------------------------------------------------------------------------------------------
# The fast update against the authors'-style reference update (tests/test_agent.py, on the device)


def make_agent(variant: str, seed: int, **overrides) -> SacAeAgent:
    """tests/test_agent.py's make_agent on DEVICE: the same networks (initialised on the CPU, then moved)."""
    kw = dict(hidden_dim=32, batch_size=test_agent.BATCH, image_size=test_agent.IMAGE, num_filters=8)
    cfg = TrainConfig(**{**kw, **test_agent.VARIANTS[variant], **overrides})
    torch.manual_seed(seed)
    obs_shape = (9, cfg.image_size, cfg.image_size) if cfg.pixels else (test_agent.STATE_DIM,)
    return tight_adam(SacAeAgent(obs_shape, test_agent.ACTION_DIM, cfg, DEVICE))


@pytest.mark.parametrize("variant", ["sac_ae", "sac_pixel", "sac_states"])
def test_fast_update_equals_reference_update_on_the_device(variant):
    agent = make_agent(variant, seed=7)
    perturb(agent.critic_target, 0.05, seed=3)
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.25))
    ref = copy.deepcopy(agent)
    test_agent.assert_independent_copy(agent, ref)
    start = test_agent.snapshot(agent)
    for i, step in enumerate((1000, 1000, 1001, 1002)):
        # torch.manual_seed seeds the GPU's generator too: both updates draw the same noise.
        batch = on_device(test_agent.make_batch(agent, seed=100 + i))
        test_agent.update_like_reference(agent, ref, batch, step, seed=1000 + i)
    assert next(agent.actor.parameters()).device.type == DEVICE.type
    moved = test_agent.changed_keys(start, agent)
    assert test_agent.keys_with(start, "critic.Q1.", "actor.trunk.", "critic_target.Q1.", "log_alpha") <= moved
    if agent.decoder is not None:
        assert test_agent.keys_with(start, "decoder.") <= moved


# ---------------------------------------------------------------------------------------------------------------
# Stacked seeds against single seeds (tests/test_multiseed.py, on the device)


def make_seeds(variant: str) -> list[SacAeAgent]:
    """tests/test_multiseed.py's make_seeds on DEVICE (tight Adam eps)."""
    agents = []
    for i in range(test_multiseed.N):
        kw = dict(hidden_dim=32, batch_size=test_multiseed.BATCH, image_size=test_multiseed.IMAGE, num_filters=8,
                  encoder_feature_dim=16, seed=10 + i)  # fmt: skip
        cfg = TrainConfig(**{**kw, **test_multiseed.VARIANTS[variant]})
        torch.manual_seed(10 + i)
        shape = (9, cfg.image_size, cfg.image_size) if cfg.pixels else (test_multiseed.STATE_DIM,)
        agent = tight_adam(SacAeAgent(shape, test_multiseed.ACTION_DIM, cfg, DEVICE))
        perturb(agent.critic_target, 0.05, seed=20 + i)
        with torch.no_grad():
            agent.log_alpha.fill_(math.log(0.2 + 0.05 * i))
        torch.manual_seed(30 + i)
        agent.update(on_device(test_multiseed.make_batch(agent, seed=40 + i)), 999)
        agent.metrics.pop()
        agents.append(agent)
    return agents


def generators() -> list[torch.Generator]:
    return [torch.Generator(device=DEVICE).manual_seed(500 + i) for i in range(test_multiseed.N)]


def single_update(agent: SacAeAgent, batch: Batch, step: int, generator: torch.Generator) -> None:
    """agent.update drawing from `generator`, through the device's global generator (which SacAeAgent uses)."""
    if DEVICE.type == "cuda":
        torch.cuda.set_rng_state(generator.get_state(), DEVICE)
        agent.update(batch, step)
        generator.set_state(torch.cuda.get_rng_state(DEVICE))
    else:
        test_multiseed.single_update(agent, batch, step, generator)


@pytest.mark.parametrize("variant", ["sac_ae", "sac_pixel", "sac_states"])
def test_group_updates_equal_single_agent_updates_on_the_device(variant):
    singles = make_seeds(variant)
    start = copy.deepcopy(singles[0].state_dict()["networks"])
    stacked = GroupAgent(copy.deepcopy(singles), generators())
    single_generators = generators()
    for k, step in enumerate(test_multiseed.STEPS):
        batches = [on_device(test_multiseed.make_batch(a, seed=100 * i + k)) for i, a in enumerate(singles)]
        stacked.update(stack_batches(batches), step)
        for agent, batch, g in zip(singles, batches, single_generators, strict=True):
            single_update(agent, batch, step, g)
        for i, agent in enumerate(singles):
            got, expected = stacked.metrics.pop(i), agent.metrics.pop()
            for name, value in expected.items():
                if value is None:
                    assert got[name] is None, (step, i, name)
                else:
                    assert got[name] == pytest.approx(value, rel=RTOL, abs=1e-6), (step, i, name)
    for state, agent in zip(stacked.unstack(), singles, strict=True):
        test_multiseed.assert_state_matches(state, agent)
    for name, p in singles[0].state_dict()["networks"]["actor"].items():
        assert not torch.equal(p, start["actor"][name]), name
    assert not torch.allclose(singles[0].actor.trunk[0].weight, singles[1].actor.trunk[0].weight)


# ---------------------------------------------------------------------------------------------------------------
# Whole runs: the overlap and a resume, bit for bit in deterministic mode (tests/test_overlap.py, test_resume.py)

DETERMINISTIC = (
    "import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
    "from sacae.cli import main; sys.exit(main(sys.argv[1:]))"
)


def train(work: Path, kill_at: str | None = None, extra=()) -> subprocess.CompletedProcess:
    """tests/test_resume.py's tiny run on DEVICE, in a process with deterministic algorithms (a warning names any
    operation that has no deterministic implementation)."""
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "SACAE_DEBUG": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("SACAE_KILL_AT", None)
    if kill_at:
        env["SACAE_KILL_AT"] = kill_at
    cmd = [sys.executable, "-c", DETERMINISTIC, *TINY, "--device", str(DEVICE), "--work_dir", str(work), *extra]
    return subprocess.run(cmd, cwd=work.parent, env=env, capture_output=True, text=True, timeout=900)


def assert_same_run_explained(work: Path, reference: Path, *outputs: str) -> None:
    try:
        assert_same_run(work, reference)
    except AssertionError as e:
        warnings = sorted({line for out in outputs for line in out.splitlines() if "deterministic" in line})
        raise AssertionError(f"{e}\nnon-deterministic operations reported: {warnings or 'none'}") from e


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("sequential") / "run"
    result = train(work, extra=["--overlap", "off"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"device {DEVICE.type}" in result.stderr or DEVICE.type == "cpu", result.stderr[-3000:]
    return work, result.stderr


def test_overlapped_run_is_identical_to_the_sequential_one_on_the_device(tmp_path, sequential):
    reference, reference_err = sequential
    work = tmp_path / "run"
    result = train(work, extra=["--overlap", "on"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "overlap on" in result.stderr
    assert_same_run_explained(work, reference, result.stderr, reference_err)


def test_run_killed_mid_step_and_resumed_is_identical_on_the_device(tmp_path, sequential):
    """SIGKILL during an environment step with an overlapped update in flight (after the checkpoint of agent step
    100), then the same command resumes it: the run equals the uninterrupted one."""
    reference, reference_err = sequential
    work = tmp_path / "run"
    killed = train(work, kill_at="env_step:120", extra=["--overlap", "on"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train(work, extra=["--overlap", "on"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "state-000000000100.pt" in resumed.stderr
    assert_same_run_explained(work, reference, resumed.stderr, killed.stderr, reference_err)


# ---------------------------------------------------------------------------------------------------------------
# The compiled update against the eager one (last: compiling takes longest)


def test_compiled_update_equals_the_eager_update(capfd):
    """--compile on (torch.compile; CUDA graphs on a GPU) against --compile off: the same parameters to float
    tolerance over updates of every kind (critic and autoencoder; actor, temperature and targets)."""
    eager, compiled = make_agent("sac_ae", seed=5, compile="off"), make_agent("sac_ae", seed=5, compile="on")
    start = test_agent.snapshot(eager)
    for i, step in enumerate((1000, 1000, 1001, 1002, 1003, 1004)):
        batch = on_device(test_agent.make_batch(eager, seed=200 + i))
        torch.manual_seed(2000 + i)
        eager.update(batch, step)
        torch.manual_seed(2000 + i)
        compiled.update(batch, step)
        got, expected = compiled.metrics.pop(), eager.metrics.pop()
        for name, value in expected.items():
            if value is None:
                assert got[name] is None, (step, name)
            else:
                assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, name)
    test_agent.assert_same_state(compiled, eager)
    assert test_agent.keys_with(start, "decoder.", "actor.trunk.") <= test_agent.changed_keys(start, eager)
    if DEVICE.type == "cuda":  # not vacuous: the compiled agent did not fall back to eager updates
        err = capfd.readouterr().err
        assert getattr(compiled, "compiled", True), f"the update fell back to eager: {err[-2000:]}"
