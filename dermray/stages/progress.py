"""Live progress on the terminal, as Ray users know it, for the two long stages.

- Extraction: ``ExtractProgress(total)`` fed with the summary rows the Ray Data job yields (views
  embedded, views quarantined) shows views done/total, img/s, ETA and the quarantine so far.
- Search: ``SearchProgress`` is a Ray Tune callback (``RunConfig(callbacks=...)``): trials done,
  running, stopped early and failed, the best validation accuracy so far with its family, and one
  line per finished trial. Tune's own table stays off (``verbose=0``): these lines replace it.

What is shown depends on the mode (``set_mode``, from the CLI's ``--quiet`` / ``--verbose``) and
on whether stdout is a terminal:

| mode | terminal | not a terminal (a log file, ``ray job submit``'s log) |
| --- | --- | --- |
| auto | a status line redrawn in place, one line per finished trial | a summary line every 30 s |
| verbose | the same, plus one line per started trial | every line, and the summaries |
| quiet | nothing | nothing |

On a terminal every line fits its width: the status line is cut (one line per redraw), a
permanent line is wrapped with an indent. A log line written while the status line is shown
(``break_status``) starts on a line of its own.

Lines go to ``sys.stdout`` as it is when written (so a test can swap it for a pseudo-terminal);
the callback keeps no stream, so Tune can pickle it with the experiment and restore it.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
import time
from collections.abc import Mapping
from typing import Any

from dermray.report.trials import DONE, ERROR, PENDING, RUNNING, STOPPED
from dermray.stages.tracking import mlflow_callback

MODES = ("auto", "quiet", "verbose")
SUMMARY_EVERY_S = 30.0  # where stdout is not a terminal: one summary line this often
REDRAW_EVERY_S = 0.5  # the terminal status line is redrawn at most this often

_mode = "auto"
_status_owner: Printer | None = None  # the printer whose status line is on the terminal now


def set_mode(mode: str) -> None:
    """``auto`` (default), ``quiet`` (no progress lines) or ``verbose`` (every line, anywhere)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}. Got {mode!r} instead.")
    _mode = mode


def get_mode() -> str:
    return _mode


def mode_from_flags(quiet: bool = False, verbose: bool = False) -> str:
    return "quiet" if quiet else "verbose" if verbose else "auto"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def term_width(stream: Any) -> int:
    """The columns of the terminal behind ``stream``; else $COLUMNS; else 80."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # not a terminal, or a stream without a fd
        columns = 0
    if columns <= 0:
        try:
            columns = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            columns = 0
    return columns if columns > 0 else 80


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width - 1`` characters (the last column stays free, so that no
    terminal wraps the line), cut with an ellipsis."""
    room = max(8, width - 1)
    return text if len(text) <= room else text[: room - 1] + "\u2026"


def wrap(text: str, width: int) -> str:
    """``text`` wrapped in lines of at most ``width - 1`` characters, continuation lines
    indented; words are not broken (a path longer than the width stays whole)."""
    if len(text) < width:
        return text
    return "\n".join(textwrap.wrap(text, max(20, width - 1), subsequent_indent="    ",
                                    break_long_words=False, break_on_hyphens=False)) or text


def break_status() -> None:
    """Another line is about to reach the terminal (a log line): clear the status line first,
    so that the line starts at the left margin instead of after the status text. The status
    comes back at its next redraw."""
    if _status_owner is not None:
        _status_owner.clear()


