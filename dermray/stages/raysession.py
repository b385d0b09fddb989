"""Starting or joining Ray, in one place.

The rule: a job of `ray job submit` (or anyone who sets RAY_ADDRESS) joins that cluster;
otherwise dermray starts its own local Ray. Ray's own default would also try the address in
/tmp/ray/ray_current_cluster, which a stopped or killed `ray start --head` leaves behind, and then
wait on a dead cluster.

Before a local Ray starts: Ray's token file (``~/.ray/auth_token``, which ``ray.init`` writes
with the umask's mode, 644 on most machines) is made here first, under umask 077, and checked
to be private after; and a command line that carried ``s3://KEY:SECRET@`` is rewritten without
them (Ray records the driver's command line as the job's entrypoint).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from dermray.errors import DermrayError
from dermray.io import storage
from dermray.stages.console import route_foreign_logs

logger = logging.getLogger(__name__)


def ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    hide_credentials_in_cmdline()
    if address == "local":
        make_private_token()
    logger.info("ray.init(address=%r)", address)
    ray.init(address=address, log_to_driver=False)
    route_foreign_logs()  # ray.init may (re)configure Ray's loggers: theirs go to OUT/logs
    check_token_private()
    if address != "local" and storage.adopted_credentials():
        logger.warning("the S3 credentials read from the URIs stay in this driver; the cluster's "
                       "workers use their own (an instance profile, or AWS_* in the job's "
                       "runtime environment)")


def joined_cluster() -> bool:
    """Whether this process runs against a cluster it joined (RAY_ADDRESS: a submitted job, or a
    user's choice), where an autoscaler may add nodes; False for dermray's own local Ray."""
    return bool(os.environ.get("RAY_ADDRESS"))


AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_SECURITY_TOKEN")


def keep_credentials_out_of_tune() -> None:
    """Tune copies the driver's AWS_* variables into every trial actor's runtime environment,
    and Ray's runtime-env agent writes that environment into its log in the session folder:
    the secret on disk (measured: runtime_env_agent.log). A local Ray's workers inherit the
    driver's environment anyway, and credentials read from a URI are not to leave this machine,
    so there Tune is told not to copy them. On a joined cluster with the user's own AWS_*
    variables Ray's behaviour is kept: it is how the trials on other nodes get them."""
    if joined_cluster() and not storage.adopted_credentials():
        return
    from ray.tune.execution import class_cache

    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(names, (set, frozenset)):
        class_cache.ENV_VARS_TO_PROPAGATE = set(names) - set(AWS_VARIABLES)


def token_path() -> Path:
    """Where Ray reads its token file: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and folders made in the block are private (umask 077); the old umask after."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def make_private_token() -> None:
    """Write the token a new local Ray is about to write, now, under umask 077: the same call
    ``ray.init`` makes (a token only when token authentication is on and none is found), so
    that the file is never readable by others, not even for a moment. Ray's private API: where
    it has moved, ``check_token_private`` still fixes the mode after ``ray.init``."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            generate_and_save_token,
        )
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:
        return
    loader = AuthenticationTokenLoader.instance()
    if loader.has_token(ignore_auth_mode=True):
        return
    with private_umask():
        generate_and_save_token()
    loader.reset_cache()


def check_token_private(path: Path | None = None) -> None:
    """A token file readable by others is made private (chmod 600), or refused with a message
    when that cannot be done."""
    path = path or token_path()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return  # no token file: a token from $RAY_AUTH_TOKEN, or authentication off
    if not mode & 0o077:
        return
    logger.warning("%s was readable by others (mode %o); made private (600)", path, mode)
    try:
        path.chmod(0o600)
    except OSError as exc:
        raise DermrayError(f"Ray's token file {path} is readable by others (mode {mode:o}) and "
                           f"cannot be made private ({exc.strerror}): run `chmod 600 {path}`, "
                           "as its owner.") from None


def hide_credentials_in_cmdline() -> None:
    """Rewrite this process's command line without URI credentials (what ``ps`` shows, and what
    Ray records as the job's entrypoint), when it held any; ``sys.argv`` follows."""
    if not any(storage.CREDENTIALS.search(a) for a in sys.orig_argv):
        return
    import ray._raylet

    sys.argv[:] = [storage.redact(a) for a in sys.argv]
    ray._raylet.setproctitle(" ".join(storage.redact(a) for a in sys.orig_argv))
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


