"""What a search trial is given and how a search ends when Ray kills a trial (no Ray here)."""

from __future__ import annotations

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
