"""Ray for the server: the optional import, joining or starting a cluster, engine workers as actors.

Ray is an extra (`pip install "jaxpaged[ray]"`). The server joins the cluster named by
`--ray-address` or `$RAY_ADDRESS` (`ray start --head` on one machine, `ray start --address=HEAD:6379`
on the others); without either it starts a private local Ray bound to 127.0.0.1 (no dashboard, a
small object store) and stops it at exit.
"""
from __future__ import annotations

import logging
import os

from .remote_engine import EngineWorker, WorkerDiedError

logger = logging.getLogger("jaxpaged.server")

RAY_MISSING = ("Ray is not installed: the Ray backends (--data-parallel-backend ray, "
               "--distributed-executor-backend ray) need the extra: pip install \"jaxpaged[ray]\"")
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024
WAIT_LOG_INTERVAL_S = 60


def require_ray():
    """The ray module, or a RuntimeError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connects to `address` / $RAY_ADDRESS, else starts a local Ray on 127.0.0.1. True when it started one."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return False
    logger.info("starting a local Ray on 127.0.0.1")
    start_local_env()
    ray.init(**local_ray_kwargs(num_cpus), logging_level=logging.WARNING, configure_logging=False)
    return True


def start_local_env() -> None:
    """Keeps a local Ray on the loopback: Ray processes started from here (inheriting this environment)
    advertise and bind 127.0.0.1 instead of the machine's other addresses (Ray's single-machine mode)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def local_ray_kwargs(num_cpus: int | None = None) -> dict:
    """ray.init arguments of a private local Ray: 127.0.0.1, no dashboard, a small object store."""
    return dict(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES)


class RayWorker:
    """WorkerHandle over a Ray actor hosting an EngineWorker."""

    def __init__(self, name: str, *, env: dict[str, str], num_cpus: float, num_gpus: float,
                 node_id: str | None = None):
        ray = require_ray()
        self._ray = ray
        self.name = name
        # two threads: the engine thread's calls run one at a time (it waits for each reply); the
        # second answers /health's pings while a step runs
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, name=None, max_concurrency=2,
                       runtime_env={"env_vars": env} if env else None)
        if node_id is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        self.actor = ray.remote(EngineWorker).options(**options).remote()

    def submit(self, method: str, args: tuple):
        return self.actor.call.remote(method, args)

    def wait(self, ref):
        """The reply; while none comes, a warning every minute (an actor Ray cannot place waits forever)."""
        waited = 0
        while True:
            try:
                return self._ray.get(ref, timeout=WAIT_LOG_INTERVAL_S)
            except self._ray.exceptions.GetTimeoutError:
                waited += WAIT_LOG_INTERVAL_S
                logger.warning("still waiting for %s after %d s (if it is not placed: the cluster lacks the "
                               "resources it asks for, see `ray status`)", self.name, waited)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.WorkerCrashedError) as exc:
                raise WorkerDiedError(f"{self.name} (Ray actor) died: {exc.__class__.__name__}") from None

    def is_alive(self, timeout: float = 5.0) -> bool:
        """False once Ray reports the actor dead; a busy actor (no answer in `timeout`) counts as alive."""
        try:
            self._ray.get(self.actor.call.remote("ping", ()), timeout=timeout)
        except self._ray.exceptions.GetTimeoutError:
            return True
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.WorkerCrashedError):
            return False
        return True

    def kill(self) -> None:
        try:
            self._ray.kill(self.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass


def current_node_id() -> str:
    return require_ray().get_runtime_context().get_node_id()


def cluster_gpus() -> float:
    return float(require_ray().cluster_resources().get("GPU", 0))
