"""DMCEnv against dm_control itself: observation layout, frame stacking, action repeat and rescaling, time limits,
seeding, cameras and task-name parsing.

Pixel environments render in software (tens of ms per frame), so pixel tests share module-scoped environments and
take few steps; everything that does not need an image runs in state mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# sacae.envs must be imported before dm_control: it picks the headless GL backend (MUJOCO_GL) that dm_control
# reads once, at import. Importing dm_control first leaves it on GLFW, which cannot render without a display.
from sacae.envs import DMCEnv, split_task_name

# isort: split
import dm_env
import numpy as np
import pytest
from dm_control import suite

from sacae.errors import SacaeError


def raw_env(domain: str, task: str, seed: int):
    """dm_control's own environment, seeded the way DMCEnv documents."""
    return suite.load(domain, task, task_kwargs={"random": seed})


def flat_obs(time_step) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in time_step.observation.values()])


def groups(obs: np.ndarray, frame_stack: int = 3) -> list[np.ndarray]:
    """The frame_stack RGB frames of a channels-first stacked observation, oldest first."""
    assert obs.shape[0] == 3 * frame_stack
    return [obs[3 * i : 3 * i + 3] for i in range(frame_stack)]


def camera_frame(env: DMCEnv, camera_id: int | None = None) -> np.ndarray:
    """An independent render of the current physics state, channels first."""
    size = env.image_size
    cam = env.camera_id if camera_id is None else camera_id
    return env.physics.render(size, size, camera_id=cam).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def cheetah_pixels():
    env = DMCEnv("cheetah", "run", seed=0, pixels=True, frame_stack=3, action_repeat=2)
    yield env
    env.close()


@pytest.fixture(scope="module")
def cartpole_pixels():
    env = DMCEnv("cartpole", "swingup", seed=1, pixels=True, frame_stack=3, action_repeat=8)
    yield env
    env.close()


# ------------------------------------------------------------------------------------------------------------
# Observation shapes and contents


def test_pixel_observation_shape_cheetah(cheetah_pixels):
    env = cheetah_pixels
    obs, info = env.reset(seed=0)
    assert isinstance(info, dict)
    assert obs.shape == (9, 84, 84)
    assert obs.dtype == np.uint8
    assert env.spec.obs_shape == (9, 84, 84)
    assert env.spec.obs_dtype == np.uint8
    assert env.spec.frame_shape == (3, 84, 84)
    assert env.spec.action_dim == 6
    next_obs, reward, terminated, truncated, _ = env.step(np.zeros(6))
    assert next_obs.shape == (9, 84, 84) and next_obs.dtype == np.uint8
    assert isinstance(reward, float)
    assert isinstance(terminated, bool) and isinstance(truncated, bool)
    # Channels first: the newest frame is the render (H, W, 3) transposed, not reshaped.
    np.testing.assert_array_equal(next_obs[6:9], camera_frame(env))


def test_pixel_observation_other_image_size():
    env = DMCEnv("cartpole", "swingup", seed=0, pixels=True, image_size=64, frame_stack=3, action_repeat=8)
    try:
        obs, _ = env.reset()
        assert obs.shape == (9, 64, 64) and obs.dtype == np.uint8
        assert env.spec.obs_shape == (9, 64, 64)
        next_obs, *_ = env.step(np.zeros(1))
        assert next_obs.shape == (9, 64, 64)
        np.testing.assert_array_equal(next_obs[6:9], camera_frame(env))
    finally:
        env.close()


