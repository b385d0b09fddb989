"""Reading back what a stage wrote into OUT (metrics.json, trials.csv, extract_run.json,
embedding_map.json, fingerprints), in one place: a damaged file (cut short by a full disk,
edited by hand, another program's) is one message naming the file and the way out, never a
traceback from the parser or from the first key that is missing."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pandas as pd

from dermray.errors import DamagedOutputError
from dermray.io import storage

T = TypeVar("T")


def damaged(uri: str, why: str, fix: str) -> DamagedOutputError:
    return DamagedOutputError(f"{storage.display(uri)} is damaged ({why}): {fix}.")


def read_json_output(uri: str, fix: str, expect: type | None = None) -> Any:
    """The JSON content of a file in OUT; ``expect``: the type its top level must have.
    ``fix``: what to do about a damaged one (re-run the stage that wrote it, --fresh)."""
    try:
        value = json.loads(storage.read_bytes(uri).decode("utf-8"))
    except UnicodeDecodeError:
        raise damaged(uri, "not UTF-8 text", fix) from None
    except ValueError as exc:
        raise damaged(uri, f"not JSON: {exc}", fix) from None
    if expect is not None and not isinstance(value, expect):
        raise damaged(uri, f"a JSON {type(value).__name__}, not a {expect.__name__}", fix)
    return value


def read_csv_output(uri: str, fix: str, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV table in OUT, with at least ``columns``."""
    try:
        frame = pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise damaged(uri, f"not a readable CSV table: {str(exc).splitlines()[0][:160]}",
                      fix) from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise damaged(uri, f"no column(s) {', '.join(missing)}", fix)
    return frame


@contextmanager
def reading(uri: str, fix: str) -> Iterator[None]:
    """Around code that takes a record apart: a key, type or value that is not what the stage
    writes (KeyError, TypeError, ValueError, AttributeError, IndexError) is the file's damage."""
    try:
        yield
    except DamagedOutputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise damaged(uri, what[:200], fix) from None


def parsed(uri: str, fix: str, parse: Callable[[], T]) -> T:
    """``parse()`` under ``reading``."""
    with reading(uri, fix):
        return parse()
