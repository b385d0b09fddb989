"""The errors dermray raises for bad input; the CLI prints them without a traceback."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class DermrayError(Exception):
    """Base class: a problem with the user's input or environment, with what would fix it."""


class ConfigError(DermrayError):
    """A config key or value is wrong."""


class CatalogError(DermrayError):
    """The metadata or the image folders are invalid; ``problems`` lists every one found."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        # filled by catalog.build_catalog: problem kind -> rows (files, classes) it concerns,
        # the metadata's rows, and how many of them a problem names
        self.counts: dict[str, int] = {}
        self.rows = 0
        self.rows_reported = 0
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class StorageError(DermrayError, OSError):
    """A remote store (S3) that cannot be reached or answers with an error; still an OSError,
    so that code handling file errors handles it too."""


class FetchError(DermrayError):
    """The dataset download failed (offline, size or checksum mismatch)."""


def lookup(registry: Mapping[str, T], name: str, kind: str, kinds: str,
           error: type[Exception], known: Iterable[str] | None = None) -> T:
    """``registry[name]``, or ``error`` saying what is known instead (timm-style: the message
    lists the valid names). ``known``: the names in the order to list them (default: the
    registry's order)."""
    try:
        return registry[name]
    except KeyError:
        names = ", ".join(registry if known is None else known)
        raise error(f"Unknown {kind} {name!r}. Known {kinds}: {names}.") from None


def check(ok: bool, section: str, key: str, value: Any, must: str) -> None:
    """Raise ConfigError ("section.key must be ... Got value instead.") unless ``ok``."""
    if not ok:
        raise ConfigError(f"{section}.{key} must be {must}. Got {value!r} instead.")


def check_unique(section: str, key: str, values: tuple[Any, ...]) -> None:
    """Raise ConfigError naming the repeated items of a list key."""
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    check(not repeated, section, key, list(values),
          f"a list without repeats ({', '.join(map(str, repeated))} given more than once)")


class DamagedOutputError(DermrayError):
    """A file that a dermray stage wrote into OUT (a record, a table, a fingerprint) that
    cannot be read back as what it must be."""
