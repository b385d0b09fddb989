"""What reaches the terminal: dermray's own lines. Other libraries' logs (Ray, Ray Data, Tune,
Optuna, TensorFlow/absl, MLflow, ...) go to a log file under OUT (``OUT/logs/dermray.log``),
unless ``-v`` asks for everything on the terminal too.

The levers, each where its library reads it:

- Python logging: one handler on the root logger for the terminal, which lets through only
  ``dermray.*`` records (all of them with ``-v``), and one for the file, which takes every
  record. A library's own console handler (Ray's, Ray Data's, Optuna's) is removed and its
  logger propagates to the root instead (``route_foreign_logs``; called again after ``ray.init``
  and after Tune's imports, which add handlers of their own).
- Output of Ray's worker processes: ``ray.init(log_to_driver=False)`` (``raysession``).
- TensorFlow's C++ logs: ``TF_CPP_MIN_LOG_LEVEL`` set before TensorFlow is imported, in this
  process and so in the workers of a local Ray, which inherit its environment. (TensorFlow 2.21
  writes some lines through absl, which does not read it: "oneDNN custom operations are on".)
- What C++ code writes to this process's stderr (Ray's core worker sends its ERROR lines there
  unconditionally, e.g. ``core_worker.cc``; absl's lines): where stderr is a terminal, file
  descriptor 2 is pointed at the log file while a command runs, and Python's ``sys.stderr``
  (dermray's messages) at the terminal (``log_to``).
- Ray Data's progress bars: ``DataContext.enable_progress_bars`` (dermray shows its own).
- Tune's experiment table and its TensorBoard hint: Tune's classic output, silent at verbose=0.

A dermray log line written while a status line is shown starts on a line of its own
(``progress.break_status``), and on a terminal it is wrapped to the width.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dermray.errors import DermrayError
from dermray.io import storage
from dermray.io.storage import RedactingFilter
from dermray.stages import progress

LOG_DIR = "logs"
LOG_NAME = "dermray.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_verbose = False
_file_handler: logging.FileHandler | None = None
_stderr_swap: tuple[int, object, object] | None = None  # (the terminal's fd, old, new sys.stderr)


def is_own(record: logging.LogRecord) -> bool:
    return record.name == "dermray" or record.name.startswith("dermray.")


class TerminalHandler(logging.StreamHandler):
    """dermray's records (every record with ``verbose``) to ``sys.stderr`` as it is at emit
    time, as ``level: message``; the status line is cleared first, and on a terminal the
    message is wrapped to its width."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose
        self.setFormatter(logging.Formatter("%(message)s"))

    @property  # type: ignore[override]
    def stream(self):  # the stream of the moment (a test's redirect, a pseudo-terminal)
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; sys.stderr is used
        pass

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {super().format(record)}"
        if not is_own(record):
            text = f"[{record.name}] {text}"
        try:
            tty = sys.stderr.isatty()
        except (AttributeError, ValueError):
            tty = False
        return progress.wrap(text, progress.term_width(sys.stderr)) if tty else text

    def emit(self, record: logging.LogRecord) -> None:
        if not (self.verbose or is_own(record)):
            return
        progress.break_status()
        super().emit(record)


def _console_handler(handler: logging.Handler) -> bool:
    """Whether a library's handler writes to the terminal (a file handler does not)."""
    if isinstance(handler, (logging.FileHandler, TerminalHandler)):
        return False
    if not isinstance(handler, logging.StreamHandler):
        return False
    stream = getattr(handler, "stream", None)
    return stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) or type(
        handler).__name__ in ("PlainRayHandler", "_StderrHandler")


def route_foreign_logs() -> None:
    """Every library logger's console handler removed, its records sent up to the root (the
    file, and the terminal with ``-v``). Idempotent; call it after imports that configure
    logging."""
    for name, item in list(logging.root.manager.loggerDict.items()):
        if not isinstance(item, logging.Logger) or name == "dermray" or name.startswith(
                "dermray."):
            continue
        console = [h for h in item.handlers if _console_handler(h)]
        for handler in console:
            item.removeHandler(handler)
        if console:
            item.propagate = True
    optuna = sys.modules.get("optuna")  # imported (by Tune's OptunaSearch): its own handler
    if optuna is not None:
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()


