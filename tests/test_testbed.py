from sacae.config import PLANET_ACTION_REPEAT
from sacae.envs import split_task_name
from sacae.testbed import TESTBED, published_returns


def test_testbed_tasks_exist_and_use_the_preset_action_repeat():
    assert len(TESTBED) == 10 and len({task for task, _ in TESTBED}) == 10
    for task, action_repeat in TESTBED:
        domain, _ = split_task_name(task)
        assert PLANET_ACTION_REPEAT[domain] == action_repeat, task


def test_published_returns_ship_with_the_package():
    rows = published_returns()
    assert len(rows) == 42
    by_key = {(r.method, r.task, r.env_steps, r.source): r for r in rows}
    assert (by_key[("sac_ae", "cartpole_swingup", 100_000, "curl")].mean,
            by_key[("sac_ae", "cartpole_swingup", 100_000, "curl")].std) == (311.0, 11.0)  # fmt: skip
    assert by_key[("sac_state", "walker_walk", 100_000, "curl")].mean == 891.0
    planet = {task for task, _ in TESTBED[:6]}
    assert {r.task for r in rows} == planet
    for r in rows:
        if r.method != "sac_state":
            assert dict(TESTBED)[r.task] == r.action_repeat, r
