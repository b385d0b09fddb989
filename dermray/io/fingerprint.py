"""A result is what it says it is: each stage's output folder carries a fingerprint of what made
it (the stage's settings, the content of its inputs, the weights, the library versions that
change numbers), and a rerun into the same folder with anything else is refused, naming what
changed and the two ways out, instead of mixing old and new work.

``claim(folder, stage, settings, inputs, fresh)`` writes the fingerprint on first use, passes
when it matches, and with ``fresh`` deletes the folder's old output so the stage starts over.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from dermray.errors import DermrayError
from dermray.io import storage

logger = logging.getLogger(__name__)

FILE = "_fingerprint.json"  # "_": every reader of part files skips it


class StaleOutputError(DermrayError):
    """An output folder holds work made with other settings or inputs."""


def versions(packages: Iterable[str]) -> dict[str, str]:
    """Installed versions of the packages that change a stage's numbers."""

    found = {}
    for pkg in packages:
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return found


def content_hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make(stage: str, settings: Mapping[str, Any], inputs: Mapping[str, Any],
         packages: Iterable[str] = ()) -> dict[str, Any]:
    """A fingerprint: what made an output, and a key over all of it."""
    body = {"stage": stage, "settings": dict(settings), "inputs": dict(inputs),
            "versions": versions(packages)}
    body["key"] = content_hash(json.dumps(body, sort_keys=True, default=str).encode())
    return body


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'section.key: old -> new' for every value that differs."""
    out = []
    for part in ("settings", "inputs", "versions"):
        a, b = old.get(part, {}), new.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{part}.{key}: {a.get(key, '(none)')!r} -> {b.get(key, '(none)')!r}")
    return out


def claim(folder: str, stage: str, current: dict[str, Any], fresh: bool = False,
          flag: str = "--fresh", *, root: str) -> None:
    """Make ``folder`` the output of ``current``, or refuse.

    ``folder`` must lie inside ``root`` (OUT, or the configured storage root), checked before
    anything is read, written or deleted.

    No fingerprint yet (a new folder, or one from before fingerprints: then only if it is
    empty): write it. The same key: a rerun, which resumes. Another key: with ``fresh``, delete
    the folder and start over; otherwise raise, naming what changed.
    """
    storage.inside(folder, root)
    path = storage.join(folder, FILE)
    if storage.is_file(path):
        old = json.loads(storage.read_text(path))
        if old.get("key") == current["key"]:
            return
        changed = differences(old, current)
        if not fresh:
            raise StaleOutputError(
                f"{storage.display(folder)} holds {stage} output made with other settings or "
                f"inputs ({'; '.join(changed) or 'the fingerprint differs'}). Reusing it would mix "
                f"two results. Write to a new --out, or pass {flag} to redo the {stage} stage "
                "there (its old output is deleted).")
        storage.remove(folder, root, f"{flag}: the {stage} settings or inputs changed: "
                       + "; ".join(changed))
    elif storage.list_files(folder) and not fresh:
        raise StaleOutputError(
            f"{storage.display(folder)} holds {stage} output without a fingerprint (made by an "
            f"older dermray), so it cannot be checked against these settings. Write to a new "
            f"--out, or pass {flag} to redo the {stage} stage there.")
    elif fresh:
        storage.remove(folder, root, f"{flag}: redo the {stage} stage")
    storage.write_text(path, json.dumps(current, indent=2, sort_keys=True))