class Printer:
    """Writes permanent lines and a status line that is redrawn in place on a terminal, and
    rate-limits the status line (on a terminal) and the summary lines (elsewhere)."""

    def __init__(self, summary_every_s: float = SUMMARY_EVERY_S, stderr: bool = False) -> None:
        self.summary_every_s = summary_every_s
        self.stderr = stderr  # the stream by name: resolved at each write, never kept
        self.last_draw = self.last_summary = float("-inf")
        self.status_shown = False

    @property
    def mode(self) -> str:
        return _mode

    @property
    def stream(self) -> Any:
        return sys.stderr if self.stderr else sys.stdout

    def tty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):  # a closed or replaced stream
            return False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # progress must never fail a run
            pass

    def clear(self) -> None:
        """Erase the status line where it is shown (the cursor back at the left margin)."""
        global _status_owner
        if self.status_shown and self.tty():
            self._write("\r\x1b[2K")
        self.status_shown = False
        if _status_owner is self:
            _status_owner = None

    def line(self, text: str, always: bool = False) -> None:
        """A permanent line: on a terminal (auto, verbose), in verbose mode anywhere, and with
        ``always`` in every mode but quiet. On a terminal it is wrapped to the width."""
        if self.mode == "quiet" or not (always or self.mode == "verbose" or self.tty()):
            return
        self.clear()
        if self.tty():
            text = wrap(text, term_width(self.stream))
        self._write(text + "\n")

    def status(self, text: str, force: bool = False) -> None:
        """The live status: redrawn in place on a terminal; elsewhere a summary line every
        ``summary_every_s`` seconds (``force``: now)."""
        global _status_owner
        if self.mode == "quiet":
            return
        now = time.monotonic()
        if self.tty():
            if force or now - self.last_draw >= REDRAW_EVERY_S:
                self._write("\r\x1b[2K" + cut(text, term_width(self.stream)))
                self.last_draw, self.status_shown = now, True
                _status_owner = self
        elif force or now - self.last_summary >= self.summary_every_s:
            self._write(text + "\n")
            self.last_summary = now

    def close(self) -> None:
        self.clear()


class ExtractProgress:
    """Views done/total, img/s, ETA and views quarantined so far, for the extraction job.

    Feed it each summary batch the Ray Data job yields (``update_from_summary``) or plain counts
    (``update``); ``close`` prints the final line.
    """

    def __init__(self, total: int, done_before: int = 0,
                 summary_every_s: float = SUMMARY_EVERY_S) -> None:
        self.total, self.done_before = int(total), int(done_before)
        self.done = self.quarantined = 0
        self.start = time.monotonic()
        # the first batch back: the actors have loaded their models; the rate counts from there
        self.first_at: float | None = None
        self.first_views = 0
        self.printer = Printer(summary_every_s)

    def rate(self) -> float:
        """Views per second after the first batch (model loading left out); 0 until known."""
        if self.first_at is None:
            return 0.0
        elapsed = time.monotonic() - self.first_at
        return (self.done - self.first_views) / elapsed if elapsed > 0 else 0.0

    def text(self) -> str:
        rate = self.rate()
        left = self.total - self.done
        eta = duration(left / rate) if rate > 0 and left > 0 else ("0s" if left <= 0 else "?")
        speed = f"{rate:.1f} img/s" if rate > 0 else "? img/s"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        resumed = f" (+{self.done_before} from an earlier run)" if self.done_before else ""
        return (f"extract {self.done}/{self.total} views{resumed} {pct:5.1f}%  {speed}  "
                f"ETA {eta}  quarantined {self.quarantined}  "
                f"elapsed {duration(time.monotonic() - self.start)}")

    def update(self, views: int, quarantined: int = 0) -> None:
        """``views`` more views done (embedded or quarantined), ``quarantined`` of them bad."""
        if self.first_at is None:
            self.first_at, self.first_views = time.monotonic(), int(views)
        self.done += int(views)
        self.quarantined += int(quarantined)
        self.printer.status(self.text())

    def update_from_summary(self, rows: Any) -> None:
        """One summary batch of the job (``dermray.stages.extract.write_batch``'s rows: ``kind`` is
        ``batch`` with the views of an embedded batch, or ``quarantine`` with its bad ones)."""
        kinds = [str(k) for k in rows["kind"]]
        counts = [int(n) for n in rows["rows"]]
        self.update(sum(n for k, n in zip(kinds, counts, strict=True) if k == "batch"),
                    sum(n for k, n in zip(kinds, counts, strict=True) if k == "quarantine"))

    def close(self) -> None:
        self.printer.close()
        self.printer.line(self.text().replace("extract ", "extract done: ", 1), always=True)


