"""Batch prediction as a Ray Data job: ``dermray predict --ray`` (and on a joined cluster).

The flow: input paths (a folder, a list file, an ``s3://`` prefix) -> decode tasks (CPU, read with
the byte and pixel limits of the local path) -> a pool of ``Predictor`` actors, each loading the
model bundle once (backbones on a GPU where the cluster has one) and applying the head and the
decision policy -> prediction rows, streamed back to the driver batch by batch and appended to
one CSV or Parquet file. Only paths and prediction rows (a path, 7 probabilities) pass through the
driver; images stay in the tasks and actors, so memory is bounded whatever the input size.

With GPU actors the decode step runs as separate CPU tasks, in parallel with the GPUs; on a
CPU-only cluster the two steps ask for the same resources and Ray Data fuses them into the actor
(as in the extraction job), which saves moving decoded images through the object store.

The numbers are the local path's: the same decoding (``augment.decode_image``), the same
``Bundle.features`` (frozen backbones in fixed-size chunks, test-time views averaged) and the same
head, so the probabilities match ``Bundle.iter_predictions`` on the same images (to 1e-5; the
test checks it).

Pure pieces (``expand_inputs``, ``decode_files``, ``predict_rows``, ``PredictionWriter``) run
without Ray; ``run_predict_ray`` is the wiring.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermray.data.augment import DecodeError, decode_image
from dermray.errors import DermrayError
from dermray.io import storage
from dermray.models.backbones import limit_threads
from dermray.models.bundle import IMAGE_SUFFIXES, Bundle, Limits, load_bundle, read_image_file
from dermray.stages.raysession import ensure_ray

LIST_SUFFIXES = (".txt", ".lst", ".list")
OUTPUT_FORMATS = ("csv", "parquet")


# ---- inputs -----------------------------------------------------------------------------------

def _remote_uri(template: str, inner: str) -> str:
    """``scheme://inner`` with the template URI's query (its S3 options) kept."""
    scheme = template.split("://", 1)[0]
    _, sep, query = template.partition("?")
    return f"{scheme}://{inner}" + (sep + query if sep else "")


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Image paths or URIs from what the user named.

    - a folder: its image files, recursively, sorted;
    - an ``s3://`` prefix (no image suffix): the image objects below it, sorted;
    - a list file (``.txt``, ``.lst``, ``.list``): one path or URI per line (blank lines and
      ``#`` comments skipped; relative paths are relative to the list file's folder);
    - anything else is taken as an image file, whatever its suffix (a bad one is reported).
    """
    out: list[str] = []
    for item in inputs:
        item = str(item)
        if storage.is_remote(item):
            if storage.display(item).lower().endswith(IMAGE_SUFFIXES):
                out.append(item)
            else:
                out.extend(_remote_uri(item, p) for p in storage.list_files(item)
                           if p.lower().endswith(IMAGE_SUFFIXES))
            continue
        path = Path(item)
        if path.is_dir():
            out.extend(str(p) for p in sorted(path.rglob("*"))
                       if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            for line in path.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if not storage.is_remote(line) and not Path(line).is_absolute():
                    line = str(path.parent / line)
                out.append(storage.strip_credentials(line))
        else:
            out.append(item)
    return out


def read_limited(uri: str, max_bytes: int) -> bytes:
    """A file's bytes (local: regular files only), refused from its size when over ``max_bytes``."""
    if not storage.is_remote(uri):
        return read_image_file(Path(uri), max_bytes)
    import pyarrow.fs as pafs

    fs, path = storage.open_fs(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise DecodeError("no such object (or a prefix, not a file)")
    if info.size > max_bytes:
        raise DecodeError(f"{info.size} bytes is over the limit of {max_bytes} bytes "
                          "(--max-bytes)")
    with fs.open_input_stream(path) as stream:
        return stream.read()


def decode_files(batch: dict[str, np.ndarray], image_size: int, max_bytes: int,
                 max_pixels: int) -> dict[str, np.ndarray]:
    """Read and decode a batch of paths as the local path does; a failure is an ``error``
    string (and a blank image) on its row, never an exception."""
    paths = [str(p) for p in batch["path"]]
    images = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    for i, path in enumerate(paths):
        try:
            images[i] = decode_image(read_limited(path, max_bytes), image_size,
                                     max_pixels=max_pixels)
        except (DecodeError, OSError) as exc:
            errors[i] = f"{exc}"
    return {"path": np.asarray(paths, dtype=object), "image": images, "error": errors}


# ---- the model, one batch at a time -----------------------------------------------------------

def image_id(path: str) -> str:
    """The image id of a path or URI: its file name without the suffix (as the local path)."""
    return Path(storage.display(path)).stem


def metadata_rows(metadata: pd.DataFrame | None, ids: Sequence[str]) -> pd.DataFrame | None:
    """Age, sex, localization of these images from a frame indexed by image_id (unknown if
    absent), as ``Bundle._predict_batch`` builds them."""
    if metadata is None:
        return None
    return pd.DataFrame({"age": [metadata["age"].get(i, np.nan) for i in ids],
                         "sex": [metadata["sex"].get(i, "unknown") for i in ids],
                         "localization": [metadata["localization"].get(i, "unknown")
                                          for i in ids]})


def predict_rows(bundle: Bundle, batch: dict[str, np.ndarray], policy: str = "accuracy",
                 metadata: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
    """Prediction columns for a decoded batch: ``path``, ``image_id``, ``dx``, ``policy``,
    ``p_<class>`` and ``error`` (rows that failed to decode keep their reason, NaN
    probabilities and an empty ``dx``)."""
    paths = np.asarray(batch["path"], dtype=object)
    errors = np.asarray(batch["error"], dtype=object)
    ok = np.asarray([not e for e in errors], dtype=bool)
    ids = [image_id(p) for p in paths]
    proba = np.full((len(paths), len(bundle.labels)), np.nan)
    dx = np.full(len(paths), "", dtype=object)
    if ok.any():
        meta = (metadata_rows(metadata, [i for i, k in zip(ids, ok, strict=True) if k])
                if bundle.uses_metadata else None)
        proba[ok] = bundle.head.predict_proba(bundle.features(np.asarray(batch["image"])[ok],
                                                              meta))
        dx[ok] = [bundle.labels[i] for i in bundle.decide(proba[ok], policy)]
    out = {"path": paths, "image_id": np.asarray(ids, dtype=object), "dx": dx,
           "policy": np.full(len(paths), policy, dtype=object)}
    out.update({f"p_{c}": proba[:, j] for j, c in enumerate(bundle.labels)})
    out["error"] = errors
    return out


def bundle_files(directory: str | Path) -> dict[str, bytes]:
    """A local bundle folder as {relative path: bytes}: shipped to the actors, so that workers
    on other nodes need no copy of the driver's folder."""
    root = Path(directory)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class Predictor:
    """The Ray Data actor: the bundle loaded once (its backbones built once), then
    ``predict_rows`` per batch. TensorFlow is imported here, inside the actor."""

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
        self.bundle = load_bundle(model, weights_dirs=weights_dirs)
        self.policy, self.metadata = policy, metadata

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return predict_rows(self.bundle, batch, self.policy, self.metadata)

    def __del__(self) -> None:
        if self._tmp:
            storage.remove(self._tmp, tempfile.gettempdir(), "bundle copy", logging.DEBUG,
                           best_effort=True)


# ---- output -----------------------------------------------------------------------------------

def output_format(out: str | None, fmt: str | None = None) -> str:
    """csv or parquet: as asked, else from the suffix of ``out`` (CSV by default)."""
    if fmt is None:
        fmt = "parquet" if out and storage.display(out).lower().endswith(".parquet") else "csv"
    if fmt not in OUTPUT_FORMATS:
        raise DermrayError(f"The output format must be one of {', '.join(OUTPUT_FORMATS)}. Got "
                           f"{fmt!r} instead.")
    return fmt


class PredictionWriter:
    """Prediction rows appended batch by batch to one CSV or Parquet file (or CSV on stdout).

    A local file is written under a temporary name in its folder and renamed when complete; an
    ``s3://`` target is written to a local temporary file and copied up when complete (streamed,
    never held in memory). On failure nothing is left at the target.
    """

    def __init__(self, out: str | None, fmt: str | None = None) -> None:
        self.out, self.fmt = out, output_format(out, fmt)
        self.rows = 0
        self._parquet = None
        self._tmp: Path | None = None
        self._fh = None
        if out is None:
            if self.fmt == "parquet":
                raise DermrayError("Parquet output needs --out FILE.parquet.")
            return
        if storage.is_remote(out):
            self._tmp = Path(tempfile.mkstemp(prefix="dermray-pred-", suffix=f".{self.fmt}")[1])
        else:
            target = Path(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")

    def write(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        if self.fmt == "csv":
            text = frame.to_csv(index=False, header=self.rows == 0, float_format="%.5f")
            if self._tmp is None:
                sys.stdout.write(text)
            else:
                if self._fh is None:
                    self._fh = open(self._tmp, "w")  # noqa: SIM115 - closed in close()
                self._fh.write(text)
        else:

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(str(self._tmp), table.schema)
            self._parquet.write_table(table.cast(self._parquet.schema))
        self.rows += len(frame)

    def close(self, ok: bool = True) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._parquet is not None:
            self._parquet.close()
        if self._tmp is None:
            return
        try:
            if ok and self._tmp.exists():
                if storage.is_remote(self.out):
                    import pyarrow.fs as pafs

                    fs, path = storage.open_fs(self.out)
                    pafs.copy_files(str(self._tmp), path,
                                    source_filesystem=pafs.LocalFileSystem(),
                                    destination_filesystem=fs)
                else:
                    os.replace(self._tmp, self.out)
        finally:
            storage.remove(self._tmp, self._tmp.parent, "temporary output", logging.DEBUG,
                           best_effort=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        self.close(ok=kind is None)


def split_rows(batch: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Prediction rows, and a message per file that was skipped (naming it and why)."""
    bad = batch["error"].astype(str) != ""
    problems = [f"{p}: {e}; skipped" for p, e in zip(batch.loc[bad, "path"],
                                                     batch.loc[bad, "error"], strict=True)]
    return batch.loc[~bad].drop(columns=["error"]).reset_index(drop=True), problems


# ---- Ray wiring -------------------------------------------------------------------------------

def actor_layout(num_actors: int = 0) -> dict[str, Any]:
    """The predictor pool: one actor per GPU where the cluster has GPUs (up to one per GPU),
    else one actor per node (or ``num_actors``), each with all of its node's cores for
    TensorFlow; decode tasks take the remaining CPU slots."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    nodes = max(1, len([n for n in ray.nodes() if n.get("Alive")]))
    if gpus:
        size = num_actors or gpus
        return {"min_size": 1, "max_size": size, "num_gpus": 1.0, "num_cpus": 1, "threads": 0}
    size = num_actors or nodes
    return {"min_size": size, "max_size": size, "num_gpus": 0.0, "num_cpus": 1,
            "threads": os.cpu_count() or 1}


def run_predict_ray(model: str, inputs: Sequence[str], out: str | None = None,
                    policy: str = "accuracy", metadata: pd.DataFrame | None = None,
                    limits: Limits | None = None, weights_dirs: Sequence[str] = (),
                    fmt: str | None = None, num_actors: int = 0,
                    on_problem: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Predict every image named by ``inputs`` on Ray Data; rows stream into ``out``.

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
                                       if w not in ("none", "imagenet")}]
    files = None if storage.is_remote(model) else bundle_files(bundle.directory)
    writer = PredictionWriter(out, fmt)
    ensure_ray()
    layout = actor_layout(num_actors)
    blocks = max(1, min(len(paths) // limits.batch_size, 1000))
    ds = ray.data.from_pandas(pd.DataFrame({"path": paths})).repartition(blocks)
    ds = ds.map_batches(decode_files, batch_size=limits.batch_size, num_cpus=1,
                        fn_kwargs={"image_size": bundle.spec["image_size"],
                                   "max_bytes": limits.max_bytes,
                                   "max_pixels": limits.max_pixels})
    ds = ds.map_batches(
        Predictor, batch_size=limits.batch_size, num_cpus=layout["num_cpus"],
        num_gpus=layout["num_gpus"] or None,
        compute=ray.data.ActorPoolStrategy(min_size=layout["min_size"],
                                           max_size=layout["max_size"]),
        fn_constructor_kwargs={"model": str(model), "files": files, "weights_dirs": dirs,
                               "policy": policy, "metadata": metadata,
                               "threads": layout["threads"]})
    skipped = 0
    first: tuple[float, int] | None = None  # (seconds to the first batch, its rows)
    with writer:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            first = first or (time.perf_counter() - start, len(batch))
            rows, problems = split_rows(batch)
            writer.write(rows)
            skipped += len(problems)
            for problem in problems:
                (on_problem or (lambda m: None))(problem)
        if writer.rows + skipped != len(paths):  # raised inside: no output is left behind
            raise DermrayError(f"Counts do not reconcile: {len(paths)} files, {writer.rows} "
                               f"rows written, {skipped} skipped. Run the prediction again.")
    wall = time.perf_counter() - start
    return {"files": len(paths), "rows": writer.rows, "skipped": skipped,
            "wall_s": round(wall, 2), "images_per_s": round(len(paths) / wall, 2),
            "first_batch_s": round(first[0], 2) if first else None,
            "first_batch_rows": first[1] if first else 0,
            "actor_layout": layout, "out": out}
