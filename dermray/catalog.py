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
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from dermray.config import CLASSES, SPLITS
from dermray.errors import CatalogError, StorageError
from dermray.storage import display, is_remote, open_fs, redact, storage_errors, write_parquet
from dermray.storage import join as join_uri

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "age", "sex", "localization")
IMAGE_ID = re.compile(r"^ISIC_\d{7}$")
IMAGE_SUFFIXES = (".jpg", ".jpeg")
LAYOUT_DIRS = re.compile(r"^ham10000_images(_part_[12])?$", re.IGNORECASE)
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "lesion_id", "dx", "label", "split", "path", "age", "sex", "localization",
)
MAX_EXAMPLES = 10
# the values HAM10000_metadata.csv uses; others are reported, and read as unknown
SEXES: tuple[str, ...] = ("male", "female", "unknown")
LOCALIZATIONS: tuple[str, ...] = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
    "lower extremity", "neck", "scalp", "trunk", "unknown", "upper extremity",
)
AGE_RANGE = (0.0, 120.0)
# an image over this many pixels (read from its header) takes GBs to decode: reported
MAX_PIXELS = 40_000_000
HEADER_BYTES = 64 * 1024  # enough for a JPEG's or PNG's header (EXIF included)


@dataclass(frozen=True)
class Problem:
    """One kind of problem found in a catalog: a short ``kind`` (a key of the counts), the
    message (rows, field, fix), the CSV lines it concerns and how many rows, files or classes."""

    kind: str
    message: str
    lines: tuple[int, ...] = ()
    count: int = 0

    def __str__(self) -> str:
        return self.message


def _problem(kind: str, message: str, lines: Iterable[int] = (), count: int | None = None) -> Problem:
    lines = tuple(int(v) for v in lines)
    return Problem(kind, message, lines, len(lines) if count is None else count)


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


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_EXAMPLES])
    more = len(items) - MAX_EXAMPLES
    return shown + (f" (and {more} more)" if more > 0 else "")


def validate_metadata(frame: pd.DataFrame, source: str = "metadata") -> list[str]:
    """Every error in the metadata rows, each naming the row (CSV line), field and fix."""
    return [p.message for p in metadata_problems(frame, source)]


def metadata_problems(frame: pd.DataFrame, source: str = "metadata") -> list[Problem]:
    """The errors of the metadata rows (any one refuses the catalog), one Problem per kind."""
    source = display(source)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        return [_problem("missing column", f"{source}: missing column(s) {', '.join(missing)}; "
                         f"the header must have {', '.join(REQUIRED_COLUMNS)} (the official "
                         "HAM10000_metadata.csv does).", count=len(missing))]
    if frame.empty:
        return [_problem("no rows", f"{source}: a header but no rows; list one image per row "
                         "(lesion_id, image_id, dx, ...), as HAM10000_metadata.csv does.", count=0)]
    problems: list[Problem] = []
    line = frame.index.to_numpy() + 2  # header is line 1

    dx = frame["dx"].fillna("").astype(str)
    bad_dx = ~dx.isin(CLASSES)
    if bad_dx.any():
        rows = [f"line {ln} ({v!r})" for ln, v in zip(line[bad_dx], dx[bad_dx])]
        problems.append(_problem(
            "dx not a class", f"{source}: field 'dx' outside the 7 classes {', '.join(CLASSES)} "
            f"at {_examples(rows)}; fix the label or remove the row.", line[bad_dx]))

    image_id = frame["image_id"].fillna("").astype(str)
    bad_id = ~image_id.str.match(IMAGE_ID)
    if bad_id.any():
        rows = [f"line {ln} ({v!r})" for ln, v in zip(line[bad_id], image_id[bad_id])]
        problems.append(_problem(
            "bad image_id", f"{source}: field 'image_id' must be 'ISIC_' followed by 7 digits at "
            f"{_examples(rows)}; paths and other names are not accepted.", line[bad_id]))
    dup = image_id.duplicated(keep="first") & ~bad_id
    if dup.any():
        rows = [f"line {ln} ({v})" for ln, v in zip(line[dup], image_id[dup])]
        problems.append(_problem(
            "duplicate image_id", f"{source}: duplicate 'image_id' at {_examples(rows)}; each "
            "image must be listed once: remove the repeated rows.", line[dup]))

    lesion = frame["lesion_id"].fillna("").astype(str).str.strip()
    empty = lesion == ""
    if empty.any():
        rows = [f"line {ln}" for ln in line[empty]]
        problems.append(_problem(
            "empty lesion_id", f"{source}: empty 'lesion_id' at {_examples(rows)}; every image "
            "needs its lesion id, or the split cannot keep a lesion out of two splits.",
            line[empty]))
    good = ~empty & ~bad_dx
    per_lesion = dx[good].groupby(lesion[good]).nunique()
    mixed = per_lesion[per_lesion > 1].index.tolist()
    if mixed:
        in_mixed = good & lesion.isin(mixed)
        problems.append(_problem(
            "lesion with several dx", f"{source}: lesion(s) with more than one 'dx': "
            f"{_examples(mixed)}; a lesion has one diagnosis: fix the rows of these lesions.",
            line[in_mixed]))
    problems += class_problems(dx[good & ~lesion.isin(mixed)], lesion[good & ~lesion.isin(mixed)],
                               source)
    return problems


