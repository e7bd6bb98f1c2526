"""Full checkpoints of a training run, written so that nothing is ever lost.

Layout under WORK_DIR/checkpoint/:

    state-<agent steps>.pt     everything but the replay contents (torch.save of tensors and plain values,
                               loaded with weights_only=True), including the list of replay chunks it needs
    replay/chunk-<first frame>-<end frame>.npz
                               the frames and transitions added between two checkpoints (numpy arrays,
                               loaded with allow_pickle=False)

A checkpoint writes only the replay data added since the previous one, so its cost grows with new data, not with
the buffer. Every file is written to a temporary name, fsynced and renamed; the state file is written last, so a
checkpoint exists only once all its chunks do. The previous checkpoint and its chunks are kept until the next one
is complete; chunks that no kept checkpoint needs any more are deleted.
"""

from __future__ import annotations

import errno
import io
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sacae import faults
from sacae.errors import SacaeError
from sacae.replay import ReplayBuffer
from sacae.storage import atomic_path, load_torch

FORMAT = "sacae-checkpoint"
VERSION = 1
STATE_RE = re.compile(r"state-(\d+)\.pt")
CHUNK_RE = re.compile(r"chunk-(\d+)-(\d+)\.npz")
KEEP = 2  # the newest checkpoint and the one before it


@dataclass
class Chunk:
    name: str
    frame_range: tuple[int, int]
    transition_range: tuple[int, int]


