"""The few lines a run ends with on the terminal: the winner, its validation and test figures
per decision policy, where the report and the bundle are, and what to run next."""

from __future__ import annotations

import math
import shlex
import textwrap
from collections.abc import Mapping
from typing import Any

# per policy: (column head, split, metric)
COLUMNS = (("val acc", "val", "accuracy"), ("val bal", "val", "balanced_accuracy"),
           ("test acc", "test", "accuracy"), ("test bal", "test", "balanced_accuracy"),
           ("test mel sens", "test", "melanoma_sensitivity"))


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def policy_rows(policies: Mapping[str, Any]) -> list[list[str]]:
    """``policies`` as ``finish`` returns it ({split: policy_report}) -> one row per policy."""
    names = list((policies.get("val") or {}).get("policies", {}))
    rows = []
    for name in names:
        row = [name]
        for _, split, key in COLUMNS:
            row.append(_num(((policies.get(split) or {}).get("policies", {}).get(name) or {})
                            .get(key)))
        rows.append(row)
    return rows


def table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append(indent + "  ".join(cells).rstrip())
    return lines


def run_summary(result: Mapping[str, Any]) -> list[str]:
    """The closing lines of ``dermray run`` / ``dermray search`` from their result (the dict
    ``run_search_stage`` returns, with ``logs`` where a log file was written)."""
    win = result["winner"]
    lines = [f"winner: {win['family']} on {win['features']} (trial {win.get('trial_id', '?')})",
             (f"  val accuracy {_num(win.get('val_accuracy'))}, test accuracy "
             f"{_num(win.get('test_accuracy'))} (balanced "
             f"{_num(win.get('test_balanced_accuracy'))})")]
    if result.get("ensemble"):  # why the soft vote won or lost
        lines += textwrap.wrap(f"ensemble candidate: {result['ensemble']}", 79,
                               initial_indent="  ", subsequent_indent="    ")
    rows = policy_rows(result.get("policies") or {})
    if rows:
        lines.append("  decision policies (chosen on val; `dermray predict --policy NAME`):")
        lines += table(["policy", *(c for c, _, _ in COLUMNS)], rows, indent="  ")
    paths = [("report", result.get("report_html")), ("model", result.get("model")),
             ("trials", result.get("trials")), ("logs", result.get("logs"))]
    lines += [f"{name + ':':8}{path}" for name, path in paths if path]
    model, out = result.get("model", "OUT/model"), result.get("out", "OUT")
    lines += ["next:",
              f"  dermray predict --model {shlex.quote(str(model))} IMAGE_DIR",
              f"  dermray report {shlex.quote(str(out))}",
              f"  tensorboard --logdir {shlex.quote(str(result.get('tune_logs', 'OUT/tune')))}"]
    return lines