def class_problems(dx: pd.Series, lesion: pd.Series, source: str) -> list[Problem]:
    """Every class must be in the catalog, with enough lesions for the 3-way split: found here,
    at validate and split time, not when a head is trained."""
    per_class = lesion.groupby(dx).nunique().reindex(list(CLASSES), fill_value=0)
    problems = []
    absent = [c for c in CLASSES if per_class[c] == 0]
    if absent:
        problems.append(_problem(
            "class absent", f"{source}: no row of class(es) {', '.join(absent)}; dermray trains "
            f"on all {len(CLASSES)} HAM10000 classes ({', '.join(CLASSES)}): add images of them "
            "(the official metadata has every class).", count=len(absent)))
    few = [f"{c} ({per_class[c]})" for c in CLASSES if 0 < per_class[c] < len(SPLITS)]
    if few:
        problems.append(_problem(
            "class with too few lesions", f"{source}: class(es) with fewer than {len(SPLITS)} "
            f"lesions: {', '.join(few)}; a lesion-grouped split into {', '.join(SPLITS)} needs "
            "one lesion per split: add lesions of these classes.", count=len(few)))
    return problems


def metadata_warnings(frame: pd.DataFrame, source: str = "metadata"
                      ) -> tuple[pd.DataFrame, list[Problem]]:
    """Implausible age, sex and localization values: reported (with their CSV lines) and read as
    unknown, the row kept. They are warnings, not errors: the image and its diagnosis, which the
    heads learn from, are fine, and these fields feed only the optional ``+meta`` features, which
    already treat a missing value as unknown. Returns the frame with those values cleared."""
    source = display(source)
    line = frame.index.to_numpy() + 2
    frame = frame.copy()
    problems: list[Problem] = []
    given = frame["age"].notna() & (frame["age"].astype(str).str.strip() != "")
    age = pd.to_numeric(frame["age"], errors="coerce")
    bad = given & (age.isna() | (age < AGE_RANGE[0]) | (age > AGE_RANGE[1]))
    if bad.any():
        rows = [f"line {ln} ({v!r})" for ln, v in zip(line[bad], frame["age"][bad])]
        problems.append(_problem(
            "implausible age", f"{source}: field 'age' not a number in [{AGE_RANGE[0]:g}, "
            f"{AGE_RANGE[1]:g}] at {_examples(rows)}; read as unknown: fix the age or leave it "
            "empty.", line[bad]))
    frame["age"] = age.where(~bad)
    for col, allowed in (("sex", SEXES), ("localization", LOCALIZATIONS)):
        raw = frame[col]
        value = raw.astype(str).str.strip().str.lower()
        bad = raw.notna() & ~value.isin(allowed)
        if bad.any():
            rows = [f"line {ln} ({v!r})" for ln, v in zip(line[bad], raw[bad])]
            problems.append(_problem(
                f"{col} not in the HAM10000 list", f"{source}: field '{col}' not one of "
                f"{', '.join(allowed)} at {_examples(rows)}; read as 'unknown': fix the value.",
                line[bad]))
        frame[col] = raw.where(raw.isna(), value).where(~bad, "unknown")
    return frame, problems


