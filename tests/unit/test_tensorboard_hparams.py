"""TensorBoard's HParams view covers every family's parameters (issue 20): Tune's own logger gives
TensorBoard the parameters of whichever trial it reads first, so a search that starts with
XGBoost offers only XGBoost's. ``HParamsLogger`` writes one experiment (all searched families'
parameters, typed) with every trial, and each trial's own values with neutral ones ('n/a', 0,
False) for the others, so that no trial has a blank (TensorBoard's parallel coordinates drop such
a trial). No Ray started: the callback is driven as Tune drives it, with stand-in trials.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dermray.config import SearchConfig
from dermray.models.heads import families, get_family
from dermray.stages.tracking import HParamsLogger, hparam_domain

pytest.importorskip("tensorboardX")


class StandInTrial:
    """What Tune's TBX logger reads of a trial."""

    def __init__(self, path: Path, params: dict) -> None:
        self.local_path = str(path)
        self.evaluated_params = params

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def test_the_domain_names_every_parameter_a_family_can_suggest():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = SearchConfig(families=families())
    domain = hparam_domain(cfg)
    for family in families():
        trial = optuna.create_study().ask()
        get_family(family).space(trial, cfg)
        assert set(trial.params) <= set(domain), family
        for key, value in trial.params.items():  # one type per column
            assert isinstance(value, type(domain[key])) or (
                isinstance(value, (int, float)) and isinstance(domain[key], (int, float)))


def test_every_trial_writes_the_whole_domain_and_its_own_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    cfg = SearchConfig(families=("xgboost", "mlp"), features=("resnet50",))
    logger = HParamsLogger(hparam_domain(cfg))
    trials = {
        "xgb": StandInTrial(tmp_path / "xgb", {"family": "xgboost", "features": "resnet50",
                                               **get_family("xgboost").first_point(cfg)}),
        "mlp": StandInTrial(tmp_path / "mlp", {"family": "mlp", "features": "resnet50",
                                               **get_family("mlp").first_point(cfg)}),
    }
    for trial in trials.values():  # as Tune calls it: start, results, end
        logger.log_trial_start(trial)
        for step in (1, 2):
            logger.log_trial_result(step, trial, {"val_accuracy": 0.5, "train_loss": 1.0 / step,
                                                  "training_iteration": step})
        logger.log_trial_end(trial)
    mux = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    assert set(content) == {"xgb", "mlp"}
    every = set(hparam_domain(cfg))
    for run, tags in content.items():
        experiment = metadata.parse_experiment_plugin_data(tags[metadata.EXPERIMENT_TAG])
        assert {h.name for h in experiment.hparam_infos} == every  # whichever TensorBoard reads
        start = metadata.parse_session_start_info_plugin_data(
            tags[metadata.SESSION_START_INFO_TAG])
        assert set(start.hparams) == every  # no blank
        own = trials[run].evaluated_params
        assert start.hparams["family"].string_value == own["family"]
        other = "mlp" if own["family"] == "xgboost" else "xgboost"
        for key, value in get_family(other).first_point(cfg).items():  # neutral, of its type
            held = start.hparams[key]
            assert (held.string_value == "n/a") if isinstance(value, str) else (
                held.number_value == 0)
        for key, value in own.items():
            held = start.hparams[key]
            assert (held.string_value == value) if isinstance(value, str) else (
                held.number_value == float(value))
    # the training loss is a scalar curve beside the validation metrics
    tags = mux.Runs()["mlp"]
    assert "ray/tune/train_loss" in set(tags.get("scalars", [])) | set(tags.get("tensors", []))
