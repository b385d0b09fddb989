"""The results page without Ray: one vocabulary of trial states, ISO times, params for people,
wide tables in a scrolling box, the winner marked, and each policy's fitted rule shown."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dermray.domain import CLASSES
from dermray.report import trials as states
from dermray.report.dashboard import format_params, plots, write_dashboard


@pytest.mark.parametrize("tune, final, word", [
    ("TERMINATED", True, "done"), ("TERMINATED", False, "stopped early"),
    ("ERROR", False, "error"), ("ERROR", True, "error"), ("RUNNING", False, "running"),
    ("PENDING", False, "pending"), ("", False, "running"), ("RUNNING", True, "done")])
def test_one_vocabulary_of_trial_states(tune, final, word):
    assert states.trial_state(tune, final) == word
    assert word in states.STATES


def test_iso_times():
    assert states.iso_time(1796281124) == "2026-12-03T06:58:44Z"
    assert states.iso_time(float("nan")) == states.iso_time(None) == states.iso_time("x") == ""


def test_params_as_key_value_with_four_significant_digits():
    text = format_params(json.dumps({"logistic_C": 0.0044031381286583375,
                                     "logistic_class_weight": "none", "mlp_width": 256,
                                     "prior": [0.119171, 0.108808]}))
    assert text.split("\n") == ["logistic_C=0.004403", "logistic_class_weight=none",
                                "mlp_width=256", "prior=[0.1192, 0.1088]"]
    assert format_params("") == "" and format_params("not json") == "not json"


def _metrics(trial_id: str) -> dict:
    per = {"accuracy": 0.8, "balanced_accuracy": 0.7, "melanoma_sensitivity": 0.9,
           "melanoma_specificity": 0.6, "recall": {c: 0.5 for c in CLASSES}}
    split = {"accuracy": 0.8, "balanced_accuracy": 0.7, "macro_f1": 0.6, "n": 10,
             "per_class": {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 1}
                           for c in CLASSES},
             "confusion_matrix": [[1 if i == j else 0 for j in range(7)] for i in range(7)]}
    return {"family": "logistic", "features": "resnet50", "trial_id": trial_id,
            "params": {}, "val": split, "test": split,
            "best_per_family": {"logistic": {"features": "resnet50", "val": split,
                                             "test": split}},
            "operating_points": {"temperature": 1.5, "policies": {
                "accuracy": {}, "melanoma": {"threshold": 0.123456, "target_sensitivity": 0.9}}},
            "policies": {"test": {"ece_before": 0.1, "ece_after": 0.05,
                                  "policies": {"accuracy": per, "melanoma": per}}}}


def test_page_scrolls_wide_tables_marks_the_winner_and_shows_policy_rules(tmp_path):
    rows = [{"trial_id": f"t{i}", "family": "logistic", "features": "resnet50",
             "params": json.dumps({"logistic_C": 1 / 3 ** i}), "val_accuracy": 0.5 + i / 10,
             "val_balanced_accuracy": 0.5, "val_macro_f1": 0.5, "val_log_loss": 1.0,
             "iterations": 1, "time_total_s": 1.0, "ended_at": states.iso_time(1e9 + i),
             "completed": True, "status": "done"} for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "trials.csv", index=False)
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics("t2")))
    write_dashboard(str(tmp_path))
    page = (tmp_path / "report.html").read_text()
    assert page.count('<div class="wide"><table') == page.count("<table") >= 4
    assert '<tr class="winner"><td>t2</td>' in page
    assert "logistic_C=0.1111" in page and "0.1111111" not in page
    assert "mel where p(mel) &gt;= 0.123 (validation sensitivity &gt;= 0.9), else argmax" in page
    assert "temperature 1.5" in page
    assert "2001-09-09T01:46:42Z" in page  # ISO times, not epoch seconds


def test_over_time_plot_has_an_integer_axis_and_a_winner_star():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame({"trial_id": ["a", "b", "c"], "family": ["x", "x", "y"],
                          "val_accuracy": [0.5, 0.9, 0.7], "ended_at": ["1", "2", "3"]})
    captured = {}
    real = plt.close

    def keep(fig):  # read the axes before the figure is closed
        ax = fig.axes[0]
        captured[ax.get_title()] = ([lbl.get_text() for lbl in ax.get_legend().get_texts()],
                                    [t for t in ax.get_xticks()])
        real(fig)

    plt.close = keep
    try:
        plots(frame, winner="b")
    finally:
        plt.close = real
    legend, ticks = captured["val accuracy over the search"]
    assert "winner" in legend
    assert all(float(t).is_integer() for t in ticks)
    assert "winner" in captured["val accuracy by family"][0]
