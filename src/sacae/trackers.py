"""Experiment trackers beside the run's own logs: Weights & Biases and MLflow, each fed the scalars of train.log and
eval.log at the rows' env steps, the run's configuration and the evaluation videos (TensorBoard is the Logger's).

Both work offline by default: wandb in offline mode (WORK_DIR/wandb, for `wandb sync`), MLflow in a file store
(WORK_DIR/mlruns). A resumed run continues the same tracker runs, whose ids WORK_DIR/trackers.json keeps. Each
tracker is asked on opening what it already holds: rows at or below those steps are not sent again, and rows of the
logs that it never got (a SIGKILL loses what wandb had not yet written to disk) are sent before the new ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sacae.errors import SacaeError
from sacae.storage import write_text_atomic

IDS_FILE = "trackers.json"
# The module each tracker imports and the pip command that installs it.
PACKAGES = {"wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow-skinny")}
PROJECT = "sacae"  # the wandb project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say else


def check_installed(names: Iterable[str]) -> None:
    """SacaeError naming the pip command for the first tracker in `names` whose package does not import."""
    for name in names:
        if name not in PACKAGES:
            continue
        module, command = PACKAGES[name]
        try:
            __import__(module)
        except ImportError:
            raise SacaeError(
                f"--logger {name} needs the {module} package, which is not installed here; install it with "
                f"`{command}` (or `pip install -e '.[{name}]'` in a source checkout)."
            ) from None


def scalars(kind: str, row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a log row under the names TensorBoard gets too: `train/<key>`, `eval/<key>`."""
    return {
        f"{kind}/{key}": value
        for key, value in row.items()
        if key != "env_steps" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def run_name(config: Mapping[str, Any], work_dir: Path) -> tuple[str, str]:
    """(name, group) of a run, in the layout of `sacae sweep`: `<task>/<configuration>/seed_<i>`, `<task>/<conf>`."""
    try:
        group = f"{config['domain_name']}_{config['task_name']}/{config['configuration']}"
        return f"{group}/seed_{config['seed']}", group
    except KeyError:
        return work_dir.name, work_dir.parent.name


@dataclass
class Held:
    """What a tracker already stores of this run: every key up to step `all_keys`, and each of `keys` up to its own
    step (-1: nothing)."""

    all_keys: int = -1
    keys: dict[str, int] = field(default_factory=dict)

    def has(self, key: str, step: int) -> bool:
        return step <= max(self.all_keys, self.keys.get(key, -1))


class WandbTracker:
    """One wandb run, offline unless WANDB_MODE says otherwise, started on the first row it gets (a session with
    nothing to send, such as a finished run run again, leaves no empty offline run behind)."""

    name = "wandb"

    def __init__(self, work_dir: Path, config: Mapping[str, Any], ids: dict[str, Any], remember) -> None:
        self.config = dict(config)
        self.name_group = run_name(config, work_dir)
        self.id = ids.get("id") or secrets.token_hex(4)
        if "id" not in ids:
            remember({"id": self.id})
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        # Offline runs go to WORK_DIR/wandb/offline-run-<time>-<id>/, one folder per session; WANDB_DIR moves them.
        self.root = Path(os.environ.get("WANDB_DIR") or work_dir)
        self.run = None
        if self.mode in ("offline", "dryrun", "disabled"):
            self.held = Held(all_keys=offline_last_step(self.root / "wandb", self.id))
        else:
            # Online, the server knows where a resumed run stands.
            self._start()
            self.held = Held(all_keys=self.run.starting_step - 1 if self.run.resumed else -1)

    def _start(self) -> None:
        import wandb

        name, group = self.name_group
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or PROJECT,
                id=self.id,
                resume="allow",
                name=name,
                group=group,
                config=self.config,
                dir=None if "WANDB_DIR" in os.environ else str(self.root),
                mode=None if "WANDB_MODE" in os.environ else "offline",
                reinit="create_new",
            )
        except Exception as e:  # wandb raises its own types (no network, bad key, ...)
            raise SacaeError(f"wandb could not start the run {self.id} ({type(e).__name__}: {e}).") from None

    def log(self, step: int, values: dict[str, float], video: Path | None) -> None:
        import wandb

        if self.run is None:
            self._start()
        data: dict[str, Any] = dict(values)
        if video is not None:
            data["eval/video"] = wandb.Video(str(video), format="mp4")
        self.run.log(data, step=step)

    def close(self, finished: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if finished else 1)
            self.run = None