class CheckpointStore:
    """Writes and finds the checkpoints of one run directory."""

    def __init__(self, work_dir: str | Path):
        self.dir = Path(work_dir) / "checkpoint"
        self.replay_dir = self.dir / "replay"
        self.chunks: list[Chunk] = []  # the chunks the newest checkpoint needs, oldest first
        self._kept_chunks: list[set[str]] = []  # chunk names of each kept checkpoint, newest last

    # ---------------------------------------------------------------------------------------------------------
    def states(self) -> list[Path]:
        """State files, newest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := STATE_RE.fullmatch(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def exists(self) -> bool:
        return bool(self.states())

    def remove_all(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.chunks, self._kept_chunks = [], []

    # ---------------------------------------------------------------------------------------------------------
    def save(self, state: dict[str, Any], replay: ReplayBuffer, agent_steps: int) -> Path:
        """Persist the replay data added since the last checkpoint, then `state` (with the chunk list)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.replay_dir.mkdir(exist_ok=True)
        first_frame, end_frame, first_tr, end_tr = replay.live_range()
        frames_from = self.chunks[-1].frame_range[1] if self.chunks else 0
        transitions_from = self.chunks[-1].transition_range[1] if self.chunks else 0
        # Chunks whose frames and transitions have all left the buffer are no longer needed.
        chunks = [c for c in self.chunks if c.frame_range[1] > first_frame or c.transition_range[1] > first_tr]

        new_chunk = None
        if end_frame > frames_from or end_tr > transitions_from:
            data = replay.chunk_since(frames_from, transitions_from)
            f0, f1 = (int(x) for x in data["frame_range"])
            t0, t1 = (int(x) for x in data["transition_range"])
            new_chunk = (Chunk(f"chunk-{f0:012d}-{f1:012d}.npz", (f0, f1), (t0, t1)), data)
        state = dict(state, format=FORMAT, version=VERSION)
        all_chunks = chunks + ([new_chunk[0]] if new_chunk else [])
        state["replay_chunks"] = [[c.name, *c.frame_range, *c.transition_range] for c in all_chunks]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        path = self.dir / f"state-{agent_steps:012d}.pt"

        needed = len(payload) + (sum(a.nbytes for a in new_chunk[1].values()) if new_chunk else 0)
        self._check_space(needed, path)
        try:
            if new_chunk is not None:
                with atomic_path(self.replay_dir / new_chunk[0].name) as tmp:
                    np.savez(tmp, **new_chunk[1])
            faults.reached("checkpoint_write")
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(payload)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._raise_no_space(needed, path)
            raise SacaeError(f"Could not write the checkpoint {path} ({e.strerror or e}).") from None

        self.chunks = all_chunks
        self._kept_chunks = (self._kept_chunks + [{c.name for c in all_chunks}])[-KEEP:]
        self._prune(keep_state=path)
        return path

    def _check_space(self, needed: int, path: Path) -> None:
        free = shutil.disk_usage(self.dir).free
        if needed > free:
            self._raise_no_space(needed, path, free)

    def _raise_no_space(self, needed: int, path: Path, free: int | None = None) -> None:
        free = shutil.disk_usage(self.dir).free if free is None else free
        previous = self.states()
        kept = f"the previous checkpoint {previous[0].name} is intact" if previous else "no checkpoint was written"
        raise SacaeError(
            f"The disk is full: the checkpoint {path.name} needs about {needed / 1e6:.1f} MB in {self.dir} and "
            f"{free / 1e6:.1f} MB are free; {kept}. Free at least {max(needed - free, 0) / 1e6 + 1:.0f} MB and run "
            f"the same command again to resume."
        )

    def _prune(self, keep_state: Path) -> None:
        """Delete state files beyond the newest KEEP, chunks no kept state needs, and leftover temporary files."""
        states = self.states()
        for old in states[KEEP:]:
            old.unlink(missing_ok=True)
        needed = set().union(*self._kept_chunks) if self._kept_chunks else set()
        for p in self.replay_dir.iterdir():
            if CHUNK_RE.fullmatch(p.name) and p.name not in needed:
                p.unlink(missing_ok=True)
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        for folder in (self.dir, self.replay_dir):
            if folder.is_dir():
                for p in folder.glob(".*.tmp*"):
                    p.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------------------------------
    def load_latest(self, replay_factory, at_most: int | None = None) -> tuple[dict[str, Any], ReplayBuffer] | None:
        """The newest readable checkpoint as (state, replay buffer), or None when there is none.

        `replay_factory()` makes an empty buffer of the run's shape. A damaged checkpoint (state file or one of
        its chunks) is reported on stderr and the previous one is tried; if none can be read, SacaeError. With
        `at_most`, only checkpoints of at most that many agent steps count (a group of seeds resumes from a step
        that every seed has), and the newer ones are deleted once one is loaded: the run continues from before them.
        """
        newer = [p for p in self.states() if at_most is not None and step_of(p) > at_most]
        states = [p for p in self.states() if p not in newer]
        if not states:
            return None
        self._remove_temporaries()
        problems = []
        for path in states:
            try:
                state = self._read_state(path)
                replay = replay_factory()
                for name, *_ in state["replay_chunks"]:
                    self._read_chunk(self.replay_dir / name, replay, state["replay"])
                replay.load_state_dict(state["replay"])
            except SacaeError as e:
                problems.append(str(e).rstrip("."))
                continue
            for problem in problems:
                print(f"sacae: warning: {problem}; using the older checkpoint {path.name}.", file=sys.stderr)
            for damaged in states[: states.index(path)]:
                # Kept for inspection, out of the way of the checkpoints this run writes from here on.
                damaged.replace(damaged.with_name(damaged.name + ".damaged"))
            for later in newer:
                later.unlink(missing_ok=True)
            self.chunks = [Chunk(n, (f0, f1), (t0, t1)) for n, f0, f1, t0, t1 in state["replay_chunks"]]
            self._kept_chunks = [{c.name for c in self.chunks}]
            return state, replay
        raise SacaeError(
            f"No checkpoint in {self.dir} can be read ({'; '.join(problems)}); start over with --no_resume."
        )

    def newest_says_finished(self) -> bool | None:
        """Whether the newest readable checkpoint is of a finished run (None when no checkpoint can be read): the
        record a guard trusts over status.json, which a user may have deleted or edited."""
        for path in self.states():
            try:
                state = self._read_state(path)
            except SacaeError:
                continue
            return bool(state.get("finished"))
        return None

    @staticmethod
    def _read_state(path: Path) -> dict[str, Any]:
        state = load_torch(path, map_location="cpu")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise SacaeError(f"The checkpoint {path} is not a sacae checkpoint.")
        if state.get("version") != VERSION:
            raise SacaeError(f"The checkpoint {path} has format version {state.get('version')}, not {VERSION}.")
        return state

    @staticmethod
    def _read_chunk(path: Path, replay: ReplayBuffer, replay_state: dict[str, Any]) -> None:
        try:
            with np.load(path, allow_pickle=False) as data:
                chunk = {k: data[k] for k in data.files}
            replay.load_chunk(chunk, int(replay_state["frames_written"]), int(replay_state["transitions_written"]))
        except FileNotFoundError:
            raise SacaeError(f"The replay chunk {path} of the checkpoint is missing.") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise SacaeError(f"The replay chunk {path} is damaged ({type(e).__name__}: {e}).") from None


def step_of(path: Path) -> int:
    """The agent steps of a state file, from its name."""
    return int(STATE_RE.fullmatch(path.name).group(1))


# ------------------------------------------------------------------------------------------------------------
# RNG states as values that torch.load(weights_only=True) accepts (tensors, ints, floats, strings, containers).
def numpy_legacy_state(state: tuple) -> dict[str, Any]:
    name, key, pos, has_gauss, cached = state
    return {"name": name, "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def numpy_legacy_tuple(state: dict[str, Any]) -> tuple:
    key = state["key"].numpy().astype(np.uint32)
    return (state["name"], key, state["pos"], state["has_gauss"], state["cached"])


def to_tensors(value: Any) -> Any:
    """numpy arrays (at any depth of dicts and lists) as tensors."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: to_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_tensors(v) for v in value)
    return value


def to_arrays(value: Any) -> Any:
    """The inverse of `to_tensors`."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: to_arrays(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_arrays(v) for v in value)
    return value
