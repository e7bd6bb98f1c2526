"""The training configuration: one typed dataclass whose fields carry the defaults of ALGORITHM.md and their help.

Step counts (`num_train_steps`, `init_steps`, `eval_freq`) are AGENT steps, as in the authors' release; one agent
step is `action_repeat` environment steps, and everything we print or plot (S in the console, `env_steps` in the
logs) counts environment steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

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
EXECUTION_FIELDS = ("device", "num_threads", "overlap", "replay_device", "compile")

# dm_control episodes are 1000 simulator steps long.
EPISODE_ENV_STEPS = 1000

# The three configurations of the paper by name (TrainConfig.configuration), as the flags that make them.
CONFIGURATIONS = {
    "sac_ae": {"encoder_type": "pixel", "decoder_type": "pixel"},
    "sac_pixel": {"encoder_type": "pixel", "decoder_type": "identity"},
    "sac_states": {"encoder_type": "identity", "decoder_type": "identity"},
}

# The experiment trackers --logger may name (docs/trackers.md).
TRACKERS = ("tensorboard", "wandb", "mlflow")

# Step counts, intervals, sizes and episode counts stay below this: far beyond any run (the paper's longest is 3M
# agent steps), and every product of them with the action repeat still fits the int64 that numpy and torch store.
MAX_COUNT = 10**12
# dm_control seeds each task's numpy RandomState with the run's seed, and RandomState takes [0, 2**32 - 1] only
# (np.random.SeedSequence, which seeds the replay and the exploration, refuses negatives too).
MAX_SEED = 2**32 - 1
# torch.set_num_threads takes any positive C int, but OpenMP starts every thread it is given: beyond the logical CPUs
# of the largest machines a count only slows training down.
MAX_THREADS = 1024
# exp(88.7) is the largest float32: a log standard deviation beyond it makes the policy's scale infinite.
LOG_STD_LIMIT = 88.0


@dataclass(frozen=True)
class TrainConfig:
    """Train a SAC+AE agent on a DeepMind Control Suite task (or a Gymnasium environment: --env).

    Step flags (--num_train_steps, --init_steps, --eval_freq) count AGENT steps, as in the authors' release:
    environment steps = agent steps x action_repeat. The console's S and the logs' env_steps count environment
    steps.
    """

    # --- task ---
    domain_name: str = "cheetah"
    """dm_control domain, e.g. cheetah, walker, cartpole."""
    task_name: str = "run"
    """dm_control task of the domain, e.g. run, walk, swingup."""
    # The help lists dm_control.suite's own tasks; tyro evaluates the annotation when it builds the command line.
    task: Annotated[str | None, tyro.conf.arg(help=_task_help())] = None
    """Shorthand DOMAIN_TASK for any dm_control.suite task (e.g. cartpole_swingup, ball_in_cup_catch);
    overrides --domain_name/--task_name."""
    env: str | None = None
    """A Gymnasium environment instead of a dm_control task, gymnasium:<id> (e.g. gymnasium:Pendulum-v1 or
    gymnasium:HalfCheetah-v5; gymnasium:<module>:<id> first imports the module that registers the id), with a Box
    action space; pixels are its rgb_array render (docs/environments.md)."""
    env_kwargs: str | None = None
    """With --env: keyword arguments for gymnasium.make, as a JSON object (e.g. '{"max_episode_steps": 500}')."""
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
    """Write TensorBoard curves to WORK_DIR/tb (the same as --logger tensorboard)."""
    logger: str = ""
    """Experiment trackers, comma-separated: tensorboard (WORK_DIR/tb), wandb (offline, in WORK_DIR/wandb, unless
    WANDB_MODE is set), mlflow (a file store in WORK_DIR/mlruns unless MLFLOW_TRACKING_URI is set); --save_tb adds
    tensorboard. Each gets the scalars of train.log and eval.log at their env steps (docs/trackers.md)."""
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
    compile: Literal["auto", "on", "off"] = "auto"
    """Run the update (critic, actor, temperature, targets, autoencoder and their optimizer steps) through
    torch.compile, with CUDA graphs on a GPU (mode reduce-overhead); the same math to float rounding. If compiling
    fails, training goes on eagerly after one line on stderr. auto: off, on a CPU and on a GPU alike, until it is
    measured faster there (docs/performance.md)."""
    replay_device: Literal["auto", "host", "cuda"] = "auto"
    """Where the replay frames live. auto: on the training GPU when they fit in its free memory (keeping what the
    networks and their update need, and 4 GB more), else in host memory; host; cuda (the training GPU, or an
    error). Batches are gathered where the frames are."""
    checkpoint_every: int | None = None
    """Write a full checkpoint (networks, optimizers, replay, RNGs, counters) every this many ENVIRONMENT steps
    (default: at each evaluation, eval_freq x action_repeat; 0: only at the end and when stopped by a signal)."""

    # --- run control (not part of the run's configuration) ---
    resume: str | None = None
    """Resume the run in this folder from its saved config.json; other flags are ignored, except --device,
    --num_threads, --overlap, --replay_device and --compile when set away from their defaults."""
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
        """The environment as one folder name: cheetah_run, or gymnasium-Pendulum-v1 for --env gymnasium:Pendulum-v1."""
        if self.env is not None:
            return re.sub(r"[^A-Za-z0-9._-]+", "-", self.env).strip("-")
        return f"{self.domain_name}_{self.task_name}"

    @property
    def pixels(self) -> bool:
        return self.encoder_type == "pixel"

    @property
    def trackers(self) -> tuple[str, ...]:
        """The trackers --logger and --save_tb ask for, each once, tensorboard first when --save_tb is given."""
        names = [name.strip() for name in self.logger.split(",") if name.strip()]
        return tuple(dict.fromkeys(["tensorboard"] * self.save_tb + names))

    @property
    def checkpoint_agent_steps(self) -> int:
        """Agent steps between periodic checkpoints (0: none). The one place --checkpoint_every, in environment
        steps, becomes agent steps (rounded down, at least one), the unit of `sacae.schedule`."""
        if self.checkpoint_every is None:
            return self.eval_freq
        if self.checkpoint_every == 0:
            return 0
        return max(1, self.checkpoint_every // (self.action_repeat or 1))

    @property
    def episode_agent_steps(self) -> int:
        """Agent steps of the longest episode: dm_control's 1000 simulator steps, or a Gymnasium env's time limit."""
        env_steps = EPISODE_ENV_STEPS
        if self.env is not None:
            from sacae.gym_env import time_limit  # imported lazily: it imports gymnasium

            env_steps = time_limit(self.env, self.env_kwargs)
        return math.ceil(env_steps / (self.action_repeat or 1))

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
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> TrainConfig:
        """The configuration a config.json object holds; SacaeError naming `source` (the file it came from) and the
        first key that is unknown, of the wrong type or out of range. Keys left out take their defaults."""
        where = f"the config file {source}" if source is not None else "the config"
        known = {f.name for f in dataclasses.fields(cls)} - set(RUN_CONTROL_FIELDS)
        unknown = sorted(set(d) - known - {"configuration"})
        if unknown:
            raise SacaeError(f"{where[0].upper()}{where[1:]} has unknown keys: {', '.join(unknown)}.")
        hints = field_types()
        values = {}
        for name, value in d.items():
            if name not in known:
                continue
            expected = _type_mismatch(value, hints[name])
            if expected is None:
                value, expected = _coerce(value, hints[name])
            if expected is not None:
                raise SacaeError(f"In {where}, {name} must be {expected} (got {_shown(value, True)}).")
            values[name] = value
        cfg = cls(**values)
        try:
            validate(cfg, keys=True)
        except SacaeError as e:
            raise SacaeError(f"In {where}, {e}") from None
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """The configuration in a config.json file, checked as the command line's flags are (task names and the
        image size against the task's model included); SacaeError naming the file and the key otherwise."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise SacaeError(f"There is no config file at {path}.") from None
        except OSError as e:
            raise SacaeError(f"The config file {path} cannot be read ({e.strerror}).") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, undecodable bytes, a number of 4,300+ digits
            raise SacaeError(f"The config file {path} is not valid JSON ({e}).") from None
        if not isinstance(d, dict):
            raise SacaeError(f"The config file {path} does not hold a JSON object.")
        cfg = cls.from_dict(d, source=path)
        try:
            resolve(cfg, keys=True)
        except SacaeError as e:
            message = str(e)
            raise SacaeError(f"In the config file {path}, {message[:1].lower()}{message[1:]}") from None
        return cfg


