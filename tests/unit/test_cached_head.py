"""The cached fine-tune family (dermray/models/heads/cached.py) on tiny activation maps, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from dermray.models.heads import get_family
from dermray.models.heads.base import HeadError
from dermray.models.heads.cached import CachedFinetuneHead


def _separable(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2x2x2048 float16 maps (a 64-px ResNet50 cut) whose class moves their mean."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 7
    centers = np.random.default_rng(99).normal(0, 1, (7, 2048))
    X = np.maximum(0, centers[y][:, None, None, :] + rng.normal(0, 1, (n, 2, 2, 2048)))
    return X.astype(np.float16), y


def test_beats_chance_round_trips_and_averages_flips(tmp_path):
    X, y = _separable(140)
    Xv, yv = _separable(70, seed=1)
    reported = []
    head = CachedFinetuneHead(weights="none", epochs=2, learning_rate=1e-3, batch_size=35)
    head.fit(X, y, eval_set=(Xv, yv), progress=lambda epoch, p, **train: reported.append((p, train)))
    proba = head.predict_proba(Xv)
    assert proba.shape == (70, 7) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert (proba.argmax(axis=1) == yv).mean() > 0.5  # chance: 1/7
    assert len(reported) == 2 and reported[-1][0].shape == (70, 7)  # one report per epoch
    # with the epoch's training loss (TensorBoard's training curve)
    assert all(np.isfinite(train["train_loss"]) and train["train_loss"] > 0
               for _, train in reported)
    # one validation pass per epoch: what the stopping rule watched (Keras' history) is the
    # accuracy of the very probabilities reported, the four flips' mean (no second pass of
    # Keras' own without them)
    history = head.model_.history.history
    assert "val_accuracy" in history and len(history["val_accuracy"]) == 2
    for (p, _), watched in zip(reported, history["val_accuracy"], strict=True):
        assert watched == (p.argmax(axis=1) == yv).mean()
    head.save(tmp_path)
    loaded = CachedFinetuneHead.load(tmp_path)
    assert loaded.tta and loaded.n_features_in_ == 8192
    np.testing.assert_allclose(loaded.predict_proba(Xv), proba, atol=1e-6)
    # the bundle's extractor gives flattened float32 rows: the same probabilities
    flat = Xv.reshape(70, -1).astype(np.float32)
    np.testing.assert_allclose(loaded.predict_proba(flat), proba, atol=1e-6)
    # test-time augmentation: the mean of the four flips' probabilities
    loaded.tta = False
    flips = [Xv, Xv[:, :, ::-1], Xv[:, ::-1], Xv[:, ::-1, ::-1]]
    np.testing.assert_allclose(np.mean([loaded.predict_proba(f) for f in flips], axis=0), proba,
                               atol=1e-6)


def test_bad_maps_and_params_are_clear_errors():
    X, y = _separable(14)
    with pytest.raises(HeadError, match="square maps of 2048 channels"):
        CachedFinetuneHead(weights="none").fit(np.zeros((14, 3000), np.float16), y)
    with pytest.raises(HeadError, match="'cut' parameter"):
        CachedFinetuneHead(cut="vgg19", weights="none").fit(X, y)
    spec = get_family("cached_cnn")
    assert spec.input == "activations" and spec.iterative


def test_the_stopping_rule_restores_the_best_accuracy_epoch():
    """cached_cnn stops on validation accuracy (not loss), with patience 3, and ends with the
    weights of its best-accuracy epoch: here epoch 2 of 6, although the loss was lowest at 1."""
    import keras

    head = CachedFinetuneHead(patience=3)
    stop = head.early_stopping()
    assert (stop.monitor, stop.patience, stop.restore_best_weights) == ("val_accuracy", 3, True)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    stop.set_model(model)
    model.stop_training = False  # what fit() sets before the first epoch
    stop.on_train_begin()
    history = [(0.60, 0.9), (0.70, 1.0), (0.80, 1.2), (0.70, 1.3), (0.75, 1.4), (0.79, 1.5)]
    for epoch, (accuracy, loss) in enumerate(history):
        model.layers[0].kernel.assign(np.full((2, 1), float(epoch), np.float32))
        stop.on_epoch_end(epoch, {"val_accuracy": accuracy, "val_loss": loss})
        if model.stop_training:
            break
    stop.on_train_end()
    assert model.stop_training and epoch == 5  # three epochs without a better accuracy
    assert float(model.layers[0].kernel.numpy()[0, 0]) == 2.0  # epoch 2's weights (0-based)