class PredictProgress:
    """Images done/total, img/s and ETA of a local ``dermray predict``, on stderr, and only on
    a terminal (a log or a pipe gets nothing); cleared when done.

    Call it as ``on_progress(done, total)``."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.printer = Printer(stderr=True)

    def __call__(self, done: int, total: int) -> None:
        if not self.printer.tty():
            return
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = duration((total - done) / rate) if rate > 0 else "?"
        self.printer.status(f"predict {done}/{total} images  {rate:.1f} img/s  ETA {eta}  "
                            f"elapsed {duration(elapsed)}", force=done >= total)

    def close(self) -> None:
        self.printer.clear()


def _family(trial: Any) -> str:
    config = getattr(trial, "config", None) or {}
    fam = str(config.get("family", "?"))
    feats = config.get("features")
    return f"{fam} on {feats}" if feats else fam


def _finite(value: Any, sign: float = 1.0) -> float:
    """A metric as a sort key, ascending (``sign`` -1: a larger value first); a missing or NaN
    figure ranks last (+inf), as selection's ``na_position='last'``."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    return sign * float(value) if ok else math.inf


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


class _Callback:
    """ray.tune.Callback, resolved lazily so that this module imports without Ray."""


def tune_callback_base() -> type:
    try:
        from ray.tune import Callback

        return Callback
    except ImportError:  # pragma: no cover - Ray is a core dependency
        return _Callback


