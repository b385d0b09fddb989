"""Nothing outside OUT is touched (issue 22, class 1): every deletion goes through
``storage.remove``, which resolves the target and refuses one that is not strictly inside the
folder the run owns; joined paths cannot climb out; ``--fresh`` deletes exactly the stage's old
folder and logs each deletion. No Ray."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from dermray.errors import StorageError
from dermray.io import storage
from dermray.io.fingerprint import FILE, StaleOutputError, claim, make


def tree(root: Path) -> set[str]:
    """Every path below ``root`` (links not followed), relative."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A folder of someone else's work beside OUT (and two levels above it)."""
    other = tmp_path / "x"
    (other / "keep").mkdir(parents=True)
    (other / "keep" / "result.json").write_text("{}")
    return other


def test_remove_refuses_everything_not_strictly_inside_root(tmp_path, victim):
    out = tmp_path / "a" / "out"
    (out / "tune" / "heads").mkdir(parents=True)
    (out / "escape").symlink_to(victim)  # a link inside OUT naming a folder outside
    before = tree(tmp_path)
    refused = [out, out / ".", out / "..", out / ".." / ".." / "x", tmp_path / "x",
               out / "escape" / "keep", out / "tune" / ".." / ".." / "out2", Path("/"),
               out / "tune" / ".." / "..", "s3://bucket/out/x"]
    for target in refused:
        with pytest.raises(StorageError):
            storage.remove(target, out, "test")
    assert tree(tmp_path) == before
    # the link itself is inside: removing it removes the link, never what it names
    assert storage.remove(out / "escape", out, "test")
    assert not (out / "escape").exists() and (victim / "keep" / "result.json").is_file()
    assert storage.remove(out / "tune" / "heads", out, "test")
    assert not storage.remove(out / "tune" / "heads", out, "test")  # nothing there: False
    assert tree(victim) == {"keep", "keep/result.json"}


def test_a_folder_holding_a_link_outside_is_removed_without_following_it(tmp_path, victim):
    out = tmp_path / "out"
    (out / "tune").mkdir(parents=True)
    (out / "tune" / "escape").symlink_to(victim)
    storage.remove(out / "tune", out, "test")
    assert not (out / "tune").exists() and tree(victim) == {"keep", "keep/result.json"}


@pytest.mark.parametrize("name", ["", ".", "..", "a/../..", "../x", "a//b"])
def test_join_refuses_names_that_leave_the_folder(name):
    with pytest.raises(StorageError):
        storage.join("/tmp/out", name)
    with pytest.raises(StorageError):
        storage.join("s3://b/out?region=us-east-1", "tune", name)


def test_join_keeps_good_names_and_the_query():
    assert storage.join("s3://b/out?x=1", "tune", "heads/") == "s3://b/out/tune/heads?x=1"
    assert storage.join("/o/", "embeddings", "backbone=r/split=val") == \
        "/o/embeddings/backbone=r/split=val"


@pytest.mark.parametrize(("target", "root", "ok"), [
    ("s3://b/out/tune/heads?q=1", "s3://b/out/tune?q=1", True),
    ("s3://b/out/x", "s3://b", True),
    ("s3://b/out", "s3://b/out", False),   # the root itself
    ("s3://b/out/", "s3://b/out", False),
    ("s3://b/outer/x", "s3://b/out", False),  # a sibling sharing a prefix
    ("s3://c/out/x", "s3://b/out", False),   # another bucket
    ("s3://b/out/../y", "s3://b/out", False),
    ("s3://b/out/x?endpoint_override=evil:1", "s3://b/out", False),  # another store
    ("/tmp/out/x", "s3://b/out", False),
])
def test_inside_on_s3_compares_bucket_key_and_store(target, root, ok):
    if ok:
        storage.inside(target, root)
    else:
        with pytest.raises(StorageError):
            storage.inside(target, root)


def fingerprint(seed: int) -> dict:
    return make("search", {"seed": seed}, {"manifest": "m"})


def test_fresh_deletes_exactly_the_stage_folder_and_logs_it(tmp_path, victim, caplog):
    out = tmp_path / "out"
    folder = storage.join(str(out / "tune"), "heads")
    claim(folder, "search", fingerprint(0), root=str(out / "tune"))
    (Path(folder) / "trial_1").mkdir()
    (Path(folder) / "trial_1" / "result.json").write_text("{}")
    (out / "tune" / "other_experiment").mkdir()
    (out / "tune" / "other_experiment" / "tuner.pkl").write_bytes(b"x")
    (out / "manifest.parquet").write_bytes(b"x")
    with pytest.raises(StaleOutputError):  # changed settings without --fresh: nothing deleted
        claim(folder, "search", fingerprint(1), root=str(out / "tune"))
    before = tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dermray.io.storage"):
        claim(folder, "search", fingerprint(1), fresh=True, root=str(out / "tune"))
    gone = before - tree(tmp_path)
    assert gone == {"out/tune/heads/trial_1", "out/tune/heads/trial_1/result.json"}
    # the one deletion is logged, naming the folder
    deleted = [r.deleted for r in caplog.records if hasattr(r, "deleted")]
    assert deleted == [folder]
    assert json.loads((Path(folder) / FILE).read_text())["settings"] == {"seed": 1}


def test_claim_refuses_a_folder_outside_its_root_before_anything(tmp_path, victim):
    out = tmp_path / "a" / "out"
    out.mkdir(parents=True)
    before = tree(tmp_path)
    for folder in (str(out / ".." / ".." / "x"), str(tmp_path / "x"), str(out)):
        with pytest.raises(StorageError):
            claim(folder, "search", fingerprint(0), fresh=True, root=str(out))
    assert tree(tmp_path) == before


def test_replace_dir_refuses_a_target_outside_its_root(tmp_path, victim):
    out = tmp_path / "out"
    build = tmp_path / ".build"
    build.mkdir()
    (build / "bundle.json").write_text("{}")
    before = tree(tmp_path)
    with pytest.raises(StorageError):
        storage.replace_dir(build, victim, "bundle.json", link=True, root=out)
    assert tree(tmp_path) == before


def test_sweep_deletes_only_inside_out_even_through_a_link(tmp_path, victim):
    """A leftover-looking name that is a link to a folder outside: the link goes, the folder
    it names stays."""
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / ".model.build.abc_12")
    assert storage.sweep_leftovers(out) == [str(out / ".model.build.abc_12")]
    assert tree(victim) == {"keep", "keep/result.json"}


def test_a_failed_cleanup_is_a_warning_a_failed_fresh_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "tmpdir").mkdir()

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(storage.shutil, "rmtree", refuse)
    assert storage.remove(tmp_path / "tmpdir", tmp_path, "test", best_effort=True) is False
    with pytest.raises(PermissionError):
        storage.remove(tmp_path / "tmpdir", tmp_path, "test")
    with pytest.raises(StorageError):  # outside the root: refused even when best effort
        storage.remove(tmp_path, tmp_path, "test", best_effort=True)
