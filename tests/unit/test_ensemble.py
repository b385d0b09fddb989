"""The soft-vote ensemble (issue 18, item 5): weights fitted on validation log-loss on the simplex,
its accuracy estimated out of fold (lesion-grouped: the weights never see the fold they score),
chosen only when that beats the best trial's validation accuracy, and exported as one bundle
that `dermray predict` and `dermray explain` accept, giving the probabilities selection computed.

Tiny: numpy for the weights; 14 images of 32 px, VGG19 on seeded random weights, a logistic head
and an XGBoost head (with metadata) for the bundle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermray.cli import main
from dermray.config import SearchConfig
from dermray.data.synth import render_lesion
from dermray.domain import CLASSES
from dermray.models.backbones import FrozenExtractor
from dermray.models.bundle import BUNDLE_FILE, BundleError, BundleSpec, load_bundle, read_spec
from dermray.models.ensemble import EnsembleHead, fit_weights, lesion_folds, mix, out_of_fold
from dermray.models.features import metadata_matrix
from dermray.models.heads import make_head
from dermray.models.policies import fit_operating_points, policy_report
from dermray.stages.extract import weights_record
from dermray.stages.select import (
    choose_ensemble,
    ensemble_candidate,
    ensemble_members,
    ensemble_spec,
    export_bundle,
)

SIZE = 32
K = len(CLASSES)


def informative(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A member right on about 70% of the rows, confidently (0.3-0.9 on the true class), and
    wrong on the others with less confidence (0.2-0.45 on another class): two such members err
    on different rows, and their vote beats either."""
    n = len(y)
    wrong = rng.random(n) < 0.3
    target = np.where(wrong, (y + rng.integers(1, K, n)) % K, y)
    mass = np.where(wrong, rng.uniform(0.2, 0.45, n), rng.uniform(0.3, 0.9, n))
    p = rng.dirichlet(np.ones(K), size=n) * (1 - mass)[:, None]
    p[np.arange(n), target] += mass
    return p


def test_a_member_that_is_pure_noise_gets_about_no_weight():
    rng = np.random.default_rng(0)
    y = rng.integers(0, K, 400)
    noise = rng.dirichlet(np.ones(K), size=len(y))
    w = fit_weights([informative(y, rng), noise], y)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w[1] < 0.03, w
    # two useful members that err on different rows share the vote
    a, b = informative(y, rng), informative(y, rng)
    w = fit_weights([a, b], y)
    assert 0.2 < w[0] < 0.8, w


def test_the_out_of_fold_weights_never_see_the_fold_they_score():
    rng = np.random.default_rng(1)
    y = rng.integers(0, K, 300)
    lesions = rng.integers(0, 120, len(y))  # several images per lesion
    probas = [informative(y, rng), informative(y, rng), rng.dirichlet(np.ones(K), len(y))]
    row_of = {round(float(v), 12): i for i, v in enumerate(probas[0][:, 0])}  # a row's mark
    seen: list[set[int]] = []

    def spy(parts, y_part):
        seen.append({row_of[round(float(v), 12)] for v in parts[0][:, 0]})
        return fit_weights(parts, y_part)

    oof = out_of_fold(probas, y, lesions, k=5, seed=0, fit=spy)
    assert len(oof.folds) == len(seen) == 5
    held = [set(f.tolist()) for f in oof.folds]
    assert sorted(i for f in held for i in f) == list(range(len(y)))  # each row scored once
    for fold, fitted in zip(held, seen, strict=True):
        assert not fold & fitted  # the weights never saw a row they score
        assert fold | fitted == set(range(len(y)))
    for a in range(5):  # no lesion in two folds
        for b in range(a + 1, 5):
            assert not set(lesions[list(held[a])]) & set(lesions[list(held[b])])
    # the estimate is the accuracy of those held-out mixes, fold by fold
    for fold, w in zip(oof.folds, oof.fold_weights, strict=True):
        np.testing.assert_allclose(oof.proba[fold], mix([p[fold] for p in probas], w))
    assert oof.accuracy == pytest.approx(np.mean(oof.proba.argmax(1) == y))
    assert lesion_folds(y, lesions, 5, 0)[0].tolist() == oof.folds[0].tolist()  # seeded


def _scored(ids, y, proba):
    rows = pd.DataFrame({"image_id": ids, "label": y})
    return {"val": (rows, proba), "test": (rows, proba)}


def _trials(accuracies, families=None, features=None):
    n = len(accuracies)
    return pd.DataFrame({
        "trial_id": [f"t{i}" for i in range(n)],
        "family": families or ["logistic"] * n, "features": features or ["resnet50"] * n,
        "params": ["{}"] * n, "val_accuracy": accuracies,
        "val_balanced_accuracy": accuracies, "val_log_loss": [1.0] * n,
        "status": ["done"] * n})


