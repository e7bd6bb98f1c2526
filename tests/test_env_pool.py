"""EnvPool against the same environments stepped one after another: observations (pixels included), rewards, flags,
states for checkpoints, renders for videos, errors, and the asynchronous step, for worker threads and processes.

Pixel environments render 16x16 images here: the same code path as 84x84 at a fraction of the cost.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading

# sacae.envs before dm_control: it picks the headless GL backend.
from sacae.envs import DMCEnv

# isort: split
import numpy as np
import pytest

from sacae.env_pool import EnvPool, RemoteEnv, default_workers
from sacae.errors import SacaeError

PARALLEL = ["threads", "processes"]


def cartpole(seed: int, pixels: bool = True) -> functools.partial:
    return functools.partial(
        DMCEnv, "cartpole", "swingup", seed=seed, pixels=pixels, image_size=16, action_repeat=8, frame_stack=3
    )


def point_mass(seed: int) -> functools.partial:
    # 1000-step episodes at action repeat 250: an episode ends every 4 agent steps.
    return functools.partial(DMCEnv, "point_mass", "easy", seed=seed, pixels=False, action_repeat=250)


def actions_for(steps: int, num_envs: int, action_dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (steps, num_envs, action_dim)).astype(np.float32)


def assert_same(a, b) -> None:
    """Equal to the bit: arrays by dtype, shape and value, everything else by ==."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    else:
        assert a == b and type(a) is type(b)


def serial_trajectory(makes, actions, reset_seeds) -> list:
    """What the environments give stepped one after another on this thread, resetting all when one ends."""
    envs = [make() for make in makes]
    try:
        out = [[env.reset(seed=s) for env, s in zip(envs, reset_seeds, strict=True)]]
        for step_actions in actions:
            results = [env.step(a) for env, a in zip(envs, step_actions, strict=True)]
            out.append(results)
            if any(r[2] or r[3] for r in results):
                out.append([env.reset() for env in envs])
        return out
    finally:
        for env in envs:
            env.close()


def pool_trajectory(pool: EnvPool, actions, reset_seeds) -> list:
    out = [pool.reset(seeds=reset_seeds)]
    for step_actions in actions:
        results = pool.step(list(step_actions))
        out.append(results)
        if any(r[2] or r[3] for r in results):
            out.append(pool.reset())
    return out


@pytest.mark.parametrize("workers", PARALLEL)
def test_pixels_equal_serial_stepping(workers):
    makes = [cartpole(1), cartpole(2)]
    actions = actions_for(4, 2, 1)
    expected = serial_trajectory(makes, actions, [11, 12])
    with EnvPool(makes, workers=workers) as pool:
        got = pool_trajectory(pool, actions, [11, 12])
    assert_same(expected, got)
    # The two seeds really differ, so a pool that mixed environments up would fail.
    assert not np.array_equal(got[-1][0][0], got[-1][1][0])


@pytest.mark.parametrize("workers", PARALLEL)
def test_states_equal_serial_across_episode_ends(workers):
    makes = [point_mass(1), point_mass(2)]
    actions = actions_for(5, 2, 2)
    expected = serial_trajectory(makes, actions, [5, 6])
    with EnvPool(makes, workers=workers) as pool:
        got = pool_trajectory(pool, actions, [5, 6])
    assert_same(expected, got)
    assert [all(r[3] for r in step) for step in got if len(step[0]) == 5] == [False] * 3 + [True, False]


@pytest.mark.parametrize("workers", PARALLEL)
def test_state_round_trip_through_the_pool(workers):
    # Environments of different kinds in one pool: each worker holds its own.
    with EnvPool([cartpole(1), point_mass(2)], workers=workers) as pool:
        dims = [env.spec.action_dim for env in pool.envs]
        actions = [[np.full(d, 0.1 * (k + 1), np.float32) for d in dims] for k in range(5)]
        pool.reset(seeds=[3, 4])
        for a in actions[:2]:
            pool.step(a)
        states = pool.get_state()
        expected = [pool.step(a) for a in actions[2:]]  # the point mass's episode ends on the way
        assert expected[1][1][3] and not expected[0][1][3]
        observations = pool.set_state(states)
        assert observations[0].shape == (9, 16, 16) and observations[1].shape == (4,)
        assert_same(expected, [pool.step(a) for a in actions[2:]])


@pytest.mark.parametrize("workers", PARALLEL)
def test_single_environments_through_their_stand_ins(workers):
    direct = cartpole(1)()
    try:
        direct.reset(seed=2)
        direct.step(np.array([0.5], np.float32))
        with EnvPool([cartpole(1), cartpole(5, pixels=False)], workers=workers) as pool:
            env = pool.envs[0]
            assert isinstance(env, RemoteEnv)
            env.reset(seed=2)
            env.step(np.array([0.5], np.float32))
            assert_same(direct.step(np.array([0.3], np.float32)), env.step(np.array([0.3], np.float32)))
            # A video frame, rendered on the environment's own worker (its GL context's thread): the same pixels.
            assert_same(direct.render(24, 32), env.render(24, 32))
            assert env.spec == direct.spec and env.frame_stack == 3
            assert env.episode_env_steps == direct.episode_env_steps == 16
            assert_same(direct.get_state(), env.get_state())
            rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
            assert_same(direct.sample_action(rng_a), env.sample_action(rng_b))
            assert_same(rng_a.random(), rng_b.random())  # the caller's generator moved as the environment's does
    finally:
        direct.close()


