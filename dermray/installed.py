"""Missing packages found in the driver, before Ray starts, with the command that installs them.

Without this, ``pip install dermray`` (no ``cpu`` / ``gpu`` extra: no TensorFlow) fails with a
raw traceback from inside a Ray actor, minutes in. ``find_spec`` looks a package up without
importing it (TensorFlow takes seconds to import).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

from dermray.config import load_section, read_yaml
from dermray.errors import DermrayError
from dermray.models.heads import get_family

# module -> the command that installs it (the extra of dermray that carries it)
INSTALL = {
    "tensorflow": "pip install 'dermray[cpu]'   (on a CUDA machine: pip install 'dermray[gpu]')",
    "xgboost": "pip install 'dermray'   (xgboost is a core dependency: reinstall dermray)",
    "mlflow": "pip install 'dermray[track]'",
    "tensorboard": "pip install 'dermray[track]'",
}


class MissingPackageError(DermrayError):
    """A package a stage needs is not installed; the message gives the install command."""


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def require(module: str, why: str) -> None:
    """Raise MissingPackageError naming ``module``, why it is needed and how to install it."""
    if not is_installed(module):
        how = INSTALL.get(module, f"pip install {module}")
        raise MissingPackageError(f"{module} is not installed, and {why}. Install it with:\n"
                                  f"    {how}")


def require_all(needs: Iterable[tuple[str, str]]) -> None:
    """Every (module, why) at once: one message listing every missing package."""
    problems = []
    for module, why in needs:
        try:
            require(module, why)
        except MissingPackageError as exc:
            problems.append(str(exc))
    if problems:
        raise MissingPackageError("\n".join(problems))


def extract_needs() -> list[tuple[str, str]]:
    return [("tensorflow", "`dermray extract` embeds images with Keras on TensorFlow")]


def search_needs(cfg: Any) -> list[tuple[str, str]]:
    """What a search config needs: its families' packages (each family's spec names them;
    Keras needs TensorFlow as its backend), and MLflow when tracking is set."""
    needs = [(module, f"search.families has {family!r}")
             for family in cfg.families for module in get_family(family).packages]
    if getattr(cfg, "mlflow_tracking_uri", ""):
        needs.append(("mlflow", "search.mlflow_tracking_uri is set"))
    return needs


def check_stages(config_path: str | None, stages: Iterable[str], out: str,
                 overrides: dict[str, Any] | None = None) -> None:
    """Check the packages of the named stages of a config (``extract``, ``search``) before any
    work starts. The config is loaded (and so validated) here too."""

    needs: list[tuple[str, str]] = []
    for stage in stages:
        if stage == "extract":
            needs += extract_needs()
        elif stage == "search":
            needs += search_needs(load_section("search", config_path,
                                               {"out": out, **(overrides or {})}))
    require_all(needs)


def check_run(config_path: str, out: str) -> None:
    """``dermray run``: the packages of every stage the config file has a section for."""

    check_stages(config_path, [s for s in ("extract", "search") if s in read_yaml(config_path)],
                 out)