def test_the_ensemble_is_chosen_only_when_its_out_of_fold_accuracy_wins():
    rng = np.random.default_rng(2)
    n = 350
    y = rng.integers(0, K, n)
    ids = [f"ISIC_{i:05d}" for i in range(n)]
    lesions = pd.Series([f"L{i // 2}" for i in range(n)], index=ids)
    a, b = informative(y, rng), informative(y, rng)
    acc = [float(np.mean(p.argmax(1) == y)) for p in (a, b)]
    members = [(_trials(acc).iloc[i], _scored(ids, y, p)) for i, p in enumerate((a, b))]
    record, mixed = ensemble_candidate(members, max(acc), lesions)
    # two members that err on different rows: the vote beats either, out of fold
    assert record["out_of_fold"]["accuracy"] > max(acc) and record["chosen"]
    assert "beats" in record["reason"] and len(record["weights"]) == 2
    assert mixed["val"][0].shape == (n, K)
    # the same members against a single trial that did better: not chosen, and said why
    record, _ = ensemble_candidate(members, 0.99, lesions)
    assert not record["chosen"] and "does not beat" in record["reason"]
    assert record["members"][0]["weight"] == pytest.approx(record["weights"][0])
    # a member twice is no better than itself: a tie is not a win
    twice = [(m[0], _scored(ids, y, a)) for m in members]
    record, _ = ensemble_candidate(twice, acc[0], lesions)
    assert record["out_of_fold"]["accuracy"] == pytest.approx(acc[0]) and not record["chosen"]


def test_members_are_the_best_trial_of_each_family_and_backbones():
    trials = _trials([0.5, 0.6, 0.7, 0.4, 0.9],
                     ["logistic", "logistic", "xgboost", "logistic", "finetune"],
                     ["resnet50", "resnet50+meta", "resnet50", "vgg19", "images"])
    picked = {(r["family"], r["features"]) for r in ensemble_members(trials)}
    # metadata is not a pair of its own; an images family is left out
    assert picked == {("logistic", "resnet50+meta"), ("xgboost", "resnet50"),
                      ("logistic", "vgg19")}
    assert len(ensemble_members(trials.iloc[:1])) == 1


def _metadata(ids, y):
    sexes, places = ["male", "female", "unknown"], ["back", "face", "trunk"]
    return pd.DataFrame({"lesion_id": [f"HAM_{i // 2}" for i in range(len(ids))],
                         "image_id": ids, "dx": [CLASSES[k] for k in y],
                         "dx_type": "histo", "age": [30.0 + 5 * i for i in range(len(ids))],
                         "sex": [sexes[i % 3] for i in range(len(ids))],
                         "localization": [places[i % 3] for i in range(len(ids))]})


@pytest.fixture(scope="module")
def ensemble_bundle(tmp_path_factory):
    """Two trials on one VGG19 pass (logistic on vgg19, XGBoost on vgg19+meta), chosen as an
    ensemble by ``choose_ensemble`` and exported as `dermray run` does."""
    root = tmp_path_factory.mktemp("ensemble")
    images = root / "images"
    images.mkdir()
    arrays, ids = [], []
    for i, dx in enumerate(CLASSES):
        for j in range(2):
            array = np.asarray(render_lesion(dx, 10 * i + j, 10 * i + j + 1, (SIZE, SIZE)))
            Image.fromarray(array).save(images / f"ISIC_{i}{j}.png")
            arrays.append(array)
            ids.append(f"ISIC_{i}{j}")
    y = np.repeat(np.arange(K), 2)
    meta = _metadata(ids, y)
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    X = FrozenExtractor(["vgg19"], {"vgg19": "none"}, SIZE, batch_size=16, jit_compile=False,
                        seed=0).embed("vgg19", np.stack(arrays))
    X_meta = np.concatenate([X, metadata_matrix(meta)], axis=1)
    logistic = make_head("logistic", {"C": 0.01}).fit(X, y)
    xgb = make_head("xgboost", {"n_estimators": 8, "max_depth": 2, "early_stopping_rounds": 0,
                                "n_jobs": 1}).fit(X_meta, y)
    heads = {"t0": logistic, "t1": xgb}
    inputs = {"t0": X, "t1": X_meta}
    # the trials' reported accuracies: lower than the vote's here, so that it is chosen
    trials = _trials([0.3, 0.2], ["logistic", "xgboost"], ["vgg19", "vgg19+meta"])

    def scored(row):
        proba = heads[row["trial_id"]].predict_proba(inputs[row["trial_id"]])
        rows = pd.DataFrame({"image_id": ids, "label": y})
        return {"head": heads[row["trial_id"]], "val": (rows, proba), "test": (rows, proba)}

    lesions = pd.Series(meta["lesion_id"].to_numpy(), index=ids)
    record, chosen = choose_ensemble(trials, scored, lesions)
    assert chosen is not None, record
    head, entry, mixed, members = chosen
    points = fit_operating_points(mixed["val"][0], y, np.full(K, 1 / K), {"melanoma_target": 0.9})
    figures = {"val": entry["val"], "test": entry["test"],
               "policies": {s: policy_report(p, t, points) for s, (p, t) in mixed.items()}}
    extract = {"config": {"image_size": SIZE, "tta_views": 0, "seed": 0},
               **weights_record({"vgg19": "none"})}
    out = root / "out"
    spec = ensemble_spec(members, extract, figures, points, str(out))
    export_bundle(head, None, SearchConfig(out=str(out)), extract, figures, str(out),
                  operating_points=points, spec=spec)
    return {"model": out / "model", "images": images, "arrays": np.stack(arrays), "ids": ids,
            "proba": mixed["val"][0], "metadata": root / "HAM10000_metadata.csv",
            "record": record, "root": root}