def conv_output_size(image_size: int, num_layers: int) -> int:
    """Side of the encoder's last feature map: one stride-2 3x3 conv, then stride-1 3x3 convs, no padding."""
    return (image_size - 3) // 2 + 1 - 2 * (num_layers - 1)


def default_action_repeat(domain_name: str, encoder_type: str, env: str | None = None) -> int:
    """The action repeat a run gets without --action_repeat: the domain's PlaNet value from pixels, 1 from states
    and 1 for a Gymnasium --env."""
    if env is not None:
        return 1
    return PLANET_ACTION_REPEAT.get(domain_name, DEFAULT_ACTION_REPEAT) if encoder_type == "pixel" else 1


def _task_help() -> str:
    """--task's help, with the tasks dm_control.suite itself lists."""
    text = "Shorthand DOMAIN_TASK for any dm_control.suite task; overrides --domain_name/--task_name."
    try:
        from sacae.envs import task_summary  # imports dm_control
    except SacaeError:  # no rendering backend loads: training says so when it starts
        return text
    return f"{text} Tasks by domain: {task_summary()}."


def train_command(config: dict[str, Any], leave_out: tuple[str, ...] = ()) -> list[str]:
    """The `sacae train` words that reproduce a run from its config.json: --task, then each flag whose value is not
    its default (the action repeat's default follows from the domain), in the order of `sacae train --help`."""
    defaults = TrainConfig()
    if config.get("env") is not None:
        words = ["sacae", "train", "--env", config["env"]]
    else:
        words = ["sacae", "train", "--task", f"{config['domain_name']}_{config['task_name']}"]
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        skip = ("domain_name", "task_name", "task", "env", *RUN_CONTROL_FIELDS, *leave_out)
        if name in skip or name not in config:
            continue
        value, default = config[name], getattr(defaults, name)
        if name == "action_repeat":
            encoder = config.get("encoder_type", defaults.encoder_type)
            default = default_action_repeat(config["domain_name"], encoder, config.get("env"))
        if value == default and type(value) is type(default):
            continue
        if isinstance(value, bool):
            words.append(f"--{name}" if value else f"--no_{name}")
        elif value is not None:
            words += [f"--{name}", str(value)]
    return words


