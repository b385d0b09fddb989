"""``dermray predict`` without Ray: what goes in, what comes out, and the loop between.

In: the paths a user names (``expand_inputs``: folders, list files, ``s3://`` prefixes), read
within ``Limits`` (``read_limited``: regular files only, bounded bytes) and decoded a batch at a
time (``decode_files``: bounded pixels; a failure is an ``error`` string on its row). Between: the
bundle's ``predict_batch`` on the decoded images. Out: ``split_rows`` (prediction rows, and a
reason per skipped file) into a ``PredictionWriter`` (CSV or Parquet, written whole or not at all).

``iter_predictions`` is the local loop (``run_predict_local``: the whole command). The Ray Data job
(``dermray.stages.predict``) maps the same ``decode_files`` over tasks and the same
``predict_decoded`` over actors, and ``drain``s into the same writer, so both give the same rows.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermray.data.augment import DecodeError, decode_image
from dermray.errors import DermrayError
from dermray.io import storage
from dermray.models.bundle import Bundle, load_bundle

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".lst", ".list")
OUTPUT_FORMATS = ("csv", "parquet")


@dataclass(frozen=True)
class Limits:
    """What `dermray predict` reads at most: bytes per file, pixels per image, files per batch."""

    max_bytes: int = 50_000_000
    max_pixels: int = 40_000_000
    batch_size: int = 64

    def __post_init__(self) -> None:
        for key in ("max_bytes", "max_pixels", "batch_size"):
            if getattr(self, key) < 1:
                raise DermrayError(f"--{key.replace('_', '-')} must be >= 1. Got "
                                   f"{getattr(self, key)} instead.")


# ---- inputs -----------------------------------------------------------------------------------

def _remote_uri(template: str, inner: str) -> str:
    """``scheme://inner`` with the template URI's query (its S3 options) kept."""
    scheme = template.split("://", 1)[0]
    _, sep, query = template.partition("?")
    return f"{scheme}://{inner}" + (sep + query if sep else "")


def expand_inputs(inputs: Iterable[str | Path]) -> list[str]:
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


