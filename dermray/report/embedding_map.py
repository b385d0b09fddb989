"""A 2-D map of the embeddings, coloured by diagnosis: do the classes separate in feature space?

One point per image (its views averaged, as the heads see val/test rows), projected to two
dimensions by PCA (scikit-learn, the default: linear, deterministic, fast on any size) or UMAP
(``umap-learn``, where installed: non-linear neighbourhoods, slower). PCA is fitted on the train
split's images when there are any, so that the map's axes are the model's view, and every split
is projected on them; UMAP is fitted on all rows.

``embedding_map`` returns the coordinates (``image_id``, ``dx``, ``split``, ``x``, ``y``) and
``write_embedding_map`` draws them to PNG and SVG (with the coordinates as CSV). The reports take
``html_section`` / ``markdown_section``: the map of the winner's features, redrawn only when the
embedding files change, or nothing (never an error) where OUT has no embeddings.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from dermray.domain import CLASSES
from dermray.errors import DamagedOutputError, DermrayError
from dermray.io import storage
from dermray.io.outputs import read_json_output, reading
from dermray.models.backbones import BACKBONES
from dermray.models.embeddings import backbone_dir, load_embeddings

logger = logging.getLogger(__name__)

METHODS = ("pca", "umap")
# one colour per diagnosis, the same on every map (tab10, in CLASSES order)
COLOURS = dict(zip(CLASSES, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                             "#e377c2"), strict=True))
MARKERS = {"train": "o", "val": "s", "test": "^"}


def umap_installed() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def project(X: np.ndarray, method: str = "pca", fit_rows: np.ndarray | None = None,
            seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """(n, 2) coordinates of the rows of ``X`` and what the projection was (for the caption).

    ``fit_rows``: a boolean mask of the rows PCA is fitted on (all when None).
    """
    if method not in METHODS:
        raise DermrayError(f"The embedding map's method must be one of {', '.join(METHODS)}. Got "
                           f"{method!r} instead.")
    if len(X) < 3:
        raise DermrayError(f"An embedding map needs at least 3 images; got {len(X)}.")
    X = np.asarray(X, dtype=np.float64)
    if method == "umap":
        if not umap_installed():
            raise DermrayError("UMAP is not installed: pip install umap-learn, or use method "
                               "'pca'.")
        import umap

        reducer = umap.UMAP(n_components=2, random_state=seed,
                            n_neighbors=min(15, len(X) - 1))
        return reducer.fit_transform(X), {"method": "umap"}

    fit = X if fit_rows is None or not np.any(fit_rows) else X[np.asarray(fit_rows, bool)]
    pca = PCA(n_components=2, random_state=seed).fit(fit)
    ratio = pca.explained_variance_ratio_
    return pca.transform(X), {"method": "pca", "explained_variance": [float(r) for r in ratio]}


def embedding_map(out: str | Path, backbone: str | Sequence[str] = "resnet50",
                  splits: Sequence[str] | None = None, method: str = "pca",
                  max_points: int = 5000, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Coordinates of OUT's embeddings (one row per image, views averaged) and the projection.

    ``max_points``: at most this many images, sampled per class in proportion (seeded), so that
    the map stays readable and the cost bounded on the full dataset.
    """

    names = [backbone] if isinstance(backbone, str) else list(backbone)
    X, _, frame = load_embeddings(out, names, split=list(splits) if splits else None,
                                  average_views=True)
    if len(frame) > max_points:
        keep = (frame.groupby("dx", group_keys=False)
                .apply(lambda g: g.sample(frac=max_points / len(frame), random_state=seed))
                .index.sort_values())
        X, frame = X[keep], frame.loc[keep].reset_index(drop=True)
    coords, info = project(X, method, fit_rows=(frame["split"] == "train").to_numpy(), seed=seed)
    result = pd.DataFrame({"image_id": frame["image_id"].to_numpy(),
                           "dx": frame["dx"].astype(str).to_numpy(),
                           "split": frame["split"].astype(str).to_numpy(),
                           "x": coords[:, 0], "y": coords[:, 1]})
    info = {**info, "backbone": "+".join(names), "points": len(result)}
    return result, info


