"""A/B of the compiled update (--compile on) against the eager one, on this machine: `python -m sacae.compile_bench`.

Two agents of one configuration, one eager and one compiled, update on the same random batches (of the real shapes)
in alternating blocks, so that both see the same load on a shared machine. It prints the compile time, each side's
median seconds per update, the median over rounds of eager / compiled, and one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from sacae.agent import SacAeAgent
from sacae.bench import sync_device
from sacae.config import CONFIGURATIONS, TrainConfig
from sacae.process import configure_process, processor_name
from sacae.replay import random_batch
from sacae.trainer import select_device


def compare(configuration: str, rounds: int = 5, block: int = 2, device: str = "cpu", **sizes) -> dict:
    """Alternating blocks of `block` updates, eager then compiled (or compiled then eager, every other round)."""
    cfg = TrainConfig(**CONFIGURATIONS[configuration], **sizes)
    dev = select_device(device)
    action_dim = 6
    obs_shape = (3 * cfg.frame_stack, cfg.image_size, cfg.image_size) if cfg.pixels else (17,)
    torch.manual_seed(1)
    eager = SacAeAgent(obs_shape, action_dim, cfg, dev)
    compiled = copy.deepcopy(eager)
    compiled.compiled = True
    g = torch.Generator().manual_seed(2)
    batches = [random_batch(cfg.pixels, obs_shape, action_dim, cfg.batch_size, dev, g) for _ in range(4)]
    step = 1000

    def timed(agent, n: int) -> list[float]:
        nonlocal step
        seconds = []
        for _ in range(n):
            sync_device(dev)
            t0 = time.perf_counter()
            agent.update(batches[step % len(batches)], step)
            sync_device(dev)
            seconds.append(time.perf_counter() - t0)
            step += 1
        return seconds

    t0 = time.perf_counter()
    timed(compiled, 2)  # both kinds of update (with and without the actor): every loss compiles here
    compile_s = time.perf_counter() - t0
    if not compiled.compiled:
        raise SystemExit("torch.compile failed here (see the line above); nothing to compare")
    timed(eager, 2)
    eager_s, compiled_s, ratios = [], [], []
    for r in range(rounds):
        order = (eager, compiled) if r % 2 == 0 else (compiled, eager)
        times = {id(agent): statistics.median(timed(agent, block)) for agent in order}
        eager_s.append(times[id(eager)])
        compiled_s.append(times[id(compiled)])
        ratios.append(times[id(eager)] / times[id(compiled)])
    return {
        "configuration": configuration,
        "device": str(dev),
        "compile_s": compile_s,
        "eager_median_s": statistics.median(eager_s),
        "compiled_median_s": statistics.median(compiled_s),
        "speedup_median": statistics.median(ratios),
        "speedups": ratios,
        "sizes": {k: getattr(cfg, k) for k in ("image_size", "num_filters", "hidden_dim", "batch_size")},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sacae.compile_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--configurations", nargs="+", default=["sac_ae", "sac_pixel", "sac_states"],
                        choices=sorted(CONFIGURATIONS))  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=2, help="updates per side and round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--image_size", type=int, default=84)
    parser.add_argument("--num_filters", type=int, default=32)
    parser.add_argument("--hidden_dim", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.block < 1:
        parser.error("--rounds and --block must be at least 1")
    configure_process(args.num_threads)
    sizes = {k: getattr(args, k) for k in ("image_size", "num_filters", "hidden_dim", "batch_size")}
    results = []
    print(f"compiled vs eager update: {args.device} ({processor_name()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {sizes}", flush=True)  # fmt: skip
    print(f"{'configuration':<14}{'compile s':>10}{'eager s':>10}{'compiled s':>12}{'eager/compiled':>16}", flush=True)
    for configuration in args.configurations:
        r = compare(configuration, args.rounds, args.block, args.device, **sizes)
        results.append(r)
        print(f"{configuration:<14}{r['compile_s']:>10.1f}{r['eager_median_s']:>10.4f}{r['compiled_median_s']:>12.4f}"
              f"{r['speedup_median']:>15.2f}x", flush=True)  # fmt: skip
    print(json.dumps({"torch": torch.__version__, "processor": processor_name(), "threads": torch.get_num_threads(),
                      "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