@pytest.mark.parametrize(
    "domain,task",
    [("cheetah", "run"), ("walker", "walk"), ("cartpole", "swingup")],  # walker has a scalar entry ('height')
)
def test_state_observation_is_flat_dm_control_observation(domain, task):
    seed = 11
    env = DMCEnv(domain, task, seed=seed, pixels=False)
    raw = raw_env(domain, task, seed)
    try:
        expected_len = sum(int(np.prod(s.shape)) for s in raw.observation_spec().values())
        obs, _ = env.reset()
        ts = raw.reset()
        assert obs.dtype == np.float32
        assert obs.ndim == 1
        assert obs.shape == (expected_len,) == env.spec.obs_shape
        assert env.spec.obs_dtype == np.float32
        assert env.frame_stack == 1
        np.testing.assert_array_equal(obs, flat_obs(ts))
        rng = np.random.default_rng(0)
        low, high = raw.action_spec().minimum, raw.action_spec().maximum
        for _ in range(3):
            a = rng.uniform(-1, 1, size=env.spec.action_dim)
            obs, *_ = env.step(a)
            ts = raw.step(low + (a + 1) / 2 * (high - low))
            np.testing.assert_allclose(obs, flat_obs(ts), rtol=1e-6, atol=1e-6)
    finally:
        env.close()
        raw.close()


# ------------------------------------------------------------------------------------------------------------
# Frame stacking


def test_reset_fills_stack_with_first_frame_and_steps_shift_it(cartpole_pixels):
    env = cartpole_pixels
    obs0, _ = env.reset(seed=3)
    f0 = camera_frame(env)
    g = groups(obs0)
    for i in range(3):
        np.testing.assert_array_equal(g[i], f0)

    rng = np.random.default_rng(0)
    frames = [f0]
    prev = obs0
    for step in range(1, 5):
        obs, *_ = env.step(rng.uniform(-1, 1, size=1))
        frames.append(camera_frame(env))
        g = groups(obs)
        # The last group is the new frame...
        np.testing.assert_array_equal(g[2], frames[-1])
        # ...and the stack shifted by one: groups 0, 1 are groups 1, 2 of the previous observation.
        np.testing.assert_array_equal(g[0], groups(prev)[1])
        np.testing.assert_array_equal(g[1], groups(prev)[2])
        # Against the full history, with the reset frame filling the stack's start.
        expected = [frames[max(0, step - 2 + i)] for i in range(3)]
        for i in range(3):
            np.testing.assert_array_equal(g[i], expected[i])
        prev = obs
    # The test means something only if the frames actually changed while the cart moved.
    assert not np.array_equal(frames[0], frames[-1])
    assert not np.array_equal(frames[-2], frames[-1])


def test_reset_after_steps_clears_old_frames(cartpole_pixels):
    env = cartpole_pixels
    env.reset(seed=4)
    for _ in range(3):
        env.step(np.ones(1))
    obs, _ = env.reset(seed=5)
    f0 = camera_frame(env)
    for g in groups(obs):
        np.testing.assert_array_equal(g, f0)


# ------------------------------------------------------------------------------------------------------------
# Action repeat and action rescaling