def plot_embedding_map(coords: pd.DataFrame, info: dict[str, Any], paths: Sequence[str | Path]
                       ) -> list[str]:
    """Draw the map (colour: diagnosis; marker: split) to each path (.png, .svg)."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
    for split, marker in MARKERS.items():
        for dx in CLASSES:
            rows = coords[(coords["dx"] == dx) & (coords["split"] == split)]
            if len(rows):
                ax.scatter(rows["x"], rows["y"], s=12, c=COLOURS[dx], marker=marker,
                           alpha=0.75, linewidths=0, label=dx if split == "train" else None)
    present = [dx for dx in CLASSES if (coords["dx"] == dx).any()]
    handles = [plt.Line2D([], [], marker="o", ls="", color=COLOURS[dx], label=dx)
               for dx in present]
    handles += [plt.Line2D([], [], marker=m, ls="", color="grey", label=s)
                for s, m in MARKERS.items() if (coords["split"] == s).any()]
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.8)
    if info["method"] == "pca":
        var = info.get("explained_variance", [0, 0])
        ax.set_xlabel(f"PC1 ({var[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({var[1]:.0%} of variance)")
    else:
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
    ax.set_title(f"{info['backbone']} embeddings, {info['points']} images "
                 f"({info['method'].upper()})", fontsize=10)
    fig.tight_layout()
    written = []
    for path in paths:
        fmt = Path(storage.display(path)).suffix.lstrip(".") or "png"

        buf = io.BytesIO()
        fig.savefig(buf, format=fmt)
        written.append(storage.write_bytes(path, buf.getvalue()))  # atomic, local or s3://
    plt.close(fig)
    return written


def write_embedding_map(out: str | Path, backbone: str | Sequence[str] = "resnet50",
                        method: str = "pca", max_points: int = 5000, seed: int = 0,
                        name: str = "embedding_map") -> dict[str, Any]:
    """OUT/<name>.png, .svg and .csv (the coordinates); returns what was written and how."""
    coords, info = embedding_map(out, backbone, method=method, max_points=max_points, seed=seed)
    files = plot_embedding_map(coords, info, [storage.join(out, f"{name}.png"),
                                              storage.join(out, f"{name}.svg")])
    files.append(storage.write_text(storage.join(out, f"{name}.csv"),
                                    coords.to_csv(index=False, float_format="%.5f")))
    return {**info, "files": files}


# ---- the report's section ---------------------------------------------------------------------

def report_backbones(out: str | Path, features: str | None) -> list[str]:
    """The backbones of the winner's feature set that have pooled embeddings in OUT (a fused set
    is mapped fused, as the head sees it); else the first backbone found; [] if none."""

    def present(name: str) -> bool:
        spec = BACKBONES.get(name)
        return (spec is not None and not getattr(spec, "is_map", False)
                and bool(storage.list_files(backbone_dir(out, name), ".parquet")))

    wanted = [t for t in (features or "").split("+") if t in BACKBONES]
    if wanted and all(present(n) for n in wanted):
        return wanted
    return [n for n in BACKBONES if present(n)][:1]


def _source_key(out: str | Path, names: list[str], method: str) -> str:
    """Changes when the embedding part files change (their names are their views' hash)."""

    files = [f for n in names for f in storage.list_files(backbone_dir(out, n), ".parquet")]
    return hashlib.sha1("\n".join([method, *names, *files]).encode()).hexdigest()


def report_map(out: str | Path, features: str | None = None, method: str = "pca"
               ) -> dict[str, Any] | None:
    """OUT/embedding_map.{png,svg,csv,json} for the report, redrawn when the embeddings changed;
    None (with a log line) where there is nothing to map or the map fails."""
    try:
        names = report_backbones(out, features)
        if not names:
            return None
        key = _source_key(out, names, method)
        record_uri = storage.join(out, "embedding_map.json")
        if storage.is_file(record_uri) and storage.is_file(storage.join(out,
                                                                        "embedding_map.png")):
            record = cached_record(record_uri, key)
            if record is not None:
                return record
        record = {**write_embedding_map(out, names, method=method), "key": key}
        storage.write_text(record_uri, json.dumps(record, indent=2))
        return record
    except Exception:  # a plot must never cost the report
        logger.warning("no embedding map for %s", storage.display(out), exc_info=True)
        return None


def cached_record(record_uri: str, key: str) -> dict[str, Any] | None:
    """The map's record when it is of these embeddings and whole; None (the map is redrawn,
    as the cache it is) when it is of others or damaged (not JSON, a field missing)."""
    fix = "it is redrawn"
    try:
        record = read_json_output(record_uri, fix, expect=dict)
        if record.get("key") != key:
            return None
        with reading(record_uri, fix):
            _caption(record)
    except DamagedOutputError as exc:
        logger.info("%s", exc)
        return None
    return record


def _caption(record: dict[str, Any]) -> str:
    how = record["method"].upper()
    if record["method"] == "pca":
        var = record.get("explained_variance", [0, 0])
        how += f", fitted on train: PC1 {var[0]:.0%}, PC2 {var[1]:.0%} of the variance"
    return (f"{record['points']} images' {record['backbone']} embeddings (views averaged) in two "
            f"dimensions ({how}); colour: diagnosis, marker: split.")


def markdown_section(out: str | Path, features: str | None = None) -> list[str]:
    """Report.md lines: a heading, the map (a link to embedding_map.png) and its caption."""
    record = report_map(out, features)
    if record is None:
        return []
    return ["## Embedding map", "", "![embedding map](embedding_map.png)", "", _caption(record),
            ""]


def html_section(out: str | Path, features: str | None = None) -> str:
    """Report.html: the map inlined (the page stays one self-contained file) with its caption."""
    record = report_map(out, features)
    if record is None:
        return ""
    png = storage.read_bytes(storage.join(out, "embedding_map.png"))
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return (f'<h2>Embedding map</h2>\n<img alt="embedding map" src="{uri}">\n'
            f"<p>{_caption(record)}</p>\n")
