"""Backbone weights are recorded and found by content (sha256), never trusted by a machine's path:
where training read them (a hint), a named folder, $DERMRAY_WEIGHTS_DIR, the Keras cache, or
Keras' ImageNet download (hash checked), and that only for Keras' own file (issue 20)."""

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
    with pytest.raises(BackboneError, match=r"Could not find .*sha256:.*r50.h5 there has other "
                       r"content.*--weights-dir"):
        find_weights("resnet50", digest, "r50.h5", [tmp_path / "b"])


def test_imagenet_download_is_used_only_when_its_hash_matches(tmp_path, monkeypatch):
    good, digest = make_file(tmp_path / "download", "x.h5", b"keras imagenet file")
    monkeypatch.setattr(backbones, "imagenet_file", lambda name: str(good))
    name = backbones.imagenet_name("resnet50")
    assert find_weights("resnet50", digest, name, origin="keras") == str(good)
    with pytest.raises(BackboneError, match="are sha256:.*, not sha256:0+, the file the model"):
        find_weights("resnet50", "sha256:" + "0" * 64, name, origin="keras")
    # seeded random weights travel as 'none'
    assert find_weights("resnet50", "none") == "none"


def no_download(name):
    raise AssertionError("a download was attempted")


def test_the_hint_is_tried_first_and_used_only_by_its_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "imagenet_file", no_download)
    hinted, digest = make_file(tmp_path / "train" / "weights", "r50.h5", b"the trained weights")
    elsewhere, _ = make_file(tmp_path / "given", "r50.h5", b"the trained weights")
    assert find_weights("resnet50", digest, "r50.h5", [elsewhere.parent], hint=str(hinted),
                        origin="file") == str(hinted)
    hinted.write_bytes(b"replaced since")  # same path, other content: not used
    assert find_weights("resnet50", digest, "r50.h5", [elsewhere.parent], hint=str(hinted),
                        origin="file") == str(elsewhere)


def test_a_file_named_like_keras_but_not_keras_own_is_never_downloaded(tmp_path, monkeypatch):
    """The shared ResNet50 file has Keras' file name but other bytes: when it is nowhere to be
    found, the message names what was looked for and every place looked, and no download is
    tried (Keras' file would be another network's weights)."""
    monkeypatch.setattr(backbones, "imagenet_file", no_download)
    monkeypatch.setenv("DERMRAY_WEIGHTS_DIR", str(tmp_path / "env"))
    name = backbones.imagenet_name("resnet50")
    digest = "sha256:" + "7" * 64
    hint = tmp_path / "gone" / name
    with pytest.raises(BackboneError) as info:
        find_weights("resnet50", digest, name, [tmp_path / "given"], hint=str(hint), origin="file")
    message = str(info.value)
    for part in (digest, name, str(hint), str(tmp_path / "given"), str(tmp_path / "env"),
                 str(tmp_path / "keras_home" / "models"), "not Keras' own ImageNet file",
                 "--weights-dir"):
        assert part in message


def test_the_origin_is_keras_only_for_keras_own_file(tmp_path):
    path, digest = make_file(tmp_path, "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             b"not the real bytes")
    assert backbones.weights_origin("vgg19", digest, path) == "file"
    assert backbones.weights_origin("vgg19", "none") == "random"
    # Keras' own VGG19 file, known by its sha256 without reading it
    assert backbones.weights_origin("vgg19", backbones.KERAS_SHA256[path.name]) == "keras"


def test_the_shared_files_origins(resnet50_weights):
    """../shared's ResNet50 file has Keras' name and layout but not Keras' bytes (its md5 is
    not the one Keras pins): a user's file, never to be downloaded; its VGG19 file is Keras' own."""
    identity = backbones.sha256_file(resnet50_weights)
    assert backbones.weights_origin("resnet50", identity, resnet50_weights) == "file"
    vgg19 = resnet50_weights.with_name(backbones.imagenet_name("vgg19"))
    if vgg19.is_file():
        assert backbones.is_keras_file("vgg19", vgg19)
        assert backbones.sha256_file(vgg19) == backbones.KERAS_SHA256[vgg19.name]