def resolve(cfg: TrainConfig, keys: bool = False) -> TrainConfig:
    """Fill in derived defaults (task shorthand, action repeat) and reject impossible values with one sentence
    (naming config.json keys rather than flags with `keys`)."""
    from sacae.envs import split_task_name  # imported lazily: envs imports dm_control

    validate(cfg, keys)  # before the names and sizes below are looked up
    changes: dict[str, Any] = {}
    if cfg.env is not None:
        from sacae.gym_env import time_limit  # imported lazily: it imports gymnasium

        if cfg.task is not None:
            raise SacaeError(f"--env {cfg.env} and --task {cfg.task} both name an environment; give one of them.")
        time_limit(cfg.env, cfg.env_kwargs)  # the id, the kwargs and a time limit, each with its own sentence
    elif cfg.env_kwargs is not None:
        raise SacaeError("--env_kwargs only applies with --env gymnasium:<id>.")
    elif cfg.task is not None:
        domain, task = split_task_name(cfg.task)
        changes.update(domain_name=domain, task_name=task, task=None)
    else:
        split_task_name(f"{cfg.domain_name}_{cfg.task_name}", domain=cfg.domain_name, task=cfg.task_name)
    if cfg.action_repeat is None:
        domain = changes.get("domain_name", cfg.domain_name)
        changes["action_repeat"] = default_action_repeat(domain, cfg.encoder_type, cfg.env)
    cfg = dataclasses.replace(cfg, **changes)
    validate(cfg, keys)
    if cfg.pixels and cfg.env is None:
        width, height = offscreen_size(cfg.domain_name, cfg.task_name)
        side = min(width, height)
        name = "image_size" if keys else "--image_size"
        if cfg.image_size > side:
            raise SacaeError(
                f"{name} {cfg.image_size} is larger than MuJoCo renders off screen for {cfg.env_name} (its model's "
                f"framebuffer is {width}x{height}); lower {name} to at most {side}."
            )
    return cfg


@functools.cache
def offscreen_size(domain_name: str, task_name: str) -> tuple[int, int]:
    """(width, height) of the task model's offscreen framebuffer: dm_control refuses to render a larger image.
    MuJoCo's default is 640x480; a model may set its own (dog: 1920x1080)."""
    from sacae.envs import suite  # imported lazily: envs imports dm_control

    env = suite.load(domain_name, task_name)
    try:
        visual = env.physics.model.vis.global_
        return int(visual.offwidth), int(visual.offheight)
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------------------
# Checking values: every field's type, then its range, then the combinations of fields.


@dataclass(frozen=True)
class Bounds:
    """The numbers a field accepts: from `low` to `high` (None: no upper bound), either end open; `why` follows the
    upper bound in the message."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    why: str = ""

    def problem(self, value: float) -> str | None:
        """What `value` must be, or None when it is within the bounds. NaN fails every comparison: each test asks
        for the good case, so NaN is refused as well."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        low_ok = value > self.low if self.low_open else value >= self.low
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if low_ok and high_ok:
            return None
        if not self.integer and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"must lie in {opening}{self.low:g}, {self.high:g}{closing}{self.why}"
        if not low_ok:
            if self.low == 0:
                return "must be a positive number" if self.low_open else "must be non-negative"
            return f"must be at least {self.low:,}"
        return f"must be at most {self.high:,}{self.why}"


