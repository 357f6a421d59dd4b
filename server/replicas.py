"""Starting the engine processes of a distributed server: N data-parallel replicas x P tensor-parallel ranks.

Placement:
- `--data-parallel-backend mp`: every replica is a local child process (spawned).
- `--data-parallel-backend ray`: every replica is a Ray actor; the first `--data-parallel-size-local`
  replicas are pinned to this node, the others go wherever Ray finds the resources (1 CPU, plus
  the replica's GPUs when the cluster has GPUs).
- `--distributed-executor-backend ray` with `--tensor-parallel-size N`: each replica is a group of
  jax.distributed processes, one Ray actor each (on CPU one device per process, so N processes; on
  GPU ceil(N / GPUs per node) processes of N / processes GPUs). Rank 0 hosts the coordinator.
On CPU, processes on this machine split its cores evenly (os.sched_setaffinity), so each replica
gets its own share: 2 replicas on a 2-core machine get 1 core each.
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import shutil

from .async_engine import AsyncLLMEngine
from .data_parallel import DataParallelEngine
from .remote_engine import ProcessWorker, RemoteEngine

logger = logging.getLogger("jaxpaged.server")


def on_cpu(use_ray: bool = False) -> bool:
    """Whether the engines run on CPU: as $JAX_PLATFORMS says, else when the Ray cluster has no GPU
    (with Ray), else when this machine has no nvidia-smi."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if use_ray:
        from .ray_utils import cluster_gpus
        return cluster_gpus() == 0
    return shutil.which("nvidia-smi") is None


def cpu_shares(num_local: int) -> list[list[int] | None]:
    """This machine's allowed cores split into num_local disjoint, equal-ish sets (None: too few cores)."""
    cores = sorted(os.sched_getaffinity(0))
    if num_local <= 1 or len(cores) < num_local:
        return [None] * max(num_local, 1)
    per = len(cores) // num_local
    return [cores[i * per:(i + 1) * per] for i in range(num_local)]


def build_distributed_engine(args, config, metrics) -> DataParallelEngine:
    """Starts every engine process (in parallel), wraps each replica in an AsyncLLMEngine with its metrics."""
    dp = args.data_parallel_size
    use_ray = args.data_parallel_backend == "ray" or args.distributed_executor_backend == "ray"
    started_ray = False
    if use_ray:
        from .ray_utils import init_ray
        ranks = config.tensor_parallel_size if args.distributed_executor_backend == "ray" else 1
        # a local Ray gets at least one logical CPU per engine process, so every actor can be placed
        started_ray = init_ray(args.ray_address, num_cpus=max(len(os.sched_getaffinity(0)), dp * ranks))
    try:
        engines = _make_remote_engines(args, config, dp, use_ray)
    except BaseException:
        if started_ray:
            import ray
            ray.shutdown()
        raise
    replicas = [AsyncLLMEngine(e, metrics=metrics.engine(i)) for i, e in enumerate(engines)]

    def on_stop():
        for e in engines:
            e.shutdown()
        if started_ray:
            import ray
            ray.shutdown()
            logger.info("local Ray stopped")

    engine = DataParallelEngine(replicas, config.block_size, on_stop=on_stop)
    engine.metrics = metrics
    return engine


def _make_remote_engines(args, config, dp: int, use_ray: bool) -> list[RemoteEngine]:
    tp = config.tensor_parallel_size
    multi_host_tp = args.distributed_executor_backend == "ray" and tp > 1
    cpu = on_cpu(use_ray)
    if multi_host_tp:
        per_process = 1 if cpu else min(tp, _gpus_per_node())
        ranks = math.ceil(tp / per_process)
    else:
        per_process, ranks = tp, 1
    dp_local = args.data_parallel_size_local if args.data_parallel_size_local is not None else dp
    shares = cpu_shares(dp_local * ranks) if cpu else [None] * (dp_local * ranks)
    engines, cpus_of = [], []
    for i in range(dp):
        local = i < dp_local
        workers, rank_cpus = [], []
        for rank in range(ranks):
            name = f"replica {i} rank {rank}" if ranks > 1 else f"replica {i}"
            share = shares[i * ranks + rank] if local else None
            env = _worker_env(cpu, per_process if multi_host_tp else tp, i, use_ray)
            workers.append(_make_worker(name, env, use_ray, local, cpu, per_process))
            rank_cpus.append(share)
        engines.append(RemoteEngine(workers, config, name=f"data-parallel replica {i}"))
        cpus_of.append(rank_cpus)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(lambda e_c: e_c[0].start(e_c[1], args.engine_factory), zip(engines, cpus_of)))
    except BaseException:
        for e in engines:
            e.shutdown()
        raise
    for i, e in enumerate(engines):
        logger.info("data-parallel replica %d ready (pid %s, %d process(es))", i, e.pid, len(e.workers))
    return engines


def _worker_env(cpu: bool, devices: int, replica: int, use_ray: bool) -> dict[str, str]:
    """Environment of one engine process (set before it imports JAX)."""
    env = {k: os.environ[k] for k in ("JAX_PLATFORMS", "JAXPAGED_CACHE", "XLA_FLAGS") if k in os.environ}
    if cpu and devices > 1:   # this process's share of a tensor-parallel mesh as host devices
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    if not cpu and not use_ray:   # local processes: replica i sees GPUs [i*devices, (i+1)*devices)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(d) for d in range((replica + 1) * devices)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[replica * devices:(replica + 1) * devices])
    return env


def _make_worker(name: str, env: dict, use_ray: bool, local: bool, cpu: bool, devices: int):
    if not use_ray:
        return ProcessWorker(name, env)
    from .ray_utils import RayWorker, current_node_id
    return RayWorker(name, env=env, num_cpus=1, num_gpus=0 if cpu else devices,
                     node_id=current_node_id() if local else None)


def _gpus_per_node() -> int:
    import ray
    counts = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(min(c for c in counts if c > 0))) if any(counts) else 1
