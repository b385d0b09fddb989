"""Fine-tuning ResNet50's top from cached activations against end to end, in one run, on the same
real images: the two cuts' storage and epoch time beside the end-to-end comparison.

(a) cached, per cut (``--cut``): the frozen trunk's maps are computed once, every cut in one
    pass (timed apart, like the extraction stage), and an epoch trains ``CachedFinetuneHead``
    on them (flips of the maps): ``resnet50_c5b2`` (conv5_block2_out, 7x7x2048) trains
    conv5_block3; the deeper ``resnet50_c4b6`` (conv4_block6_out, 14x14x1024) trains the whole
    of stage 5 (conv5_block1..3);
(b) end to end: ResNet50 from the images with only conv5_block3 (batch norms frozen) and the
    same classifier trainable; every epoch runs the whole frozen trunk forward again (the same
    trainable layers as the c5b2 arm; the c4b6 arm trains more, stage 5's three blocks).

Each is timed over its second epoch (the first one builds and compiles). Also reported, per cut:
the storage per view of the cached map (float16 in memory; the Parquet files of a real run when
``--activations`` names its activations folder, OUT/activations, or with one cut that cut's
backbone=... folder).

(c) the family's own path: ``CachedFinetuneHead.fit`` with a validation set, as a search trial
    runs it (an epoch = training, then one pass over validation with the four flip views, whose
    accuracy the stopping rule watches). ``--from-run OUT`` takes the maps of a real run's
    extraction (its first ``--images`` train views and ``--val`` val images) instead of
    computing them, so that a measurement over thousands of maps costs no extraction. Its rate,
    ``family_maps_s``, is train maps per second of whole epochs (validation included), the
    figure issue 18 sets at >= 100 on 2 idle cores.

    python benchmarks/cached_finetune.py --images 128 --json out/bench_cached.json \
        [--cut resnet50_c5b2 resnet50_c4b6] [--activations out/ham10000/activations]
    python benchmarks/cached_finetune.py --from-run out/ham10000 --images 2048 --val 512 \
        --epochs 3 --json out/bench_family.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMRAY_SHARED", REPO.parent / "shared"))
HAM = SHARED / "data" / "ham10000"
WEIGHTS = SHARED / "weights" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
SIZE = 224


def real_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    from dermray.data.augment import decode_batch
    from dermray.domain import CLASSES

    meta = pd.read_csv(HAM / "metadata_images_200x150.csv")
    # every class represented: up to n/7 images per class, then filled with the rest
    rows = pd.concat([g.sample(min(len(g), n // 7 + 1), random_state=0)
                      for _, g in meta.groupby("dx")]).head(n)
    paths = [str(HAM / "images_200x150" / f"{i}.jpg") for i in rows["image_id"]]
    batch = {"image_id": rows["image_id"].to_numpy(object), "path": np.array(paths, object),
             "split": np.full(len(rows), "train", object), "aug_index": np.zeros(len(rows), int)}
    images = decode_batch(batch, SIZE, 0)["image"]
    return images, rows["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()


class EpochTimer:
    def __init__(self) -> None:
        self.times: list[float] = []

    def callback(self):
        import keras

        timer = self

        class Cb(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                timer.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                timer.times.append(time.perf_counter() - timer.start)

        return Cb()


def end_to_end_model(weights: str):
    """ResNet50 on images, only conv5_block3 (not its batch norms) and the softmax trainable."""
    import keras

    from dermray.models.heads.finetune import _caffe_layer

    base = keras.applications.ResNet50(include_top=False, weights=weights,
                                       input_shape=(SIZE, SIZE, 3))
    for layer in base.layers:
        layer.trainable = (layer.name.startswith("conv5_block3")
                           and not isinstance(layer, keras.layers.BatchNormalization))
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.RandomFlip("horizontal_and_vertical")(inputs)
    x = base(_caffe_layer()(x), training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(7, activation="softmax")(x)
    return keras.Model(inputs, outputs)


CUTS = ("resnet50_c5b2", "resnet50_c4b6")


def parquet_storage(folder: Path, cut: str, only_cut: bool) -> dict[str, object]:
    """Views and bytes of a real run's Parquet maps of ``cut``: under ``folder/backbone=<cut>``,
    or ``folder`` itself when it is that backbone's folder (or the only cut measured)."""
    import pyarrow.parquet as pq

    if (folder / f"backbone={cut}").is_dir():
        folder = folder / f"backbone={cut}"
    elif folder.name != f"backbone={cut}" and (folder.name.startswith("backbone=")
                                                or not only_cut):
        return {"parquet": f"no backbone={cut} folder under {folder}"}
    files = list(folder.rglob("*.parquet"))
    views = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if not views:
        return {"parquet": f"no Parquet rows under {folder}"}
    size = sum(f.stat().st_size for f in files)
    return {"parquet_views": views, "parquet_bytes_per_view": int(size / views),
            "parquet_total_gib": round(size / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="maps (images) per training step; the family trains with 64")
    parser.add_argument("--cut", nargs="+", choices=CUTS, default=list(CUTS),
                        help="the activation maps to fine-tune from (default: both)")
    parser.add_argument("--activations", help="a real run's activation folder (storage/view)")
    parser.add_argument("--json")
    parser.add_argument("--from-run", help="a real run's OUT: its cached maps, not new ones")
    parser.add_argument("--val", type=int, default=256, help="val maps of the family's path")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the family's path")
    args = parser.parse_args()
    if args.from_run:
        family_path(args)
        return
    cuts = list(dict.fromkeys(args.cut))

    import keras

    from dermray.models.backbones import FrozenExtractor, get_spec
    from dermray.models.heads.cached import TOP_BLOCKS, CachedFinetuneHead

    images, y = real_images(args.images)
    n = len(images)
    result: dict[str, object] = {"images": n, "image_size": SIZE, "batch_size": args.batch_size,
                                 "cpus": os.cpu_count()}

    # every cut from one pass of the frozen trunk, as the extraction computes them
    start = time.perf_counter()
    extractor = FrozenExtractor(cuts, dict.fromkeys(cuts, str(WEIGHTS)), SIZE,
                                batch_size=args.batch_size)
    flat = extractor.embed_rows(images, dict.fromkeys(cuts, np.ones(n, bool)))
    maps = {cut: flat[cut].reshape(n, *get_spec(cut).map_shape(SIZE)).astype(np.float16)
            for cut in cuts}
    del flat
    result["cache_once_s"] = round(time.perf_counter() - start, 2)  # all cuts in one pass

    per_cut: dict[str, dict[str, object]] = {}
    for cut in cuts:
        timer = EpochTimer()
        head = CachedFinetuneHead(cut=cut, channels=get_spec(cut).channels, weights=str(WEIGHTS),
                                  epochs=2, batch_size=args.batch_size, tta=False)
        # KerasHead.fit takes no callbacks: time the same compiled model's epochs directly
        model = head._build(maps[cut].shape[1:])
        model.compile(optimizer=keras.optimizers.Adam(1e-4),
                      loss="sparse_categorical_crossentropy")
        model.fit(maps[cut], y, epochs=2, batch_size=args.batch_size, verbose=0,
                  callbacks=[timer.callback()])
        per_cut[cut] = {
            "blocks_trained": "+".join(TOP_BLOCKS[cut]),
            "map_shape": "x".join(map(str, maps[cut].shape[1:])),
            "map_bytes_per_view_float16": int(maps[cut][0].nbytes),
            "trainable_params_cached": int(sum(np.prod(w.shape)
                                               for w in model.trainable_weights)),
            "cached_epoch_s": round(timer.times[-1], 2),
            "cached_maps_s": round(n / timer.times[-1], 1),
        }
        if args.activations:
            per_cut[cut].update(parquet_storage(Path(args.activations), cut, len(cuts) == 1))
        del model
        keras.backend.clear_session()

    timer = EpochTimer()
    e2e = end_to_end_model(str(WEIGHTS))
    e2e.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    e2e.fit(images.astype(np.float32), y, epochs=2, batch_size=args.batch_size, verbose=0,
            callbacks=[timer.callback()])
    e2e_epoch = timer.times[-1]
    result.update({
        "trainable_params_end_to_end": int(sum(np.prod(w.shape) for w in e2e.trainable_weights)),
        "end_to_end_epoch_s": round(e2e_epoch, 2),
        "end_to_end_img_s": round(n / e2e_epoch, 1),
    })
    for cut, row in per_cut.items():
        row["speedup_end_to_end_over_cached"] = round(e2e_epoch / float(row["cached_epoch_s"]), 2)
    result["cuts"] = per_cut

    lines = [(k, v) for k, v in result.items() if k != "cuts"]
    lines += [(f"{cut}.{k}", v) for cut, row in per_cut.items() for k, v in row.items()]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


def family_path(args: argparse.Namespace) -> None:
    """(c): the head's own fit, validation per epoch included, on a real run's maps."""
    from dermray.models.embeddings import load_activations
    from dermray.models.heads.cached import CachedFinetuneHead

    X, y, _ = load_activations(args.from_run, "resnet50_c5b2", "train", views="all")
    pick = np.random.default_rng(0).permutation(len(X))[:args.images]
    X, y = X[pick], y[pick]
    Xv, yv, _ = load_activations(args.from_run, "resnet50_c5b2", "val", views="original")
    Xv, yv = Xv[:args.val], yv[:args.val]
    ends: list[float] = []
    head = CachedFinetuneHead(weights=str(WEIGHTS), epochs=args.epochs, patience=args.epochs,
                              batch_size=args.batch_size)
    start = time.perf_counter()
    head.fit(X, y, eval_set=(Xv, yv), progress=lambda *a, **k: ends.append(time.perf_counter()))
    epochs = np.diff([start, *ends])
    # the same maps through the same model without the validation pass: its share of an epoch
    start = time.perf_counter()
    head.model_.fit(X, y, epochs=1, batch_size=args.batch_size, verbose=0)
    train_only = time.perf_counter() - start
    start = time.perf_counter()
    head.predict_proba(Xv)
    validation = time.perf_counter() - start
    result = {"train_maps": len(X), "val_maps": len(Xv), "batch_size": args.batch_size,
              "cpus": os.cpu_count(), "epoch_s": [round(t, 2) for t in epochs],
              "family_maps_s": round(len(X) / float(np.median(epochs[1:] if len(epochs) > 1
                                                                else epochs)), 1),
              "train_only_maps_s": round(len(X) / train_only, 1),
              "validation_tta_s": round(validation, 2),
              "validation_tta_maps_s": round(4 * len(Xv) / validation, 1)}
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
