"""Connecting to Ray and sizing work to the cluster it finds."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Environment every Ray worker of a Whence run gets (tokenizer threads would fight the actors' torch threads).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}


@dataclass(frozen=True)
class ClusterSettings:
    """Where and how wide a run executes: data-parallel workers (a model replica each), pipeline stages per worker,
    the model's precision, the Ray cluster to join, and extra environment variables for the run's actors (CUDA
    or fault-injection settings in tests)."""

    workers: int = 1
    shards: int = 1
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    address: str | None = None
    actor_env: dict = field(default_factory=dict, hash=False, compare=False)
    # Activation checkpointing in the fitting actors (`whence fit --activation-checkpointing`): each block's
    # graph is rebuilt at its backward pass, for one more forward pass of compute. Not part of a run's identity:
    # the sums are the same, so a fit that ran out of memory resumes with it.
    checkpointing: bool = False

    def __post_init__(self):
        from whence.errors import SettingsError

        for name in ("workers", "shards"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}", name)

    @classmethod
    def from_args(cls, args) -> ClusterSettings:
        """From the command line's --workers, --shards, --dtype and --address (and --activation-checkpointing,
        where the command has it)."""
        return cls(workers=args.workers, shards=args.shards, dtype=args.dtype, address=args.address,
                   checkpointing=getattr(args, "activation_checkpointing", False))


def connect(address: str | None = None):
    """ray.init unless already connected (notebooks, tests). Without an address: the job's cluster when run by
    `ray job submit` (RAY_ADDRESS is set), else a new local one; `--address auto` joins a running cluster.

    A local cluster is private to this machine: every Ray process binds 127.0.0.1 (local_only_node), runs no
    dashboard, and is stopped at exit, on SIGTERM and SIGHUP too (stop_on_signals). Ray's own messages (worker
    logs, Ray Data's notices, the core worker's C++ log) stay out of the terminal unless the root logger is at
    DEBUG (`whence --verbose`); they remain in Ray's session logs. A start that times out (a busy machine) is
    retried once, then a ClusterError says so."""
    import ray

    if ray.is_initialized():
        quiet_data_progress()
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # Not "auto": a stale /tmp/ray/ray_current_cluster would make ray.init wait on a cluster long gone.
        address = "local"
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    options = dict(address=address, log_to_driver=verbose, runtime_env={"env_vars": dict(WORKER_ENV)},
                   logging_level=logging.INFO if verbose else logging.WARNING, configure_logging=True)
    if address == "local":
        options.update(include_dashboard=False)
    if not verbose and "RAY_BACKEND_LOG_LEVEL" not in os.environ:
        # The driver's core worker logs to stderr; there, only fatal errors (its ERROR lines are notices such as
        # Ray Data's actors' "constructor arguments in the object store and max_restarts > 0"). The level is read
        # when ray.init starts the core worker; the workers log at Ray's default level to their files.
        options["runtime_env"]["env_vars"]["RAY_BACKEND_LOG_LEVEL"] = "info"
        with _environment(RAY_BACKEND_LOG_LEVEL="fatal"), _without_log_level_notice():
            _init_with_retry(ray, options)
    else:
        _init_with_retry(ray, options)
    if address == "local":
        stop_on_signals(ray)
    quiet_data_progress(verbose)
    log.info("ray: %s", ray.cluster_resources())
    return ray


# A busy machine can take longer than Ray's start-up waits (its GCS port wait defaults to 30 s; raised here).
GCS_PORT_WAIT_S = "120"
START_ATTEMPTS = 2


def _init_with_retry(ray, options: dict) -> None:
    """ray.init(**options); a start that times out is shut down and tried once more, then a ClusterError."""
    from whence.errors import ClusterError

    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", GCS_PORT_WAIT_S)
    for attempt in range(1, START_ATTEMPTS + 1):
        before = _child_pids()
        try:
            with local_only_node(options["address"] == "local" or is_loopback(options["address"])):
                ray.init(**options)
            return
        except Exception as error:  # Ray raises a bare Exception when its node does not come up in time
            if not _is_start_up_failure(error):
                raise
            ray.shutdown()
            _stop_children(_child_pids() - before)  # the GCS and raylet a failed start leaves running
            if attempt == START_ATTEMPTS:
                where = "a local Ray cluster" if options["address"] == "local" else f"Ray at {options['address']}"
                raise ClusterError(f"could not start or join {where} after {START_ATTEMPTS} attempts ({error}); "
                                   "the machine may be overloaded: retry when it is quieter, or start Ray with "
                                   "`ray start --head` and pass --address auto") from None
            log.warning("ray did not start (%s); retrying once", error)


def _child_pids() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def _stop_children(pids: set[int]) -> None:
    """Terminate these processes of ours (then kill those still running after a few seconds)."""
    import psutil

    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
            processes[-1].terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue


def _is_start_up_failure(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (TimeoutError, ConnectionError)) or "timed out" in text or "timeout" in text


def is_loopback(address: str | None) -> bool:
    """Whether `address` ("host:port") names this machine's loopback interface, where a local cluster of ours
    listens (local_only_node): joined in Ray's multi-machine mode, Ray would rewrite 127.0.0.1 to the machine's
    external address and wait there for a GCS that is not listening on it."""
    if not address or address in ("local", "auto") or "://" in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


@contextmanager
def local_only_node(enabled: bool):
    """While a local cluster starts, Ray's single-machine mode (what it uses on macOS and Windows): the node's
    address is 127.0.0.1, so the GCS, raylet, agents and workers listen on the loopback interface only.
    (ray.init's _node_ip_address="127.0.0.1" is rewritten to the machine's external address by Ray.)"""
    if not enabled:
        yield
        return
    import ray._private.ray_constants as ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER  # read from the variable when Ray was imported
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _environment(**{ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag


@contextmanager
def _without_log_level_notice():
    """Ray's C++ logger announces "Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL ..." on the
    driver's stderr as the core worker starts, whatever the level. While ray.init runs, file descriptor 2 goes to
    a temporary file, replayed afterwards without that line: every other line, and all of them on an error, kept.
    (The processes ray.init starts log to their own files; one that inherited the descriptor writes to the
    unlinked file.)"""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if "Set ray log level from" not in line))
            sys.stderr.flush()


@contextmanager
def _environment(**variables: str):
    """os.environ with `variables` set, restored afterwards (the processes started meanwhile keep them)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def stop_on_signals(ray) -> None:
    """SIGTERM and SIGHUP end the process through SystemExit, so Ray's atexit shutdown stops the local cluster
    (its agents would otherwise outlive a killed run for minutes). Only where no handler is installed yet."""
    import atexit
    import signal
    import threading

    atexit.register(ray.shutdown)  # also registered by Ray; explicit, as the signals below rely on it
    if threading.current_thread() is not threading.main_thread():
        return

    def exit_on(signum, _frame):
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, exit_on)