# SOF markers (baseline, progressive, lossless...; not DHT C4, JPG C8, DAC CC) hold the size
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def header_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header or a PNG's IHDR, without PIL (ten times
    faster, for every file of a catalog); None for other formats or an odd header."""
    if head.startswith(PNG_MAGIC) and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not head.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 9 < len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            return int.from_bytes(head[i + 7:i + 9], "big"), int.from_bytes(head[i + 5:i + 7], "big")
        i += 2 + int.from_bytes(head[i + 2:i + 4], "big")
    return None


def _read_ends(path: str) -> tuple[int, bytes, bytes]:
    """A file's size, its first HEADER_BYTES and its last 2 bytes (local path or URI)."""
    if not is_remote(path):
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(HEADER_BYTES)
            if size > HEADER_BYTES:
                fh.seek(size - 2)
                return size, head, fh.read(2)
            return size, head, head[-2:]
    fs, inner = open_fs(path)
    with fs.open_input_file(inner) as fh:
        size = fh.size()
        head = fh.read(min(size, HEADER_BYTES))
        return size, head, (head[-2:] if size <= HEADER_BYTES else fh.read_at(2, size - 2))


def check_image_file(path: str, size: int | None = None) -> tuple[str, str] | None:
    """(kind, detail) when an image file is empty, not an image, truncated or too large, from
    its header and its last bytes; None when it looks like an image. No full decode: extract
    decodes it and quarantines what fails, with the reason."""
    if size == 0:
        return "zero-byte image", "0 bytes"
    try:
        size, head, tail = _read_ends(path)
    except OSError as exc:
        return "unreadable image", redact(exc)[:160]
    if size == 0:
        return "zero-byte image", "0 bytes"
    dims = header_size(head)
    is_jpeg = head.startswith(b"\xff\xd8\xff")
    if dims is None:
        try:
            with Image.open(io.BytesIO(head)) as img:
                dims, is_jpeg = img.size, img.format == "JPEG"
        except Image.DecompressionBombError as exc:
            return "image too large", str(exc)[:160]
        except (OSError, SyntaxError, ValueError):
            if is_jpeg and size > HEADER_BYTES:
                return None  # a JPEG whose header runs past what was read: left to extract
            return "not an image", f"{size} bytes starting {head[:8]!r}"
    if dims[0] * dims[1] > MAX_PIXELS:
        return "image too large", f"{dims[0]}x{dims[1]} pixels, over {MAX_PIXELS}"
    if is_jpeg and tail != b"\xff\xd9":
        return "truncated image", f"no JPEG end marker ({size} bytes)"
    return None


def image_file_warnings(frame: pd.DataFrame, sizes: dict[str, int], workers: int = 16
                        ) -> list[Problem]:
    """Zero-byte, non-image, truncated and over-large files among the listed images (``path``
    column), one Problem per kind, naming a few files. Threads: on S3 each file is a request."""
    paths = frame["path"].dropna()
    if paths.empty:
        return []

    def check(path: str) -> tuple[str, str] | None:
        return check_image_file(path, sizes.get(path))

    if any(is_remote(p) for p in paths):
        with ThreadPoolExecutor(max_workers=workers) as pool:
            found = list(pool.map(check, paths.tolist()))
    else:  # local reads are fast; threads would only contend for the GIL
        found = [check(p) for p in paths]
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for idx, path, result in zip(paths.index, paths, found):
        if result:
            by_kind.setdefault(result[0], []).append((int(idx) + 2, f"{display(path)} ({result[1]})"))
    fixes = {"zero-byte image": "an empty file", "not an image": "not an image file",
             "truncated image": "cut short", "image too large": "huge when decoded",
             "unreadable image": "unreadable"}
    return [_problem(kind, f"{len(items)} listed image file(s) {fixes.get(kind, kind)}: "
                     f"{_examples([t for _, t in items])}; `dermray extract` quarantines them "
                     "(with the reason): replace or remove them to train on them.",
                     [ln for ln, _ in items]) for kind, items in by_kind.items()]


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


def problem_counts(problems: Iterable[Problem]) -> dict[str, int]:
    """kind -> rows (or files, classes) it concerns."""
    counts: dict[str, int] = {}
    for p in problems:
        counts[p.kind] = counts.get(p.kind, 0) + p.count
    return counts


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
        errors.append(_problem("no images", f"no images found in "
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
        errors.append(_problem(
            "image file missing", f"{int(absent.sum())} listed image(s) missing in "
            f"{', '.join(map(display, dirs))}: {_examples(ids[absent].tolist())}; add the files "
            "or pass the folder that holds them with --images.", frame.index[absent] + 2))
    unlisted = sorted(set(index) - set(ids))
    if unlisted:
        warnings.append(f"{len(unlisted)} image(s) on disk are not in the metadata and are "
                        f"ignored: {_examples(unlisted)}.")
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
