"""bundle.json has one writer and one reader (``BundleSpec``): a round trip gives the spec back,
and an edited or damaged bundle is refused, naming the file and the field, before any image is
read (issue 22 item 4): numbers out of range, fields that contradict each other, any other edit
(the checksum), a changed, missing or extra file. The preprocessing a bundle records is the one
its embedder runs (tests/unit/test_explain.py, which builds the network). No Ray and no network
here: a logistic head on random numbers.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from dermray.cli import main
from dermray.domain import CLASSES
from dermray.errors import DermrayError
from dermray.models.bundle import (
    BUNDLE_FILE,
    BackboneRecord,
    BundleError,
    BundleSpec,
    expected_inputs,
    load_bundle,
)
from dermray.models.heads import make_head
from dermray.models.policies import fit_operating_points

SIZE = 32


def make_spec(**changes) -> BundleSpec:
    fields = {"family": "logistic", "features": "vgg19+meta", "image_size": SIZE,
              "tta_views": 1, "seed": 0, "backbones": (BackboneRecord.of("vgg19", "none"),),
              "params": {"logistic_C": 1.0}, "trial_id": "t1",
              "metrics": {"test": {"accuracy": 0.5}}}
    return BundleSpec(**{**fields, **changes})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A logistic bundle on vgg19+meta with fitted operating points, as export writes one."""
    root = tmp_path_factory.mktemp("export") / "model"
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(CLASSES)), 10)
    X = rng.normal(size=(len(y), expected_inputs(make_spec()))) + y[:, None] * 0.1
    head = make_head("logistic", {"C": 1.0}).fit(X, y)
    points = fit_operating_points(head.predict_proba(X), y, np.bincount(y) / len(y),
                                  {"melanoma_target": 0.9})
    spec = make_spec(operating_points=points)
    head.save(root / "head")
    (root / "model_card.md").write_text("# card\n")
    spec.write(root)
    return root, spec


def copy_of(exported, tmp_path):
    root, _ = exported
    copy = tmp_path / "model"
    shutil.copytree(root, copy)
    return copy


def edited(exported, tmp_path, edit):
    """A copy whose bundle.json was edited by hand (its checksum left as it was)."""
    copy = copy_of(exported, tmp_path)
    body = json.loads((copy / BUNDLE_FILE).read_text())
    edit(body)
    (copy / BUNDLE_FILE).write_text(json.dumps(body))
    return copy


def test_the_spec_round_trips_and_records_every_file(exported):
    root, spec = exported
    bundle = load_bundle(root)
    assert bundle.spec == spec
    assert bundle.spec.backbones[0].preprocessing == "caffe"  # from the registry, at export
    body = json.loads((root / BUNDLE_FILE).read_text())
    assert body["format"] == 4 and "preprocessing" not in body  # only per backbone now
    assert sorted(body["files"]) == ["head/logistic.npz", "head/params.json", "model_card.md"]
    assert all(v.startswith("sha256:") and len(v) == 71 for v in body["files"].values())


def points(key, value):
    def edit(body):
        target = body["operating_points"]
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return edit


def set_key(key, value):
    return lambda body: body.__setitem__(key, value)


def set_backbone(key, value):
    return lambda body: body["backbones"][0].__setitem__(key, value)