def test_the_bundle_records_its_members_weights_and_one_backbone_pass(ensemble_bundle):
    spec = read_spec(ensemble_bundle["model"])
    assert spec.family == "ensemble" and [b.name for b in spec.backbones] == ["vgg19"]
    assert [(m.family, m.features) for m in spec.members] == [("logistic", "vgg19"),
                                                               ("xgboost", "vgg19+meta")]
    assert [m.weight for m in spec.members] == ensemble_bundle["record"]["weights"]
    files = json.loads((ensemble_bundle["model"] / BUNDLE_FILE).read_text())["files"]
    assert any(f.startswith("head/0/") for f in files) and any(f.startswith("head/1/")
                                                               for f in files)
    card = (ensemble_bundle["model"] / "model_card.md").read_text()
    assert "Ensemble members" in card and "xgboost on `vgg19+meta`" in card
    bundle = load_bundle(ensemble_bundle["model"])
    assert isinstance(bundle.head, EnsembleHead) and bundle.uses_metadata


def test_predict_gives_the_probabilities_of_selection(ensemble_bundle, tmp_path):
    out = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(ensemble_bundle["model"]), "--no-ray", "--metadata",
                 str(ensemble_bundle["metadata"]), "--out", str(out),
                 str(ensemble_bundle["images"])]) == 0
    rows = pd.read_csv(out).sort_values("image_id")
    assert rows["image_id"].tolist() == ensemble_bundle["ids"]
    proba = rows[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(proba, ensemble_bundle["proba"], atol=1e-4)


def test_explain_explains_the_ensemble_s_own_probability_by_occlusion(ensemble_bundle,
                                                                     tmp_path):
    paths = sorted(ensemble_bundle["images"].glob("*.png"))[:1]
    assert main(["explain", "--model", str(ensemble_bundle["model"]), "--out",
                 str(tmp_path / "x"), *map(str, paths)]) == 0
    records = json.loads((tmp_path / "x" / "explanations.json").read_text())
    # explain has no patient metadata: the 'unknown' encoding, as predict without --metadata
    bundle = load_bundle(ensemble_bundle["model"])
    want = bundle.predict_proba(ensemble_bundle["arrays"][:1])
    for record, p in zip(records, want, strict=True):
        assert record["method"] == "occlusion"
        np.testing.assert_allclose([record["probabilities"][c] for c in CLASSES], p, atol=1e-5)
        assert Path(record["png"]).is_file()
    assert main(["explain", "--model", str(ensemble_bundle["model"]), "--method", "gradcam",
                 "--out", str(tmp_path / "y"), str(paths[0])]) == 2


def test_a_damaged_member_file_is_refused_naming_it(ensemble_bundle, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(ensemble_bundle["model"], model)
    member = min(p for p in (model / "head" / "1").rglob("*") if p.is_file())
    member.write_bytes(member.read_bytes() + b" ")
    with pytest.raises(BundleError, match=str(member.relative_to(model))):
        load_bundle(model)
    assert main(["predict", "--model", str(model), "--no-ray",
                 str(ensemble_bundle["images"])]) == 2
    assert str(member.relative_to(model)) in capsys.readouterr().err


def test_the_spec_refuses_members_that_do_not_add_up(ensemble_bundle):
    spec = read_spec(ensemble_bundle["model"])
    fields = {k: getattr(spec, k) for k in ("family", "features", "backbones", "image_size",
                                            "tta_views", "seed", "params", "trial_id",
                                            "metrics", "operating_points")}
    m0, m1 = spec.members
    heavy = type(m0)(**{**m0.__dict__, "weight": 0.9})
    with pytest.raises(BundleError, match="weights that sum to 1"):
        BundleSpec(**fields, members=(heavy, m1))
    images = type(m0)(**{**m0.__dict__, "family": "finetune", "features": "images"})
    with pytest.raises(BundleError, match=r"members\[0\]\.family"):
        BundleSpec(**fields, members=(images, m1))
    with pytest.raises(BundleError, match="2 or more"):
        BundleSpec(**{**fields, "features": f"{m0.family}:{m0.features}"}, members=(m0,))


@pytest.mark.slow
def test_ray_predict_gives_the_local_probabilities(ensemble_bundle, tmp_path):
    import ray

    out = tmp_path / "pred.csv"
    try:
        assert main(["predict", "--ray", "--model", str(ensemble_bundle["model"]), "--metadata",
                     str(ensemble_bundle["metadata"]), "--out", str(out),
                     str(ensemble_bundle["images"])]) == 0
    finally:
        ray.shutdown()
    rows = pd.read_csv(out).sort_values("image_id")
    np.testing.assert_allclose(rows[[f"p_{c}" for c in CLASSES]].to_numpy(),
                               ensemble_bundle["proba"], atol=1e-4)