class SearchProgress(tune_callback_base()):
    """A Ray Tune callback: the search's live status and one line per finished trial.

    The best figure shown is the one selection ranks on (``dermray.stages.select``): each ended
    trial's last reported ``metric``, failed trials left out, ties broken by balanced accuracy
    and then log-loss; not the best of any iteration.

    Args:
        num_samples: the trials the search will run (for "n/total").
        metric: the validation metric shown and ranked on (max).
        summary_every_s: where stdout is not a terminal, a summary line this often.
        time_budget_s: the search's time budget (0: none); the ETA never passes its end.
    """

    def __init__(self, num_samples: int, metric: str = "val_accuracy",
                 summary_every_s: float = SUMMARY_EVERY_S, time_budget_s: float = 0.0) -> None:
        self.num_samples, self.metric = int(num_samples), metric
        self.summary_every_s = summary_every_s
        self.time_budget_s = float(time_budget_s or 0.0)
        self._reset()

    def _reset(self) -> None:
        self.start = time.monotonic()
        self.done: set[str] = set()
        self.stopped: set[str] = set()
        self.failed: set[str] = set()
        self.ended_here = 0  # trials that ended while this callback watched (the ETA's rate)
        self.seen: dict[str, int] = {}  # trial id -> its number, in the order trials started
        self.best: tuple[float, str, str] | None = None  # value, family, trial id
        self.best_key: tuple[Any, ...] | None = None
        self.last: dict[str, Mapping[str, Any]] = {}  # trial id -> its last result
        self.printer = Printer(self.summary_every_s)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the callbacks with the experiment: keep the settings, not the run's state
        return {"num_samples": self.num_samples, "metric": self.metric,
                "summary_every_s": self.summary_every_s, "time_budget_s": self.time_budget_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"time_budget_s": 0.0, **state})
        self._reset()

    def setup(self, **info: Any) -> None:
        self._reset()

    # counts and text
    def _number(self, trial: Any) -> int:
        return self.seen.setdefault(trial.trial_id, len(self.seen) + 1)

    def running(self, trials: list[Any]) -> int:
        ended = self.done | self.stopped | self.failed
        return sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in ended)

    def _absorb(self, trials: list[Any]) -> None:
        """Count trials that ended before this callback saw them (a resumed experiment's)."""
        known = self.done | self.stopped | self.failed
        for t in trials:
            if t.trial_id in known or t.status not in ("TERMINATED", "ERROR"):
                continue
            self._number(t)
            self._note(t, t.last_result)
            if t.status == "ERROR":
                self.failed.add(t.trial_id)
            else:
                (self.done if (t.last_result or {}).get("final") else self.stopped).add(t.trial_id)
                self._rank(t, t.last_result or {})

    def eta(self, finished: int) -> str:
        """Time left: the trials still to run at the pace of those that ended in this run
        (wall time per ended trial, so concurrency is in it), capped by the time budget."""
        left = self.num_samples - finished
        if left <= 0:
            return "0s"
        elapsed = time.monotonic() - self.start
        estimates = []
        if self.ended_here:
            estimates.append(elapsed / self.ended_here * left)
        if self.time_budget_s > 0:
            estimates.append(max(0.0, self.time_budget_s - elapsed))
        return duration(min(estimates)) if estimates else "?"

    def status_text(self, trials: list[Any], final: bool = False) -> str:
        self._absorb(trials)
        finished = len(self.done) + len(self.stopped) + len(self.failed)
        pending = max(0, self.num_samples - finished - self.running(trials))
        best = (f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best
                else f"best {self.metric} -")
        # the words of dermray.report.trials, as trials.csv and the report use them
        failed = f", {len(self.failed)} {ERROR}" if self.failed else ""
        counts = (f"{len(self.done)} {DONE}, {self.running(trials)} {RUNNING}, "
                  f"{len(self.stopped)} {STOPPED}{failed}, {pending} {PENDING}")
        elapsed = f"elapsed {duration(time.monotonic() - self.start)}"
        if final:
            return f"search {finished}/{self.num_samples} trials: {counts} | {elapsed} | {best}"
        # live: what matters most first, as a narrow terminal cuts the end of the line
        return (f"search {finished}/{self.num_samples} | ETA {self.eta(finished)} | {best} | "
                f"{counts} | {elapsed}")

    def _note(self, trial: Any, result: Mapping[str, Any] | None) -> None:
        if result:
            self.last[trial.trial_id] = result

    def _rank(self, trial: Any, result: Mapping[str, Any]) -> None:
        """An ended trial joins the ranking by its last result, as selection ranks it."""
        value = result.get(self.metric)
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            return
        key = (-float(value), _finite(result.get("val_balanced_accuracy"), -1.0),
               _finite(result.get("val_log_loss")), _family(trial))
        if self.best_key is None or key < self.best_key:
            self.best_key = key
            self.best = (float(value), _family(trial), trial.trial_id)

    # Tune's hooks
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        n = self._number(trial)
        if self.printer.mode == "verbose":
            self.printer.line(f"trial {n}/{self.num_samples} started: {_family(trial)} "
                              f"({trial.trial_id})")
        self.printer.status(self.status_text(trials))

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        self._number(trial)
        self._note(trial, result)
        self.printer.status(self.status_text(trials))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        result = trial.last_result or self.last.get(trial.trial_id) or {}
        self._note(trial, result)
        self._rank(trial, result)
        self.ended_here += 1
        if result.get("final"):
            self.done.add(trial.trial_id)
            how = "done"
        else:  # ASHA stopped it at a rung: its last reported figures stand
            self.stopped.add(trial.trial_id)
            how = f"stopped early at iteration {result.get('training_iteration', '?')}"
        self._trial_line(trial, trials, result, how)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        self.failed.add(trial.trial_id)
        self.ended_here += 1
        where = getattr(trial, "path", None) or getattr(trial, "local_path", "") or ""
        self._trial_line(trial, trials, trial.last_result or {},
                         f"FAILED (error.txt under {where})" if where else "FAILED")

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.printer.status(self.status_text(trials))

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.printer.close()
        self.printer.line(self.status_text(trials, final=True).replace(
            "search ", "search finished: ", 1),
                          always=True)

    def _trial_line(self, trial: Any, trials: list[Any], result: Mapping[str, Any],
                    how: str) -> None:
        n = self._number(trial)
        secs = result.get("time_total_s")
        took = f" in {duration(secs)}" if isinstance(secs, (int, float)) else ""
        self.printer.line(
            f"trial {n}/{self.num_samples} {_family(trial)}: {self.metric} "
            f"{_fmt(result.get(self.metric))} (balanced "
            f"{_fmt(result.get('val_balanced_accuracy'))}){took}, {how}  [{trial.trial_id}]")
        # on a terminal the status line comes back under it; elsewhere only the periodic summary
        self.printer.status(self.status_text(trials), force=self.printer.tty())


def tune_callbacks(cfg: Any) -> list[Any]:
    """The callbacks of a search's RunConfig: the live progress, and MLflow tracking when
    ``search.mlflow_tracking_uri`` is set."""
    # Tune's newer console output prints an experiment header even at verbose=0 (with a
    # TensorBoard hint pointing into Ray's session folder, not OUT/tune); its classic output is
    # silent at verbose=0. A user's own setting wins. (Also set before a restore:
    # dermray.stages.console.quiet_libraries.)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    callbacks: list[Any] = [SearchProgress(cfg.num_samples, time_budget_s=60.0 * float(
        getattr(cfg, "time_budget_minutes", 0) or 0))]
    uri = getattr(cfg, "mlflow_tracking_uri", "")
    if uri:

        callbacks.append(mlflow_callback(cfg))
    return callbacks
