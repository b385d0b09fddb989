"""Patient metadata in the cached fine-tune (issue 18 item 3): joined after pooling, the head
taking one array (rows of the flattened map, then the metadata columns), from the search's inputs
to an exported bundle that `dermray predict` and `dermray explain` run. No Ray: tiny maps."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dermray.config import build_section, output_settings
from dermray.data.synth import render_lesion
from dermray.domain import CLASSES
from dermray.errors import ConfigError
from dermray.models.backbones import FrozenExtractor
from dermray.models.embeddings import backbone_dir, to_table
from dermray.models.features import (
    LOCALIZATIONS,
    N_METADATA,
    activation_features,
    metadata_matrix,
    parse_features,
)
from dermray.models.heads import get_family
from dermray.models.heads.base import HeadError
from dermray.models.heads.cached import CachedFinetuneHead

MAP = "resnet50_c5b2"


def _patients(y: np.ndarray, seed: int) -> pd.DataFrame:
    """Metadata whose localization names the class (age and sex are noise)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.choice([np.nan, 30.0, 45.0, 60.0, 85.0], len(y)),
                         "sex": rng.choice(["male", "female", "unknown"], len(y)),
                         "localization": [LOCALIZATIONS[i] for i in y]})


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """2x2x2048 noise maps that say nothing of the class, flattened, then the metadata."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    maps = np.abs(rng.normal(0, 0.01, (n, 2 * 2 * 2048)))
    frame = _patients(y, seed)
    return np.concatenate([maps, metadata_matrix(frame)], axis=1).astype(np.float16), y, frame


def test_the_metadata_joins_after_pooling():
    """The model (not trained): the metadata channels skip the block and join the pooled map
    before the dropout and the classifier, so metadata alone moves the probabilities."""
    import keras

    head = CachedFinetuneHead(weights="none", meta=N_METADATA)
    model = head._build((2, 2, 2048 + N_METADATA))
    joined = model.get_layer("with_metadata")
    pooled, meta = joined.input
    assert tuple(pooled.shape) == (None, 2048) and tuple(meta.shape) == (None, N_METADATA)
    assert isinstance(pooled._keras_history.operation, keras.layers.GlobalAveragePooling2D)
    after = [layer for layer in model.layers if layer.input is joined.output]
    assert [type(layer).__name__ for layer in after] == ["Dropout"]
    X, _, frame = _rows(7, 0)
    other = X.copy()
    other[:, 8192:] = metadata_matrix(frame.assign(localization="unknown", sex="unknown"))
    first, second = (np.asarray(model(head._inputs(rows), training=False)) for rows in (X, other))
    assert np.abs(first - second).max() > 1e-4


@pytest.mark.slow  # one fit (~6 s here: the block's weights, compiling the train step)
def test_a_label_only_the_metadata_knows_is_learned_and_round_trips(tmp_path):
    X, y, _ = _rows(140, 0)
    Xv, yv, frame_v = _rows(70, 1)
    head = CachedFinetuneHead(weights="none", meta=N_METADATA, epochs=3, learning_rate=1e-2,
                              dropout=0.0, batch_size=14)
    proba = head.fit(X, y).predict_proba(Xv)
    assert head.n_features_in_ == 8192 + N_METADATA
    # the maps are noise: only the metadata (joined after pooling) can tell the classes apart
    assert (proba.argmax(axis=1) == yv).mean() >= 0.9
    # the same maps with other patients' metadata: the decision follows the metadata
    shifted = (yv + 3) % len(CLASSES)
    moved = Xv.copy()
    moved[:, 8192:] = metadata_matrix(frame_v.assign(
        localization=[LOCALIZATIONS[i] for i in shifted]))
    assert (head.predict_proba(moved).argmax(axis=1) == shifted).mean() >= 0.9
    head.save(tmp_path)
    loaded = CachedFinetuneHead.load(tmp_path)
    assert loaded.meta == N_METADATA and loaded.n_features_in_ == 8192 + N_METADATA
    np.testing.assert_allclose(loaded.predict_proba(Xv), proba, atol=1e-6)
    # float32 rows (as a bundle's extractor gives them): the head reads float16, as trained
    np.testing.assert_allclose(loaded.predict_proba(Xv.astype(np.float32)), proba, atol=1e-6)
    with pytest.raises(HeadError, match=f"expecting {8192 + N_METADATA} features"):
        loaded.predict_proba(np.zeros((2, 4 * 4 * 2048 + N_METADATA), np.float16))


def test_rows_without_their_metadata_are_a_clear_error():
    y = np.arange(14) % 7
    maps = np.zeros((14, 2, 2, 2048), np.float16)
    head = CachedFinetuneHead(weights="none", meta=N_METADATA)
    with pytest.raises(HeadError, match=f"with {N_METADATA} metadata columns takes rows"):
        head.fit(maps, y)  # maps alone: where is the metadata?
    with pytest.raises(HeadError, match="a flattened square map of 2048 channels"):
        head.fit(maps.reshape(14, -1), y)  # rows with no metadata columns
    with pytest.raises(HeadError, match="'meta' parameter"):
        CachedFinetuneHead(weights="none", meta=-1).fit(maps, y)


@pytest.mark.parametrize("options, inputs", [
    ([False], [MAP]), ([True], [f"{MAP}+meta"]), ([False, True], [MAP, f"{MAP}+meta"])])
def test_the_option_is_configured_or_searched_and_fingerprinted(options, inputs):
    from dermray.stages.search import define_space, first_points

    cfg = build_section("search", {"families": ["cached_cnn"], "cached_cnn_meta": options})
    spec = get_family("cached_cnn")
    assert spec.input_key(cfg) == inputs
    assert output_settings(cfg)["cached_cnn_meta"] == options  # in the search's fingerprint
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        constants = define_space(trial, cfg)
        assert ("cached_cnn_meta" in trial.params) == (len(options) > 1)
        meta = trial.params.get("cached_cnn_meta", options[0])
        assert constants["features"] == (f"{MAP}+meta" if meta else MAP)
        params = spec.head_params({**trial.params, **constants}, cfg)
        assert params["meta"] == (N_METADATA if meta else 0)
        assert parse_features(constants["features"], maps=True) == ([MAP], meta)
    (point,) = first_points(cfg)
    assert point["features"] == inputs[0]
    assert spec.head_params(point, cfg)["meta"] == (N_METADATA if options[0] else 0)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="search.cached_cnn_meta must be a non-empty list"):
        build_section("search", {"cached_cnn_meta": [True, True]})
    with pytest.raises(ConfigError, match="search.cached_cnn_meta must be a list"):
        build_section("search", {"cached_cnn_meta": True})
    with pytest.raises(ConfigError, match="is an activation map"):  # not an embedding feature
        build_section("search", {"features": [f"{MAP}+meta"]})
    with pytest.raises(ConfigError, match="resnet50_c5b2 is an activation map"):
        parse_features(f"{MAP}+resnet50", maps=True)  # a map joins metadata, not a backbone


def test_the_search_reads_rows_of_the_map_then_the_metadata(tmp_path):
    """activation_features (the search's, the selection's and the test scoring's reader)."""
    rng = np.random.default_rng(0)
    n = 6
    rows = pd.DataFrame({"image_id": [f"ISIC_{i}" for i in range(n)], "lesion_id": "L",
                         "dx": "nv", "label": 5, "split": "val", "aug_index": 0,
                         "age": [np.nan, 40, 55, 70, 20, 35.0], "sex": ["male", "female"] * 3,
                         "localization": ["back", "face", "trunk"] * 2})
    maps = rng.normal(0, 1, (n, 2 * 2 * 2048)).astype(np.float16)
    folder = tmp_path / backbone_dir("out", MAP)
    folder.mkdir(parents=True)
    pq.write_table(to_table(rows, maps, MAP), folder / "part-0.parquet")
    X, y, frame = activation_features(tmp_path / "out", MAP, "val")
    assert X.shape == (n, 2, 2, 2048) and X.dtype == np.float16
    Xm, ym, frame_m = activation_features(tmp_path / "out", f"{MAP}+meta", "val")
    assert Xm.shape == (n, 8192 + N_METADATA) and Xm.dtype == np.float16
    np.testing.assert_array_equal(Xm[:, :8192], X.reshape(n, -1))
    np.testing.assert_array_equal(Xm[:, 8192:], metadata_matrix(frame).astype(np.float16))
    assert list(frame_m["image_id"]) == list(frame["image_id"]) and list(ym) == list(y)


SIZE = 64  # a 2x2x2048 map at the cut


@pytest.mark.slow  # three tiny ResNet50s (extract, the head's block, the bundle), a fit (~15 s)
def test_a_bundle_with_metadata_predicts_and_explains_as_trained(tmp_path):
    """Exported as the search exports its winner: from image files `dermray predict` gives the
    probabilities the head gives on the extracted rows with the patients' metadata (and the
    'unknown' encoding without it); `dermray explain` runs by occlusion."""
    from dermray.models.bundle import load_bundle
    from dermray.models.predict_io import predict_files
    from dermray.report.evaluate import metrics
    from dermray.report.explain import Explainer
    from dermray.stages.extract import weights_record
    from dermray.stages.select import export_bundle

    images = tmp_path / "images"
    images.mkdir()
    y = np.arange(14) % len(CLASSES)
    arrays = [np.asarray(render_lesion(CLASSES[c], i, i + 1, (SIZE, SIZE))) for i, c in
              enumerate(y)]
    ids = [f"ISIC_{i:02d}" for i in range(len(y))]
    for name, array in zip(ids, arrays, strict=True):
        Image.fromarray(array).save(images / f"{name}.png")
    maps = FrozenExtractor([MAP], {MAP: "none"}, SIZE, batch_size=16,
                           jit_compile=False).embed(MAP, np.stack(arrays))
    patients = _patients(y, 0).assign(image_id=ids)
    X = np.concatenate([maps, metadata_matrix(patients)], axis=1).astype(np.float16)
    head = CachedFinetuneHead(weights="none", meta=N_METADATA, epochs=2, learning_rate=3e-3,
                              batch_size=7).fit(X, y)
    proba = head.predict_proba(X)
    record = {"config": {"image_size": SIZE, "tta_views": 0, "seed": 0},
              **weights_record({MAP: "none"})}
    row = pd.Series({"family": "cached_cnn", "features": f"{MAP}+meta", "trial_id": "t0",
                     "params": json.dumps({"cached_cnn_meta": True})})
    scored = metrics(y, proba)
    export_bundle(head, row, build_section("search", {"families": ["cached_cnn"]}), record,
                  {"val": scored, "test": scored}, str(tmp_path / "out"))
    bundle = load_bundle(tmp_path / "out" / "model", warn_random=False)
    assert bundle.uses_metadata and bundle.spec.features == f"{MAP}+meta"
    paths = [images / f"{name}.png" for name in ids]
    preds, problems = predict_files(bundle, paths, metadata=patients.set_index("image_id"))
    assert problems == []
    got = preds.set_index("image_id").loc[ids, [f"p_{c}" for c in bundle.labels]].to_numpy()
    np.testing.assert_allclose(got, proba, atol=2e-3)
    # no metadata given: the 'unknown' encoding, as for the embedding heads' +meta
    unknown = pd.DataFrame({"age": [np.nan] * len(y), "sex": "unknown",
                            "localization": "unknown"})
    plain, _ = predict_files(bundle, paths)
    expected = head.predict_proba(np.concatenate([maps, metadata_matrix(unknown)], axis=1))
    got = plain.set_index("image_id").loc[ids, [f"p_{c}" for c in bundle.labels]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)
    explained = Explainer(bundle).explain(arrays[0])
    assert explained.method == "occlusion" and explained.heat.shape == (SIZE, SIZE)
