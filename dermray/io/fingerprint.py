"""A result is what it says it is: each stage's output folder carries a fingerprint of what made
it (the stage's settings, the content of its inputs, the weights, the library versions that
change numbers), and a rerun into the same folder with anything else is refused, naming what
changed and the two ways out, instead of mixing old and new work.

``claim(folder, stage, current, fresh)`` writes the fingerprint on first use, passes when it
matches, and with ``fresh`` deletes the folder's old output so the stage starts over.

Which settings a fingerprint holds is declared once, where each setting is declared: a config
field (``dermray.config.setting``) or a head family's own setting
(``dermray.models.heads.registry.Setting``) says its ``effect``, one of ``EFFECTS``; a stage's
fingerprint holds the values of its ``OUTPUT`` settings. No list to extend: a setting without a
declaration fails a test (tests/unit/test_fingerprint_declared.py) and the stage that reads it.
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
from dermray.io.outputs import read_json_output

logger = logging.getLogger(__name__)

FILE = "_fingerprint.json"  # "_": every reader of part files skips it

# what a setting does to its stage's output (see the module docstring)
OUTPUT = "output"  # changes the numbers: its value is in the stage's fingerprint
# names what the stage reads or which outputs it makes (a manifest, a weights file, the images,
# the backbones): the stage fingerprints what it names, by content (a hash, a sha256, each
# backbone's own folder), so the name itself is not in the fingerprint
INPUT = "input"
NEUTRAL = "neutral"  # where or how fast the stage runs (paths, resources, logging), never what
EFFECTS = (OUTPUT, INPUT, NEUTRAL)
EFFECT = "effect"  # the key of the declaration in a dataclass field's metadata


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

    No fingerprint yet: write it (a folder that holds files but no fingerprint is not a dermray
    output: refused, and never deleted, even with ``fresh``). The same key: a rerun, which
    resumes. Another key: with ``fresh``, delete the folder and start over; otherwise raise,
    naming what changed.
    """
    storage.inside(folder, root)
    changed = check_claim(folder, stage, current, fresh, flag, root=root)
    if changed is None:
        return
    if changed:
        storage.remove(folder, root, f"{flag}: the {stage} settings or inputs changed: "
                       + "; ".join(changed))
    storage.write_text(storage.join(folder, FILE), json.dumps(current, indent=2, sort_keys=True))


def check_claim(folder: str, stage: str, current: dict[str, Any], fresh: bool = False,
                flag: str = "--fresh", *, root: str) -> list[str] | None:
    """What ``claim`` would do, without doing it: None (the same key: nothing to do), [] (no
    fingerprint yet: it would be written), the differences (``fresh``: the folder would start
    over); raises where ``claim`` refuses. Nothing is written or deleted, so a run can check
    every stage's claim before the first of them starts Ray."""
    storage.inside(folder, root)
    path = storage.join(folder, FILE)
    if storage.is_file(path):
        try:
            old = read_fingerprint(path, flag)
        except DermrayError:
            if not fresh:
                raise
            return [f"its {FILE} is damaged"]  # with fresh: started over, as for a change
        if old.get("key") == current["key"]:
            return None
        changed = differences(old, current)
        if not fresh:
            raise StaleOutputError(
                f"{storage.display(folder)} holds {stage} output made with other settings or "
                f"inputs ({'; '.join(changed) or 'the fingerprint differs'}). Reusing it would mix "
                f"two results. Write to a new --out, or pass {flag} to redo the {stage} stage "
                "there (its old output is deleted).")
        return changed or ["the fingerprint differs"]
    if storage.list_files(folder):
        raise StaleOutputError(
            f"{storage.display(folder)} holds files but no {FILE}: it is not the output of a "
            f"dermray {stage} stage, so it is neither reused nor deleted. Write to a new --out, "
            "or move those files away.")
    return []


def read_fingerprint(path: str, flag: str = "--fresh") -> dict[str, Any]:
    """A stage's fingerprint file; a damaged one (not JSON, not a mapping) is a message naming
    it and the way out."""
    return read_json_output(path, f"pass {flag} to redo the stage that wrote it, or write to "
                            "a new --out", expect=dict)