def read_limited(uri: str | Path, max_bytes: int) -> bytes:
    """A file's bytes, at most ``max_bytes``, refused from its size where it can be: a local file
    must be a regular one (a FIFO, device or socket is never read), an ``s3://`` URI an object."""
    if storage.is_remote(uri):
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
    info = os.stat(uri)
    if not stat.S_ISREG(info.st_mode):
        raise DecodeError("not a regular file (a folder, FIFO, device or socket)")
    if info.st_size > max_bytes:
        raise DecodeError(f"{info.st_size} bytes is over the limit of {max_bytes} bytes "
                          "(--max-bytes)")
    with open(uri, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DecodeError(f"grew over the limit of {max_bytes} bytes while read (--max-bytes)")
    return data


def decode_files(batch: dict[str, np.ndarray], image_size: int, max_bytes: int,
                 max_pixels: int) -> dict[str, np.ndarray]:
    """Read and decode a batch of paths; a failure is an ``error`` string (and a blank image) on
    its row, never an exception."""
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


def image_id(path: str | Path) -> str:
    """The image id of a path or URI: its file name without the suffix."""
    return Path(storage.display(path) if storage.is_remote(path) else path).stem


def metadata_rows(metadata: pd.DataFrame | None, ids: Sequence[str]) -> pd.DataFrame | None:
    """Age, sex, localization of these images from a frame indexed by image_id (unknown where
    absent)."""
    if metadata is None:
        return None
    return pd.DataFrame({"age": [metadata["age"].get(i, np.nan) for i in ids],
                         "sex": [metadata["sex"].get(i, "unknown") for i in ids],
                         "localization": [metadata["localization"].get(i, "unknown")
                                          for i in ids]})


def predict_decoded(bundle: Bundle, batch: dict[str, np.ndarray], policy: str = "accuracy",
                    metadata: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
    """Prediction columns for a decoded batch (``decode_files``): ``path``, ``image_id``, ``dx``,
    ``policy``, ``p_<class>`` and ``error`` (rows that failed to decode keep their reason, NaN
    probabilities and an empty ``dx``). ``p_<class>`` are the head's probabilities; ``dx`` is
    the decision of ``policy``, taken on the temperature-scaled ones."""
    paths = np.asarray(batch["path"], dtype=object)
    errors = np.asarray(batch["error"], dtype=object)
    ok = np.asarray([not e for e in errors], dtype=bool)
    ids = [image_id(p) for p in paths]
    proba = np.full((len(paths), len(bundle.labels)), np.nan)
    dx = np.full(len(paths), "", dtype=object)
    if ok.any():
        meta = (metadata_rows(metadata, [i for i, k in zip(ids, ok, strict=True) if k])
                if bundle.uses_metadata else None)
        proba[ok] = bundle.predict_proba(np.asarray(batch["image"])[ok], meta)
        dx[ok] = [bundle.labels[i] for i in bundle.decide(proba[ok], policy)]
    out = {"path": paths, "image_id": np.asarray(ids, dtype=object), "dx": dx,
           "policy": np.full(len(paths), policy, dtype=object)}
    out.update({f"p_{c}": proba[:, j] for j, c in enumerate(bundle.labels)})
    out["error"] = errors
    return out


def split_rows(batch: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Prediction rows, and a message per file that was skipped (naming it and why)."""
    bad = batch["error"].astype(str) != ""
    problems = [f"{p}: {e}; skipped" for p, e in zip(batch.loc[bad, "path"],
                                                     batch.loc[bad, "error"], strict=True)]
    return batch.loc[~bad].drop(columns=["error"]).reset_index(drop=True), problems


# ---- the local loop ---------------------------------------------------------------------------

def iter_predictions(bundle: Bundle, paths: Iterable[str | Path],
                     metadata: pd.DataFrame | None = None, policy: str = "accuracy",
                     limits: Limits | None = None
                     ) -> Iterator[tuple[pd.DataFrame, list[str]]]:
    """(rows, problems) per batch of ``limits.batch_size`` files, so that memory does not grow
    with the number of files: the Ray job's decode and predict steps, in this process.

    ``metadata`` (HAM10000 columns, indexed by image_id) feeds models trained with patient
    metadata; images it does not list get the 'unknown' encoding."""
    limits = limits or Limits()
    batch: list[str] = []
    for path in paths:
        batch.append(str(path))
        if len(batch) == limits.batch_size:
            yield _predict_paths(bundle, batch, metadata, policy, limits)
            batch = []
    if batch:
        yield _predict_paths(bundle, batch, metadata, policy, limits)


def _predict_paths(bundle: Bundle, paths: list[str], metadata: pd.DataFrame | None,
                   policy: str, limits: Limits) -> tuple[pd.DataFrame, list[str]]:
    decoded = decode_files({"path": np.asarray(paths, dtype=object)}, bundle.spec.image_size,
                           limits.max_bytes, limits.max_pixels)
    return split_rows(pd.DataFrame(predict_decoded(bundle, decoded, policy, metadata)))


def predict_files(bundle: Bundle, paths: Iterable[str | Path],
                  metadata: pd.DataFrame | None = None, policy: str = "accuracy",
                  limits: Limits | None = None) -> tuple[pd.DataFrame, list[str]]:
    """All of ``iter_predictions`` at once (for a few files)."""
    frames, problems = [], []
    for frame, found in iter_predictions(bundle, paths, metadata, policy, limits):
        frames += [frame] if len(frame) else []
        problems += found
    if not frames:
        return pd.DataFrame(columns=["path", "image_id", "dx", "policy",
                                     *[f"p_{c}" for c in bundle.labels]]), problems
    return pd.concat(frames, ignore_index=True), problems


def drain(batches: Iterable[tuple[pd.DataFrame, list[str]]], writer: PredictionWriter,
          files: int, on_problem: Callable[[str], None] | None = None,
          on_progress: Callable[[int, int], None] | None = None) -> int:
    """Write every batch's rows, report every skipped file; returns how many were skipped.
    ``on_progress(files done, files)`` after each batch.

    Call it inside ``with writer``: counts that do not reconcile (``files`` = rows + skipped)
    raise, and the writer then leaves nothing behind."""
    skipped = 0
    for rows, problems in batches:
        writer.write(rows)
        skipped += len(problems)
        for problem in problems:
            (on_problem or (lambda m: None))(problem)
        if on_progress is not None:
            on_progress(writer.rows + skipped, files)
    if writer.rows + skipped != files:
        raise DermrayError(f"Counts do not reconcile: {files} files, {writer.rows} rows written, "
                           f"{skipped} skipped. Run the prediction again.")
    return skipped


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


def run_predict_local(model: str | Path, inputs: Sequence[str], out: str | None = None,
                      policy: str = "accuracy", metadata: pd.DataFrame | None = None,
                      limits: Limits | None = None, weights_dirs: Sequence[str] = (),
                      fmt: str | None = None,
                      on_problem: Callable[[str], None] | None = None,
                      on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """``dermray predict`` in this process (``run_predict_ray``'s twin, without Ray): every image
    named by ``inputs``, batch by batch, into ``out`` (stdout without it); ``on_progress(files
    done, files)`` after each batch.

    Returns counts: ``files`` = ``rows`` + ``skipped``."""
    limits = limits or Limits()
    bundle = load_bundle(model, weights_dirs=weights_dirs)
    paths = expand_inputs(inputs)
    if not paths:
        raise DermrayError(f"No images found in {', '.join(map(str, inputs))}.")
    writer = PredictionWriter(out, fmt)
    with writer:
        skipped = drain(iter_predictions(bundle, paths, metadata, policy, limits), writer,
                        len(paths), on_problem, on_progress)
    return {"files": len(paths), "rows": writer.rows, "skipped": skipped, "out": out}
