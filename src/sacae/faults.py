"""Fault injection for the resume tests: SACAE_KILL_AT=<point>:<n> kills this process with SIGKILL the n-th time
it reaches <point> (update, env_step, eval_episode, checkpoint_write). Unset, each check is one comparison."""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("SACAE_KILL_AT")
_POINT, _, _COUNT = (_SPEC or "").partition(":")
_seen = 0


def reached(point: str) -> None:
    global _seen
    if _SPEC is None or point != _POINT:
        return
    _seen += 1
    if _seen == int(_COUNT or 1):
        os.kill(os.getpid(), signal.SIGKILL)
