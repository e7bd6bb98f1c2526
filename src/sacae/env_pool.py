"""`EnvPool`: the environments of a group of seeds, stepped in parallel, each on a worker of its own (a thread or a
process), with the results of stepping them one after another.

Every environment lives on one worker for its whole life and every call to it runs there: MuJoCo's EGL contexts are
current on the thread that made them (dm_control refuses to render one from another thread), and a worker process
holds its environment outright. `EnvPool.envs[i]` stands for environment i with its usual interface (`reset`,
`step`, `render`, `get_state`, `set_state`, `spec`, ...), so single calls such as a video frame go to its worker too.
docs/multiseed.md ("Stepping the group's environments") has the measurements behind the choice of workers.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import pickle
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Literal

import numpy as np

Workers = Literal["auto", "serial", "threads", "processes"]
StepResult = tuple[np.ndarray, float, bool, bool, dict[str, Any]]

# Read once from a worker process and kept by its stand-in: the trainer reads `spec` at every step (sample_action)
# and never changes any of these.
STATIC_ATTRIBUTES = ("spec", "frame_stack", "pixels", "image_size", "action_repeat", "camera_id")


def default_workers(num_envs: int, pixels: bool) -> Literal["serial", "threads", "processes"]:
    """What `workers="auto"` uses: worker processes for two or more pixel environments, else no worker at all (one
    environment is then used exactly as a single run uses it).

    Measured on a 2-core machine (docs/multiseed.md): MuJoCo's step and its render release the GIL, but a state
    environment's step is mostly dm_control's Python (0.1-0.7 ms), which threads cannot run in parallel and which
    costs less than a message to a worker process; a pixel environment's step is mostly Mesa's rendering threads,
    and processes overlap the rest of one environment's step with another's where threads did not."""
    if num_envs <= 1 or not pixels:
        return "serial"
    return "processes"


class _RemoteTraceback(Exception):
    """The worker's traceback, attached as the cause of an exception raised in a worker process."""

    def __str__(self) -> str:
        return self.args[0]


class _ThreadWorker:
    """One daemon thread that builds an environment and runs every call to it. A daemon (unlike
    concurrent.futures' workers, which are stopped before atexit handlers run) lets the pool close its
    environments on their own threads at interpreter exit."""

    def __init__(self, make_env: Callable[[], Any], name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self.env: Any = None
        self.ready = self._submit(make_env)

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # any error of the environment goes back to its caller
                future.set_exception(e)

    def _submit(self, fn: Callable, *args, **kwargs) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def started(self) -> None:
        self.env = self.ready.result()

    def call(self, name: str, args: tuple = (), kwargs: dict | None = None) -> Future:
        return self._submit(lambda: getattr(self.env, name)(*args, **(kwargs or {})))

    def call_function(self, fn: Callable, *args) -> Future:
        return self._submit(fn, *args)

    def attribute(self, name: str) -> Any:
        return getattr(self.env, name)  # plain data: safe to read from any thread

    def stop(self) -> None:
        if self._thread.is_alive():
            self._calls.put(None)
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=30)


def _free_rendering(env: Any) -> None:
    """Free a dm_control environment's GL contexts on the thread they are current on. dm_control's environments
    have no close of their own: their contexts are freed when garbage-collected or at exit, from whichever thread
    that happens on, and dm_control refuses (with a traceback on stderr) to free a context from a thread other than
    its own."""
    physics = getattr(env, "physics", None)
    if physics is not None and hasattr(physics, "free"):
        physics.free()


