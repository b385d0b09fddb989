"""The errors dermray raises for bad input; the CLI prints them without a traceback."""

from __future__ import annotations


class DermrayError(Exception):
    """Base class: a problem with the user's input or environment, with what would fix it."""


class ConfigError(DermrayError):
    """A config key or value is wrong."""


class CatalogError(DermrayError):
    """The metadata or the image folders are invalid; ``problems`` lists every one found."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class FetchError(DermrayError):
    """The dataset download failed (offline, size or checksum mismatch)."""