class MlflowTracker:
    """One MLflow run, in WORK_DIR/mlruns (a file store) unless MLFLOW_TRACKING_URI names another store; a resumed
    run stays in the store it began in."""

    name = "mlflow"

    def __init__(self, work_dir: Path, config: Mapping[str, Any], ids: dict[str, Any], remember) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = (
            ids.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or (work_dir / "mlruns").resolve().as_uri()
        )
        if "://" not in uri or uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; it is the one that needs no
            # server and no database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if "run_id" in ids:
            self.run_id = ids["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            name, group = run_name(config, work_dir)
            tags = {"sacae.work_dir": str(work_dir.resolve()), "sacae.group": group}
            self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            remember({"tracking_uri": uri, "run_id": self.run_id})
        run = self.client.get_run(self.run_id)
        # Params never change once logged; a resumed run may run on another device or thread count, and keeps the
        # values it began with.
        params = [Param(k, str(v)) for k, v in config.items() if k not in run.data.params]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.held = Held(
            keys={
                key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in run.data.metrics
            }
        )
        self.videos = {Path(a.path).name for a in self.client.list_artifacts(self.run_id, "video")}

    def log(self, step: int, values: dict[str, float], video: Path | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if values:
            metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
            self.client.log_batch(self.run_id, metrics=metrics)
        if video is not None and video.name not in self.videos:
            self.client.log_artifact(self.run_id, str(video), artifact_path="video")
            self.videos.add(video.name)

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


TRACKER_CLASSES = {"wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The run's wandb and MLflow trackers behind one call per log row; `names` may hold tensorboard, which the
    Logger writes itself."""

    def __init__(self, names: Sequence[str], work_dir: str | Path, config: Mapping[str, Any] | None = None) -> None:
        self.work_dir = Path(work_dir)
        check_installed(names)
        self.ids = load_ids(self.work_dir)
        self.trackers: list[Any] = []
        for name in names:
            if name in TRACKER_CLASSES:
                with self._errors(name, "open its run"):
                    tracker = TRACKER_CLASSES[name](
                        self.work_dir, config or {}, self.ids.get(name, {}), lambda ids, n=name: self._remember(n, ids)
                    )
                self.trackers.append(tracker)

    def _remember(self, name: str, ids: dict[str, Any]) -> None:
        self.ids[name] = {**self.ids.get(name, {}), **ids}
        write_text_atomic(self.work_dir / IDS_FILE, json.dumps(self.ids, indent=2, sort_keys=True) + "\n")

    @contextlib.contextmanager
    def _errors(self, name: str, doing: str) -> Iterator[None]:
        try:
            yield
        except SacaeError:
            raise
        except Exception as e:  # each library raises its own types (disk full, store damaged, ...)
            raise SacaeError(
                f"{name} could not {doing} in {self.work_dir} ({type(e).__name__}: {e}); run the same command again "
                f"to resume from the last checkpoint."
            ) from None

    def catch_up(self, rows: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Send the rows of the logs (kind, row; in the order they were written) that a tracker does not hold yet;
        an evaluation's video is WORK_DIR/video/<env_steps>.mp4 where that file exists."""
        if not self.trackers:
            return
        for kind, row in rows:
            video = self.work_dir / "video" / f"{row['env_steps']}.mp4" if kind == "eval" else None
            self.log(kind, row, video if video is not None and video.is_file() else None)

    def log(self, kind: str, row: Mapping[str, Any], video: Path | None = None) -> None:
        step = int(row["env_steps"])
        values = scalars(kind, row)
        for tracker in self.trackers:
            new = {key: value for key, value in values.items() if not tracker.held.has(key, step)}
            clip = video if video is not None and not tracker.held.has(f"{kind}/video", step) else None
            if new or clip is not None:
                with self._errors(tracker.name, f"log the {kind} row at env step {step:,}"):
                    tracker.log(step, new, clip)

    def close(self, finished: bool = True) -> None:
        """End each tracker's run: finished, or stopped (to be resumed)."""
        for tracker in self.trackers:
            with self._errors(tracker.name, "close its run"):
                tracker.close(finished)
        self.trackers = []


def logged_rows(work_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """The rows of train.log and eval.log as (kind, row), in the order the run logged them: by env steps, and an
    episode's train row before the evaluation at the same env step (which runs at the start of the next step)."""
    from sacae.logger import read_jsonl

    rows = [(kind, row) for kind in ("train", "eval") for row in read_jsonl(work_dir / f"{kind}.log")]
    return sorted(rows, key=lambda kind_row: (kind_row[1]["env_steps"], kind_row[0] == "eval"))


def load_ids(work_dir: Path) -> dict[str, Any]:
    """WORK_DIR/trackers.json: {"wandb": {"id": ...}, "mlflow": {"tracking_uri": ..., "run_id": ...}}."""
    path = work_dir / IDS_FILE
    try:
        ids = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise SacaeError(
            f"{path} is not readable ({e}); it keeps the trackers' run ids, so fix or remove it."
        ) from None
    if not isinstance(ids, dict) or not all(isinstance(v, dict) for v in ids.values()):
        raise SacaeError(f"{path} does not hold the trackers' run ids; fix or remove it.")
    return ids


def read_wandb_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a wandb .wandb transaction log, as `wandb leet inspect --json` reads them (a file cut short
    by a kill is read up to its last whole record)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"}
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", os.fspath(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        raise SacaeError(f"wandb could not read its log {path} ({result.stderr.strip()[-300:]}).")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def wandb_history(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(step, values) of each history row of a .wandb file, wandb's own keys (_step, _runtime, ...) left out."""
    rows = []
    for record in read_wandb_records(path):
        if record.get("type") == "history":
            item = record["history"].get("item", {})
            step = record["history"].get("step", {}).get("num", item.get("_step", 0))
            rows.append((int(step), {k: v for k, v in item.items() if not k.startswith("_")}))
    return rows


def offline_runs(wandb_dir: Path, run_id: str) -> list[Path]:
    """The .wandb files of the offline sessions of run `run_id`, oldest first (their folders are named by start
    time)."""
    return sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"), key=lambda p: p.parent.name)


def offline_last_step(wandb_dir: Path, run_id: str) -> int:
    """The last step an offline wandb run holds on disk (-1: none). Sessions log increasing steps, so the newest
    file that holds any history row holds the last one."""
    for path in reversed(offline_runs(wandb_dir, run_id)):
        steps = [step for step, _ in wandb_history(path)]
        if steps:
            return max(steps)
    return -1
