"""Backbone weights are recorded and found by content (sha256), never by a machine's path: a
named folder, $DERMRAY_WEIGHTS_DIR, the Keras cache, or Keras' ImageNet download (hash checked)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dermray.models import backbones
from dermray.models.backbones import BackboneError, find_weights, weights_identity, weights_name


def make_file(folder: Path, name: str, content: bytes) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    return path, "sha256:" + hashlib.sha256(content).hexdigest()


@pytest.fixture(autouse=True)
def no_outside_dirs(monkeypatch, tmp_path):
    monkeypatch.delenv("DERMRAY_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


def test_identity_is_the_content_hash(tmp_path):
    path, digest = make_file(tmp_path / "w", "mine.weights.h5", b"weights v1")
    assert weights_identity(str(path), "resnet50") == digest
    assert weights_identity("none", "resnet50") == "none"
    assert weights_name(str(path), "resnet50") == "mine.weights.h5"
    assert weights_name("imagenet", "vgg19") == "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.mark.parametrize("where", ["argument", "env", "keras_cache"])
def test_found_by_identity_wherever_it_is_and_whatever_its_name(tmp_path, monkeypatch, where):
    folder = {"argument": tmp_path / "given", "env": tmp_path / "from_env",
              "keras_cache": tmp_path / "keras_home" / "models"}[where]
    make_file(folder, "decoy.h5", b"other weights")
    path, digest = make_file(folder, "renamed_since.h5", b"the trained weights")
    if where == "env":
        monkeypatch.setenv("DERMRAY_WEIGHTS_DIR", str(folder))
    given = [folder] if where == "argument" else []
    assert find_weights("resnet50", digest, "original_name.h5", given) == str(path)


def test_a_same_named_file_with_other_content_is_refused(tmp_path):
    _, digest = make_file(tmp_path / "a", "r50.h5", b"the trained weights")
    make_file(tmp_path / "b", "r50.h5", b"tampered")
    with pytest.raises(BackboneError, match=r"No weights file .*sha256:.*--weights-dir"):
        find_weights("resnet50", digest, "r50.h5", [tmp_path / "b"])


def test_imagenet_download_is_used_only_when_its_hash_matches(tmp_path, monkeypatch):
    good, digest = make_file(tmp_path / "download", "x.h5", b"keras imagenet file")
    monkeypatch.setattr(backbones, "imagenet_file", lambda name: str(good))
    name = backbones.imagenet_name("resnet50")
    assert find_weights("resnet50", digest, name) == str(good)
    with pytest.raises(BackboneError, match="trained with sha256:0+"):
        find_weights("resnet50", "sha256:" + "0" * 64, name)
    # seeded random weights travel as 'none'
    assert find_weights("resnet50", "none") == "none"