@pytest.mark.parametrize(
    "domain,task,repeat",
    [("cartpole", "swingup", 8), ("cheetah", "run", 4), ("quadruped", "walk", 2)],  # quadruped: bounds != [-1,1]
)
def test_action_repeat_sums_rewards_and_matches_physics(domain, task, repeat):
    seed = 21
    env = DMCEnv(domain, task, seed=seed, pixels=False, action_repeat=repeat)
    raw = raw_env(domain, task, seed)
    try:
        env.reset()
        raw.reset()
        spec = raw.action_spec()
        low, high = spec.minimum.astype(np.float64), spec.maximum.astype(np.float64)
        rng = np.random.default_rng(1)
        rewards_seen = []
        for _ in range(4):
            a = rng.uniform(-1, 1, size=env.spec.action_dim)
            obs, reward, terminated, truncated, _ = env.step(a)
            scaled = low + (a + 1) / 2 * (high - low)
            raw_rewards = []
            for _ in range(repeat):
                ts = raw.step(scaled)
                raw_rewards.append(ts.reward)
            rewards_seen.extend(raw_rewards)
            assert reward == pytest.approx(sum(raw_rewards), rel=1e-9, abs=1e-12)
            assert not terminated and not truncated
            assert env.physics.data.time == pytest.approx(raw.physics.data.time, abs=1e-12)
            np.testing.assert_allclose(env.physics.get_state(), raw.physics.get_state(), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(obs, flat_obs(ts), rtol=1e-6, atol=1e-6)
        # R simulator steps per agent step.
        assert env.physics.data.time == pytest.approx(4 * repeat * env._env.control_timestep(), rel=1e-9)
        if domain == "cartpole":  # swingup's reward is strictly positive: a sum differs from any single term
            assert min(rewards_seen) > 0
    finally:
        env.close()
        raw.close()


def test_actions_are_rescaled_to_actuator_bounds():
    # Quadruped's actuators have ranges such as [-0.8, 0.8] and [-1, 1.1], so a plain pass-through would fail.
    env = DMCEnv("quadruped", "walk", seed=0, pixels=False, action_repeat=1)
    try:
        env.reset()
        ctrlrange = env.physics.model.actuator_ctrlrange.copy()
        low, high = ctrlrange[:, 0], ctrlrange[:, 1]
        assert not (np.all(low == -1) and np.all(high == 1))
        n = env.spec.action_dim
        assert n == len(low)

        env.step(-np.ones(n))
        np.testing.assert_allclose(env.physics.data.ctrl, low, atol=1e-12)
        env.step(np.ones(n))
        np.testing.assert_allclose(env.physics.data.ctrl, high, atol=1e-12)
        env.step(np.zeros(n))
        np.testing.assert_allclose(env.physics.data.ctrl, (low + high) / 2, atol=1e-12)

        a = np.random.default_rng(0).uniform(-1, 1, size=n)
        env.step(a)
        np.testing.assert_allclose(env.physics.data.ctrl, low + (a + 1) / 2 * (high - low), atol=1e-12)

        # Out-of-range actions are clipped to the bounds.
        out = np.where(np.arange(n) % 2 == 0, 3.0, -2.5)
        env.step(out)
        np.testing.assert_allclose(env.physics.data.ctrl, np.where(out > 0, high, low), atol=1e-12)

        with pytest.raises(ValueError):
            env.step(np.zeros(n + 1))
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------------------
# Episode end: truncation vs termination


def test_time_limit_is_truncation_after_125_steps_with_repeat_8():
    env = DMCEnv("cartpole", "swingup", seed=0, pixels=False, action_repeat=8)
    try:
        env.reset()
        rng = np.random.default_rng(0)
        flags = []
        for _ in range(200):
            _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, size=1))
            flags.append((terminated, truncated))
            if terminated or truncated:
                break
        assert len(flags) == 125
        assert flags[-1] == (False, True)
        assert all(f == (False, False) for f in flags[:-1])
        assert env.physics.data.time == pytest.approx(10.0, abs=1e-6)  # 1000 simulator steps of 0.01 s
    finally:
        env.close()


def test_task_termination_is_terminated_and_stops_the_repeat():
    """A time step with discount 0 (a task's own end) is `terminated`, and the repeat stops there."""
    env = DMCEnv("cartpole", "swingup", seed=0, pixels=False, action_repeat=4)
    try:
        env.reset()
        inner = env._env
        original_step = inner.step
        calls = []

        def step_that_terminates_on_second_call(action):
            ts = original_step(action)
            calls.append(ts.reward)
            if len(calls) == 2:
                ts = ts._replace(step_type=dm_env.StepType.LAST, discount=0.0)
            return ts

        inner.step = step_that_terminates_on_second_call
        try:
            _, reward, terminated, truncated, _ = env.step(np.zeros(1))
        finally:
            del inner.step
        assert len(calls) == 2  # the repeat stopped at the terminal step
        assert terminated is True and truncated is False
        assert reward == pytest.approx(sum(calls))
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------------------
# Seeding


