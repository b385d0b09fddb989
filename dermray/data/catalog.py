"""HAM10000 metadata, image layouts on disk, validation and the lesion-grouped split.

Reads the official ``HAM10000_metadata.csv`` and finds the images in the layouts users have
(Dataverse: ``HAM10000_images_part_1/`` and ``_part_2/``; Kaggle: the same and lower-case copies;
or any folders given explicitly), on local disk or ``s3://``. Validation reports every problem at
once, naming the row, the field and the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dermray.data.checks import (  # noqa: F401 - validate_metadata and the lists: catalog's API
    IMAGE_ID,
    LOCALIZATIONS,
    REQUIRED_COLUMNS,
    SEXES,
    Problem,
    examples,
    image_file_warnings,
    metadata_problems,
    metadata_warnings,
    problem,
    problem_counts,
    validate_metadata,
)
from dermray.domain import CLASSES, SPLITS
from dermray.errors import CatalogError, StorageError
from dermray.io.storage import display, open_fs, redact, storage_errors, write_parquet
from dermray.io.storage import join as join_uri

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg")
LAYOUT_DIRS = re.compile(r"^ham10000_images(_part_[12])?$", re.IGNORECASE)
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "lesion_id", "dx", "label", "split", "path", "age", "sex", "localization",
)
def read_metadata(uri: str) -> pd.DataFrame:
    """Read the metadata CSV with ids as strings; a clear error if it is missing or unreadable."""
    fs, path = open_fs(uri)
    try:
        with storage_errors(uri), fs.open_input_stream(path) as stream:
            raw = stream.read()
    except StorageError as exc:  # the store, not the path: its message says what to check
        raise CatalogError(f"Cannot read the metadata file: {exc}") from None
    except (FileNotFoundError, OSError) as exc:
        raise CatalogError(
            f"Cannot read the metadata file {display(uri)}: {redact(exc)}. Pass the path "
            "of HAM10000_metadata.csv with --metadata (or run `dermray data fetch --dest DIR` "
            "first).") from None
    try:
        frame = pd.read_csv(io.BytesIO(raw), dtype={"lesion_id": str, "image_id": str, "dx": str},
                            keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise CatalogError(f"The metadata file {display(uri)} is not a readable CSV: {exc}. "
                           "Pass HAM10000_metadata.csv (a header and one row per image).") from None
    return frame


def resolve_image_dirs(roots: Iterable[str]) -> list[str]:
    """Expand each root into the folders that hold images.

    A root that holds JPEGs is used as is; its sub-folders named like the Dataverse or Kaggle
    layouts (``HAM10000_images_part_1``, ``ham10000_images_part_2``, ...) are added too.
    """
    dirs: list[str] = []
    for root in roots:
        fs, path = open_fs(root)
        with storage_errors(root):
            info = fs.get_file_info(path)
        if info.type != pafs.FileType.Directory:
            raise CatalogError(f"Image folder {display(root)} does not exist or is not a folder; "
                               "pass an existing folder with --images.")
        with storage_errors(root):
            entries = fs.get_file_info(pafs.FileSelector(path))
        if any(e.type == pafs.FileType.File and e.base_name.lower().endswith(IMAGE_SUFFIXES)
               for e in entries):
            dirs.append(root)
        for entry in sorted(entries, key=lambda e: e.base_name):
            if entry.type == pafs.FileType.Directory and LAYOUT_DIRS.match(entry.base_name):
                dirs.append(join_uri(root, entry.base_name))
    return dirs


def index_images(dirs: Sequence[str], sizes: dict[str, int] | None = None
                 ) -> tuple[dict[str, str], int]:
    """Map image_id -> file path/URI over the folders; the first folder wins for repeats.

    Returns the index and how many repeated files (Kaggle ships two copies) were skipped;
    ``sizes`` (if given) is filled with path -> bytes, from the listing.
    """
    index: dict[str, str] = {}
    repeats = 0
    for root in dirs:
        fs, path = open_fs(root)
        with storage_errors(root):
            entries = fs.get_file_info(pafs.FileSelector(path))
        for entry in entries:
            name = entry.base_name
            if entry.type != pafs.FileType.File or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            stem = name.rsplit(".", 1)[0]
            if stem in index:
                repeats += 1
                continue
            index[stem] = join_uri(root, name) if "://" in root else str(Path(path) / name)
            if sizes is not None and entry.size is not None:
                sizes[index[stem]] = entry.size
    return index, repeats


@dataclass
class Catalog:
    """Validated metadata rows with the path of each image."""

    frame: pd.DataFrame
    image_dirs: list[str]
    warnings: list[str] = field(default_factory=list)
    # the warnings' row and file problems: kind, CSV lines, count (the rows are kept)
    problems: list[Problem] = field(default_factory=list)

    @property
    def class_counts(self) -> dict[str, int]:
        counts = self.frame["dx"].value_counts()
        return {c: int(counts.get(c, 0)) for c in CLASSES}

    def summary(self) -> dict[str, Any]:
        reported = len({ln for p in self.problems for ln in p.lines})
        return {
            "rows": len(self.frame),
            "rows_clean": len(self.frame) - reported,
            "rows_reported": reported,
            "problem_counts": problem_counts(self.problems),
            "lesions": int(self.frame["lesion_id"].nunique()),
            "class_counts": self.class_counts,
            "image_dirs": [display(d) for d in self.image_dirs],
            "warnings": self.warnings,
        }


def default_image_roots(metadata: str) -> list[str]:
    """With no --images, look beside the metadata file (the Dataverse/Kaggle layouts)."""
    if "://" in metadata:
        path, sep, query = metadata.partition("?")
        return [path.rsplit("/", 1)[0] + sep + query]
    return [str(Path(metadata).expanduser().resolve().parent)]


def build_catalog(metadata: str, images: Sequence[str] = (), check_files: bool = True) -> Catalog:
    """Read and validate the metadata and find every listed image; raise with all problems.

    Errors (a bad label, id or lesion, a listed image missing, a class absent) refuse the
    catalog: CatalogError lists every one, with ``counts`` per kind. Warnings keep the row and
    are reported with their CSV lines: implausible age/sex/localization (read as unknown) and,
    with ``check_files``, listed files that are empty, not images, truncated or huge (extract
    quarantines those). Rows in = rows clean + rows reported, in ``summary()``.
    """
    frame = read_metadata(metadata)
    errors = metadata_problems(frame, source=metadata)
    if errors and errors[0].kind in ("missing column", "no rows"):
        raise _catalog_error(metadata, frame, errors, [])
    frame, found = metadata_warnings(frame, source=metadata)
    roots = list(images) or default_image_roots(metadata)
    dirs = resolve_image_dirs(roots)
    warnings: list[str] = []
    if not dirs:
        errors.append(problem("no images", f"no images found in "
                              f"{', '.join(map(display, roots))}: expected JPEGs named "
                              "ISIC_xxxxxxx.jpg, or the folders HAM10000_images_part_1/_part_2; "
                              "pass the image folders with --images DIR.", count=0))
    sizes: dict[str, int] = {}
    index, repeats = index_images(dirs, sizes)
    if repeats:
        warnings.append(f"{repeats} image file(s) appear in more than one folder; the first "
                        "folder's copy is used.")
    ids = frame["image_id"].fillna("").astype(str)
    on_disk = ids.map(index)
    absent = on_disk.isna() & ids.str.match(IMAGE_ID)
    if absent.any() and dirs:
        errors.append(problem(
            "image file missing", f"{int(absent.sum())} listed image(s) missing in "
            f"{', '.join(map(display, dirs))}: {examples(ids[absent].tolist())}; add the files "
            "or pass the folder that holds them with --images.", frame.index[absent] + 2))
    unlisted = sorted(set(index) - set(ids))
    if unlisted:
        warnings.append(f"{len(unlisted)} image(s) on disk are not in the metadata and are "
                        f"ignored: {examples(unlisted)}.")
    frame["path"] = on_disk
    if check_files:
        found += image_file_warnings(frame, sizes)
    warnings = [p.message for p in found] + warnings
    if errors:
        raise _catalog_error(metadata, frame, errors, found)
    for w in warnings:
        logger.warning(w)
    return Catalog(frame=frame, image_dirs=dirs, warnings=warnings, problems=found)


def _catalog_error(metadata: str, frame: pd.DataFrame, errors: list[Problem],
                   warnings: list[Problem]) -> CatalogError:
    """The CatalogError of a refused catalog: every error, then the warnings, and the counts."""
    message = f"Invalid catalog {display(metadata)} ({len(errors)} problem(s)):"
    if len(errors) == 1 and errors[0].kind in ("missing column", "no rows"):
        message = f"Invalid catalog {display(metadata)}:"
    err = CatalogError(message, [p.message for p in errors])
    if warnings:
        err.args = (err.args[0] + f"\nand {len(warnings)} warning(s):\n"
                    + "\n".join(f"  - {p.message}" for p in warnings),)
    err.counts = problem_counts(errors + warnings)
    err.rows = len(frame)
    err.rows_reported = len({ln for p in errors + warnings for ln in p.lines})
    return err


def _allocate(sizes: np.ndarray, fracs: np.ndarray) -> np.ndarray:
    """Assign groups (lesions, given in random order) to splits by the largest image deficit.

    Big lesions go first, so the small ones fine-tune the counts at the end.
    """
    target = fracs * sizes.sum()
    have = np.zeros(len(fracs))
    out = np.empty(len(sizes), dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    # every split gets one group first, so that every class is in every split
    for k, i in enumerate(order):
        if k < len(fracs):
            j = k
        else:
            j = int(np.argmax((target - have) / np.maximum(target, 1e-9)))
        out[i] = j
        have[j] += sizes[i]
    return out


def split_frame(frame: pd.DataFrame, fracs: Sequence[float] = (0.70, 0.15, 0.15),
                seed: int = 0) -> pd.DataFrame:
    """Lesion-grouped, class-stratified split: adds a ``split`` column (train/val/test).

    No lesion is in two splits; per class, lesions are shuffled with ``seed`` and assigned so
    that each split holds its fraction of the class's images. Deterministic in ``seed``.
    """
    fracs_arr = np.asarray(fracs, dtype=float)
    rng = np.random.default_rng(seed)
    lesions = (frame.groupby("lesion_id", sort=True)
               .agg(dx=("dx", "first"), n=("image_id", "size")).reset_index())
    assignment: dict[str, str] = {}
    for cls in CLASSES:
        sub = lesions[lesions["dx"] == cls]
        if len(sub) == 0:
            continue
        if len(sub) < len(SPLITS):
            raise CatalogError(
                f"Class '{cls}' has only {len(sub)} lesion(s); a lesion-grouped split into "
                f"{', '.join(SPLITS)} needs at least {len(SPLITS)} per class. Add data or drop "
                "the class."
            )
        perm = rng.permutation(len(sub))
        ids = sub["lesion_id"].to_numpy()[perm]
        sizes = sub["n"].to_numpy()[perm]
        for lesion_id, j in zip(ids, _allocate(sizes, fracs_arr)):
            assignment[lesion_id] = SPLITS[j]
    out = frame.copy()
    out["split"] = out["lesion_id"].map(assignment)
    return out


def build_manifest(catalog: Catalog, fracs: Sequence[float], seed: int) -> pd.DataFrame:
    """The manifest frame: one row per image, with label index, split and path."""
    frame = split_frame(catalog.frame, fracs, seed)
    frame["label"] = frame["dx"].map({c: i for i, c in enumerate(CLASSES)}).astype("int64")
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce").astype("float64")
    for col in ("sex", "localization"):
        frame[col] = frame[col].fillna("unknown").astype(str)
    frame = frame.sort_values("image_id").reset_index(drop=True)
    return frame[list(MANIFEST_COLUMNS)]


def write_manifest(frame: pd.DataFrame, out: str, config: dict[str, Any],
                   fingerprint: dict[str, Any] | None = None) -> str:
    """Write ``OUT/manifest.parquet`` atomically, the config (and the split's fingerprint) in
    the file's metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({b"dermray": json.dumps(
        {"config": config, "fingerprint": fingerprint}).encode()})
    target = join_uri(out, "manifest.parquet")
    write_parquet(table, target)
    return target if "://" in str(out) else open_fs(target)[1]