BAD = [
    (points("temperature", float("nan")), "'operating_points.temperature' must be a finite"),
    (points("temperature", 0.0), "'operating_points.temperature' must be a finite number > 0"),
    (points("temperature", -1.5), "'operating_points.temperature'"),
    (points("policies.melanoma.threshold", 5.0),
     "'operating_points.policies.melanoma': The melanoma policy's threshold must be in \\[0, 1\\]"),
    (points("policies.melanoma.threshold", float("nan")),
     "'operating_points.policies.melanoma': The melanoma policy's threshold"),
    (points("policies.balanced.prior", [0.5, 0.5]),
     "'operating_points.policies.balanced': The balanced policy's prior must be 7 shares"),
    (points("policies.balanced.prior", [0.5] * 7), "The balanced policy's prior"),
    (points("policies.balanced.alpha", -1), "The balanced policy's alpha"),
    (set_key("tta_views", 100_000), "'tta_views' must be an integer in \\[0, 7\\]"),
    (set_key("image_size", 0), "'image_size' must be an integer in \\[32, 1024\\]"),
    (set_key("image_size", "224"), "'image_size' must be an integer in \\[32, 1024\\]"),
    (set_key("seed", -1), "'seed' must be a non-negative integer"),
    (set_key("labels", list(CLASSES)[::-1]), "'labels' must be"),
    (set_key("family", "svm"), "'family' must be one of logistic"),
    (set_key("features", "resnet50+meta"), "'backbones' must be the backbones of features"),
    (set_key("preprocessing", "caffe"), "'preprocessing' must be absent"),
    (set_backbone("preprocessing", "torch"), "'backbones\\[0\\].preprocessing' must be one of"),
    (set_backbone("weights_identity", "unknown"), "'backbones\\[0\\].weights_identity'"),
    (set_backbone("name", "alexnet"), "'backbones\\[0\\].name' must be one of"),
    (set_backbone("weights_origin", "cloud"), "'backbones\\[0\\].weights_origin' must be one of"),
    # random weights cannot pass for Keras' (a demo bundle must not lose its warning)
    (set_backbone("weights_origin", "keras"),
     "'backbones\\[0\\].weights_origin' must be 'random' exactly when"),
    (set_backbone("weights_hint", 3), "'backbones\\[0\\].weights_hint' must be a string"),
    (lambda body: body.pop("seed"), "'seed' must be present"),
    (set_key("format", 2), "is bundle format 2; this dermray reads format 4"),
]


@pytest.mark.parametrize("edit, message", BAD)
def test_a_bad_field_is_refused_naming_the_file_and_the_field(exported, tmp_path, edit, message):
    model = edited(exported, tmp_path, edit)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(model)
    assert f"{model}/{BUNDLE_FILE}" in str(info.value)


def test_predict_refuses_a_damaged_bundle_with_exit_2(exported, tmp_path, capsys):
    model = edited(exported, tmp_path, points("policies.melanoma.threshold", 5.0))
    image = tmp_path / "never_read.jpg"
    assert main(["predict", "--model", str(model), "--policy", "melanoma", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "melanoma policy's threshold" in err and "Traceback" not in err


def test_any_other_edit_is_refused_by_the_checksum(exported, tmp_path):
    # a valid value, but not the one trained with: the embeddings would be silently wrong
    model = edited(exported, tmp_path, set_key("image_size", 64))
    with pytest.raises(BundleError, match="bundle.json was changed after export: its checksum"):
        load_bundle(model)


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / "head" / "params.json").write_text('{"C": 2.0}'),
     "head/params.json was changed after export"),
    (lambda m: (m / "head" / "logistic.npz").unlink(), "head/logistic.npz is missing"),
    (lambda m: (m / "head" / "extra.npz").write_bytes(b"x"),
     "head/extra.npz is not a file the export wrote"),
])
def test_a_changed_missing_or_extra_file_is_refused_naming_it(exported, tmp_path, damage,
                                                             message):
    model = copy_of(exported, tmp_path)
    damage(model)
    with pytest.raises(BundleError, match=message):
        load_bundle(model)


def test_export_cannot_write_what_load_would_refuse(exported):
    _, spec = exported
    bad = json.loads(json.dumps(spec.operating_points))
    bad["temperature"] = float("inf")
    with pytest.raises(BundleError, match="operating_points.temperature"):
        replace(spec, operating_points=bad)
    with pytest.raises(BundleError, match="'features' must be 'images' with no backbones"):
        make_spec(family="finetune", features="vgg19")