def _count(low: int, high: int = MAX_COUNT, why: str = "") -> Bounds:
    return Bounds(low, high, integer=True, why=why)


_POSITIVE = Bounds(0.0, low_open=True)  # learning rates, the temperature
_NON_NEGATIVE = Bounds(0.0)  # penalty weights (Adam's weight_decay refuses negatives)
_UNIT = Bounds(0.0, 1.0)  # Polyak rates, the discount
_ADAM_BETA = Bounds(0.0, 1.0, high_open=True)  # torch.optim.Adam refuses beta1 outside [0, 1)
_LOG_STD = Bounds(-LOG_STD_LIMIT, LOG_STD_LIMIT, why=", where exp() of it is a finite float32")
_EPISODE = ", the episode length in simulator steps"

FIELD_BOUNDS: dict[str, Bounds] = {
    "image_size": _count(1),  # and at most the model's offscreen framebuffer (resolve)
    "action_repeat": _count(1, EPISODE_ENV_STEPS, _EPISODE),
    "frame_stack": _count(1, EPISODE_ENV_STEPS, _EPISODE),  # a longer stack only repeats an episode's first frame
    "num_train_steps": _count(0),
    "init_steps": _count(0),
    "eval_freq": _count(1),
    "num_eval_episodes": _count(0),
    "replay_buffer_capacity": _count(1),
    "batch_size": _count(1),  # the memory an update needs is checked before training (sacae.placement)
    "hidden_dim": _count(1),
    "encoder_feature_dim": _count(1),
    "num_layers": _count(1),
    "num_filters": _count(1),
    "critic_lr": _POSITIVE,
    "critic_beta": _ADAM_BETA,
    "critic_tau": _UNIT,
    "critic_target_update_freq": _count(1),
    "discount": _UNIT,
    "actor_lr": _POSITIVE,
    "actor_beta": _ADAM_BETA,
    "actor_log_std_min": _LOG_STD,
    "actor_log_std_max": _LOG_STD,
    "actor_update_freq": _count(1),
    "init_temperature": _POSITIVE,
    "alpha_lr": _POSITIVE,
    "alpha_beta": _ADAM_BETA,
    "encoder_lr": _POSITIVE,
    "encoder_tau": _UNIT,
    "decoder_lr": _POSITIVE,
    "decoder_update_freq": _count(1),
    "decoder_latent_lambda": _NON_NEGATIVE,
    "decoder_weight_lambda": _NON_NEGATIVE,
    "seed": _count(0, MAX_SEED, " = 2**32 - 1, the largest seed numpy's RandomState takes"),
    "num_threads": _count(1, MAX_THREADS),
    "checkpoint_every": _count(0, MAX_COUNT * EPISODE_ENV_STEPS),  # environment steps
}
# Fields not listed: integers within int64 (what numpy and torch store), floats finite.
_INT64 = Bounds(-(2**63), 2**63 - 1, integer=True, why=" (a 64-bit integer)")
_FINITE = Bounds(-math.inf, math.inf)
# Text fields that name something and so cannot be empty (an empty folder name would mean the current folder).
NON_EMPTY_FIELDS = ("work_dir", "resume", "device")


@functools.cache
def field_types() -> dict[str, Any]:
    """Each TrainConfig field's type, evaluated (the annotations are strings in this module)."""
    return typing.get_type_hints(TrainConfig)


def _members(tp: Any) -> tuple[Any, ...]:
    """The alternatives of a union type (X | None), or the type itself."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _matches(value: Any, tp: Any) -> bool:
    """Whether `value`, as JSON gives it, is of type `tp` (bool is not an int here, an int is a float)."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, member) for member in args)
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is dict:
        key_type, value_type = args or (Any, Any)
        return isinstance(value, dict) and all(
            _matches(k, key_type) and _matches(v, value_type) for k, v in value.items()
        )
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, t) for v, t in zip(value, args, strict=True))
        return all(_matches(v, args[0]) for v in value) if args else True
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a typing construct this check does not know: the field's own checks apply


