"""``dermray report OUT``: OUT/report.html, one self-contained page (no network, no external
files) with every trial (sortable), the best per family, the winner's test metrics and confusion
matrix, and plots of val accuracy by family and over time."""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np
import pandas as pd

from dermray import storage
from dermray.errors import DermrayError

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var rows = Array.from(body.rows), asc = th.dataset.dir !== 'asc';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v || a.cells[col].textContent;
      var y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    table.querySelectorAll('th').forEach(function (h) { delete h.dataset.dir; });
    th.dataset.dir = asc ? 'asc' : 'desc';
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #eef; cursor: pointer; user-select: none; }
th[data-dir=asc]::after { content: ' \\25B2'; } th[data-dir=desc]::after { content: ' \\25BC'; }
tr.winner td { background: #efe; font-weight: bold; }
td.params { font-family: monospace; font-size: 11px; max-width: 40em; }
img { max-width: 48%; margin-right: 1%; }
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(trials: pd.DataFrame) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fams = sorted(trials["family"].unique())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, fam in enumerate(fams):
        vals = trials.loc[trials["family"] == fam, "val_accuracy"].dropna()
        ax.scatter(np.full(len(vals), i) + np.linspace(-0.15, 0.15, len(vals)), vals, s=25)
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylabel("val accuracy")
    ax.set_title("val accuracy by family")
    out["by_family"] = _png(fig)
    plt.close(fig)
    order = trials.sort_values("ended_at") if "ended_at" in trials else trials
    fig, ax = plt.subplots(figsize=(6, 3.5))
    acc = order["val_accuracy"].fillna(0).to_numpy()
    ax.plot(range(1, len(acc) + 1), acc, "o", label="trial")
    ax.plot(range(1, len(acc) + 1), np.maximum.accumulate(acc), "-", label="best so far")
    ax.set_xlabel("trial (in order of completion)")
    ax.set_ylabel("val accuracy")
    ax.set_title("val accuracy over time")
    ax.legend()
    out["over_time"] = _png(fig)
    plt.close(fig)
    return out


def _table(frame: pd.DataFrame, table_id: str, highlight: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for col, value in row.items():
            if isinstance(value, float):
                text = "" if np.isnan(value) else f"{value:.4f}"
                cells.append(f'<td data-v="{value}">{text}</td>')
            else:
                cls = ' class="params"' if col == "params" else ""
                cells.append(f"<td{cls}>{html.escape(str(value))}</td>")
        mark = ' class="winner"' if highlight and row.get("trial_id") == highlight else ""
        rows.append(f"<tr{mark}>{''.join(cells)}</tr>")
    return (f'<table id="{table_id}" class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def policy_section(policies: dict[str, Any] | None) -> str:
    """The winner's operating points on test (chosen on validation), with calibration."""
    if not policies:
        return ""
    test = policies["test"]
    frame = pd.DataFrame([{"policy": name, "accuracy": m["accuracy"],
                           "balanced_accuracy": m["balanced_accuracy"],
                           "melanoma_sensitivity": m["melanoma_sensitivity"],
                           "melanoma_specificity": m["melanoma_specificity"],
                           **{f"recall_{c}": r for c, r in m["recall"].items()}}
                          for name, m in test["policies"].items()]).fillna(np.nan)
    return (f"<h2>Operating points (chosen on validation; test)</h2>{_table(frame, 'policies')}"
            f"<p>Expected calibration error on test: {test['ece_before']:.3f} before "
            f"temperature scaling, {test['ece_after']:.3f} after. <code>dermray predict "
            f"--policy NAME</code> applies one.</p>")


def write_dashboard(out: str) -> str:
    """Write OUT/report.html (OUT: a folder or an s3:// URI); returns its path."""
    trials_uri, metrics_uri = storage.join(out, "trials.csv"), storage.join(out, "metrics.json")
    if not storage.is_file(trials_uri) or not storage.is_file(metrics_uri):
        raise DermrayError(f"{storage.display(out)} has no trials.csv / metrics.json; run "
                           "`dermray run` or `dermray search` with --out there first.")
    trials = pd.read_csv(io.BytesIO(storage.read_bytes(trials_uri)))
    result: dict[str, Any] = json.loads(storage.read_text(metrics_uri))
    shown = trials[[c for c in ("trial_id", "family", "features", "val_accuracy",
                                "val_balanced_accuracy", "val_macro_f1", "val_log_loss",
                                "iterations", "time_total_s", "status", "params")
                    if c in trials.columns]]
    best = pd.DataFrame([{"family": fam, "features": b["features"],
                          "val_accuracy": b["val"]["accuracy"],
                          "test_accuracy": b["test"]["accuracy"],
                          "test_balanced_accuracy": b["test"]["balanced_accuracy"],
                          "test_macro_f1": b["test"]["macro_f1"]}
                         for fam, b in result.get("best_per_family", {}).items()])
    test = result["test"]
    per_class = pd.DataFrame([{"class": c, **{k: (v if v is not None else np.nan)
                                              for k, v in m.items()}}
                              for c, m in test["per_class"].items()])
    from dermray.evaluate import plot_confusion

    png = plot_confusion(test["confusion_matrix"], "winner, test")
    cm = "data:image/png;base64," + base64.b64encode(png).decode()
    figs = plots(trials)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dermray: Tune results</title><style>{CSS}</style></head>
<body>
<h1>dermray: Tune results</h1>
<p>{len(trials)} trials. Winner (highest validation accuracy): <b>{html.escape(result['family'])}</b>
on <code>{html.escape(result['features'])}</code>, trial {html.escape(str(result['trial_id']))}.
Test (scored once, after selection): accuracy {test['accuracy']:.4f}, balanced accuracy
{test['balanced_accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} on {test['n']} images.</p>
<h2>Plots</h2>
<img alt="val accuracy by family" src="{figs['by_family']}"><img alt="val accuracy over time" src="{figs['over_time']}">
<h2>Best trial per family</h2>
{_table(best, "best")}
<h2>Winner: test metrics per class</h2>
{_table(per_class, "per-class")}
{policy_section(result.get("policies"))}
<img alt="confusion matrix" src="{cm}">
<h2>All trials (click a header to sort)</h2>
{_table(shown, "trials", highlight=str(result['trial_id']))}
<script>{SORT_JS}</script>
</body></html>
"""
    return storage.write_text(storage.join(out, "report.html"), page)
