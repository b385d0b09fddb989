"""Reuse dermray's embedding Parquet for your own analysis: pandas, pyarrow and DuckDB read it
as it is; a 2-D projection coloured by class (PNG); the nearest neighbours of an image.

    python examples/analyze_embeddings.py --out out/demo --backbone resnet50 --png out/demo/projection.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/demo", help="a dermray output folder")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--png", help="where to draw the projection (default OUT/projection.png)")
    parser.add_argument("--image-id", help="the image whose neighbours to list (default: first)")
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()
    folder = Path(args.out) / "embeddings" / f"backbone={args.backbone}"

    # 1. pyarrow: every part file under the folder (the files carry split and backbone)
    dataset = ds.dataset(str(folder), format="parquet")
    print(f"pyarrow: {dataset.count_rows()} rows, schema:\n{dataset.schema}\n")

    # 2. DuckDB: SQL straight on the files
    import duckdb

    counts = duckdb.sql(
        f"SELECT split, dx, count(*) AS views FROM read_parquet('{folder}/*/*.parquet', "
        "hive_partitioning = true) GROUP BY ALL ORDER BY split, dx").df()
    print("DuckDB, views per split and class:")
    print(counts.pivot(index="dx", columns="split", values="views").fillna(0).astype(int), "\n")

    # 3. pandas: original views only (aug_index 0), the embedding column as a matrix
    frame = pd.read_parquet(folder, filters=[("aug_index", "=", 0)])
    frame = frame.sort_values("image_id").reset_index(drop=True)
    X = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
    print(f"pandas: {len(frame)} original views, embeddings {X.shape}\n")

    # a 2-D projection (PCA on standardised features), coloured by class
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    xy = PCA(n_components=2, random_state=0).fit_transform(StandardScaler().fit_transform(X))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    for cls in CLASSES:
        sel = (frame["dx"] == cls).to_numpy()
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.7, label=f"{cls} ({sel.sum()})")
    ax.set_title(f"{args.backbone} embeddings, PCA")
    ax.legend(markerscale=2, fontsize=8)
    png = Path(args.png or Path(args.out) / "projection.png")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    print(f"wrote {png}")

    # nearest neighbours by cosine similarity
    unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    query = args.image_id or frame["image_id"].iloc[0]
    if query not in set(frame["image_id"]):
        raise SystemExit(f"{query} is not in {folder}; pick an image_id from the Parquet.")
    i = int(np.flatnonzero(frame["image_id"] == query)[0])
    sims = unit @ unit[i]
    order = [j for j in np.argsort(-sims) if j != i][: args.k]
    print(f"\nnearest neighbours of {query} ({frame['dx'][i]}, lesion {frame['lesion_id'][i]}):")
    print(frame.loc[order, ["image_id", "lesion_id", "dx", "split"]]
          .assign(cosine=sims[order].round(4)).to_string(index=False))


if __name__ == "__main__":
    main()