@pytest.mark.parametrize("workers", PARALLEL)
def test_async_step_equals_step_and_checks_its_use(workers):
    actions = actions_for(3, 2, 1)
    with EnvPool([cartpole(1, pixels=False), cartpole(2, pixels=False)], workers=workers) as a:
        with EnvPool([cartpole(1, pixels=False), cartpole(2, pixels=False)], workers=workers) as b:
            a.reset(), b.reset()
            for step_actions in actions:
                b.step_async(list(step_actions))
                with pytest.raises(RuntimeError, match="step_wait"):
                    b.step_async(list(step_actions))
                with pytest.raises(RuntimeError, match="step_wait"):
                    b.get_state()
                assert_same(a.step(list(step_actions)), b.step_wait())
            with pytest.raises(RuntimeError, match="without step_async"):
                b.step_wait()


@pytest.mark.parametrize("workers", PARALLEL)
def test_an_environments_error_reaches_the_caller_as_its_own(workers):
    direct = cartpole(2, pixels=False)()
    direct.reset(seed=1)
    with EnvPool([cartpole(1, pixels=False), cartpole(2, pixels=False)], workers=workers) as pool:
        pool.reset(seeds=[0, 1])
        with pytest.raises(ValueError, match=r"action has shape \(2,\), expected \(1,\)"):
            pool.step([np.zeros(2, np.float32), np.full(1, 0.5, np.float32)])
        # Environment 1 took its step all the same, and the pool goes on.
        direct.step(np.full(1, 0.5, np.float32))
        expected = direct.step(np.full(1, -0.5, np.float32))
        got = pool.step([np.zeros(1, np.float32), np.full(1, -0.5, np.float32)])[1]
        assert_same(expected, got)
    direct.close()
    with pytest.raises(SacaeError, match="Unknown task 'nope'"):
        EnvPool([cartpole(1, pixels=False), functools.partial(DMCEnv, "cartpole", "nope", seed=1)], workers=workers)


def test_one_environment_runs_here_with_no_worker():
    assert default_workers(1, pixels=True) == "serial" and default_workers(4, pixels=False) == "serial"
    assert default_workers(2, pixels=True) == "processes"
    before = threading.active_count()
    with EnvPool([cartpole(1, pixels=False)]) as pool:
        assert pool.workers == "serial" and type(pool.envs[0]) is DMCEnv
        assert threading.active_count() == before
        pool.reset(seeds=[0])
        pool.step_async([np.zeros(1, np.float32)])  # serial: steps at once
        assert pool.envs[0].episode_env_steps == 8
        assert len(pool.step_wait()) == 1


def test_indices_select_environments():
    with EnvPool([cartpole(s, pixels=False) for s in (1, 2, 3)], workers="threads") as pool:
        pool.reset(seeds=[0, 0, 0])
        results = pool.step([np.full(1, 0.2, np.float32), np.full(1, 0.4, np.float32)], indices=[2, 0])
        assert len(results) == 2
        assert [env.episode_env_steps for env in pool.envs] == [8, 0, 8]
        with pytest.raises(ValueError, match="distinct"):
            pool.step([np.zeros(1, np.float32)] * 2, indices=[1, 1])


def test_a_pool_left_open_closes_quietly_at_exit():
    # dm_control frees GL contexts at exit from the main thread, which fails (a traceback per context on stderr) for
    # contexts current on a worker thread: the pool closes its environments on their own threads first.
    script = textwrap.dedent(
        """
        import functools
        from sacae.envs import DMCEnv
        from sacae.env_pool import EnvPool
        pool = EnvPool([functools.partial(DMCEnv, "cartpole", "swingup", seed=s, image_size=16) for s in (1, 2)],
                       workers="threads")
        pool.reset()
        print(pool.envs[1].render(8, 8).shape)
        del pool
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(8, 8, 3)"
    assert done.stderr == ""


def test_worker_processes_outlive_stop_signals_and_report_a_death():
    # Ctrl-C and Slurm's signals reach every process of the job; the trainer answers them with a checkpoint, for
    # which it needs every environment's state.
    with EnvPool([point_mass(1), point_mass(2)], workers="processes") as pool:
        pool.reset()
        workers = sorted((p for p in multiprocessing.active_children() if p.name.startswith("sacae-env-")),
                         key=lambda p: p.name)  # fmt: skip
        assert len(workers) == 2
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            os.kill(workers[0].pid, signum)
        assert len(pool.get_state()) == 2
        os.kill(workers[1].pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="sacae-env-1 .* died"):
            pool.step([np.zeros(2, np.float32)] * 2)