MAX_BLOCKS = 200  # Ray Data blocks of a job: enough to spread over a cluster's decode tasks


def batch_blocks(frame: pd.DataFrame, batch_size: int,
                 max_blocks: int = MAX_BLOCKS) -> list[pd.DataFrame]:
    """The rows as Ray Data blocks of whole model batches (a multiple of ``batch_size`` rows;
    only the last may be short), at most ``max_blocks`` of them: for extract's embedders and
    predict's predictors, which both pad a short batch.

    An embedding actor gets a block's rows in batches of ``batch_size``, and pads a short batch
    to the full size (XLA compiles one shape). Blocks of any other size cost a padded batch
    each: 10,033 views in 200 even blocks of ~50 rows reached the actor as 400 batches (32 + 18
    rows), so the network did 12,800 views' work for 10,033 (0.78); in blocks of 64 rows it is
    314 batches, all but the last full (0.999)."""
    per = batch_size * max(1, -(-len(frame) // (max_blocks * batch_size)))
    return [frame.iloc[i:i + per] for i in range(0, len(frame), per)] or [frame]


def _amounts(resources: dict[str, float], keys: tuple[str, ...] = ("CPU", "GPU")) -> str:
    def amount(key: str) -> str:  # Ray counts memory in bytes
        value = resources.get(key, 0.0)
        return f"{key} {value / 1e9:.1f} GB" if "memory" in key else f"{key} {value:g}"

    return ", ".join(amount(k) for k in keys)


def node_offers() -> tuple[list[tuple[str, dict[str, float]]], bool]:
    """What one node can ever offer a task or an actor: (label, resources) for each live node
    and, on a joined cluster, for each node type of its autoscaler config (read from the GCS,
    where the autoscaler publishes it). The flag says whether the offers are complete: True on
    dermray's own local Ray (nothing adds a node) or where the autoscaler config was read."""
    import ray

    offers = [(f"node {n.get('NodeManagerAddress', '?')}",
               {k: float(v) for k, v in (n.get("Resources") or {}).items()})
              for n in ray.nodes() if n.get("Alive")]
    if not joined_cluster():
        return offers, True
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # Ray's private API moved, or the GCS does not answer it
        logger.debug("no autoscaler config", exc_info=True)
        config = None
    if config is None or not config.node_group_configs:
        return offers, False
    for group in config.node_group_configs:
        if group.max_count != 0:
            offers.append((f"node type {group.name}",
                           {k: float(v) for k, v in dict(group.resources).items()}))
    return offers, True


def check_resources(requests: list[tuple[str, dict[str, float], str]]) -> None:
    """Each request ``(what, resources, fix)``: the resources one task or actor asks for, with
    what asks for them (a setting and its value) and how to change it. A request that no node
    of the cluster can ever offer would wait forever (Ray Tune and Ray Data queue it without an
    end): refused here, before the job starts, naming the request, the setting to change and
    what the cluster has. On a joined cluster whose autoscaler config cannot be read, a warning
    instead (an autoscaler may still add a node that fits)."""
    offers, complete = node_offers()

    def fits(resources: dict[str, float], offer: dict[str, float]) -> bool:
        return all(offer.get(k, 0.0) >= v for k, v in resources.items() if v > 0)

    for what, resources, fix in requests:
        if any(fits(resources, offer) for _, offer in offers):
            continue
        keys = tuple(dict.fromkeys(["CPU", "GPU", *(k for k, v in resources.items() if v > 0)]))
        has = "; ".join(f"{label}: {_amounts(offer, keys)}" for label, offer in offers) or "no node"
        asked = _amounts(resources, tuple(k for k in keys if resources.get(k, 0) > 0))
        if not complete:
            logger.warning("%s asks for %s per task, which no node of this cluster has now (%s); "
                           "its autoscaler's node types could not be read, so the job waits for "
                           "one to be added. If none can be, it waits forever: %s", what, asked,
                           has, fix)
            continue
        where = ("this local Ray has" if not joined_cluster() else
                 "no node or node type of this cluster (its autoscaler config included) has it:")
        raise DermrayError(f"{what} asks for {asked} per task, but {where} {has}. Nothing would "
                           f"ever run it, and the job would wait forever. {fix}")
