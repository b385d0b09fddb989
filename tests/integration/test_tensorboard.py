"""TensorBoard, as the README runs it (`.venv/bin/tensorboard --logdir OUT/tune`), finds one run
per trial of the session's search, each with the validation metrics as scalars: the event files
Tune writes (through tensorboardX, which Ray's tune extra installs) exist and are readable."""

from __future__ import annotations

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
