"""Batch prediction as a Ray Data job: ``dermray predict --ray`` (and on a joined cluster).

The flow: input paths (a folder, a list file, an ``s3://`` prefix) -> decode tasks (CPU, read with
the byte and pixel limits) -> a pool of ``Predictor`` actors, each loading the model bundle once
(backbones on a GPU where the cluster has one) and applying the head and the decision policy ->
prediction rows, streamed back to the driver batch by batch and appended to one CSV or Parquet
file. Only paths and prediction rows (a path, 7 probabilities) pass through the driver; images
stay in the tasks and actors, so memory is bounded whatever the input size.

With GPU actors the decode step runs as separate CPU tasks, in parallel with the GPUs; on a
CPU-only cluster the two steps ask for the same resources and Ray Data fuses them into the actor
(as in the extraction job), which saves moving decoded images through the object store.

This module is only the wiring. Every step is a pure piece of ``dermray.models.predict_io``, the
local loop's own: ``expand_inputs``, ``Limits``, ``decode_files`` (tasks), ``predict_decoded``
(actors), ``split_rows`` and ``drain`` into a ``PredictionWriter`` (driver). So the probabilities
match the local path's on the same images (to 1e-5; the test checks it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermray.errors import DermrayError
from dermray.io import storage
from dermray.models.backbones import limit_threads
from dermray.models.bundle import load_bundle
from dermray.models.predict_io import (
    Limits,
    PredictionWriter,
    decode_files,
    drain,
    expand_inputs,
    predict_decoded,
    split_rows,
)
from dermray.stages.raysession import (
    batch_blocks,
    check_resources,
    cluster_shape,
    ensure_ray,
    pool_layout,
)


def bundle_files(directory: str | Path) -> dict[str, bytes]:
    """A local bundle folder as {relative path: bytes}: shipped to the actors, so that workers
    on other nodes need no copy of the driver's folder."""
    root = Path(directory)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class Predictor:
    """The Ray Data actor: the bundle loaded once (its backbones built once), then
    ``predict_decoded`` per batch. TensorFlow is imported here, inside the actor."""

    def __init__(self, model: str, files: dict[str, bytes] | None, weights_dirs: list[str],
                 policy: str, metadata: pd.DataFrame | None = None, threads: int = 0) -> None:
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            limit_threads(threads)
        self._tmp = None
        if files is not None:
            self._tmp = tempfile.mkdtemp(prefix="dermray-bundle-")
            for rel, data in files.items():
                target = Path(self._tmp, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            model = self._tmp
        # the driver warned already if the weights are random: not once more per actor
        self.bundle = load_bundle(model, weights_dirs=weights_dirs, warn_random=False)
        self.policy, self.metadata = policy, metadata

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return predict_decoded(self.bundle, batch, self.policy, self.metadata)

    def __del__(self) -> None:
        if self._tmp:
            storage.remove(self._tmp, tempfile.gettempdir(), "bundle copy", logging.DEBUG,
                           best_effort=True)


# ---- Ray wiring -------------------------------------------------------------------------------

def actor_layout(num_actors: int = 0) -> dict[str, Any]:
    """The predictor pool: the embedding pool's layout (``raysession.pool_layout``: one actor
    per GPU, else one per node, or ``num_actors``), each asking for one CPU."""
    gpus, nodes = cluster_shape()
    return {**pool_layout(gpus, nodes, os.cpu_count() or 1, num_actors), "num_cpus": 1}


def run_predict_ray(model: str, inputs: Sequence[str], out: str | None = None,
                    policy: str = "accuracy", metadata: pd.DataFrame | None = None,
                    limits: Limits | None = None, weights_dirs: Sequence[str] = (),
                    fmt: str | None = None, num_actors: int = 0,
                    on_problem: Callable[[str], None] | None = None,
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Predict every image named by ``inputs`` on Ray Data; rows stream into ``out``;
    ``on_progress(files done, files)`` after each batch (Ray Data's own bars stay off).

    Returns counts: ``files`` = ``rows`` + ``skipped``, the wall time and images/s.
    """
    import ray

    start = time.perf_counter()
    limits = limits or Limits()
    bundle = load_bundle(model, weights_dirs=weights_dirs)  # a bad bundle fails before Ray starts
    paths = expand_inputs(inputs)
    if not paths:
        raise DermrayError(f"No images found in {', '.join(map(str, inputs))}.")
    # the weights the driver found, by folder: an actor on this machine finds the same files
    dirs = [*map(str, weights_dirs), *{str(Path(w).parent) for w in bundle.weights.values()
                                       if w != "none"}]
    files = None if storage.is_remote(model) else bundle_files(bundle.directory)
    writer = PredictionWriter(out, fmt)
    ensure_ray()
    layout = actor_layout(num_actors)
    check_resources([(f"A predictor actor (1 CPU, {layout['num_gpus']:g} GPU)",
                      {"CPU": 1.0, "GPU": float(layout["num_gpus"])},
                      "Give the cluster a node with a CPU (and a GPU, where it has GPUs).")])
    ds = ray.data.from_pandas(batch_blocks(pd.DataFrame({"path": paths}), limits.batch_size,
                                           max_blocks=1000))
    ds = ds.map_batches(decode_files, batch_size=limits.batch_size, num_cpus=1,
                        fn_kwargs={"image_size": bundle.spec.image_size,
                                   "max_bytes": limits.max_bytes,
                                   "max_pixels": limits.max_pixels})
    ds = ds.map_batches(
        Predictor, batch_size=limits.batch_size, num_cpus=layout["num_cpus"],
        num_gpus=layout["num_gpus"] or None,
        compute=ray.data.ActorPoolStrategy(min_size=layout["min_size"],
                                           max_size=layout["max_size"],
                                           initial_size=layout["initial_size"]),
        fn_constructor_kwargs={"model": str(model), "files": files, "weights_dirs": dirs,
                               "policy": policy, "metadata": metadata,
                               "threads": layout["threads"]})
    first: list[tuple[float, int]] = []  # (seconds to the first batch, its rows)

    def batches():
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            first[:] = first or [(time.perf_counter() - start, len(batch))]
            yield split_rows(batch)

    with writer:  # counts that do not reconcile raise inside: no output is left behind
        skipped = drain(batches(), writer, len(paths), on_problem, on_progress)
    wall = time.perf_counter() - start
    return {"files": len(paths), "rows": writer.rows, "skipped": skipped,
            "wall_s": round(wall, 2), "images_per_s": round(len(paths) / wall, 2),
            "first_batch_s": round(first[0][0], 2) if first else None,
            "first_batch_rows": first[0][1] if first else 0,
            "actor_layout": layout, "out": out}
