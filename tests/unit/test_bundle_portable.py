"""A bundle predicts wherever its weights can be found, starting where training read them (issue
20): exported in one folder from a weights file of its own (not Keras' file, like the shared
ResNet50 file), copied elsewhere, `dermray predict` finds the file with no flag, and gives the
probabilities the training network gives; when the file is gone the message names what was
looked for and every place looked, and nothing is downloaded. A bundle on random weights says so
in bundle.json and the model card, and predict warns once.

No Ray, no network: tiny images, a VGG19 weights file saved here from a seeded random network.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermray.cli import main
from dermray.config import SearchConfig
from dermray.data.synth import render_lesion
from dermray.domain import CLASSES
from dermray.models import backbones
from dermray.models.backbones import FrozenExtractor
from dermray.models.bundle import BUNDLE_FILE, load_bundle, read_spec
from dermray.models.heads import make_head
from dermray.report.evaluate import metrics
from dermray.stages.extract import weights_record
from dermray.stages.select import export_bundle

SIZE = 32


def no_download(name):
    raise AssertionError("a download was attempted")


@pytest.fixture(autouse=True)
def nowhere_else(monkeypatch, tmp_path):
    """No weights folder but the hint: an empty Keras cache, no $DERMRAY_WEIGHTS_DIR, and any
    download is a failure."""
    monkeypatch.delenv("DERMRAY_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    monkeypatch.setattr(backbones, "imagenet_file", no_download)


def export(root, head, weights, name):
    """OUT/model as `dermray run` exports it, from an extraction record of ``weights``."""
    record = {"config": {"image_size": SIZE, "tta_views": 0, "seed": 0},
              **weights_record({"vgg19": weights})}
    row = pd.Series({"family": "logistic", "features": "vgg19", "params": "{}",
                     "trial_id": name})
    y = np.repeat(np.arange(len(CLASSES)), 2)
    scored = metrics(y, np.full((len(y), len(CLASSES)), 1 / len(CLASSES)))
    out = root / name
    export_bundle(head, row, SearchConfig(out=str(out)), record, {"val": scored, "test": scored},
                  str(out))
    return out / "model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """In a training folder: a weights file of our own (named like Keras' VGG19 file, other
    bytes), 14 tiny images, their embeddings, a logistic head, and two exports: on that file,
    and on random weights."""
    import keras

    root = tmp_path_factory.mktemp("training")
    weights = root / "weights" / "vgg19_mine.weights.h5"
    weights.parent.mkdir()
    keras.utils.set_random_seed(7)  # not the bundle's seed: random weights would differ
    keras.applications.VGG19(include_top=False, weights=None,
                             input_shape=(SIZE, SIZE, 3)).save_weights(str(weights))
    images = root / "images"
    images.mkdir()
    arrays = []
    for i, dx in enumerate(CLASSES):
        for j in range(2):
            array = np.asarray(render_lesion(dx, 10 * i + j, 10 * i + j + 1, (SIZE, SIZE)))
            Image.fromarray(array).save(images / f"ISIC_{i}{j}.png")
            arrays.append(array)
    X = FrozenExtractor(["vgg19"], {"vgg19": str(weights)}, SIZE, batch_size=16,
                        jit_compile=False).embed("vgg19", np.stack(arrays))
    head = make_head("logistic", {"C": 1.0}).fit(X, np.repeat(np.arange(len(CLASSES)), 2))
    return {"weights": weights, "images": images, "head": head,
            "proba": head.predict_proba(X), "model": export(root, head, str(weights), "mine"),
            "random": export(root, head, "none", "random")}


def copied(model, tmp_path):
    """A copy of a bundle in another folder (OUT/model is a link: the copy is of its files)."""
    target = tmp_path / "elsewhere" / "model"
    shutil.copytree(model, target)
    return target


def test_the_bundle_records_where_its_weights_were_found(trained):
    record = read_spec(trained["model"]).backbones[0]
    assert record.weights_hint == str(trained["weights"])
    assert record.weights_origin == "file"  # the user's file: never downloaded
    assert record.weights_identity == backbones.sha256_file(trained["weights"])


def test_a_copied_bundle_predicts_with_no_flag_as_trained(trained, tmp_path):
    model = copied(trained["model"], tmp_path)
    assert load_bundle(model).weights["vgg19"] == str(trained["weights"])
    out = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(model), "--no-ray", "--out", str(out),
                 str(trained["images"])]) == 0
    rows = pd.read_csv(out).sort_values("image_id")
    assert len(rows) == 14
    proba = rows[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(proba, trained["proba"], atol=1e-4)  # the training network


def test_a_bundle_whose_weights_are_gone_names_what_and_where(trained, tmp_path, capsys):
    model = copied(trained["model"], tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(trained["weights"].parent, moved)
    trained["weights"].rename(trained["weights"].with_suffix(".away"))
    try:
        code = main(["predict", "--model", str(model), "--no-ray", str(trained["images"])])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        for part in (read_spec(model).backbones[0].weights_identity, "vgg19_mine.weights.h5",
                     str(trained["weights"]), str(tmp_path / "empty_keras_home" / "models"),
                     "--weights-dir"):
            assert part in err
        # found by its hash in a folder given
        assert load_bundle(model, [moved]).weights["vgg19"] == str(moved / trained[
            "weights"].name)
    finally:
        trained["weights"].with_suffix(".away").rename(trained["weights"])


def test_random_weights_are_said_in_the_bundle_and_the_card_and_warned_once(trained, tmp_path,
                                                                           caplog, capsys):
    model = trained["random"]
    body = json.loads((model / BUNDLE_FILE).read_text())
    assert body["backbones"][0]["weights_origin"] == "random"
    assert body["backbones"][0]["weights_identity"] == "none"
    assert "Random weights" in (model / "model_card.md").read_text()
    assert "Random weights" not in (trained["model"] / "model_card.md").read_text()
    # the CLI's own terminal logging (stages/console.py) prints the warning on stderr
    assert main(["predict", "--model", str(model), "--no-ray", "--batch-size", "4",
                 "--out", str(tmp_path / "p.csv"), str(trained["images"])]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines()
              if ln.startswith("warning:") and "random" in ln]
    assert len(warned) == 1 and "vgg19" in warned[0]
    assert len(pd.read_csv(tmp_path / "p.csv")) == 14  # four batches, one warning
    with caplog.at_level(logging.WARNING, logger="dermray.models.bundle"):
        caplog.clear()
        load_bundle(trained["model"])
    assert not caplog.records  # real weights: no warning
