"""A stage's output folder is claimed by its fingerprint: reused only by the same settings and
inputs, deleted only by --fresh, and only when dermray made it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dermray.io.fingerprint import FILE, StaleOutputError, claim, make


def test_a_folder_is_reused_refused_or_redone_by_its_fingerprint(tmp_path: Path):
    folder = tmp_path / "embeddings"
    first = make("extract", {"image_size": 32}, {"manifest": "sha256:a"})
    claim(str(folder), "extract", first, root=str(tmp_path))
    (folder / "part-0.parquet").write_bytes(b"rows")
    claim(str(folder), "extract", first, root=str(tmp_path))  # a rerun: resumes, keeps the rows
    assert (folder / "part-0.parquet").is_file()
    other = make("extract", {"image_size": 64}, {"manifest": "sha256:a"})
    with pytest.raises(StaleOutputError, match="image_size"):
        claim(str(folder), "extract", other, root=str(tmp_path))
    assert (folder / "part-0.parquet").is_file()
    claim(str(folder), "extract", other, fresh=True, root=str(tmp_path))  # starts over
    assert [p.name for p in folder.iterdir()] == [FILE]
    assert json.loads((folder / FILE).read_text())["key"] == other["key"]


@pytest.mark.parametrize("fresh", [False, True])
def test_files_without_a_fingerprint_are_neither_adopted_nor_deleted(tmp_path: Path, fresh):
    folder = tmp_path / "experiment"
    folder.mkdir()
    (folder / "someone_elses.csv").write_text("x\n")
    with pytest.raises(StaleOutputError):
        claim(str(folder), "search", make("search", {}, {}), fresh=fresh, root=str(tmp_path))
    assert [p.name for p in folder.iterdir()] == ["someone_elses.csv"]
