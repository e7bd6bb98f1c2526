"""The training configuration: one typed dataclass whose fields carry the defaults of ALGORITHM.md and their help.

Step counts (`num_train_steps`, `init_steps`, `eval_freq`) are AGENT steps, as in the authors' release; one agent
step is `action_repeat` environment steps, and everything we print or plot (S in the console, `env_steps` in the
logs) counts environment steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sacae.errors import SacaeError

# PlaNet benchmark action repeats (ALGORITHM.md), by domain. Pixel runs of a domain not listed use 1, the authors'
# release's default; state runs always use 1.
PLANET_ACTION_REPEAT: dict[str, int] = {
    "cartpole": 8,
    "finger": 2,
    "walker": 2,
    "cheetah": 4,
    "reacher": 4,
    "ball_in_cup": 4,
    "hopper": 4,
}
DEFAULT_ACTION_REPEAT = 1

# Flags that say how to start (resume or not) rather than what to train: never saved in config.json.
RUN_CONTROL_FIELDS = ("resume", "no_resume", "force")
# Flags that change where and how fast a run executes, not what it computes: a run may resume with other values,
# and seeds that differ only in them are the same experiment.
EXECUTION_FIELDS = ("device", "num_threads", "overlap", "replay_device")

# dm_control episodes are 1000 simulator steps long.
EPISODE_ENV_STEPS = 1000


@dataclass(frozen=True)
class TrainConfig:
    """Train a SAC+AE agent on a DeepMind Control Suite task.

    Step flags (--num_train_steps, --init_steps, --eval_freq) count AGENT steps, as in the authors' release:
    environment steps = agent steps x action_repeat. The console's S and the logs' env_steps count environment
    steps.
    """

    # --- task ---
    domain_name: str = "cheetah"
    """dm_control domain, e.g. cheetah, walker, cartpole."""
    task_name: str = "run"
    """dm_control task of the domain, e.g. run, walk, swingup."""
    task: str | None = None
    """Shorthand DOMAIN_TASK (e.g. cartpole_swingup, ball_in_cup_catch); overrides --domain_name/--task_name."""
    image_size: int = 84
    """Side of the square pixel observation."""
    action_repeat: int | None = None
    """Simulator steps per agent step (rewards summed). Default: the PlaNet value for the domain for pixel runs
    (cartpole 8; finger, walker 2; cheetah, reacher, ball_in_cup, hopper 4; else 1), 1 for state runs."""
    frame_stack: int = 3
    """Number of consecutive frames stacked along channels."""

    # --- agent variant (the folder names sac_ae / sac_pixel / sac_states follow from these two) ---
    encoder_type: Literal["pixel", "identity"] = "pixel"
    """pixel: convolutional encoder on images; identity: the state vector itself."""
    decoder_type: Literal["pixel", "identity"] = "pixel"
    """pixel: train a pixel decoder (the autoencoder); identity: no decoder."""

    # --- schedule (agent steps) ---
    num_train_steps: int = 1_000_000
    """Agent steps to train for (environment steps = this x action_repeat)."""
    init_steps: int = 1000
    """Seed phase: agent steps of uniformly random actions before the first update."""
    seed_updates: Literal["burst", "spread"] = "burst"
    """burst: run init_steps updates at once when the seed phase ends (the authors' release); spread: run them as
    one extra update per agent step over the next init_steps steps (same number of updates)."""
    eval_freq: int = 10_000
    """Evaluate (and snapshot) every this many agent steps, and once at the start and at the end."""
    num_eval_episodes: int = 10
    """Episodes per evaluation, with the deterministic policy."""

    # --- replay ---
    replay_buffer_capacity: int = 1_000_000
    """Transitions kept in the replay buffer."""
    batch_size: int = 128
    """Transitions per update."""

    # --- networks ---
    hidden_dim: int = 1024
    """Width of the actor and critic MLPs."""
    encoder_feature_dim: int = 50
    """Size of the encoder's output features."""
    num_layers: int = 4
    """Convolutional layers in the encoder (and transposed ones in the decoder)."""
    num_filters: int = 32
    """Filters per convolutional layer."""

    # --- critic ---
    critic_lr: float = 1e-3
    """Learning rate of the critic optimizer (Q heads and encoder)."""
    critic_beta: float = 0.9
    """Adam beta1 of the critic optimizer."""
    critic_tau: float = 0.01
    """Polyak rate of the target Q heads."""
    critic_target_update_freq: int = 2
    """Update the target critic every this many updates."""
    discount: float = 0.99
    """Discount factor of the critic target."""

    # --- actor and temperature ---
    actor_lr: float = 1e-3
    """Learning rate of the actor optimizer."""
    actor_beta: float = 0.9
    """Adam beta1 of the actor optimizer."""
    actor_log_std_min: float = -10.0
    """Lower bound of the policy's log standard deviation (tanh-rescaled into [min, max])."""
    actor_log_std_max: float = 2.0
    """Upper bound of the policy's log standard deviation."""
    actor_update_freq: int = 2
    """Update the actor and temperature every this many updates."""
    init_temperature: float = 0.1
    """Initial entropy temperature alpha."""
    alpha_lr: float = 1e-4
    """Learning rate of the temperature (log alpha) optimizer."""
    alpha_beta: float = 0.5
    """Adam beta1 of the temperature optimizer."""

    # --- encoder and decoder ---
    encoder_lr: float = 1e-3
    """Learning rate of the encoder optimizer used by the autoencoder loss."""
    encoder_tau: float = 0.05
    """Polyak rate of the target encoder."""
    decoder_lr: float = 1e-3
    """Learning rate of the decoder optimizer."""
    decoder_update_freq: int = 1
    """Run the autoencoder step every this many updates."""
    decoder_latent_lambda: float = 1e-6
    """Weight of the L2 penalty on the latent code."""
    decoder_weight_lambda: float = 1e-7
    """Weight decay of the decoder optimizer."""

    # --- run ---
    seed: int = 1
    """Seed of the environments, the networks' initialisation, the replay sampling and the exploration."""
    work_dir: str = "./save"
    """Folder for config.json, train.log, eval.log, tb/, video/ and model/."""
    save_tb: bool = False
    """Write TensorBoard curves to WORK_DIR/tb."""
    save_video: bool = False
    """Write one evaluation episode per evaluation to WORK_DIR/video/<env_steps>.mp4."""
    save_model: bool = False
    """Write a snapshot of the networks at each evaluation to WORK_DIR/model/<env_steps>.pt."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 is the faithful default; bf16 runs the networks under autocast (opt-in, faster, not yet validated)."""
    num_threads: int | None = None
    """CPU threads for PyTorch (default: PyTorch's choice)."""
    overlap: Literal["auto", "on", "off"] = "auto"
    """Run each step's update (one per agent step after the seed phase) in a worker thread while the environment
    steps with the action already chosen: the same math, step for step. auto: on with a CUDA device, off on a CPU,
    where the environment step is about 1% of a pixel agent step (docs/performance.md)."""
    replay_device: Literal["auto", "host", "cuda"] = "auto"
    """Where the replay frames live. auto: on the training GPU when they fit in its free memory (keeping 4 GB for
    the networks), else in host memory; host; cuda (the training GPU, or an error). Batches are gathered where the
    frames are."""
    checkpoint_every: int | None = None
    """Write a full checkpoint (networks, optimizers, replay, RNGs, counters) every this many ENVIRONMENT steps
    (default: at each evaluation, eval_freq x action_repeat; 0: only at the end and when stopped by a signal)."""

    # --- run control (not part of the run's configuration) ---
    resume: str | None = None
    """Resume the run in this folder from its saved config.json; other flags are ignored, except --device,
    --num_threads, --overlap and --replay_device when set away from their defaults."""
    no_resume: bool = False
    """Start over in --work_dir even if it holds a checkpoint (a finished run also needs --force)."""
    force: bool = False
    """With --no_resume: allow discarding a FINISHED run in --work_dir."""

    # ------------------------------------------------------------------------------------------------------------
    @property
    def configuration(self) -> str:
        """The configuration's folder name: sac_ae, sac_pixel or sac_states."""
        if self.encoder_type == "identity":
            return "sac_states"
        return "sac_ae" if self.decoder_type == "pixel" else "sac_pixel"

    @property
    def env_name(self) -> str:
        return f"{self.domain_name}_{self.task_name}"

    @property
    def pixels(self) -> bool:
        return self.encoder_type == "pixel"

    @property
    def checkpoint_agent_steps(self) -> int:
        """Agent steps between periodic checkpoints (0: none)."""
        if self.checkpoint_every is None:
            return self.eval_freq
        if self.checkpoint_every == 0:
            return 0
        return max(1, self.checkpoint_every // (self.action_repeat or 1))

    @property
    def episode_agent_steps(self) -> int:
        return math.ceil(EPISODE_ENV_STEPS / (self.action_repeat or 1))

    def to_dict(self) -> dict[str, Any]:
        """The run's configuration (the run-control flags are not part of it)."""
        d = dataclasses.asdict(self)
        for name in RUN_CONTROL_FIELDS:
            d.pop(name)
        return d

    def to_json(self) -> str:
        d = self.to_dict()
        d["configuration"] = self.configuration
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)} - set(RUN_CONTROL_FIELDS)
        unknown = sorted(set(d) - known - {"configuration"})
        if unknown:
            raise SacaeError(f"The config has unknown keys: {', '.join(unknown)}.")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise SacaeError(f"There is no config file at {path}.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SacaeError(f"The config file {path} is not valid JSON ({e}).") from None
        if not isinstance(d, dict):
            raise SacaeError(f"The config file {path} does not hold a JSON object.")
        return cls.from_dict(d)


def conv_output_size(image_size: int, num_layers: int) -> int:
    """Side of the encoder's last feature map: one stride-2 3x3 conv, then stride-1 3x3 convs, no padding."""
    return (image_size - 3) // 2 + 1 - 2 * (num_layers - 1)


def default_action_repeat(domain_name: str, encoder_type: str) -> int:
    """The action repeat a run gets without --action_repeat: the domain's PlaNet value from pixels, 1 from states."""
    return PLANET_ACTION_REPEAT.get(domain_name, DEFAULT_ACTION_REPEAT) if encoder_type == "pixel" else 1


def train_command(config: dict[str, Any], leave_out: tuple[str, ...] = ()) -> list[str]:
    """The `sacae train` words that reproduce a run from its config.json: --task, then each flag whose value is not
    its default (the action repeat's default follows from the domain), in the order of `sacae train --help`."""
    defaults = TrainConfig()
    words = ["sacae", "train", "--task", f"{config['domain_name']}_{config['task_name']}"]
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        if name in ("domain_name", "task_name", "task", *RUN_CONTROL_FIELDS, *leave_out) or name not in config:
            continue
        value, default = config[name], getattr(defaults, name)
        if name == "action_repeat":
            default = default_action_repeat(config["domain_name"], config.get("encoder_type", defaults.encoder_type))
        if value == default and type(value) is type(default):
            continue
        if isinstance(value, bool):
            words.append(f"--{name}" if value else f"--no_{name}")
        elif value is not None:
            words += [f"--{name}", str(value)]
    return words


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill in derived defaults (task shorthand, action repeat) and reject impossible values with one sentence."""
    from sacae.envs import split_task_name  # imported lazily: envs imports dm_control

    changes: dict[str, Any] = {}
    if cfg.task is not None:
        domain, task = split_task_name(cfg.task)
        changes.update(domain_name=domain, task_name=task, task=None)
    else:
        split_task_name(f"{cfg.domain_name}_{cfg.task_name}", domain=cfg.domain_name, task=cfg.task_name)
    if cfg.action_repeat is None:
        changes["action_repeat"] = default_action_repeat(changes.get("domain_name", cfg.domain_name), cfg.encoder_type)
    cfg = dataclasses.replace(cfg, **changes)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise SacaeError naming the first impossible value."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SacaeError(message)

    need(
        not (cfg.decoder_type == "pixel" and cfg.encoder_type == "identity"),
        "--decoder_type pixel needs --encoder_type pixel: a state vector has no image to reconstruct "
        "(use --decoder_type identity for state SAC).",
    )
    need(
        cfg.action_repeat is not None and cfg.action_repeat >= 1,
        f"--action_repeat must be at least 1 (got {cfg.action_repeat}).",
    )
    need(
        cfg.action_repeat is None or cfg.action_repeat <= EPISODE_ENV_STEPS,
        f"--action_repeat must be at most the episode length {EPISODE_ENV_STEPS} (got {cfg.action_repeat}).",
    )
    need(cfg.frame_stack >= 1, f"--frame_stack must be at least 1 (got {cfg.frame_stack}).")
    need(cfg.num_layers >= 1, f"--num_layers must be at least 1 (got {cfg.num_layers}).")
    need(cfg.num_filters >= 1, f"--num_filters must be at least 1 (got {cfg.num_filters}).")
    if cfg.encoder_type == "pixel":
        side = conv_output_size(cfg.image_size, cfg.num_layers)
        smallest = 2 * (cfg.num_layers - 1) * 2 + 3
        need(
            side >= 1,
            f"--image_size {cfg.image_size} is too small for {cfg.num_layers} conv layers: "
            f"the smallest image that fits is {smallest}x{smallest}.",
        )
    need(cfg.num_train_steps >= 0, f"--num_train_steps must be non-negative (got {cfg.num_train_steps}).")
    need(cfg.init_steps >= 0, f"--init_steps must be non-negative (got {cfg.init_steps}).")
    need(cfg.eval_freq >= 1, f"--eval_freq must be at least 1 (got {cfg.eval_freq}).")
    need(cfg.num_eval_episodes >= 0, f"--num_eval_episodes must be non-negative (got {cfg.num_eval_episodes}).")
    need(
        cfg.replay_buffer_capacity >= 1,
        f"--replay_buffer_capacity must be at least 1 (got {cfg.replay_buffer_capacity}).",
    )
    need(cfg.batch_size >= 1, f"--batch_size must be at least 1 (got {cfg.batch_size}).")
    need(cfg.hidden_dim >= 1, f"--hidden_dim must be at least 1 (got {cfg.hidden_dim}).")
    need(
        cfg.encoder_feature_dim >= 1,
        f"--encoder_feature_dim must be at least 1 (got {cfg.encoder_feature_dim}).",
    )
    need(0.0 <= cfg.discount <= 1.0, f"--discount must lie in [0, 1] (got {cfg.discount}).")
    for name in ("critic_tau", "encoder_tau"):
        value = getattr(cfg, name)
        need(0.0 <= value <= 1.0, f"--{name} must lie in [0, 1] (got {value}).")
    for name in ("actor_update_freq", "critic_target_update_freq", "decoder_update_freq"):
        value = getattr(cfg, name)
        need(value >= 1, f"--{name} must be at least 1 (got {value}).")
    for name in ("critic_lr", "actor_lr", "encoder_lr", "decoder_lr", "alpha_lr"):
        value = getattr(cfg, name)
        need(value > 0 and math.isfinite(value), f"--{name} must be a positive number (got {value}).")
    need(cfg.init_temperature > 0, f"--init_temperature must be positive (got {cfg.init_temperature}).")
    need(
        cfg.actor_log_std_min < cfg.actor_log_std_max,
        f"--actor_log_std_min ({cfg.actor_log_std_min}) must be below --actor_log_std_max ({cfg.actor_log_std_max}).",
    )
    need(
        cfg.checkpoint_every is None or cfg.checkpoint_every >= 0,
        f"--checkpoint_every must be non-negative (got {cfg.checkpoint_every}).",
    )
    need(not (cfg.force and not cfg.no_resume), "--force only applies with --no_resume (start over).")
    need(
        not (cfg.resume is not None and cfg.no_resume),
        "--resume RUN_DIR and --no_resume contradict each other; use one.",
    )
    need(
        not (cfg.replay_device == "cuda" and cfg.device == "cpu"),
        "--replay_device cuda keeps the replay frames on the training GPU, but --device is cpu; use --device cuda "
        "(or auto) or --replay_device host.",
    )
    need(
        cfg.num_threads is None or cfg.num_threads >= 1,
        f"--num_threads must be at least 1 (got {cfg.num_threads}).",
    )
