"""The cached fine-tune family (dermray/models/heads/cached.py) on tiny activation maps, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from dermray.models.heads import get_family
from dermray.models.heads.base import HeadError
from dermray.models.heads.cached import TOP_BLOCKS, CachedFinetuneHead


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


@pytest.fixture(scope="module")
def source_network():
    """The frozen ResNet50 the extraction builds (64 px; resnet50's pooled output and both cuts'
    maps from one pass), with seeded random weights and batch norms that are not the identity
    (random scales, shifts and statistics), so that a block copied without its batch norms'
    weights differs."""
    import keras

    from dermray.models.backbones import build_network

    keras.utils.set_random_seed(3)
    network = build_network(["resnet50", *sorted(TOP_BLOCKS)], None, 64)
    rng = np.random.default_rng(4)
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.2, shape),
                               rng.normal(0, 0.2, shape), rng.uniform(0.5, 2.0, shape)])
    return network


@pytest.mark.parametrize("cut", sorted(TOP_BLOCKS))
def test_the_copied_blocks_are_the_frozen_networks_own(cut, source_network, monkeypatch):
    """With dropout 0 the head's pooled features from a cut's map are the frozen network's own
    pooled conv5_block3_out for the same image: the copied blocks (conv5_block3 from
    resnet50_c5b2; all of stage 5, conv5_block1's projection shortcut and stride included, from
    resnet50_c4b6) reproduce the source's, weights, batch norm statistics and all. Only the
    blocks' convolutions and the classifier train."""
    import keras

    from dermray.models.backbones import get_spec, preprocess

    network, spec = source_network, get_spec(cut)
    images = np.random.default_rng(5).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    outputs = network(preprocess("resnet50", images), training=False)
    pooled = np.asarray(outputs[0])
    maps = np.asarray(outputs[1 + sorted(TOP_BLOCKS).index(cut)]).reshape(
        2, *spec.map_shape(64)).astype(np.float16)  # as the extraction caches them
    head = CachedFinetuneHead(cut=cut, weights="none", channels=spec.channels, dropout=0.0)
    # the blocks are copied from this network's layers (what _source_layers builds from the
    # weights file: the same network, without building it again)
    monkeypatch.setattr(head, "_source_layers", lambda: {l.name: l for l in network.layers})
    model = head._build(maps.shape[1:])
    gap = next(layer for layer in model.layers
               if isinstance(layer, keras.layers.GlobalAveragePooling2D))
    ours = np.asarray(keras.Model(model.input, gap.output)(maps, training=False))
    # the same (float16) map through the source network's own layers above the cut: equal
    top = keras.Model(network.get_layer(spec.layer).output,
                      network.get_layer("resnet50_avg").output)
    theirs = np.asarray(top(maps.astype(np.float32), training=False))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
    # and from the image: the network's pooled output, up to the cache's float16 rounding
    np.testing.assert_allclose(ours, pooled, rtol=0, atol=1e-2 * np.abs(pooled).max())
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    convs = {f"{block}_{i}_conv" for block in TOP_BLOCKS[cut] for i in (1, 2, 3)}
    if cut == "resnet50_c4b6":
        convs.add("conv5_block1_0_conv")  # the projection shortcut
    assert trainable == convs | {model.layers[-1].name}  # and the softmax; no batch norm


def test_the_deeper_cut_is_a_setting_of_the_family(tmp_path):
    """search.cached_cnn_features takes resnet50_c4b6: in the search's fingerprint, the maps
    the family reads, and the head's channels."""
    from dermray.config import build_section, output_settings

    cfg = build_section("search", {"cached_cnn_features": "resnet50_c4b6", "out": str(tmp_path)})
    spec = get_family("cached_cnn")
    assert output_settings(cfg)["cached_cnn_features"] == "resnet50_c4b6"
    assert spec.input_key(cfg) == ["resnet50_c4b6"]
    params = spec.head_params(spec.first_point(cfg), cfg)
    assert (params["cut"], params["channels"]) == ("resnet50_c4b6", 1024)


@pytest.mark.parametrize("meta", [0, 3])
def test_a_logistic_start_is_the_frozen_probe_before_any_step(meta):
    """head_init 'logistic' (linear probing, then fine-tuning): before the first step the head's
    probabilities are the standardised logistic regression's on the block's pooled features
    (and the metadata columns, where joined), its standardisation folded into the classifier.
    A hidden layer (width) has no such start and is refused by name."""
    import keras

    from dermray.models.heads.logistic import LogisticHead

    X, y = _separable(70)
    if meta:
        extra = np.random.default_rng(5).normal(0, 1, (len(X), meta)).astype(np.float16)
        X = np.concatenate([X.reshape(len(X), -1), extra], axis=1)
    head = CachedFinetuneHead(weights="none", head_init="logistic", init_C=0.01, meta=meta,
                              tta=False)
    inputs = head._inputs(X)
    keras.utils.set_random_seed(0)
    model = head._build(inputs.shape[1:])
    untouched = model.get_layer("classifier").get_weights()[0].copy()
    head._initialise(model, inputs, y)
    assert not np.allclose(model.get_layer("classifier").get_weights()[0], untouched)
    pooled = np.asarray(keras.Model(model.input, model.get_layer("classifier").input)
                        .predict(inputs, verbose=0), np.float64)
    assert pooled.shape == (len(X), 2048 + meta)
    probe = LogisticHead(C=0.01).fit(pooled, y)
    np.testing.assert_allclose(model.predict(inputs, verbose=0), probe.predict_proba(pooled),
                               atol=1e-5)
    # the random start is Keras' draw, untouched
    plain = CachedFinetuneHead(weights="none", meta=meta, tta=False)
    keras.utils.set_random_seed(0)
    model = plain._build(inputs.shape[1:])
    plain._initialise(model, inputs, y)
    np.testing.assert_array_equal(model.get_layer("classifier").get_weights()[0], untouched)
    with pytest.raises(HeadError, match="head_init 'logistic'.*width 0"):
        CachedFinetuneHead(weights="none", head_init="logistic", width=8, meta=meta,
                           epochs=1).fit(X, y)


def test_the_logistic_start_is_a_search_setting(tmp_path):
    """search.cached_cnn_head_init: in the search's fingerprint, handed to every trial's head,
    and with 'logistic' the searched width keeps to 0 (no hidden layer to start)."""
    import optuna

    from dermray.config import build_section, output_settings

    spec = get_family("cached_cnn")
    for init, widths in (("random", {0, 256}), ("logistic", {0})):
        cfg = build_section("search", {"cached_cnn_head_init": init, "out": str(tmp_path)})
        assert output_settings(cfg)["cached_cnn_head_init"] == init
        assert spec.head_params(spec.first_point(cfg), cfg)["head_init"] == init
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        seen = set()
        for _ in range(12):
            trial = study.ask()
            spec.space(trial, cfg)
            seen.add(trial.params["cached_cnn_width"])
        assert seen == widths
    from dermray.errors import ConfigError

    with pytest.raises(ConfigError, match="cached_cnn_head_init"):
        build_section("search", {"cached_cnn_head_init": "zeros", "out": str(tmp_path)})