def quiet_data_progress(verbose: bool = False) -> None:
    """Ray Data's per-operator progress bars drown our own progress lines; keep them off, and (unless verbose) its
    console notices too ("Progress bars disabled", "execution finished"): they still go to its ray-data.log."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    if not verbose:
        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
                handler.setLevel(logging.ERROR)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def gpu_share(actors: int) -> float:
    """GPUs each of `actors` GPU actors reserves on this cluster (actors.hosting.gpu_share)."""
    from actors.hosting import gpu_share as share

    return share(cluster_gpus(), actors)


def actor_resources(workers: int) -> dict:
    """An even share of the CPUs that leaves room for the reading tasks (an actor that asks for every core would
    starve the stages feeding it), and a GPU (or an equal share of the GPUs) per worker when there are GPUs."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    resources = {"num_cpus": round(max(0.1, min(1.0, (cpus - 0.5) / max(workers, 1))), 2)}
    if cluster_gpus() >= 1:
        resources["num_gpus"] = gpu_share(workers)
    return resources


def torch_threads(num_cpus: float) -> int:
    """Threads for torch inside an actor: its CPU share rounded up, at least one."""
    total = os.cpu_count() or 1
    return max(1, min(total, int(round(num_cpus + 0.49))))


# Reading and tokenising: light tasks; fractional CPUs so they run beside the actors.
READ_TASK_CPUS = 0.25


def surface_user_errors(function):
    """Re-raise a WhenceError that a Ray task or actor raised, unwrapped from Ray's exception chain, so the
    command line prints its message (file and line, query id, ...) rather than a remote traceback."""
    import functools

    from whence.errors import WhenceError

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except WhenceError:
            raise
        except Exception as error:
            cause = find_user_error(error)
            if cause is not None:
                raise cause from None
            raise

    return wrapper


def find_user_error(error: BaseException):
    from whence.errors import WhenceError

    seen = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, WhenceError):
            return current
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None