def test_reset_seed_is_reproducible_across_envs_and_resets(cartpole_pixels):
    other = DMCEnv("cartpole", "swingup", seed=99, pixels=True, frame_stack=3, action_repeat=8)
    try:
        actions = np.random.default_rng(5).uniform(-1, 1, size=(3, 1))

        def rollout(env, seed):
            obs, _ = env.reset(seed=seed)
            state = env.physics.get_state().copy()
            observations, rewards = [obs], []
            for a in actions:
                obs, r, *_ = env.step(a)
                observations.append(obs)
                rewards.append(r)
            return state, observations, rewards

        s1, o1, r1 = rollout(cartpole_pixels, 7)
        s2, o2, r2 = rollout(other, 7)  # an env built with another seed, reset with the same one
        s3, o3, r3 = rollout(cartpole_pixels, 7)  # the same env reset again after an episode
        for s, o, r in ((s2, o2, r2), (s3, o3, r3)):
            np.testing.assert_array_equal(s, s1)
            assert r == r1
            for a, b in zip(o, o1, strict=True):
                np.testing.assert_array_equal(a, b)
    finally:
        other.close()


@pytest.mark.parametrize("domain,task", [("cartpole", "swingup"), ("cheetah", "run")])
def test_different_seeds_give_different_initial_states(domain, task):
    env = DMCEnv(domain, task, seed=0, pixels=False)
    try:
        env.reset(seed=1)
        s1 = env.physics.get_state().copy()
        env.reset(seed=2)
        s2 = env.physics.get_state().copy()
        env.reset(seed=1)
        s1_again = env.physics.get_state().copy()
        assert not np.allclose(s1, s2)
        np.testing.assert_array_equal(s1, s1_again)
    finally:
        env.close()


def test_different_seeds_give_different_pixel_observations(cheetah_pixels):
    obs1, _ = cheetah_pixels.reset(seed=1)
    obs2, _ = cheetah_pixels.reset(seed=2)
    assert not np.array_equal(obs1, obs2)


def test_constructor_seed_matches_dm_control_seed():
    seed = 123
    env = DMCEnv("cheetah", "run", seed=seed, pixels=False)
    raw = raw_env("cheetah", "run", seed)
    try:
        obs, _ = env.reset()  # no seed: the constructor's seed drives the first episode
        ts = raw.reset()
        np.testing.assert_array_equal(obs, flat_obs(ts))
        np.testing.assert_array_equal(env.physics.get_state(), raw.physics.get_state())
        # Later resets without a seed continue the same random stream: new, but still dm_control's.
        obs, _ = env.reset()
        ts = raw.reset()
        np.testing.assert_array_equal(obs, flat_obs(ts))
    finally:
        env.close()
        raw.close()


# ------------------------------------------------------------------------------------------------------------
# Camera


def test_quadruped_uses_camera_2():
    env = DMCEnv("quadruped", "walk", seed=0, pixels=True, frame_stack=3)
    try:
        assert env.camera_id == 2
        obs, _ = env.reset()
        np.testing.assert_array_equal(obs[6:9], camera_frame(env, camera_id=2))
        assert not np.array_equal(obs[6:9], camera_frame(env, camera_id=0))
    finally:
        env.close()


def test_other_domains_use_camera_0(cheetah_pixels, cartpole_pixels):
    for env in (cheetah_pixels, cartpole_pixels):
        assert env.camera_id == 0
        obs, _ = env.reset(seed=0)
        np.testing.assert_array_equal(obs[6:9], camera_frame(env, camera_id=0))
        assert not np.array_equal(obs[6:9], camera_frame(env, camera_id=1))
    for domain, task in [("walker", "walk"), ("ball_in_cup", "catch"), ("finger", "spin"), ("reacher", "easy")]:
        assert DMCEnv(domain, task, seed=0, pixels=False).camera_id == 0


def test_explicit_camera_id_is_honoured():
    assert DMCEnv("quadruped", "walk", seed=0, pixels=False, camera_id=0).camera_id == 0
    assert DMCEnv("cheetah", "run", seed=0, pixels=False, camera_id=1).camera_id == 1


