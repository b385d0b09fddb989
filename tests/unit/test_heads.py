"""Each head family on separable synthetic embeddings; the scikit-learn contract; round trips."""

import numpy as np
import pytest

from dermray.models.heads import FAMILIES, HeadError, NotFittedError, load_head, make_head
from dermray.models.heads.base import softmax

PARAMS = {
    "logistic": {"C": 1.0},
    "xgboost": {"n_estimators": 40, "max_depth": 3, "early_stopping_rounds": 10},
    "mlp": {"epochs": 8, "width": 32, "patience": 5, "learning_rate": 1e-2},  # learns in 8
}


def blobs(n_per_class=30, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (7, dim))
    y = np.repeat(np.arange(7), n_per_class)
    X = centers[y] + rng.normal(0, 1, (len(y), dim))
    return X.astype(np.float32), y


@pytest.mark.parametrize("family", ["logistic", "xgboost", "mlp"])
def test_head_learns_and_round_trips(family, tmp_path):
    X, y = blobs()
    Xv, yv = X + np.random.default_rng(2).normal(0, 0.5, X.shape).astype(np.float32), y
    seen, train = [], []
    head = make_head(family, PARAMS[family])
    assert head.fit(X, y, eval_set=(Xv, yv), progress=lambda i, p, **figures: (
        seen.append(p.shape), train.append(figures))) is head
    proba = head.predict_proba(Xv)
    assert proba.shape == (len(Xv), 7)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (head.predict(Xv) == yv).mean() > 0.9
    assert list(head.classes_) == list(range(7))
    if family != "logistic":
        assert seen and seen[0] == (len(Xv), 7)
    if family == "mlp":  # a Keras head: the epoch's training loss with each report
        assert all(f["train_loss"] > 0 for f in train) and len(train) == len(seen)
    head.save(tmp_path / "h")
    assert not list((tmp_path / "h").glob("*.pkl"))
    again = load_head(family, tmp_path / "h")
    np.testing.assert_allclose(again.predict_proba(Xv), proba, atol=1e-6)
    # the explanation hook: the class scores Grad-CAM differentiates give the probabilities
    scores = again.differentiable_scores()
    if family == "logistic":
        np.testing.assert_allclose(softmax(Xv @ scores.weights + scores.bias), proba, atol=1e-6)
    elif family == "mlp":
        np.testing.assert_allclose(scores.model.predict(Xv, verbose=0), proba, atol=1e-5)
    else:
        assert scores is None  # trees: occlusion


@pytest.mark.parametrize("family", ["logistic", "xgboost", "mlp", "finetune"])
def test_unfitted_and_bad_input_errors(family):
    head = make_head(family, {})
    with pytest.raises(NotFittedError, match="not fitted yet"):
        head.predict_proba(np.zeros((2, 4), np.float32))
    if family != "finetune":
        X, y = blobs(5)
        with pytest.raises(HeadError, match=r"lack class\(es\) \[6\]"):
            head.fit(X[y < 6], y[y < 6], eval_set=(X, y))


def test_unknown_family():
    with pytest.raises(HeadError, match="Known families: logistic, xgboost, mlp, finetune"):
        make_head("svm", {})
    assert FAMILIES == ("logistic", "xgboost", "mlp", "finetune", "cached_cnn")


@pytest.mark.slow  # a Keras ResNet50 trained end to end (20 s); the search fixture's finetune trial covers the family: run with -m slow
def test_finetune_runs_on_tiny_images(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(7), 4)
    X = rng.integers(0, 255, (len(y), 32, 32, 3)).astype(np.uint8)
    head = make_head("finetune", {"backbone": "resnet50", "weights": "none", "image_size": 32,
                                  "epochs": 1, "batch_size": 8, "unfreeze_blocks": 1})
    head.fit(X, y)  # with eval_set (early stopping, progress) in the integration search
    proba = head.predict_proba(X)
    assert proba.shape == (len(y), 7)
    model = head.model_
    base = next(l for l in model.layers if l.name.startswith("resnet50"))
    trainable = {w.path.split("/")[0] for w in base.trainable_weights}
    assert trainable and all(name.startswith("conv5") for name in trainable)
    head.save(tmp_path / "f")
    np.testing.assert_allclose(load_head("finetune", tmp_path / "f").predict_proba(X), proba,
                               atol=1e-5)
    with pytest.raises(HeadError, match=r"images of shape \(N, 32, 32, 3\)"):
        head.predict_proba(np.zeros((2, 16, 16, 3)))


@pytest.mark.parametrize("family, params, message", [
    ("logistic", {"C": -1.0},
     "The 'C' parameter of LogisticHead must be a float in the range (0, inf). Got -1.0 instead."),
    ("logistic", {"class_weight": "auto"},
     "The 'class_weight' parameter of LogisticHead must be one of 'none', 'balanced'. Got "
     + "'auto' instead."),
    ("xgboost", {"subsample": 1.5},
     "The 'subsample' parameter of XGBoostHead must be a float in the range (0, 1]. Got 1.5 "
     + "instead."),
    ("xgboost", {"device": "tpu"}, "The 'device' parameter of XGBoostHead must be"),
    ("mlp", {"layers": 1.5},
     "The 'layers' parameter of MLPHead must be an int in the range [0, inf]. Got 1.5 instead."),
    ("finetune", {"backbone": "alexnet"},
     "The 'backbone' parameter of FinetuneHead must be one of 'vgg19', 'resnet50'. Got "
     + "'alexnet' instead."),
])
def test_parameters_are_stored_by_init_and_validated_by_fit(family, params, message):
    import re

    head = make_head(family, params)  # __init__ only stores
    assert head.get_params()[next(iter(params))] == next(iter(params.values()))
    X, y = blobs(5)
    with pytest.raises(HeadError, match=re.escape(message)):
        head.fit(X, y, eval_set=(X, y))


@pytest.mark.parametrize("family", ["logistic", "xgboost"])
def test_feature_count_checked_and_params_settable(family):
    from sklearn.base import clone

    X, y = blobs(10)
    head = make_head(family, PARAMS[family])
    assert head.set_params(**PARAMS[family]) is head
    assert clone(head).get_params() == head.get_params()
    head.fit(X, y, eval_set=(X, y))
    assert head.n_features_in_ == X.shape[1]
    with pytest.raises(HeadError, match=f"X has 8 features, but {type(head).__name__} is "
                                        "expecting 16 features as input"):
        head.predict_proba(X[:, :8])
