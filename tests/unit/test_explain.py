"""Explanations: heat maps of the image's size, that move when the lesion is covered, for Grad-CAM
(a logistic head); occlusion for XGBoost; `dermray explain` writes a PNG per image. Tiny images,
random (seeded) VGG19 weights, one backbone build for the module."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dermray.cli import main
from dermray.data.synth import render_lesion
from dermray.domain import CLASSES
from dermray.models.backbones import PREPROCESSING, FrozenExtractor, caffe_preprocess
from dermray.models.bundle import BackboneRecord, Bundle, BundleSpec, load_bundle

SIZE = 32


def lesion(dx: str, seed: int) -> np.ndarray:
    return np.asarray(render_lesion(dx, seed, seed + 1, (SIZE, SIZE)))


def skin_with_spot(covered: bool = False) -> np.ndarray:
    """Skin with a dark lesion in the upper left quarter; ``covered``: the same skin without it."""
    rng = np.random.default_rng(3)
    image = np.clip(np.array([225, 180, 150]) + rng.normal(0, 4, (SIZE, SIZE, 3)), 0, 255)
    img = Image.fromarray(image.astype(np.uint8))
    if not covered:
        ImageDraw.Draw(img).ellipse([3, 3, 15, 14], fill=(45, 30, 40))
    return np.asarray(img)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A logistic and an XGBoost bundle on the same embeddings, saved and loaded as exported."""
    from dermray.models.heads import make_head

    root = tmp_path_factory.mktemp("bundles")
    images = np.stack([lesion(dx, 10 * i + j) for i, dx in enumerate(CLASSES) for j in range(2)])
    y = np.repeat(np.arange(len(CLASSES)), 2)
    spec = BundleSpec(family="logistic", features="vgg19", image_size=SIZE, tta_views=0, seed=0,
                      backbones=(BackboneRecord.of("vgg19", "none"),), params={}, trial_id="t",
                      metrics={})
    embedding = Bundle(spec=spec, head=None, directory=root, weights={"vgg19": "none"})
    # the bundle's own embedder without XLA (its compile would cost more than the test)
    embedding._embedder = FrozenExtractor(["vgg19"], {"vgg19": "none"}, SIZE, batch_size=16,
                                          jit_compile=False, seed=0)
    X = embedding.features(images)
    out = {}
    for family, params in (("logistic", {"C": 1.0}),
                           ("xgboost", {"n_estimators": 8, "max_depth": 2,
                                        "early_stopping_rounds": 0})):
        directory = root / family
        make_head(family, params).fit(X, y).save(directory / "head")
        replace(spec, family=family).write(directory)
        out[family] = load_bundle(directory)
        out[family]._embedder = embedding.embedder()  # one network for the module
    return out


@pytest.fixture(scope="module")
def gradcam(bundles):
    from dermray.report.explain import Explainer

    return Explainer(bundles["logistic"])


def _moves(explainer) -> tuple[np.ndarray, np.ndarray]:
    seen = explainer.explain(skin_with_spot()).heat
    covered = explainer.explain(skin_with_spot(covered=True)).heat
    return seen, covered


def test_gradcam_heat_map_has_the_image_shape_and_follows_the_lesion(gradcam):
    assert gradcam.method == "gradcam"
    seen, covered = _moves(gradcam)
    assert seen.shape == covered.shape == (SIZE, SIZE)
    assert np.isfinite(seen).all() and seen.min() >= 0 and seen.max() == pytest.approx(1.0)
    assert np.abs(seen - covered).mean() > 0.05


def test_occlusion_explains_xgboost(bundles):
    from dermray.report.explain import Explainer, occlusion_map

    explainer = Explainer(bundles["xgboost"])
    assert explainer.method == "occlusion"
    explained = explainer.explain(skin_with_spot())
    assert explained.heat.shape == (SIZE, SIZE) and np.isfinite(explained.heat).all()
    assert explained.label in CLASSES and 0 < explained.proba <= 1
    # the map is the drop of the class probability where the patch covers what it looks at:
    # here a predictor that looks only at the lesion's top-left corner
    def predict(batch):
        dark = 1 - batch[:, 4:8, 4:8].mean(axis=(1, 2, 3)) / 255
        return np.stack([dark, 1 - dark], axis=1)

    drop = occlusion_map(predict, skin_with_spot(), target=0)
    assert drop.shape == (SIZE, SIZE)
    assert drop[4:8, 4:8].min() > 0 and np.allclose(drop[20:, 20:], 0)
    assert np.allclose(occlusion_map(predict, skin_with_spot(covered=True), target=0), 0,
                       atol=0.02)


def test_explain_writes_a_png_per_image(bundles, gradcam, tmp_path, capsys, monkeypatch):
    from dermray.report.explain import explain_files

    paths = []
    for name, image in (("spot", skin_with_spot()), ("mel", lesion("mel", 5))):
        Image.fromarray(image).resize((90, 60)).save(tmp_path / f"{name}.jpg")
        paths.append(tmp_path / f"{name}.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    records, problems = explain_files(bundles["logistic"], [*paths, tmp_path / "bad.jpg"],
                                      tmp_path / "out", explainer=gradcam)
    assert [r["dx"] in CLASSES for r in records] == [True, True]
    assert len(problems) == 1 and "bad.jpg" in problems[0]
    for name in ("spot", "mel"):
        with Image.open(tmp_path / "out" / f"{name}.png") as png:
            assert png.format == "PNG" and png.size[0] >= 300
    assert len(json.loads((tmp_path / "out" / "explanations.json").read_text())) == 2
    # the command (with the module's loaded XGBoost bundle: no second backbone build)
    monkeypatch.setattr("dermray.cli.load_bundle", lambda *a, **k: bundles["xgboost"])
    assert main(["explain", "--model", "M", "--out", str(tmp_path / "cli"), str(paths[0]),
                 str(tmp_path / "bad.jpg")]) == 0
    assert (tmp_path / "cli" / "spot.png").is_file()
    captured = capsys.readouterr()
    assert "occlusion" in captured.out and "bad.jpg" in captured.err


def test_the_embedder_runs_the_preprocessing_the_bundle_records(bundles, monkeypatch):
    """A bundle that records another preprocessing mode embeds in that mode (here one that
    counts its calls and then does what caffe does, so the features must equal the caffe
    bundle's, which never calls it)."""
    caffe = bundles["logistic"]
    calls = []

    def probe(images):
        calls.append(len(images))
        return caffe_preprocess(images)

    monkeypatch.setitem(PREPROCESSING, "probe", probe)
    record = replace(caffe.spec.backbones[0], preprocessing="probe")
    probed = Bundle(spec=replace(caffe.spec, backbones=(record,)), head=caffe.head,
                    directory=caffe.directory, weights=caffe.weights)
    images = np.stack([lesion("mel", 1), lesion("nv", 2)])
    got = probed.features(images)  # its own network, built from the spec
    assert calls and probed.embedder().preprocessing == {"vgg19": "probe"}
    np.testing.assert_array_equal(caffe.features(images), got)
    assert len(calls) == 1
