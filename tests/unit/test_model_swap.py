"""OUT/model is replaced atomically: a reader during 200 exports never finds no bundle."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dermray.errors import StorageError
from dermray.io import storage


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
    storage.remove(target, tmp_path, "test")
    assert list(tmp_path.iterdir()) == []


def test_a_real_folder_in_the_models_place_is_refused_and_kept(tmp_path: Path):
    """OUT/model is always a link dermray made: a real folder there is someone else's."""
    old = tmp_path / "model"
    old.mkdir()
    (old / "bundle.json").write_text("{}")
    new = tmp_path / ".model.new"
    new.mkdir()
    (new / "bundle.json").write_text('{"v": 2}')
    with pytest.raises(StorageError):
        storage.replace_dir(new, old, "bundle.json", link=True)
    assert not old.is_symlink() and (old / "bundle.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.new", "model"]


def test_the_lock_holder_sweeps_what_killed_writers_left(tmp_path: Path):
    """A run killed mid-write leaves a temp file, a half-built model or an unswapped link; the
    next run that takes OUT's lock deletes exactly those, and nothing of the results."""
    from dermray.io.lock import hold

    out = tmp_path / "out"
    storage.write_text(out / "embeddings" / "part.json", "{}")
    storage.replace_dir(Path(tempfile.mkdtemp(prefix=".model.build.", dir=tmp_path)),
                        out / "model", "bundle.json", link=True)
    left = [out / "embeddings" / ".part-1.parquet.4242.0123abcd.tmp",
            out / ".manifest.parquet.77.deadbeef.tmp"]
    for path in left:
        path.write_bytes(b"half")
    (out / ".model.build.k2_x9").mkdir()
    (out / ".model.link.0123abcd").symlink_to("nowhere")
    keep = sorted(p for p in out.rglob("*") if p not in left
                  and not p.name.startswith((".model.build", ".model.link")))
    with hold(str(out), "test"):
        pass
    assert sorted(out.rglob("*")) == keep and (out / "model").is_symlink()
