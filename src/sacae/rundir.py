"""The run folder: the files a training run writes there, and its status.json as every command reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Outputs of a run that starting over (--no_resume) removes.
RUN_OUTPUTS = ("train.log", "eval.log", "status.json", "tb", "video", "model", "checkpoint")


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's status.json (None when absent or unreadable)."""
    try:
        status = json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None
