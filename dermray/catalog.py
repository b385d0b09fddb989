"""HAM10000 metadata, image layouts on disk, validation and the lesion-grouped split.

Reads the official ``HAM10000_metadata.csv`` and finds the images in the layouts users have
(Dataverse: ``HAM10000_images_part_1/`` and ``_part_2/``; Kaggle: the same and lower-case copies;
or any folders given explicitly), on local disk or ``s3://``. Validation reports every problem at
once, naming the row, the field and the fix.
"""

from __future__ import annotations

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

from dermray.config import CLASSES, SPLITS
from dermray.errors import CatalogError
from dermray.storage import join as join_uri
from dermray.storage import open_fs, write_parquet

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "age", "sex", "localization")
IMAGE_ID = re.compile(r"^ISIC_\d{7}$")
IMAGE_SUFFIXES = (".jpg", ".jpeg")
LAYOUT_DIRS = re.compile(r"^ham10000_images(_part_[12])?$", re.IGNORECASE)
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "lesion_id", "dx", "label", "split", "path", "age", "sex", "localization",
)
MAX_EXAMPLES = 10


def read_metadata(uri: str) -> pd.DataFrame:
    """Read the metadata CSV with ids as strings; a clear error if it is missing or unreadable."""
    fs, path = open_fs(uri)
    try:
        with fs.open_input_stream(path) as stream:
            raw = stream.read()
    except (FileNotFoundError, OSError) as exc:
        raise CatalogError(
            f"Cannot read the metadata file {uri}: {exc}. Pass the path of HAM10000_metadata.csv "
            "with --metadata (or run `dermray data fetch --dest DIR` first)."
        ) from None
    try:
        frame = pd.read_csv(io.BytesIO(raw), dtype={"lesion_id": str, "image_id": str, "dx": str},
                            keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise CatalogError(f"The metadata file {uri} is not a readable CSV: {exc}") from None
    return frame


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_EXAMPLES])
    more = len(items) - MAX_EXAMPLES
    return shown + (f" (and {more} more)" if more > 0 else "")