def _serve_process(conn, make_env: Callable[[], Any]) -> None:
    """A worker process: build the environment, then run the calls that arrive on `conn` until it closes."""
    # The trainer's process handles Ctrl-C, SIGTERM and SIGUSR1 (Slurm's) by writing a checkpoint, which needs
    # every environment's state: the workers outlive those signals and end when the trainer closes their pipes.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    try:
        env = make_env()
    except BaseException as e:
        _send_error(conn, e)
        return
    try:
        conn.send(("ok", {name: getattr(env, name) for name in STATIC_ATTRIBUTES if hasattr(env, name)}))
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the trainer's process has gone
                return
            if message is None:
                return
            kind, name, args, kwargs = message
            try:
                value = getattr(env, name)
                result = value(*args, **kwargs) if kind == "call" else (_CALLABLE if callable(value) else value)
                payload = pickle.dumps(("ok", result), protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException as e:
                _send_error(conn, e)
                continue
            conn.send_bytes(payload)
    finally:
        env.close()
        conn.close()


_CALLABLE = "<sacae.env_pool: callable>"


def _send_error(conn, error: BaseException) -> None:
    text = traceback.format_exc()
    try:
        payload = pickle.dumps(("error", error, text), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(payload)  # an exception whose constructor takes other arguments than its args cannot come back
    except Exception:
        payload = pickle.dumps(("error", RuntimeError(f"{type(error).__name__}: {error}"), text))
    conn.send_bytes(payload)


class _ProcessWorker:
    """One worker process (forkserver: safe beside torch's threads and CUDA), talking over a pipe. At most one call
    is outstanding; its reply is read by `result`."""

    def __init__(self, make_env: Callable[[], Any], name: str, context):
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_process, args=(child, make_env), name=name, daemon=True)
        self._process.start()
        child.close()
        self._pending = True  # the construction's reply
        self.static: dict[str, Any] = {}

    def started(self) -> None:
        self.static = self.result()

    def send(self, message) -> None:
        if self._pending:
            raise RuntimeError(
                f"{self._process.name} is still running a call (step_async without step_wait?); wait for it first"
            )
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            raise self._died() from None
        self._pending = True

    def call(self, name: str, args: tuple = (), kwargs: dict | None = None) -> _ProcessWorker:
        self.send(("call", name, args, kwargs or {}))
        return self

    def result(self) -> Any:
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        finally:
            self._pending = False
        if reply[0] == "ok":
            return reply[1]
        _, error, text = reply
        error.__cause__ = _RemoteTraceback(f"\n\nin {self._process.name}:\n{text}")
        raise error

    def _died(self) -> RuntimeError:
        self._process.join(timeout=5)
        return RuntimeError(
            f"the environment worker {self._process.name} (pid {self._process.pid}) died with exit code "
            f"{self._process.exitcode}"
        )

    def attribute(self, name: str) -> Any:
        self.send(("get", name, (), {}))
        return self.result()

    def stop(self) -> None:
        if self._process.is_alive():
            try:
                if self._pending:
                    self._conn.recv()
                    self._pending = False
                self._conn.send(None)
            except (EOFError, OSError):
                pass
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(timeout=5)
        self._conn.close()


class _Failed:
    """A call that could not be started, standing where its future would: `result` raises why."""

    def __init__(self, error: Exception):
        self.error = error

    def result(self) -> Any:
        raise self.error


def _stop_workers(workers: list) -> None:
    """Close each worker's environment on that worker and stop it."""
    for worker in workers:
        try:
            if isinstance(worker, _ProcessWorker):
                worker.stop()  # the process closes its environment as it ends
            else:
                if worker.env is not None:
                    worker.call("close").result()
                    worker.call_function(_free_rendering, worker.env).result()
                    worker.env = None
                worker.stop()
        except Exception as e:  # close the others regardless
            print(f"sacae: closing an environment failed ({type(e).__name__}: {e})", file=sys.stderr)


class RemoteEnv:
    """Stands for an environment that lives on a worker: each method runs there and returns its result (or raises
    the environment's own exception); other attributes are read from it."""

    def __init__(self, worker):
        self._worker = worker
        if isinstance(worker, _ProcessWorker):
            self.__dict__.update(worker.static)

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        return self._worker.call("reset", (), {"seed": seed}).result()

    def step(self, action: np.ndarray) -> StepResult:
        return self._worker.call("step", (action,)).result()

    def render(self, height: int | None = None, width: int | None = None) -> np.ndarray:
        return self._worker.call("render", (height, width)).result()

    def get_state(self) -> dict[str, Any]:
        return self._worker.call("get_state").result()

    def set_state(self, state: dict[str, Any]) -> np.ndarray | None:
        return self._worker.call("set_state", (state,)).result()

    def sample_action(self, rng: np.random.Generator) -> np.ndarray:
        # Drawn here, from the caller's generator (a copy sent to a worker process would leave the caller's unmoved);
        # the environments' own sample_action is this line.
        return rng.uniform(-1.0, 1.0, size=self.spec.action_dim).astype(np.float32)

    def close(self) -> None:
        self._worker.call("close").result()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # also while unpickling or copying, before _worker exists
            raise AttributeError(name)
        value = self._worker.attribute(name)
        if callable(value) or (isinstance(value, str) and value == _CALLABLE):
            return lambda *args, **kwargs: self._worker.call(name, args, kwargs).result()
        return value


class EnvPool:
    """N independent environments stepped together, in parallel where that is faster (`default_workers`).

    `make_envs[i]()` builds environment i on its worker; with `workers="processes"` the callables must pickle (e.g.
    `functools.partial(make_env, cfg, seed)`). `workers="auto"` chooses by the number of environments and whether
    they render (`pixels`; see `default_workers`). `workers="serial"` builds them here and calls them in order, with
    no thread or process, exactly as a lone environment is used; its `step_async` steps at once.

    Every environment keeps its own random streams, so the results equal those of stepping the same environments
    one after another, bit for bit. A call over several environments runs on all of them; then the exception of the
    first (by index) that raised is raised, as that environment raised it. `indices` selects environments (the
    per-environment arguments follow its order); default all.
    """

    def __init__(self, make_envs: Sequence[Callable[[], Any]], *, workers: Workers = "auto", pixels: bool = True):
        if not make_envs:
            raise ValueError("an EnvPool needs at least one environment")
        self.workers = default_workers(len(make_envs), pixels) if workers == "auto" else workers
        if self.workers not in ("serial", "threads", "processes"):
            raise ValueError(f"workers must be auto, serial, threads or processes, not {workers!r}")
        self._workers: list = []
        self._handles: dict[int, Any] = {}  # the call in progress on each worker: a Future or the process worker
        self._in_flight: list[int] | None = None
        self._serial_results: list[tuple[bool, Any]] | None = None
        self._closed = False
        if self.workers == "serial":
            self.envs: list[Any] = []
            try:
                for make in make_envs:
                    self.envs.append(make())
            except BaseException:
                for env in self.envs:
                    env.close()
                raise
            return
        if self.workers == "threads":
            self._workers = [_ThreadWorker(make, f"sacae-env-{i}") for i, make in enumerate(make_envs)]
        else:
            context = multiprocessing.get_context("forkserver")
            # Workers forked from a server that has dm_control loaded start in a fraction of a second. Only takes
            # effect if this process has not started its forkserver yet.
            context.set_forkserver_preload(["sacae.env_pool", "sacae.envs"])
            self._workers = [_ProcessWorker(make, f"sacae-env-{i}", context) for i, make in enumerate(make_envs)]
        errors = []
        for worker in self._workers:  # all build at once; wait for each, even after a failure
            try:
                worker.started()
            except BaseException as e:
                errors.append(e)
        self.envs = [RemoteEnv(worker) for worker in self._workers]
        if errors:
            self._closed = True
            _stop_workers(self._workers)
            raise errors[0]
        # Registered after the environments exist, so that it runs before dm_control's exit handlers for their GL
        # contexts (atexit runs the newest first), which would free each context from the main thread. It holds the
        # workers, not the pool: a pool dropped without close still closes its environments at exit.
        self._exit_handler = functools.partial(_stop_workers, self._workers)
        atexit.register(self._exit_handler)

    def __len__(self) -> int:
        return len(self.envs)

    # ---------------------------------------------------------------------------------------------------------
    def reset(
        self, seeds: Sequence[int | None] | None = None, indices: Sequence[int] | None = None
    ) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """`reset(seed=seeds[k])` of each selected environment: their (obs, info)."""
        indices = self._indices(indices)
        seeds = [None] * len(indices) if seeds is None else list(seeds)
        return self._map("reset", [((), {"seed": seed}) for seed in seeds], indices)

    def step(self, actions: Sequence[np.ndarray], indices: Sequence[int] | None = None) -> list[StepResult]:
        """`step(actions[k])` of each selected environment: their (obs, reward, terminated, truncated, info)."""
        self.step_async(actions, indices)
        return self.step_wait()

    def step_async(self, actions: Sequence[np.ndarray], indices: Sequence[int] | None = None) -> None:
        """Start `step` and return at once (serial: step now), so that the caller can work meanwhile (an update on
        the GPU); `step_wait` gives the results. Each step's action is its own copy."""
        if self._in_flight is not None:
            raise RuntimeError("step_async called twice without step_wait")
        indices = self._indices(indices)
        self._start("step", [((np.array(action, copy=True),), {}) for action in actions], indices)
        self._in_flight = indices

    def step_wait(self) -> list[StepResult]:
        """The results of the `step_async` in flight, in its order (raising as `step` would)."""
        if self._in_flight is None:
            raise RuntimeError("step_wait called without step_async")
        indices, self._in_flight = self._in_flight, None
        return self._finish(indices)

    def get_state(self, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Each selected environment's `get_state()` (what a checkpoint stores)."""
        indices = self._indices(indices)
        return self._map("get_state", [((), {})] * len(indices), indices)

    def set_state(self, states: Sequence[dict[str, Any]], indices: Sequence[int] | None = None) -> list:
        """`set_state(states[k])` of each selected environment, in parallel (each replays its episode in progress):
        their current observations (None between episodes)."""
        indices = self._indices(indices)
        return self._map("set_state", [((state,), {}) for state in states], indices)

    def close(self) -> None:
        """Close every environment on its worker and stop the workers (again: nothing)."""
        if self._closed:
            return
        self._closed = True
        if self.workers == "serial":
            for env in self.envs:
                env.close()
            return
        atexit.unregister(self._exit_handler)
        _stop_workers(self._workers)

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------------------
    def _indices(self, indices: Sequence[int] | None) -> list[int]:
        if self._closed:
            raise RuntimeError("the EnvPool is closed")
        if self._in_flight is not None:
            raise RuntimeError("a step_async is in flight: call step_wait first")
        if indices is None:
            return list(range(len(self.envs)))
        chosen = [int(i) for i in indices]
        if len(set(chosen)) != len(chosen) or not all(0 <= i < len(self.envs) for i in chosen):
            raise ValueError(f"indices {chosen} must be distinct environments of 0..{len(self.envs) - 1}")
        return chosen

    def _map(self, name: str, calls: list[tuple[tuple, dict]], indices: list[int]) -> list:
        self._start(name, calls, indices)
        return self._finish(indices)

    def _start(self, name: str, calls: list[tuple[tuple, dict]], indices: list[int]) -> None:
        if len(calls) != len(indices):
            raise ValueError(f"{len(calls)} arguments for {len(indices)} environments")
        if self.workers == "serial":
            self._serial_results = [self._run_serial(i, name, *call) for i, call in zip(indices, calls, strict=True)]
            return
        for i, (args, kwargs) in zip(indices, calls, strict=True):
            self._pending_call(i, name, args, kwargs)

    def _finish(self, indices: list[int]) -> list:
        if self.workers == "serial":
            outcomes, self._serial_results = self._serial_results or [], None
        else:
            outcomes = [self._collect(i) for i in indices]
        return self._unpack(outcomes)

    def _run_serial(self, index: int, name: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        try:
            return True, getattr(self.envs[index], name)(*args, **kwargs)
        except Exception as e:  # raised by _unpack once every environment has run
            return False, e

    def _pending_call(self, index: int, name: str, args: tuple, kwargs: dict) -> None:
        try:
            self._handles[index] = self._workers[index].call(name, args, kwargs)
        except Exception as e:  # a dead worker, arguments that do not pickle: raised with the rest
            self._handles[index] = _Failed(e)

    def _collect(self, index: int) -> tuple[bool, Any]:
        handle = self._handles.pop(index)
        try:
            return True, handle.result()
        except Exception as e:
            return False, e

    @staticmethod
    def _unpack(outcomes: list[tuple[bool, Any]]) -> list:
        for ok, value in outcomes:
            if not ok:
                raise value
        return [value for _, value in outcomes]