def _describe(tp: Any) -> str:
    """What a value of type `tp` is, in words, for a message."""
    words = []
    for member in _members(tp):
        origin = typing.get_origin(member)
        if member is type(None):
            words.append("null")
        elif member is bool:
            words.append("true or false")
        elif member is int:
            words.append("an integer")
        elif member is float:
            words.append("a number")
        elif member is str:
            words.append("a string")
        elif origin is Literal:
            words.append("one of " + ", ".join(json.dumps(choice) for choice in typing.get_args(member)))
        elif origin is dict:
            words.append("an object")
        elif origin in (list, tuple):
            words.append("a list")
        else:
            words.append(getattr(member, "__name__", str(member)))
    return " or ".join(words)


def _type_mismatch(value: Any, tp: Any) -> str | None:
    """None when `value` is of type `tp`, else what it should be, in words."""
    return None if _matches(value, tp) else _describe(tp)


def _coerce(value: Any, tp: Any) -> tuple[Any, str | None]:
    """`value` (of type `tp`) as the field holds it: a JSON integer in a float field becomes a float, a JSON list in
    a tuple field a tuple. The second item says what the value must be when it cannot be converted."""
    members = _members(tp)
    if isinstance(value, int) and not isinstance(value, bool) and float in members and int not in members:
        try:
            return float(value), None
        except OverflowError:  # beyond the largest float
            return value, "a finite number"
    if isinstance(value, list) and any(typing.get_origin(m) is tuple for m in members):
        return tuple(value), None
    return value, None


def _shown(value: Any, keys: bool) -> str:
    """`value` in a message: as JSON in a config file's terms, else as typed on the command line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {len(format(value, 'x'))} hexadecimal digits"  # str() refuses 4,300+ digits
    try:
        text = json.dumps(value) if keys or not isinstance(value, (int, float)) else str(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _range_problem(name: str, value: Any) -> str | None:
    """What the field `name` must be when `value` (of the field's type) is outside what it accepts, else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        if "\x00" in value:
            return "must not hold a NUL character"
        if not value and name in NON_EMPTY_FIELDS:
            return "must not be empty"
        return None
    if not isinstance(value, (int, float)):
        return None
    return FIELD_BOUNDS.get(name, _INT64 if isinstance(value, int) else _FINITE).problem(value)


def validate(cfg: TrainConfig, keys: bool = False) -> None:
    """Raise SacaeError naming the first impossible value: a field of the wrong type, a value outside what the
    libraries underneath accept (FIELD_BOUNDS), or a combination that cannot run. It names flags (--name), or the
    keys of a config.json with `keys`."""

    def flag(name: str) -> str:
        return name if keys else f"--{name}"

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SacaeError(message)

    hints = field_types()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        problem = _type_mismatch(value, hints[f.name])
        if problem is not None:
            problem = f"must be {problem}"
        else:
            problem = _range_problem(f.name, value)
        need(problem is None, f"{flag(f.name)} {problem} (got {_shown(value, keys)}).")

    need(
        not (cfg.decoder_type == "pixel" and cfg.encoder_type == "identity"),
        f"{flag('decoder_type')} pixel needs {flag('encoder_type')} pixel: a state vector has no image to reconstruct "
        f"(use {flag('decoder_type')} identity for state SAC).",
    )
    if cfg.encoder_type == "pixel":
        side = conv_output_size(cfg.image_size, cfg.num_layers)
        smallest = 2 * (cfg.num_layers - 1) * 2 + 3
        need(
            side >= 1,
            f"{flag('image_size')} {cfg.image_size} is too small for {cfg.num_layers} conv layers: "
            f"the smallest image that fits is {smallest}x{smallest}.",
        )
    need(
        cfg.actor_log_std_min < cfg.actor_log_std_max,
        f"{flag('actor_log_std_min')} ({cfg.actor_log_std_min}) must be below {flag('actor_log_std_max')} "
        f"({cfg.actor_log_std_max}).",
    )
    need(not (cfg.force and not cfg.no_resume), "--force only applies with --no_resume (start over).")
    unknown = [name for name in cfg.trackers if name not in TRACKERS]
    need(
        not unknown,
        f"{flag('logger')} {cfg.logger}: {unknown[0] if unknown else ''} is not a tracker; choose from "
        f"{', '.join(TRACKERS)}, comma-separated (e.g. --logger tensorboard,wandb).",
    )
    need(
        not (cfg.resume is not None and cfg.no_resume),
        "--resume RUN_DIR and --no_resume contradict each other; use one.",
    )
    need(
        not (cfg.replay_device == "cuda" and cfg.device == "cpu"),
        f"{flag('replay_device')} cuda keeps the replay frames on the training GPU, but {flag('device')} is cpu; use "
        f"{flag('device')} cuda (or auto) or {flag('replay_device')} host.",
    )