def validate_metadata(frame: pd.DataFrame, source: str = "metadata") -> list[str]:
    """Every problem with the metadata rows, each naming the row (CSV line), field and fix."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        return [f"{source}: missing column(s) {', '.join(missing)}; the header must have "
                f"{', '.join(REQUIRED_COLUMNS)} (the official HAM10000_metadata.csv does)."]
    problems: list[str] = []
    line = frame.index.to_numpy() + 2  # header is line 1

    dx = frame["dx"].fillna("").astype(str)
    bad_dx = ~dx.isin(CLASSES)
    if bad_dx.any():
        rows = [f"line {ln} ({v!r})" for ln, v in zip(line[bad_dx], dx[bad_dx])]
        problems.append(f"{source}: field 'dx' outside the 7 classes {', '.join(CLASSES)} at "
                        f"{_examples(rows)}; fix the label or remove the row.")

    image_id = frame["image_id"].fillna("").astype(str)
    bad_id = ~image_id.str.match(IMAGE_ID)
    if bad_id.any():
        rows = [f"line {ln} ({v!r})" for ln, v in zip(line[bad_id], image_id[bad_id])]
        problems.append(f"{source}: field 'image_id' must be 'ISIC_' followed by 7 digits at "
                        f"{_examples(rows)}; paths and other names are not accepted.")
    dup = image_id.duplicated(keep="first") & ~bad_id
    if dup.any():
        rows = [f"line {ln} ({v})" for ln, v in zip(line[dup], image_id[dup])]
        problems.append(f"{source}: duplicate 'image_id' at {_examples(rows)}; each image must be "
                        "listed once: remove the repeated rows.")

    lesion = frame["lesion_id"].fillna("").astype(str).str.strip()
    empty = lesion == ""
    if empty.any():
        rows = [f"line {ln}" for ln in line[empty]]
        problems.append(f"{source}: empty 'lesion_id' at {_examples(rows)}; every image needs its "
                        "lesion id, or the split cannot keep a lesion out of two splits.")
    good = ~empty & ~bad_dx
    per_lesion = dx[good].groupby(lesion[good]).nunique()
    mixed = per_lesion[per_lesion > 1].index.tolist()
    if mixed:
        problems.append(f"{source}: lesion(s) with more than one 'dx': {_examples(mixed)}; a "
                        "lesion has one diagnosis: fix the rows of these lesions.")
    return problems


def resolve_image_dirs(roots: Iterable[str]) -> list[str]:
    """Expand each root into the folders that hold images.

    A root that holds JPEGs is used as is; its sub-folders named like the Dataverse or Kaggle
    layouts (``HAM10000_images_part_1``, ``ham10000_images_part_2``, ...) are added too.
    """
    dirs: list[str] = []
    for root in roots:
        fs, path = open_fs(root)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.Directory:
            raise CatalogError(f"Image folder {root} does not exist or is not a folder; pass an "
                               "existing folder with --images.")
        entries = fs.get_file_info(pafs.FileSelector(path))
        if any(e.type == pafs.FileType.File and e.base_name.lower().endswith(IMAGE_SUFFIXES)
               for e in entries):
            dirs.append(root)
        for entry in sorted(entries, key=lambda e: e.base_name):
            if entry.type == pafs.FileType.Directory and LAYOUT_DIRS.match(entry.base_name):
                dirs.append(join_uri(root, entry.base_name))
    return dirs


def index_images(dirs: Sequence[str]) -> tuple[dict[str, str], int]:
    """Map image_id -> file path/URI over the folders; the first folder wins for repeats.

    Returns the index and how many repeated files (Kaggle ships two copies) were skipped.
    """
    index: dict[str, str] = {}
    repeats = 0
    for root in dirs:
        fs, path = open_fs(root)
        for entry in fs.get_file_info(pafs.FileSelector(path)):
            name = entry.base_name
            if entry.type != pafs.FileType.File or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            stem = name.rsplit(".", 1)[0]
            if stem in index:
                repeats += 1
                continue
            index[stem] = join_uri(root, name) if "://" in root else str(Path(path) / name)
    return index, repeats


@dataclass
class Catalog:
    """Validated metadata rows with the path of each image."""

    frame: pd.DataFrame
    image_dirs: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def class_counts(self) -> dict[str, int]:
        counts = self.frame["dx"].value_counts()
        return {c: int(counts.get(c, 0)) for c in CLASSES}

    def summary(self) -> dict[str, Any]:
        return {
            "rows": len(self.frame),
            "lesions": int(self.frame["lesion_id"].nunique()),
            "class_counts": self.class_counts,
            "image_dirs": self.image_dirs,
            "warnings": self.warnings,
        }


def default_image_roots(metadata: str) -> list[str]:
    """With no --images, look beside the metadata file (the Dataverse/Kaggle layouts)."""
    if "://" in metadata:
        path, sep, query = metadata.partition("?")
        return [path.rsplit("/", 1)[0] + sep + query]
    return [str(Path(metadata).expanduser().resolve().parent)]


def build_catalog(metadata: str, images: Sequence[str] = ()) -> Catalog:
    """Read and validate the metadata and find every listed image; raise with all problems."""
    frame = read_metadata(metadata)
    problems = validate_metadata(frame, source=metadata)
    roots = list(images) or default_image_roots(metadata)
    dirs = resolve_image_dirs(roots)
    warnings: list[str] = []
    if not dirs:
        problems.append(f"no images found in {', '.join(roots)}: expected JPEGs named "
                        "ISIC_xxxxxxx.jpg, or the folders HAM10000_images_part_1/_part_2; "
                        "pass the image folders with --images DIR.")
    index, repeats = index_images(dirs)
    if repeats:
        warnings.append(f"{repeats} image file(s) appear in more than one folder; the first "
                        "folder's copy is used.")
    if problems and any("missing column" in p for p in problems):
        raise CatalogError(f"Invalid catalog {metadata}:", problems)
    ids = frame["image_id"].fillna("").astype(str)
    on_disk = ids.map(index)
    absent = on_disk.isna() & ids.str.match(IMAGE_ID)
    if absent.any() and dirs:
        problems.append(f"{int(absent.sum())} listed image(s) missing in {', '.join(dirs)}: "
                        f"{_examples(ids[absent].tolist())}; add the files or pass the folder "
                        "that holds them with --images.")
    unlisted = sorted(set(index) - set(ids))
    if unlisted:
        warnings.append(f"{len(unlisted)} image(s) on disk are not in the metadata and are "
                        f"ignored: {_examples(unlisted)}.")
    if problems:
        raise CatalogError(f"Invalid catalog {metadata} ({len(problems)} problem(s)):", problems)
    frame = frame.copy()
    frame["path"] = on_disk
    for w in warnings:
        logger.warning(w)
    return Catalog(frame=frame, image_dirs=dirs, warnings=warnings)


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
    meta = pq.read_schema(path, filesystem=fs).metadata or {}
    return json.loads(meta.get(b"dermray", b"{}"))


def manifest_config(uri: str) -> dict[str, Any]:
    return manifest_meta(uri).get("config", {})


def frame_hash(frame: pd.DataFrame) -> str:
    """A content hash of a table's rows (order and values), for fingerprints."""
    digest = pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy().tobytes()
    import hashlib

    return "sha256:" + hashlib.sha256(digest).hexdigest()


def split_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Images per split and class, with each split's class shares."""
    counts = pd.crosstab(frame["split"], frame["dx"]).reindex(index=list(SPLITS),
                                                              columns=list(CLASSES), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts["lesions"] = frame.groupby("split")["lesion_id"].nunique().reindex(list(SPLITS))
    return counts