def quiet_libraries(verbose: bool) -> None:
    """Environment and settings read by the libraries when they start: set before TensorFlow is
    imported and before Ray starts (its local workers inherit the environment). A value the
    user set wins."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF and absl C++: errors only
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Tune table, no /tmp/ray TB hint
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = verbose
    except ImportError:  # pragma: no cover - Ray is a core dependency
        pass


@contextmanager
def session(verbose: bool = False) -> Iterator[None]:
    """The terminal's logging for one command; the root logger's state restored after, so
    that a test may call the CLI many times in one process."""
    global _verbose, _file_handler
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), _verbose)
    _verbose = verbose
    handler = TerminalHandler(verbose)
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler.addFilter(RedactingFilter())  # no s3://KEY:SECRET@ in a log line
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # a library's warnings are log records too
    quiet_libraries(verbose)
    route_foreign_logs()
    try:
        yield
    finally:
        _restore_stderr()
        logging.captureWarnings(False)
        if _file_handler is not None:
            root.removeHandler(_file_handler)
            _file_handler.close()
            _file_handler = None
        root.removeHandler(handler)
        for old in saved[1]:
            root.addHandler(old)
        root.setLevel(saved[0])
        _verbose = saved[2]


def temp_log_dir() -> Path:
    """This user's log folder in the temp folder, for the logs of a command without a local
    OUT folder."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"dermray-logs-{uid}"


def log_file_for(out: str | None, command: str = "dermray") -> Path:
    """OUT/logs/dermray.log for a local OUT; for an s3:// OUT (appending to an object is not
    possible) or none (``dermray predict``) a file in this user's temp log folder."""
    if out is None:
        return temp_log_dir() / f"{command}.log"
    if storage.is_remote(out):
        name = storage.display(out).replace("://", "_").replace("/", "_").strip("_")
        return temp_log_dir() / f"{name}.log"
    return Path(out).expanduser() / LOG_DIR / LOG_NAME


def _open(out: str, path: Path) -> logging.FileHandler:
    try:
        if path.parent == temp_log_dir():  # in a shared temp folder: this user's only
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise DermrayError(f"Cannot write to the output folder {storage.display(out)} "
                           f"({exc.strerror or exc}: {path.parent}). Choose an --out you can "
                           "write to.") from None


def check_out(out: str) -> None:
    """OUT made and its log file writable, before any work (and before Ray starts): a folder
    that cannot be made or written to is a message. Nothing is written to the file."""
    _open(out, log_file_for(out)).close()


def log_to(out: str | None, command: str = "dermray") -> Path:
    """Send every log record to OUT's log file from now on (appended; one header line per
    command); call it once OUT's lock is held. An OUT that cannot be written is a message.
    ``out`` None: a command without an OUT folder (``command``'s file in the temp folder)."""
    global _file_handler
    path = log_file_for(out, command)
    handler = _open(str(out or path.parent), path)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    # a library may set its own logger to DEBUG (Ray Data does): its records reach the root's
    # handlers whatever the root's level, so the level is the handler's
    handler.setLevel(logging.DEBUG if _verbose else logging.INFO)
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    if _file_handler is not None:
        root.removeHandler(_file_handler)
        _file_handler.close()
    _file_handler = handler
    root.addHandler(handler)
    if not _verbose:
        _stderr_to(handler)
    # the command that starts here, in the file only
    handler.handle(logging.LogRecord(__name__, logging.INFO, __file__, 0, "dermray %s (pid %d, %s)",
                                     (" ".join(storage.redact(a) for a in sys.argv[1:]),
                                      os.getpid(), time.strftime("%Y-%m-%dT%H:%M:%S%z")), None))
    return path


def _stderr_to(handler: logging.FileHandler) -> None:
    """File descriptor 2 (what C++ libraries write to) into the log file, where it is a
    terminal; Python's ``sys.stderr`` stays on the terminal (a copy of the old fd 2) when it
    wrote to fd 2. Undone when the session ends."""
    global _stderr_swap
    if _stderr_swap is not None or handler.stream is None:
        return
    try:
        if not os.isatty(2):
            return
        sys.stderr.flush()
        writes_to_2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a replaced stream without a descriptor
        writes_to_2 = False
    terminal = os.dup(2)
    old = sys.stderr
    new = old
    if writes_to_2:
        new = os.fdopen(os.dup(terminal), "w", buffering=1, encoding=getattr(
            old, "encoding", None) or "utf-8", errors="backslashreplace")
        sys.stderr = new
    os.dup2(handler.stream.fileno(), 2)
    _stderr_swap = (terminal, old, new)


def _restore_stderr() -> None:
    global _stderr_swap
    if _stderr_swap is None:
        return
    terminal, old, new = _stderr_swap
    _stderr_swap = None
    try:
        new.flush()  # type: ignore[attr-defined]
    except (OSError, ValueError):
        pass
    os.dup2(terminal, 2)
    os.close(terminal)
    if new is not old:
        sys.stderr = old
        new.close()  # type: ignore[attr-defined]


def current_log_file() -> str:
    """The path of the log file in use ('' when none)."""
    return _file_handler.baseFilename if _file_handler is not None else ""


def verbose() -> bool:
    return _verbose
