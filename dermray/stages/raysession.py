"""Starting or joining Ray, in one place.

The rule: a job of `ray job submit` (or anyone who sets RAY_ADDRESS) joins that cluster;
otherwise dermray starts its own local Ray. Ray's own default would also try the address in
/tmp/ray/ray_current_cluster, which a stopped or killed `ray start --head` leaves behind, and then
wait on a dead cluster.
"""

from __future__ import annotations

import logging
import os

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
