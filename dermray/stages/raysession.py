"""Starting or joining Ray, in one place.

The rule: a job of `ray job submit` (or anyone who sets RAY_ADDRESS) joins that cluster;
otherwise dermray starts its own local Ray. Ray's own default would also try the address in
/tmp/ray/ray_current_cluster, which a stopped or killed `ray start --head` leaves behind, and then
wait on a dead cluster.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    logger.info("ray.init(address=%r)", address)
    ray.init(address=address, log_to_driver=False)


def joined_cluster() -> bool:
    """Whether this process runs against a cluster it joined (RAY_ADDRESS: a submitted job, or a
    user's choice), where an autoscaler may add nodes; False for dermray's own local Ray."""
    return bool(os.environ.get("RAY_ADDRESS"))


def cluster_shape() -> tuple[int, int]:
    """(GPUs, live nodes) of the Ray cluster this process is connected to."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus, len([n for n in ray.nodes() if n.get("Alive")])


def pool_layout(gpus: int, nodes: int, cpus: int, num_actors: int = 0, max_actors: int = 0,
                num_gpus_per_actor: float = 0.0, threads_per_actor: int = 0) -> dict[str, Any]:
    """An actor pool that embeds with TensorFlow (extract's embedders, predict's predictors),
    from the cluster's shape: ``num_actors`` fixes its size; else one actor per GPU present (at
    least one), or one per node without GPUs, growing to ``max_actors``. On GPUs all
    ``max_actors`` are asked for at once (``initial_size``), so that their pending GPU demand
    makes an autoscaler add GPU nodes in one round. A CPU actor runs TensorFlow on all of its
    node's ``cpus`` (decode tasks take the other CPU slots); a GPU actor leaves the thread count
    to TensorFlow (0)."""
    num_gpus = num_gpus_per_actor or (1.0 if gpus else 0.0)
    if num_actors:
        min_size = max_size = initial = num_actors
    elif num_gpus:
        min_size = max(1, int(gpus / num_gpus))
        max_size = initial = max(min_size, max_actors)
    else:
        min_size = initial = max(1, nodes)
        max_size = max(min_size, max_actors)
    return {"min_size": min_size, "max_size": max_size, "initial_size": initial,
            "num_gpus": num_gpus, "threads": threads_per_actor or (0 if num_gpus else cpus)}
