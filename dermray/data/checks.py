"""The catalog's checks: every problem of the metadata rows and the listed image files, as
``Problem``s (a kind, a message naming the rows, fields and fix, the CSV lines, a count).

Errors refuse a catalog; warnings keep the row and are reported (see ``catalog.build_catalog``).
Pure functions over a DataFrame, but for the image files, which are read (their header and last
bytes only).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pandas as pd
from PIL import Image

from dermray.domain import CLASSES, SPLITS
from dermray.io.storage import display, is_remote, open_fs, redact

REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "age", "sex", "localization")
IMAGE_ID = re.compile(r"^ISIC_\d{7}$")
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


def problem(kind: str, message: str, lines: Iterable[int] = (), count: int | None = None) -> Problem:
    lines = tuple(int(v) for v in lines)
    return Problem(kind, message, lines, len(lines) if count is None else count)


def examples(items: Sequence[str]) -> str:
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
        return [problem("missing column", f"{source}: missing column(s) {', '.join(missing)}; "
                        f"the header must have {', '.join(REQUIRED_COLUMNS)} (the official "
                        "HAM10000_metadata.csv does).", count=len(missing))]
    if frame.empty:
        return [problem("no rows", f"{source}: a header but no rows; list one image per row "
                        "(lesion_id, image_id, dx, ...), as HAM10000_metadata.csv does.", count=0)]
    problems: list[Problem] = []
    line = frame.index.to_numpy() + 2  # header is line 1

    dx = frame["dx"].fillna("").astype(str)
    bad_dx = ~dx.isin(CLASSES)
    if bad_dx.any():
        rows = [f"line {ln} ({v!r})" for ln, v in zip(line[bad_dx], dx[bad_dx])]
        problems.append(problem(
            "dx not a class", f"{source}: field 'dx' outside the 7 classes {', '.join(CLASSES)} "
            f"at {examples(rows)}; fix the label or remove the row.", line[bad_dx]))

    image_id = frame["image_id"].fillna("").astype(str)
    bad_id = ~image_id.str.match(IMAGE_ID)
    if bad_id.any():
        rows = [f"line {ln} ({v!r})" for ln, v in zip(line[bad_id], image_id[bad_id])]
        problems.append(problem(
            "bad image_id", f"{source}: field 'image_id' must be 'ISIC_' followed by 7 digits at "
            f"{examples(rows)}; paths and other names are not accepted.", line[bad_id]))
    dup = image_id.duplicated(keep="first") & ~bad_id
    if dup.any():
        rows = [f"line {ln} ({v})" for ln, v in zip(line[dup], image_id[dup])]
        problems.append(problem(
            "duplicate image_id", f"{source}: duplicate 'image_id' at {examples(rows)}; each "
            "image must be listed once: remove the repeated rows.", line[dup]))

    lesion = frame["lesion_id"].fillna("").astype(str).str.strip()
    empty = lesion == ""
    if empty.any():
        rows = [f"line {ln}" for ln in line[empty]]
        problems.append(problem(
            "empty lesion_id", f"{source}: empty 'lesion_id' at {examples(rows)}; every image "
            "needs its lesion id, or the split cannot keep a lesion out of two splits.",
            line[empty]))
    good = ~empty & ~bad_dx
    per_lesion = dx[good].groupby(lesion[good]).nunique()
    mixed = per_lesion[per_lesion > 1].index.tolist()
    if mixed:
        in_mixed = good & lesion.isin(mixed)
        problems.append(problem(
            "lesion with several dx", f"{source}: lesion(s) with more than one 'dx': "
            f"{examples(mixed)}; a lesion has one diagnosis: fix the rows of these lesions.",
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
        problems.append(problem(
            "class absent", f"{source}: no row of class(es) {', '.join(absent)}; dermray trains "
            f"on all {len(CLASSES)} HAM10000 classes ({', '.join(CLASSES)}): add images of them "
            "(the official metadata has every class).", count=len(absent)))
    few = [f"{c} ({per_class[c]})" for c in CLASSES if 0 < per_class[c] < len(SPLITS)]
    if few:
        problems.append(problem(
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
        problems.append(problem(
            "implausible age", f"{source}: field 'age' not a number in [{AGE_RANGE[0]:g}, "
            f"{AGE_RANGE[1]:g}] at {examples(rows)}; read as unknown: fix the age or leave it "
            "empty.", line[bad]))
    frame["age"] = age.where(~bad)
    for col, allowed in (("sex", SEXES), ("localization", LOCALIZATIONS)):
        raw = frame[col]
        value = raw.astype(str).str.strip().str.lower()
        bad = raw.notna() & ~value.isin(allowed)
        if bad.any():
            rows = [f"line {ln} ({v!r})" for ln, v in zip(line[bad], raw[bad])]
            problems.append(problem(
                f"{col} not in the HAM10000 list", f"{source}: field '{col}' not one of "
                f"{', '.join(allowed)} at {examples(rows)}; read as 'unknown': fix the value.",
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


def too_many_pixels(dims: tuple[int, int], limit: int = MAX_PIXELS) -> str | None:
    """The detail of an image over the pixel limit ('WxH pixels, over LIMIT'), or None: the
    one wording of validate's report and extract's quarantine."""
    if dims[0] * dims[1] > limit:
        return f"{dims[0]}x{dims[1]} pixels, over {limit}"
    return None


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
    if too_many_pixels(dims):
        return "image too large", too_many_pixels(dims)
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
    return [problem(kind, f"{len(items)} listed image file(s) {fixes.get(kind, kind)}: "
                     f"{examples([t for _, t in items])}; `dermray extract` quarantines them "
                     "(with the reason): replace or remove them to train on them.",
                     [ln for ln, _ in items]) for kind, items in by_kind.items()]

def problem_counts(problems: Iterable[Problem]) -> dict[str, int]:
    """kind -> rows (or files, classes) it concerns."""
    counts: dict[str, int] = {}
    for p in problems:
        counts[p.kind] = counts.get(p.kind, 0) + p.count
    return counts