def read_manifest(uri: str) -> pd.DataFrame:
    """Read a manifest written by ``dermray data split``, checking its columns."""
    fs, path = open_fs(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise CatalogError(f"Cannot read the manifest {uri}: {exc}. Create it with "
                           "`dermray data split --out OUT` and pass OUT/manifest.parquet.") from None
    frame = table.to_pandas()
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise CatalogError(f"The manifest {uri} lacks column(s) {', '.join(missing)}; recreate "
                           "it with `dermray data split`.")
    return frame


def manifest_meta(uri: str) -> dict[str, Any]:
    """What ``write_manifest`` stored beside the rows: ``config`` and ``fingerprint``."""
    fs, path = open_fs(uri)
    try:
        meta = pq.read_schema(path, filesystem=fs).metadata or {}
        value = json.loads(meta.get(b"dermray", b"{}"))
    except (pa.ArrowInvalid, ValueError) as exc:
        raise CatalogError(f"The manifest {display(uri)} is damaged ({str(exc)[:160]}): "
                           "write it again with `dermray data split --fresh` (or `dermray run "
                           "--fresh`).") from None
    if not isinstance(value, dict):
        raise CatalogError(f"The manifest {display(uri)} is damaged (its dermray record is not "
                           "a mapping): write it again with `dermray data split --fresh`.")
    return value


def manifest_config(uri: str) -> dict[str, Any]:
    return manifest_meta(uri).get("config", {})


def frame_hash(frame: pd.DataFrame) -> str:
    """A content hash of a table's rows (order and values), for fingerprints."""
    digest = pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy().tobytes()

    return "sha256:" + hashlib.sha256(digest).hexdigest()


def split_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Images per split and class, with each split's class shares."""
    counts = pd.crosstab(frame["split"], frame["dx"]).reindex(index=list(SPLITS),
                                                              columns=list(CLASSES), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts["lesions"] = frame.groupby("split")["lesion_id"].nunique().reindex(list(SPLITS))
    return counts
