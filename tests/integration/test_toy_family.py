"""A head family registered in this test alone (nearest centroid) goes through the search, the
selection, the bundle export and predict end to end: the registry is the only place a family
has to be known. Its own config key (``centroid_max_temperature``) is declared here too, and the
search config accepts, converts, checks and fingerprints it with no edit elsewhere (checked
without Ray)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest

from dermray.errors import ConfigError
from dermray.io.fingerprint import OUTPUT
from dermray.models.heads import FAMILY_SPECS, HeadError
from dermray.models.heads.base import N_CLASSES, Head, Rule, real, softmax
from dermray.models.heads.registry import FamilySpec, Setting, register_family, unregister_family


class NearestCentroidHead(Head):
    """Softmax over minus the squared distances to the class means (scaled by ``temperature``)."""

    family = "centroid"
    rules: ClassVar[dict[str, Rule]] = {"temperature": real(0, None, low_open=True)}

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def fit(self, X, y, eval_set=None, progress=None) -> NearestCentroidHead:
        self._check_params()
        self._check_xy(X, y)
        X = np.asarray(X, dtype=np.float64)
        self.centroids_ = np.stack([X[y == c].mean(axis=0) for c in range(N_CLASSES)])
        self.scale_ = float(X.var(axis=0).sum()) or 1.0
        self._set_fitted(X)
        return self

    def predict_proba(self, X) -> np.ndarray:
        self._check_fitted()
        self._check_xy(np.asarray(X), where="predict_proba")
        self._check_n_features(X)
        X = np.asarray(X, dtype=np.float64)
        dist = ((X[:, None, :] - self.centroids_[None]) ** 2).sum(axis=2) / self.scale_
        return softmax(-dist / self.temperature)

    def save(self, directory: Path) -> None:
        self._check_fitted()
        self._write_params(Path(directory))
        np.savez(Path(directory) / "centroids.npz", centroids=self.centroids_,
                 scale=self.scale_)

    @classmethod
    def load(cls, directory: Path) -> NearestCentroidHead:
        head = cls(**cls._read_params(directory))
        with np.load(Path(directory) / "centroids.npz", allow_pickle=False) as arrays:
            head.centroids_, head.scale_ = arrays["centroids"], float(arrays["scale"])
        head.classes_ = np.arange(N_CLASSES)
        head.n_features_in_ = int(head.centroids_.shape[1])
        return head


# the family's own key: search.centroid_max_temperature, the top of the searched range
MAX_TEMPERATURE = Setting("centroid_max_temperature", 5.0, float, OUTPUT,
                          real(0.05, None, low_open=True), "the largest temperature searched")


def _space(trial: Any, cfg: Any) -> None:
    trial.suggest_float("centroid_temperature", 0.05, MAX_TEMPERATURE.read(cfg), log=True)


def _first_point(cfg: Any) -> dict[str, Any]:
    return {"centroid_temperature": 1.0}


SPEC = FamilySpec("centroid", NearestCentroidHead, space=_space, first_point=_first_point,
                  settings=(MAX_TEMPERATURE,))


@pytest.fixture
def centroid_registered():
    """The family registered (no Ray): its key is a search key while it is."""
    register_family(SPEC)
    yield "centroid"
    unregister_family("centroid")


@pytest.fixture
def centroid_family(centroid_registered):
    import ray.cloudpickle

    # the trials run in Ray workers, which cannot import this test module: ship it by value
    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)
    yield centroid_registered
    ray.cloudpickle.unregister_pickle_by_value(module)


def test_the_family_s_own_key_is_a_search_key_while_it_is_registered(centroid_registered,
                                                                      tmp_path):
    import optuna

    from dermray.config import build_section, config_to_dict, load_section, output_settings
    from dermray.stages.search import define_space

    path = tmp_path / "c.yaml"
    path.write_text("search:\n  families: [centroid]\n  centroid_max_temperature: '0.5'\n")
    cfg = load_section("search", path)
    assert MAX_TEMPERATURE.read(cfg) == 0.5  # converted to its declared type
    trial = optuna.create_study().ask()
    define_space(trial, cfg)
    assert 0.05 <= trial.params["centroid_temperature"] <= 0.5  # the spec reads it
    # declared 'output': in the search's fingerprint, so a change refuses the old experiment
    assert output_settings(cfg)["centroid_max_temperature"] == 0.5
    assert config_to_dict(cfg)["centroid_max_temperature"] == 0.5
    assert MAX_TEMPERATURE.read(build_section("search", {})) == 5.0  # its default
    with pytest.raises(ConfigError, match=r"search.centroid_max_temperature must be a float in "
                                          r"the range \(0.05, inf\). Got 0.01 instead."):
        build_section("search", {"centroid_max_temperature": 0.01})
    with pytest.raises(ConfigError, match="search.centroid_max_temperature must be a number"):
        build_section("search", {"centroid_max_temperature": "hot"})
    with pytest.raises(ConfigError, match=r"centroid_max_temperatur \(did you mean "
                                          r"centroid_max_temperature\?\)"):
        build_section("search", {"centroid_max_temperatur": 1.0})


def test_the_family_s_key_is_unknown_once_it_is_gone():
    from dermray.config import build_section

    with pytest.raises(ConfigError, match="Unknown key.*: centroid_max_temperature"):
        build_section("search", {"centroid_max_temperature": 1.0})
    register_family(SPEC)
    try:  # the keys are flat: a second family may not declare the same one
        with pytest.raises(HeadError, match="already declared by family 'centroid'"):
            register_family(FamilySpec("copy", NearestCentroidHead, space=_space,
                                       first_point=_first_point, settings=(MAX_TEMPERATURE,)))
    finally:
        unregister_family("centroid")
    assert "copy" not in FAMILY_SPECS


def test_a_family_registered_here_is_searched_selected_exported_and_predicts(
        extracted, centroid_family, tmp_path):
    from dermray.config import build_section
    from dermray.models.bundle import load_bundle
    from dermray.models.features import embedding_features
    from dermray.models.predict_io import predict_files
    from dermray.report.evaluate import metrics
    from dermray.stages.search import run_search
    from dermray.stages.select import finish

    out, *_ = extracted
    manifest_path = str(out / "manifest.parquet")
    results_dir = tmp_path / "results"
    cfg = build_section("search", {
        "out": str(out), "families": [centroid_family], "features": ["resnet50"],
        "num_samples": 3, "max_concurrent": 2, "storage_path": str(tmp_path / "tune"),
        "experiment": "toy"})
    summary = finish(run_search(cfg, manifest_path, resume=False), cfg, manifest_path,
                     str(results_dir))

    trials = pd.read_csv(results_dir / "trials.csv")
    assert len(trials) == 3 and set(trials["family"]) == {"centroid"}
    assert (trials["status"] == "done").all() and trials["completed"].all()
    params = [json.loads(p) for p in trials["params"]]
    assert all(set(p) == {"centroid_temperature"} for p in params)
    assert {"centroid"} == set(summary["best_per_family"])
    reported = json.loads((results_dir / "metrics.json").read_text())
    assert reported["family"] == "centroid" and reported["features"] == "resnet50"

    bundle = load_bundle(results_dir / "model")
    assert bundle.spec.family == "centroid"
    assert isinstance(bundle.head, NearestCentroidHead)
    X, y, frame = embedding_features(out, "resnet50", "test")
    recomputed = metrics(y, bundle.head.predict_proba(X))
    assert recomputed["accuracy"] == pytest.approx(reported["test"]["accuracy"], abs=1e-12)
    # from the image files, through decode + embed, as `dermray predict` does
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("image_id")
    paths = [Path(manifest.loc[i, "path"]) for i in frame["image_id"][:8]]
    preds, problems = predict_files(bundle, paths)
    assert problems == [] and len(preds) == len(paths)
    got = preds[[f"p_{c}" for c in bundle.labels]].to_numpy()
    np.testing.assert_allclose(got, bundle.head.predict_proba(X[:8]), atol=2e-3)
