"""``dermray report OUT``: OUT/report.html, one self-contained page (no network, no external
files) with every trial (sortable), the best per family, the winner's test metrics and confusion
matrix, and plots of val accuracy by family and over time.

While a search runs (no metrics.json yet) the page is built from the Tune experiment's own files
as they are (each trial's params.json and result.json, the latest experiment_state for trial
statuses) and marked PARTIAL: the trials so far, the best per family so far, no test metrics."""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np
import pandas as pd

from dermray.errors import DermrayError
from dermray.io import storage
from dermray.io.outputs import damaged, read_csv_output, read_json_output, reading
from dermray.models.heads import FAMILY_SPECS, param_prefixes
from dermray.models.policies import describe
from dermray.report.embedding_map import html_section
from dermray.report.evaluate import plot_confusion
from dermray.report.trials import iso_time, trial_state

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
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
.wide { overflow-x: auto; max-width: 100%; margin: 1em 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef; cursor: pointer; user-select: none; white-space: nowrap; }
th[data-dir=asc]::after { content: ' \\25B2'; } th[data-dir=desc]::after { content: ' \\25BC'; }
tr.winner td { background: #efe; font-weight: bold; }
td.params { font-family: monospace; font-size: 11px; min-width: 14em; }
.plots img { max-width: 100%; }
@media (min-width: 1000px) { .plots img { max-width: 48%; margin-right: 1%; } }
img { max-width: 100%; }
.partial { background: #fff3cd; border: 2px solid #e0a800; padding: 0.8em 1.2em; font-size: 15px; }
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(trials: pd.DataFrame, winner: str | None = None) -> dict[str, str]:
    """Val accuracy by family, and over the trials in the order they ended (x: the trial's
    index, an integer axis); the winner's point is a star in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = {}
    fams = sorted(trials["family"].unique())
    is_winner = (trials["trial_id"].astype(str) == str(winner)).to_numpy() if winner else None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, fam in enumerate(fams):
        rows = trials[(trials["family"] == fam) & trials["val_accuracy"].notna()]
        xs = np.full(len(rows), i) + np.linspace(-0.15, 0.15, len(rows))
        ax.scatter(xs, rows["val_accuracy"], s=25)
        if winner:
            mark = (rows["trial_id"].astype(str) == str(winner)).to_numpy()
            if mark.any():
                ax.scatter(xs[mark], rows["val_accuracy"][mark], s=220, marker="*",
                           color="gold", edgecolors="black", zorder=3, label="winner")
                ax.legend(loc="lower right")
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylabel("val accuracy")
    ax.set_title("val accuracy by family")
    out["by_family"] = _png(fig)
    plt.close(fig)
    order = trials.sort_values("ended_at", kind="mergesort") if "ended_at" in trials else trials
    fig, ax = plt.subplots(figsize=(6, 3.5))
    acc = order["val_accuracy"].fillna(0).to_numpy()
    index = np.arange(1, len(acc) + 1)
    ax.plot(index, acc, "o", label="trial")
    ax.plot(index, np.maximum.accumulate(acc), "-", label="best so far")
    if is_winner is not None:
        mark = (order["trial_id"].astype(str) == str(winner)).to_numpy()
        if mark.any():
            ax.plot(index[mark], acc[mark], "*", markersize=16, color="gold",
                    markeredgecolor="black", label="winner")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number (in the order trials ended)")
    ax.set_ylabel("val accuracy")
    ax.set_title("val accuracy over the search")
    ax.legend(loc="lower right")
    out["over_time"] = _png(fig)
    plt.close(fig)
    return out


def format_value(value: Any) -> str:
    """A parameter for people: floats to 4 significant digits, lists element-wise."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def format_params(params: str | dict[str, Any]) -> str:
    """``{"logistic_C": 0.0044031381286583375}`` (a dict or its JSON) -> ``logistic_C=0.004403``,
    one ``key=value`` per line."""
    if isinstance(params, str):
        try:
            params = json.loads(params) if params else {}
        except ValueError:
            return params
    if not isinstance(params, dict):
        return str(params)
    return "\n".join(f"{k}={format_value(v)}" for k, v in sorted(params.items()))


def _table(frame: pd.DataFrame, table_id: str, highlight: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for col, value in row.items():
            if isinstance(value, float):
                text = "" if np.isnan(value) else f"{value:.4f}"
                cells.append(f'<td data-v="{value}">{text}</td>')
            elif col == "params":
                text = html.escape(format_params(value)).replace("\n", "<br>")
                cells.append(f'<td class="params">{text}</td>')
            else:
                cells.append(f"<td>{html.escape(str(value)).replace(chr(10), '<br>')}</td>")
        mark = ' class="winner"' if highlight and row.get("trial_id") == highlight else ""
        rows.append(f"<tr{mark}>{''.join(cells)}</tr>")
    return (f'<div class="wide"><table id="{table_id}" class="sortable"><thead><tr>{head}</tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table></div>")


def policy_section(policies: dict[str, Any] | None, points: dict[str, Any] | None = None) -> str:
    """The winner's operating points on test (chosen on validation: ``points``), with
    calibration."""
    if not policies:
        return ""
    test = policies["test"]
    frame = pd.DataFrame([{"policy": name, "rule (fitted on validation)": describe(points, name),
                           "accuracy": m["accuracy"],
                           "balanced_accuracy": m["balanced_accuracy"],
                           "melanoma_sensitivity": m["melanoma_sensitivity"],
                           "melanoma_specificity": m["melanoma_specificity"],
                           **{f"recall_{c}": r for c, r in m["recall"].items()}}
                          for name, m in test["policies"].items()]).fillna(np.nan)
    temperature = (points or {}).get("temperature")
    scaled = f" (temperature {temperature:.4g})" if isinstance(temperature, float) else ""
    return (f"<h2>Operating points (chosen on validation; test)</h2>{_table(frame, 'policies')}"
            f"<p>Expected calibration error on test: {test['ece_before']:.3f} before "
            f"temperature scaling{scaled}, {test['ece_after']:.3f} after. <code>dermray predict "
            f"--policy NAME</code> applies one.</p>")


TRIAL_COLUMNS = ("trial_id", "family", "features", "val_accuracy", "val_balanced_accuracy",
                 "val_macro_f1", "val_log_loss", "iterations", "time_total_s", "status", "params")


def _trial_statuses(experiment: str) -> dict[str, str]:
    """trial id -> Tune's status (RUNNING, PENDING, TERMINATED, ERROR), from the newest
    experiment_state file (Tune rewrites it as the search goes); empty if there is none yet."""
    states = storage.list_files(experiment, suffix=".json")
    states = [s for s in states if s.rsplit("/", 1)[-1].startswith("experiment_state-")]
    if not states:
        return {}
    try:
        data = json.loads(storage.read_text(max(states)))
        trials = [json.loads(t[0]) for t in data.get("trial_data", [])]
        return {t["trial_id"]: str(t.get("status", "")) for t in trials}
    except (ValueError, KeyError, IndexError, TypeError):  # caught mid-write: no statuses
        return {}


def _params(path: str) -> dict[str, Any] | None:
    """A trial's params.json (Tune's own file; None where it is absent, half-written or not a
    mapping: the trial's last result holds its config too)."""
    try:
        value = json.loads(storage.read_text(path)) if storage.is_file(path) else None
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def live_trials(out: str) -> pd.DataFrame:
    """The trials of the Tune experiment(s) under OUT/tune so far, one row each, read from the
    trial folders as they are: params.json (the config) and result.json (one line per result;
    the last complete line counts). ``status``: done (its final result is in), stopped early,
    running, error, or pending."""

    prefixes = param_prefixes()
    rows = []
    tune_dir = storage.join(out, "tune")
    results = storage.list_files(tune_dir, suffix="/result.json")
    statuses: dict[str, str] = {}
    for experiment in sorted({r.rsplit("/", 2)[0] for r in results}):
        statuses.update(_trial_statuses(experiment))
    for path in results:
        folder = path.rsplit("/", 1)[0]
        lines = [ln for ln in storage.read_text(path).splitlines() if ln.strip()]
        last: dict[str, Any] = {}
        for line in reversed(lines):
            try:  # the last line may be half-written
                last = json.loads(line)
                break
            except ValueError:
                continue
        params_path = storage.join(folder, "params.json")
        config = _params(params_path) or last.get("config") or {}
        trial_id = last.get("trial_id") or folder.rsplit("/", 1)[-1].split("_")[2]
        status = trial_state(statuses.get(trial_id, ""), bool(last.get("final")))
        family = config.get("family", "")
        spec = FAMILY_SPECS.get(family)  # what it fitted on: a feature spec, or images
        rows.append({
            "trial_id": trial_id, "family": family,
            "features": spec.features_of(config) if spec else config.get("features", ""),
            **{k: last.get(k, np.nan) for k in TRIAL_COLUMNS[3:7]},
            "iterations": last.get("training_iteration", 0),
            "time_total_s": last.get("time_total_s", np.nan),
            "status": status, "ended_at": iso_time(last.get("timestamp")),
            "params": json.dumps({k: v for k, v in config.items() if k.startswith(prefixes)},
                                 sort_keys=True),
        })
    seen = {r["trial_id"] for r in rows}
    for trial_id, state in statuses.items():  # trials Tune created that have no result yet
        if trial_id not in seen:
            rows.append({"trial_id": trial_id, "status": trial_state(state, False),
                         "iterations": 0})
    frame = pd.DataFrame(rows, columns=[*TRIAL_COLUMNS, "ended_at"])
    for col in TRIAL_COLUMNS[3:7]:
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame[["family", "features", "params"]] = frame[["family", "features", "params"]].fillna("")
    return frame.sort_values("val_accuracy", ascending=False, na_position="last",
                             ignore_index=True)


def partial_page(out: str, trials: pd.DataFrame) -> str:
    """The page of a search still running: a PARTIAL banner, the trials so far, plots, the best
    trial per family so far. Nothing is scored on test until the search has ended."""
    counts = trials["status"].value_counts().to_dict()
    scored = trials[trials["val_accuracy"].notna()]
    best = (scored.sort_values("val_accuracy", ascending=False).groupby("family", sort=False)
            .head(1)[["family", "features", "trial_id", "val_accuracy", "val_balanced_accuracy",
                      "status"]] if len(scored) else pd.DataFrame())
    lead = (f"Best so far: <b>{html.escape(str(scored.iloc[0]['family']))}</b> on "
            f"<code>{html.escape(str(scored.iloc[0]['features']))}</code>, val accuracy "
            f"{scored.iloc[0]['val_accuracy']:.4f} (trial "
            f"{html.escape(str(scored.iloc[0]['trial_id']))})." if len(scored) else
            "No trial has reported yet.")
    figs = plots(scored) if len(scored) else {}
    images = "".join(f'<img alt="{html.escape(k)}" src="{v}">' for k, v in figs.items())
    images = f'<div class="plots">{images}</div>'
    made = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC")
    summary = ", ".join(f"{n} {html.escape(str(s))}" for s, n in sorted(counts.items()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dermray: Tune results (PARTIAL)</title>
<style>{CSS}</style></head>
<body>
<h1>dermray: Tune results &mdash; PARTIAL</h1>
<div class="partial" id="partial"><b>PARTIAL: the search has not finished.</b> This page shows the
{len(trials)} trials so far ({summary}), read from the Tune experiment under
<code>{html.escape(storage.display(storage.join(out, "tune")))}</code> at {made}. No winner is
chosen and nothing is scored on test until the search ends. Run <code>dermray report
{html.escape(storage.display(out))}</code> again for newer figures.</div>
<p>{lead}</p>
<h2>Plots (trials so far)</h2>
{images}
<h2>Best trial per family so far (validation)</h2>
{_table(best, "best") if len(best) else "<p>none yet</p>"}
<h2>Trials so far (click a header to sort)</h2>
{_table(trials[list(TRIAL_COLUMNS)], "trials")}
<script>{SORT_JS}</script>
</body></html>
"""


def ensemble_section(record: dict[str, Any] | None) -> str:
    """The soft-vote candidate: its members and weights, and why it won or lost."""
    if not record:
        return ""
    members = pd.DataFrame([{k: m.get(k, np.nan) for k in ("trial_id", "family", "features",
                                                           "val_accuracy", "weight")}
                            for m in record["members"]])
    verdict = "Chosen" if record["chosen"] else "Not chosen"
    return (f"<h2>Ensemble candidate</h2>\n<p>{html.escape(record['rule'])}.</p>\n"
            f"{_table(members, 'ensemble') if len(members) else ''}\n"
            f"<p><b>{verdict}</b>: {html.escape(record['reason'])}.</p>")


def write_dashboard(out: str) -> str:
    """Write OUT/report.html (OUT: a folder or an s3:// URI); returns its path. Before the
    search has ended (no metrics.json yet) the page is the partial one, from Tune's files."""
    trials_uri, metrics_uri = storage.join(out, "trials.csv"), storage.join(out, "metrics.json")
    if not storage.is_file(trials_uri) or not storage.is_file(metrics_uri):
        live = live_trials(out)
        if live.empty:
            raise DermrayError(f"{storage.display(out)} has no trials.csv / metrics.json and no "
                               "Tune trials under OUT/tune yet; run `dermray run` or `dermray "
                               "search` with --out there first.")
        return storage.write_text(storage.join(out, "report.html"), partial_page(out, live))
    fix = (f"run `dermray search --out {storage.display(out)}` again (a finished search is "
           "not redone; its results are written again), or pass --fresh to redo it")
    trials = read_csv_output(trials_uri, fix, columns=("trial_id", "family", "features",
                                                       "val_accuracy"))
    if not len(trials) or pd.to_numeric(trials["val_accuracy"], errors="coerce").isna().all():
        raise damaged(trials_uri, "no trial with a val_accuracy", fix)
    result: dict[str, Any] = read_json_output(metrics_uri, fix, expect=dict)
    with reading(metrics_uri, fix):  # a key or value missing: metrics.json's damage
        page = final_page(out, trials, result)
    return storage.write_text(storage.join(out, "report.html"), page)


def final_page(out: str, trials: pd.DataFrame, result: dict[str, Any]) -> str:
    """The page of a finished search: trials.csv's trials and metrics.json's winner."""
    shown = trials[[c for c in ("trial_id", "family", "features", "val_accuracy",
                                "val_balanced_accuracy", "val_macro_f1", "val_log_loss",
                                "iterations", "time_total_s", "status", "ended_at", "params")
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

    png = plot_confusion(test["confusion_matrix"], "winner, test")
    cm = "data:image/png;base64," + base64.b64encode(png).decode()
    figs = plots(trials, winner=str(result["trial_id"]))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dermray: Tune results</title><style>{CSS}</style></head>
<body>
<h1>dermray: Tune results</h1>
<p>{len(trials)} trials. Winner (highest validation accuracy): <b>{html.escape(result['family'])}</b>
on <code>{html.escape(result['features'])}</code>, trial {html.escape(str(result['trial_id']))}.
Test (scored once, after selection): accuracy {test['accuracy']:.4f}, balanced accuracy
{test['balanced_accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} on {test['n']} images.</p>
<h2>Plots</h2>
<div class="plots"><img alt="val accuracy by family" src="{figs['by_family']}"><img alt="val accuracy over the search" src="{figs['over_time']}"></div>
<h2>Best trial per family</h2>
{_table(best, "best")}
<h2>Winner: test metrics per class</h2>
{_table(per_class, "per-class")}
{ensemble_section(result.get("ensemble"))}
{policy_section(result.get("policies"), result.get("operating_points"))}
<img alt="confusion matrix" src="{cm}">
{html_section(out, result['features'])}
<h2>All trials (click a header to sort)</h2>
{_table(shown, "trials", highlight=str(result['trial_id']))}
<script>{SORT_JS}</script>
</body></html>
"""
    return page
