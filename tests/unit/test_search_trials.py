"""What a search trial is given and how a search ends when Ray kills a trial (no Ray here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermray.models.heads import get_family


def test_a_trial_finds_the_extraction_weights_from_a_relative_out(tmp_path, monkeypatch):
    """`dermray run --out out/ham10000` gives a relative OUT, and each Tune trial runs in its
    own folder: the trial's config names OUT absolutely, so the cached fine-tune starts from the
    extraction's weights file (OUT/extract_run.json), not from Keras' download."""
    import json

    from dermray.config import build_section
    from dermray.stages.search import head_params, trial_config

    weights = tmp_path / "w.h5"
    weights.write_bytes(b"not read here")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "extract_run.json").write_text(json.dumps(
        {"cwd": str(tmp_path), "config": {"weights": {"resnet50_c5b2": "w.h5"}}}))
    monkeypatch.chdir(tmp_path)
    cfg = trial_config(build_section("search", {"out": "out", "families": ["cached_cnn"]}))
    monkeypatch.chdir(tmp_path / "out")  # a trial's own folder: "out" names nothing here
    point = get_family("cached_cnn").first_point(cfg)
    assert head_params({"family": "cached_cnn", **point}, cfg)["weights"] == str(weights)


def test_a_trial_killed_for_memory_ends_the_search_with_one_message(monkeypatch):
    """Ray's memory monitor killing a trial's actor makes Tune give up with a RuntimeError: the
    search turns it into one message (finished trials kept, a rerun resumes, what to lower)."""
    from dermray.errors import DermrayError
    from dermray.stages import search

    class Tuner:
        def fit(self):
            raise RuntimeError("Caught unexpected exception: 1 worker(s) were killed due to the "
                               "node running low on memory. Memory on the node was 22.69GB used")

    for name, value in {"claim": lambda *a, **k: None, "search_fingerprint": lambda *a: {},
                        "ensure_ray": lambda: None, "check_trial_resources": lambda cfg: None,
                        "load_search_data": lambda cfg, m: {},
                        "build_tuner": lambda cfg, data, resume: Tuner()}.items():
        monkeypatch.setattr(search, name, value)
    from dermray.config import build_section

    cfg = build_section("search", {"out": "/nonexistent/out", "families": ["logistic"]})
    with pytest.raises(DermrayError, match="ran low on memory.*rerunning the same command "
                                           "resumes.*max_concurrent"):
        search.run_search(cfg, "/nonexistent/out/manifest.parquet")


def test_a_stopped_trial_reports_and_keeps_its_best_iteration(tmp_path, monkeypatch):
    """ASHA compares a trial's latest report and may stop it there. A head that restores its
    best epoch (the Keras heads) passes a snapshot with each new best: the trial's val_* stay
    that best's figures (this epoch's own are epoch_val_*) and the newest checkpoint is its
    weights, so a stopped trial is compared and scored as the model it would hand over."""
    import json
    import shutil
    import types

    import numpy as np
    from ray import tune

    from dermray.config import build_section
    from dermray.stages import search

    y_val = np.arange(10) % 7

    def proba(correct: int) -> np.ndarray:  # the first `correct` rows right, the rest wrong
        p = np.full((10, 7), 0.01)
        p[np.arange(10), np.where(np.arange(10) < correct, y_val, (y_val + 1) % 7)] = 0.94
        return p

    class Head:
        def __init__(self, **params):
            self.weights = None

        def fit(self, X, y, eval_set=None, progress=None):
            for epoch, (correct, best) in enumerate([(5, True), (8, True), (6, False)], 1):
                self.weights = correct
                snapshot = (lambda d, c=correct: (d / "w.json").write_text(json.dumps(c))
                            ) if best else None
                progress(epoch, proba(correct), train_loss=1.0 / epoch, snapshot=snapshot)
            self.weights = 8  # the stopping rule restores the best epoch
            return self

        def predict_proba(self, X):
            return proba(self.weights)

        def save(self, d):
            (d / "w.json").write_text(json.dumps(self.weights))

    spec = types.SimpleNamespace(name="fake", iterative=True, head_class=Head,
                                 features_of=lambda config: "emb",
                                 head_params=lambda config, cfg, has_gpu=False: {})
    reports = []

    def report(metrics, checkpoint=None):
        kept = None
        if checkpoint is not None:
            kept = tmp_path / f"checkpoint{len(reports)}"
            shutil.copytree(checkpoint.path, kept)
        reports.append((metrics, kept))

    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr("ray.get_gpu_ids", list)
    cfg = build_section("search", {"out": str(tmp_path), "families": ["logistic"]})
    X = np.zeros((10, 3))
    search.train_head({"family": "fake"}, {"emb": (X, y_val, X, y_val)}, cfg, {"fake": spec})

    accuracy = [m["val_accuracy"] for m, _ in reports]
    assert accuracy == [0.5, 0.8, 0.8, 0.8]  # epoch 3 (0.6) is not what the trial delivers
    assert [m["epoch_val_accuracy"] for m, _ in reports[:3]] == [0.5, 0.8, 0.6]
    assert reports[2][0]["train_loss"] == pytest.approx(1 / 3)
    kept = [json.loads((c / "w.json").read_text()) if c else None for _, c in reports]
    assert kept == [5, 8, None, 8]  # a trial stopped after epoch 3 still has epoch 2's weights
    assert reports[-1][0]["final"] is True


@pytest.mark.parametrize("stop_on", ["val_loss", "val_accuracy"])
def test_a_keras_head_snapshots_exactly_its_best_epochs(tmp_path, stop_on):
    """The snapshot comes with the epochs the stopping rule counts as a new best (for the MLP
    the validation loss strictly lower, or the validation accuracy strictly higher), and the
    last snapshot is the model the head ends with: the best epoch by that rule."""
    import numpy as np

    from dermray.models.heads import load_head, make_head
    from dermray.models.heads.keras_base import epoch_scores

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1.2, (7, 16))
    y = np.repeat(np.arange(7), 20)
    X = (centers[y] + rng.normal(0, 1, (140, 16))).astype(np.float32)
    yv = np.repeat(np.arange(7), 6)
    Xv = (centers[yv] + rng.normal(0, 1.6, (42, 16))).astype(np.float32)
    head = make_head("mlp", {"epochs": 10, "width": 64, "patience": 10, "learning_rate": 0.05,
                             "stop_on": stop_on})
    seen = []

    def progress(epoch, proba, train_loss=None, snapshot=None):
        folder = None
        if snapshot is not None:
            folder = tmp_path / f"e{epoch}"
            folder.mkdir()
            snapshot(folder)
        seen.append((epoch_scores(yv, proba)[stop_on], folder))

    head.fit(X, y, eval_set=(Xv, yv), progress=progress)
    sign = -1 if stop_on == "val_loss" else 1
    scores = [sign * score for score, _ in seen]  # higher is better
    best_so_far = [i == 0 or s > max(scores[:i]) for i, s in enumerate(scores)]
    assert [folder is not None for _, folder in seen] == best_so_far
    assert not all(best_so_far)  # the learning rate is high enough for a worse epoch
    last = [folder for _, folder in seen if folder is not None][-1]
    np.testing.assert_allclose(load_head("mlp", last).predict_proba(Xv), head.predict_proba(Xv),
                               atol=1e-6)
    # the head ends with the best epoch by its rule (the weights restored)
    final = sign * epoch_scores(yv, head.predict_proba(Xv))[stop_on]
    assert final == pytest.approx(max(scores), abs=1e-9)


def test_the_mlp_family_stops_on_the_configured_quantity(tmp_path):
    """`search.mlp_stop_on` (default val_accuracy) reaches the MLP's early stopping and is part
    of the search's fingerprint (it changes the model a trial hands over); a bundle saved before
    the parameter existed loads with the validation loss, what it was trained with."""
    from dermray.config import build_section, output_settings
    from dermray.errors import ConfigError
    from dermray.models.heads import make_head
    from dermray.models.heads.registry import get_family

    cfg = build_section("search", {"out": "/o", "families": ["mlp"]})
    fixed = get_family("mlp").fixed_params(cfg, {})
    assert fixed["stop_on"] == "val_accuracy"
    head = make_head("mlp", fixed)
    stopper = head.early_stopping()
    assert (stopper.monitor, stopper.mode) == ("val_accuracy", "max")
    by_loss = build_section("search", {"out": "/o", "families": ["mlp"], "mlp_stop_on": "val_loss"})
    assert output_settings(by_loss) != output_settings(cfg)
    assert make_head("mlp", {}).early_stopping().monitor == "val_loss"
    # a head saved before the parameter existed: its params.json has no stop_on
    import json

    import numpy as np

    from dermray.models.heads import load_head

    X = np.random.default_rng(0).normal(size=(14, 4)).astype(np.float32)
    make_head("mlp", {"epochs": 1, "width": 8, "stop_on": "val_accuracy"}).fit(
        X, np.arange(14) % 7).save(tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    assert params.pop("stop_on") == "val_accuracy"
    (tmp_path / "params.json").write_text(json.dumps(params))
    old = load_head("mlp", tmp_path)
    assert old.stop_on == "val_loss" and old.early_stopping().mode == "min"
    with pytest.raises(ConfigError, match="mlp_stop_on"):
        build_section("search", {"out": "/o", "families": ["mlp"], "mlp_stop_on": "accuracy"})


def test_cached_trials_reserve_the_memory_the_config_gives():
    """`cached_cnn_memory_gb` becomes Ray's `memory` resource of each cached_cnn trial (bytes),
    named in the resource check's message where no node could hold it; it is not part of the
    search's fingerprint (where a trial runs, not what it computes)."""
    from dermray.config import build_section, output_settings
    from dermray.stages.search import trial_requests

    cfg = build_section("search", {"out": "/o", "families": ["cached_cnn", "logistic"],
                                   "cached_cnn_memory_gb": 9})
    (what, resources, fix), (_, logistic, _) = trial_requests(cfg, cluster_has_gpus=False)
    assert resources == {"CPU": 1.0, "GPU": 0.0, "memory": 9e9}
    assert "search.cached_cnn_memory_gb: 9.0" in what and "search.cached_cnn_memory_gb" in fix
    assert "memory" not in logistic
    default = build_section("search", {"out": "/o", "families": ["cached_cnn", "logistic"]})
    assert "memory" not in trial_requests(default, cluster_has_gpus=False)[0][1]
    assert output_settings(cfg) == output_settings(default)


