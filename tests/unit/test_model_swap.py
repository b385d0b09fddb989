"""OUT/model is replaced atomically: a reader during 200 exports never finds no bundle."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

from dermray import storage


def test_readers_never_see_a_missing_model(tmp_path: Path):
    def build(i: int) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=".model.", dir=tmp_path))
        (folder / "bundle.json").write_text(json.dumps({"version": i}))
        return folder

    target = tmp_path / "model"
    storage.replace_dir(build(0), target, "bundle.json", link=True)
    seen: list[int] = []
    misses = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.append(json.loads((target / "bundle.json").read_text())["version"])
            except FileNotFoundError as exc:
                misses.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(1, 200):
        storage.replace_dir(build(i), target, "bundle.json", link=True)
        # exports are minutes apart; a file open must not span two of them (the previous
        # version is kept for one swap), which back-to-back swaps on a loaded machine can do
        time.sleep(0.003)
    done.set()
    thread.join()
    assert misses == [] and seen and seen == sorted(seen)  # never none, never backwards
    assert json.loads((target / "bundle.json").read_text())["version"] == 199
    # beside the link: the current version and the previous one (for readers mid-swap)
    kept = [p for p in tmp_path.iterdir() if p.name != "model"]
    assert len(kept) == 2 and target.resolve() in kept
    storage.delete(target)
    assert list(tmp_path.iterdir()) == []


def test_a_real_folder_from_an_older_version_is_replaced(tmp_path: Path):
    old = tmp_path / "model"
    old.mkdir()
    (old / "bundle.json").write_text("{}")
    new = tmp_path / ".model.new"
    new.mkdir()
    (new / "bundle.json").write_text('{"v": 2}')
    storage.replace_dir(new, old, "bundle.json", link=True)
    assert old.is_symlink() and json.loads((old / "bundle.json").read_text()) == {"v": 2}
    assert len(list(tmp_path.iterdir())) == 3  # the link, the new version, the old folder