def test_a_policy_the_bundle_lacks_is_a_message(exported):
    root, spec = exported
    bundle = load_bundle(root)
    proba = np.full((2, len(CLASSES)), 1 / len(CLASSES))
    assert bundle.decide(proba, "melanoma").shape == (2,)
    without = replace(bundle, spec=replace(spec, operating_points=None))
    with pytest.raises(DermrayError, match="exported without operating points"):
        without.decide(proba, "balanced")


def _arrays(edit):
    """An exporter that wrote the head's arrays with ``edit`` applied to them."""
    def damage(head_dir):
        with np.load(head_dir / "logistic.npz") as f:
            arrays = dict(f)
        edit(arrays)
        np.savez(head_dir / "logistic.npz", **arrays)
    return damage


def _set(key, value):
    def edit(arrays):
        arrays[key] = value(arrays[key])
    return edit


def _nan_at(a):
    a = a.copy()
    a.flat[3] = np.nan
    return a


# an exporter's bug, in the head's files, hashed consistently by the same export (so the
# content hash passes): each is refused at load naming the file, never predicts
HEAD_PROBES = [
    (_arrays(_set("coef", _nan_at)), "head/logistic.npz: 'coef' holds 1 value(s) that are not"),
    (_arrays(_set("coef", lambda a: np.full_like(a, np.inf))),
     f"'coef' holds {len(CLASSES) * expected_inputs(make_spec())} value(s)"),
    (_arrays(_set("intercept", lambda a: a * np.nan)), "'intercept' holds 7 value(s)"),
    (_arrays(_set("scale", lambda a: np.where(np.arange(a.size) == 0, -np.inf, a))),
     "'scale' holds 1 value(s)"),
    (_arrays(_set("coef", lambda a: a[:, :-1])), "the head takes"),  # a feature short
    (_arrays(_set("coef", lambda a: a[:-1])), "'coef' has shape (6, "),
    (_arrays(_set("intercept", lambda a: a[:3])), "'intercept' has shape (3,)"),
    (_arrays(_set("mean", lambda a: a[:-2])), "'mean' has shape"),
    (_arrays(_set("classes", lambda a: a[:5])), "the head gives 5 classes"),
    (_arrays(_set("coef", lambda a: a.astype(str))), "head/logistic.npz: 'coef' holds all"),
    (_arrays(lambda arrays: arrays.pop("scale")), "cannot be loaded as a 'logistic' head"),
    (lambda d: (d / "logistic.npz").write_bytes(b"not a zip"),
     "cannot be loaded as a 'logistic' head"),
    (lambda d: (d / "params.json").write_text("{not json"),
     "cannot be loaded as a 'logistic' head"),
    (lambda d: (d / "params.json").write_text('{"C": 1.0, "gamma": 3}'),
     "cannot be loaded as a 'logistic' head"),
]


def test_head_numbers_are_finite_and_of_the_declared_shapes(exported, tmp_path, capsys):
    """Tried / ended exactly / ended in a message: the bundle as exported loads and predicts
    (the reference); every head an exporter's bug could write is refused at load, naming the
    file, and `dermray predict` says so with exit 2."""
    root, spec = exported
    assert np.isfinite(load_bundle(root).head.predict_proba(
        np.zeros((1, expected_inputs(spec))))).all()
    tried, exactly, messages = 1, 1, 0
    for i, (damage, message) in enumerate(HEAD_PROBES):
        model = shutil.copytree(root, tmp_path / f"m{i}")
        damage(model / "head")
        spec.write(model)  # the export hashes what it wrote: the checksum passes
        tried += 1
        with pytest.raises(BundleError) as info:
            load_bundle(model)
        assert message in str(info.value) and str(model) in str(info.value), str(info.value)
        messages += 1
    assert main(["predict", "--model", str(tmp_path / "m0"), "--no-ray",
                 str(tmp_path / "never_read.jpg")]) == 2
    err = capsys.readouterr().err
    assert "'coef' holds 1 value(s) that are not finite" in err and "Traceback" not in err
    assert (tried, exactly, messages) == (len(HEAD_PROBES) + 1, 1, 14)
