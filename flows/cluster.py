"""Connecting to Ray and sizing work to the cluster it finds."""

from __future__ import annotations

import logging
import os
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

    def __post_init__(self):
        for name in ("workers", "shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args) -> ClusterSettings:
        """From the command line's --workers, --shards, --dtype and --address."""
        return cls(workers=args.workers, shards=args.shards, dtype=args.dtype, address=args.address)


def connect(address: str | None = None):
    """ray.init unless already connected (notebooks, tests). Without an address: the job's cluster when run by
    `ray job submit` (RAY_ADDRESS is set), else a new local one; `--address auto` joins a running cluster."""
    import ray

    if ray.is_initialized():
        quiet_data_progress()
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # Not "auto": a stale /tmp/ray/ray_current_cluster would make ray.init wait on a cluster long gone.
        address = "local"
    env = dict(WORKER_ENV)
    ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env},
             logging_level=logging.WARNING, configure_logging=True)
    quiet_data_progress()
    log.info("ray: %s", ray.cluster_resources())
    return ray


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars drown our own progress lines; keep them off."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False


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
