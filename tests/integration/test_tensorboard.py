"""TensorBoard, as the README runs it (`.venv/bin/tensorboard --logdir OUT/tune`), finds one run
per trial of the session's search, each with the validation metrics as scalars: the event files
Tune writes (through tensorboardX, which Ray's tune extra installs) exist and are readable. Its
HParams view offers every family's parameters, whichever trial it reads first, and the heads that
train by epochs (MLP, fine-tuned CNNs) have a training-loss curve (issue 20)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest


def test_tensorboard_reads_one_run_per_trial(searched):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    out, _ = searched
    assert Path(sys.executable).with_name("tensorboard").exists()  # the README's command
    events = sorted((out / "tune").glob("*/*/events.out.tfevents.*"))
    trials = pd.read_csv(out / "trials.csv")
    assert len({e.parent for e in events}) == len(trials)
    mux = EventMultiplexer().AddRunsFromDirectory(str(out / "tune"))
    mux.Reload()
    runs = mux.Runs()
    assert len(runs) == len(trials)
    for tags in runs.values():
        names = set(tags.get("scalars", [])) | set(tags.get("tensors", []))
        assert {"ray/tune/val_accuracy", "ray/tune/val_balanced_accuracy"} <= names


def test_hparams_cover_every_family_and_epoch_heads_have_a_training_loss(searched):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    out, _ = searched
    trials = pd.read_csv(out / "trials.csv")
    assert trials["family"].nunique() >= 4  # the session's search tries every family
    every = {"family"}.union(*(json.loads(p) for p in trials["params"]))
    mux = EventMultiplexer().AddRunsFromDirectory(str(out / "tune"))
    mux.Reload()
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    assert content
    for tags in content.values():  # whichever run TensorBoard reads its experiment from
        experiment = metadata.parse_experiment_plugin_data(tags[metadata.EXPERIMENT_TAG])
        assert every <= {h.name for h in experiment.hparam_infos}
    epochs = 0
    for run, tags in mux.Runs().items():
        family = trials.loc[[str(t) in run for t in trials["trial_id"]], "family"]
        names = set(tags.get("scalars", [])) | set(tags.get("tensors", []))
        if len(family) and family.iloc[0] in ("mlp", "finetune", "cached_cnn"):
            assert "ray/tune/train_loss" in names, (run, sorted(names))
            epochs += 1
    assert epochs
