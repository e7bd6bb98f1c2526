"""Checkpoint cost versus replay size: `python -m sacae.checkpoint_bench [--sizes 5000 50000 500000]`.

For each replay size N it times the periodic checkpoint of a pixel SAC+AE run (default networks and optimizers)
whose buffer already holds N transitions, of which the last `--new` (one evaluation interval) were added since the
previous checkpoint. Only the newest frames are ever written in memory (the rest of the ring is allocated but
untouched), so large N fit on a small machine; the checkpoint reads and writes exactly what it would in a real run.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sacae.agent import SacAeAgent
from sacae.checkpoint import CheckpointStore, Chunk
from sacae.config import TrainConfig, resolve
from sacae.replay import ReplayBuffer


def checkpoint_cost(size: int, new: int, folder: Path, repeats: int = 3) -> dict:
    cfg = resolve(TrainConfig(task="cartpole_swingup", device="cpu"))
    obs_shape, frame_shape = (9, 84, 84), (3, 84, 84)
    agent = SacAeAgent(obs_shape, 1, cfg, torch.device("cpu"))
    episode = cfg.episode_agent_steps
    seconds, sizes = [], []
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, frame_shape, dtype=np.uint8)
    for r in range(repeats):
        buffer = ReplayBuffer(frame_shape, np.uint8, 1, max(size, new), 3, episode)
        store = CheckpointStore(folder / f"{size}-{r}")
        # The buffer as it stands after size - new transitions (persisted by an earlier checkpoint) ...
        old = size - new
        old_frames = old + old // episode
        buffer.load_state_dict({"frames_written": old_frames, "transitions_written": old, "current_t": -1,
                                "rng": buffer.rng.bit_generator.state})  # fmt: skip
        store.chunks = [Chunk("earlier", (0, old_frames), (0, old))]
        # ... then one evaluation interval of new episodes.
        for t in range(new):
            if t % episode == 0:
                buffer.start_episode(frame)
            buffer.add(np.zeros(1, np.float32), 0.0, frame, 1.0)
        state = {"agent": agent.state_dict(), "replay": buffer.state_dict()}
        start = time.perf_counter()
        path = store.save(state, buffer, size)
        seconds.append(time.perf_counter() - start)
        written = path.stat().st_size + sum(p.stat().st_size for p in store.replay_dir.glob("*.npz"))
        sizes.append(written)
        store.remove_all()
    return {"replay_transitions": size, "new_transitions": new, "median_s": statistics.median(seconds),
            "min_s": min(seconds), "max_s": max(seconds), "bytes_written": int(statistics.median(sizes))}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 50_000, 500_000])
    parser.add_argument("--new", type=int, default=5_000, help="transitions added since the previous checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = [checkpoint_cost(n, min(args.new, n), Path(tmp), args.repeats) for n in args.sizes]
    header = ("replay transitions", "new", "median s", "min s", "max s", "MB written")
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, (19, 6, 8, 6, 6, 10), strict=True)))
    for r in rows:
        print(f"{r['replay_transitions']:>19,} | {r['new_transitions']:>6,} | {r['median_s']:>8.2f} | "
              f"{r['min_s']:>6.2f} | {r['max_s']:>6.2f} | {r['bytes_written'] / 1e6:>10.1f}")  # fmt: skip
    print(json.dumps({"checkpoint": rows, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