def test_gl_backend_choice_survives_dm_control_imported_first():
    script = textwrap.dedent(
        """
        from dm_control import suite  # noqa: F401  (a user, or another library, imported it first)
        from sacae.envs import DMCEnv
        from sacae.errors import SacaeError
        try:
            DMCEnv("cartpole", "swingup", seed=0)
            print("RENDERED")
        except SacaeError as e:
            print("ERROR", e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY", "WAYLAND_DISPLAY")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60).stdout
    lines = [line for line in out.splitlines() if line.startswith(("RENDERED", "ERROR"))]
    if not lines:  # the script itself broke: a real failure, not the documented bug
        pytest.fail(out)
    # Either rendering is headless regardless of import order, or the error names the backend really in use
    # (not the MUJOCO_GL=egl that sacae would have chosen) and how to get the headless one.
    assert lines[0] == "RENDERED" or ("with the glfw backend" in lines[0] and "before importing" in lines[0]), lines[0]


# ------------------------------------------------------------------------------------------------------------
# Task names


@pytest.mark.parametrize(
    "name,expected",
    [
        ("ball_in_cup_catch", ("ball_in_cup", "catch")),
        ("cheetah_run", ("cheetah", "run")),
        ("point_mass_easy", ("point_mass", "easy")),
        ("finger_turn_hard", ("finger", "turn_hard")),
        ("humanoid_CMU_run", ("humanoid_CMU", "run")),
        ("quadruped_walk", ("quadruped", "walk")),
    ],
)
def test_split_task_name(name, expected):
    assert split_task_name(name) == expected


def test_split_task_name_round_trips_every_suite_task():
    for domain, task in suite.ALL_TASKS:
        assert split_task_name(f"{domain}_{task}") == (domain, task)


def test_unknown_task_lists_valid_tasks():
    with pytest.raises(SacaeError) as info:
        split_task_name("cheetah_fly")
    msg = str(info.value)
    assert "cheetah_fly" in msg
    for domain, task in suite.ALL_TASKS:
        assert f"{domain}_{task}" in msg


def test_unknown_task_of_known_domain_lists_its_tasks():
    with pytest.raises(SacaeError) as info:
        split_task_name("walker_fly", "walker", "fly")
    msg = str(info.value)
    assert "fly" in msg
    for domain, task in suite.ALL_TASKS:
        if domain == "walker":
            assert task in msg


def test_unknown_domain_lists_valid_domains():
    domains = sorted({d for d, _ in suite.ALL_TASKS})
    with pytest.raises(SacaeError) as info:
        split_task_name("spaceship_run", "spaceship", "run")
    msg = str(info.value)
    assert "spaceship" in msg
    for d in domains:
        assert d in msg
    # The environment constructor reports the same problem instead of a dm_control traceback.
    with pytest.raises(SacaeError, match="cheetah"):
        DMCEnv("spaceship", "run", seed=0, pixels=False)


# ------------------------------------------------------------------------------------------------------------
# Any suite task, not only the testbed's


def test_help_lists_the_suites_own_tasks(capsys, monkeypatch):
    from sacae.cli import main
    from sacae.envs import task_summary

    summary = task_summary()
    for domain, task in suite.ALL_TASKS:
        assert f"{domain}: " in summary and task in summary
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag: no words broken across lines
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "pendulum: swingup" in out and "humanoid_CMU: run, stand, walk" in out


def test_a_task_outside_the_testbed_trains(tmp_path):
    from sacae.testbed import TESTBED
    from tests.conftest import run_cli

    assert "acrobot_swingup" not in dict(TESTBED)
    work = tmp_path / "run"
    args = ["train", "--task", "acrobot_swingup", "--encoder_type", "identity", "--decoder_type", "identity",
            "--action_repeat", "8", "--hidden_dim", "16", "--batch_size", "8", "--num_train_steps", "125",
            "--init_steps", "100", "--eval_freq", "500", "--num_eval_episodes", "0", "--num_threads", "1",
            "--work_dir", str(work)]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sac_states on acrobot_swingup (action repeat 8)" in result.stderr
    import json

    rows = [json.loads(line) for line in (work / "train.log").read_text().splitlines()]
    assert [(r["env_steps"], r["agent_steps"]) for r in rows] == [(1000, 125)]
    assert rows[0]["critic_loss"] is not None and rows[0]["env_steps_per_second"] > 0