def test_a_restarted_trial_ends_with_its_checkpointed_best(tmp_path, monkeypatch):
    """Tune restarts a trial whose worker died from its newest checkpoint (its best epoch so far):
    the trial does not train again from epoch 1 under Tune's next iteration numbers (two
    trainings mixed in one trial, the kept best replaced by a worse one); it ends with that
    epoch's model, scored and checkpointed as its final report."""
    import json
    import types

    import numpy as np
    from ray import tune

    from dermray.config import build_section
    from dermray.stages import search

    y_val = np.arange(10) % 7

    class Head:
        def __init__(self, **params):
            self.correct = None

        def fit(self, *a, **k):
            raise AssertionError("a restarted trial with a checkpoint must not train again")

        @classmethod
        def load(cls, directory):
            head = cls()
            head.correct = json.loads((directory / "w.json").read_text())
            return head

        def predict_proba(self, X):
            p = np.full((10, 7), 0.01)
            right = np.arange(10) < self.correct
            p[np.arange(10), np.where(right, y_val, (y_val + 1) % 7)] = 0.94
            return p

        def save(self, d):
            (d / "w.json").write_text(json.dumps(self.correct))

    best = tmp_path / "best"
    best.mkdir()
    (best / "w.json").write_text("8")
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(best))
    reports = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(
        (metrics, json.loads((Path(checkpoint.path) / "w.json").read_text()))))
    monkeypatch.setattr("ray.get_gpu_ids", list)
    spec = types.SimpleNamespace(name="fake", iterative=True, head_class=Head,
                                 features_of=lambda config: "emb",
                                 head_params=lambda config, cfg, has_gpu=False: {})
    cfg = build_section("search", {"out": str(tmp_path), "families": ["logistic"]})
    X = np.zeros((10, 3))
    search.train_head({"family": "fake"}, {"emb": (X, y_val, X, y_val)}, cfg, {"fake": spec})
    (metrics, kept), = reports
    assert metrics["val_accuracy"] == 0.8 and metrics["final"] and kept == 8
    assert metrics["resumed_from_checkpoint"] is True
