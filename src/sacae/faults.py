"""Fault injection for the resume and error tests: SACAE_KILL_AT=<point>:<n> kills this process with SIGKILL the
n-th time it reaches <point> (update, env_step, eval_episode, checkpoint_write); SACAE_RAISE_AT=<point>:<n> raises
an unexpected RuntimeError there instead. Unset, each check is one comparison."""

from __future__ import annotations

import os
import signal


def _parse(variable: str) -> tuple[str | None, int]:
    spec = os.environ.get(variable)
    if not spec:
        return None, 0
    point, _, count = spec.partition(":")
    return point, int(count or 1)


_KILL_POINT, _KILL_COUNT = _parse("SACAE_KILL_AT")
_RAISE_POINT, _RAISE_COUNT = _parse("SACAE_RAISE_AT")
_seen: dict[str, int] = {}


def reached(point: str) -> None:
    if point != _KILL_POINT and point != _RAISE_POINT:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if point == _KILL_POINT and _seen[point] == _KILL_COUNT:
        os.kill(os.getpid(), signal.SIGKILL)
    if point == _RAISE_POINT and _seen[point] == _RAISE_COUNT:
        raise RuntimeError(f"fault injected at {point} {_RAISE_COUNT}")
