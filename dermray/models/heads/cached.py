"""Fine-tuning from cached activations: the top of a frozen CNN (ResNet50's last residual block,
conv5_block3, with its ImageNet weights as the start) plus a classifier, trained on the
activation maps that extraction cached at the cut (``resnet50_c5b2``: conv5_block2_out, 7x7x2048
float16 per view at 224). The layers below the cut are the frozen extractor's, so they run once
per view at extraction, not once per epoch: on 2 CPU cores an epoch over ~6,000 images takes about
a minute instead of end-to-end fine-tuning's several (benchmarks/cached_finetune.py).

The deeper cut (``resnet50_c4b6``: conv4_block6_out, 14x14x1024 float16 per view at 224, twice
the storage) trains the whole of ResNet50's stage 5 (conv5_block1 to conv5_block3, the first
with its projection shortcut) from the same kind of cache; ``TOP_BLOCKS`` maps each cut to the
blocks above it.

Augmentation at this depth: random horizontal and vertical flips of the maps. A flipped map is
close to the map of the flipped image (ResNet's filters are not flip-symmetric, so not equal);
it worked as augmentation when measured (docs/results.md). Test-time augmentation (``tta``)
averages the probabilities of the four flips of a map.

Patient metadata (``meta`` > 0; the input ``resnet50_c5b2+meta``, search setting
``cached_cnn_meta``) joins after pooling, as ``+meta`` does for the embedding heads: the pooled
block output and the metadata columns (``dermray.models.features.metadata_matrix``) are
concatenated before the dropout and the classifier. The head still takes one array: rows of the
flattened map followed by the ``meta`` metadata columns. Inside, the metadata travel as ``meta``
constant channels after the map's (flips leave them as they are), which the model splits off
before the block.

At prediction the bundle's extractor computes the map from the image with the same frozen
weights (found by their sha256), and this head does the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dermray.io import storage
from dermray.io.fingerprint import NEUTRAL, OUTPUT
from dermray.io.outputs import read_json_output
from dermray.models.backbones import BackboneError, find_weights, get_spec, resolve_weights
from dermray.models.features import N_METADATA
from dermray.models.heads.base import (
    CLASS_WEIGHT,
    N_CLASSES,
    HeadError,
    Rule,
    integer,
    one_of,
    real,
)
from dermray.models.heads.keras_base import KerasHead
from dermray.models.heads.logistic import LogisticHead
from dermray.models.heads.registry import (
    ACTIVATIONS,
    GPU_SHARE,
    FamilySpec,
    Setting,
    at_least,
    register_family,
)

if TYPE_CHECKING:
    from dermray.config import SearchConfig

# activation-map backbone -> the residual blocks above its cut, which this family trains: the
# last block from conv5_block2_out, or the whole of stage 5 from conv4_block6_out (the deeper
# cut: its first block has a projection shortcut and halves the map, 14x14 -> 7x7 at 224)
TOP_BLOCKS = {"resnet50_c5b2": ("conv5_block3",),
              "resnet50_c4b6": ("conv5_block1", "conv5_block2", "conv5_block3")}
# the layers of one ResNet bottleneck block with an identity shortcut, in order
BOTTLENECK = ("_1_conv", "_1_bn", "_1_relu", "_2_conv", "_2_bn", "_2_relu", "_3_conv", "_3_bn")
# the projection shortcut of a stage's first block (a strided 1x1 convolution and its batch norm)
PROJECTION = ("_0_conv", "_0_bn")


class CachedFinetuneHead(KerasHead):
    """The blocks above the cut (``TOP_BLOCKS[cut]``, from ``weights``) + global pooling (+
    ``meta`` metadata columns) + dropout + optional dense layer + softmax, fitted on activation
    maps (N, H, W, C) or their flattened rows (N, H*W*C); with ``meta`` > 0 on rows of the
    flattened map followed by the metadata (N, H*W*C + meta)."""

    # the best epoch by validation accuracy: a softmax that grows confident raises the val loss
    # while the accuracy still climbs (stopping on the loss restored epoch 2 of 6 on the real
    # data; the protocol this family follows stops on accuracy, patience 3)
    stop_on, stop_mode = "val_accuracy", "max"
    family = "cached_cnn"
    rules: ClassVar[dict[str, Rule]] = {
        "cut": one_of(*TOP_BLOCKS),
        "weights": Rule(lambda v: isinstance(v, str) and v != "",
                        "'imagenet', 'none' or a weights file path"),
        "channels": integer(1), "width": integer(0), "dropout": real(0, 1, high_open=True),
        "learning_rate": real(0, None, low_open=True), "class_weight": CLASS_WEIGHT,
        "flips": one_of(True, False), "tta": one_of(True, False), "epochs": integer(1),
        "patience": integer(0), "batch_size": integer(1), "seed": integer(0),
        "meta": integer(0), "head_init": one_of("random", "logistic"),
        "init_C": real(0, None, low_open=True)}

    def __init__(self, cut: str = "resnet50_c5b2", weights: str = "imagenet",
                 channels: int = 2048, width: int = 0, dropout: float = 0.3,
                 learning_rate: float = 1e-4, class_weight: str = "none", flips: bool = True,
                 tta: bool = True, epochs: int = 8, patience: int = 3, batch_size: int = 64,
                 seed: int = 0, meta: int = 0, head_init: str = "random",
                 init_C: float = 0.003) -> None:
        self.cut = cut
        self.weights = weights
        self.channels = channels
        self.width = width
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.class_weight = class_weight
        self.flips = flips
        self.tta = tta
        self.epochs = epochs
        self.patience = patience
        self.batch_size = batch_size
        self.seed = seed
        self.meta = meta  # metadata columns after the flattened map (0: none)
        # the classifier's start: Keras' random draw, or the frozen logistic regression (at
        # ``init_C``) on the block's own pooled features of the train maps
        self.head_init = head_init
        self.init_C = init_C

    def _inputs(self, X: np.ndarray) -> np.ndarray:
        """Maps (N, H, W, C) as float16 (how they are cached); flattened rows are reshaped. With
        ``meta`` columns: rows of the flattened map and the metadata, made maps of C + meta
        channels, the metadata constant over the cells (float16 too, in every path)."""
        X = np.asarray(X)
        if self.meta:
            return self._with_metadata(X)
        if X.ndim == 2:
            side = round((X.shape[1] / self.channels) ** 0.5)
            if side * side * self.channels != X.shape[1]:
                raise HeadError(f"CachedFinetuneHead takes square maps of {self.channels} "
                                f"channels, flattened or not. Got rows of {X.shape[1]} values.")
            X = X.reshape(len(X), side, side, self.channels)
        if X.ndim != 4 or X.shape[-1] != self.channels:
            raise HeadError(f"CachedFinetuneHead takes maps (N, H, W, {self.channels}). Got "
                            f"shape {X.shape} instead.")
        return X.astype(np.float16, copy=False)

    def _with_metadata(self, X: np.ndarray) -> np.ndarray:
        n_map = X.shape[1] - self.meta if X.ndim == 2 else -1
        side = round((max(n_map, 0) / self.channels) ** 0.5)
        if n_map <= 0 or side * side * self.channels != n_map:
            raise HeadError(f"CachedFinetuneHead with {self.meta} metadata columns takes rows: "
                            f"a flattened square map of {self.channels} channels, then the "
                            f"{self.meta} columns (feature spec '<map>+meta'). Got shape "
                            f"{X.shape} instead.")
        out = np.empty((len(X), side, side, self.channels + self.meta), np.float16)
        out[..., :self.channels] = X[:, :n_map].reshape(len(X), side, side, self.channels)
        out[..., self.channels:] = X[:, n_map:].astype(np.float16)[:, None, None, :]
        return out

    def _check_n_features(self, X: np.ndarray) -> None:
        """``X`` as ``_inputs`` made it, counted as rows (``n_features_in_``): the metadata
        channels of a map are its ``meta`` columns."""
        n = _row_length(np.shape(X)[1:], self.meta)
        if n != self.n_features_in_:
            raise HeadError(f"X has {n} features, but {type(self).__name__} is expecting "
                            f"{self.n_features_in_} features as input.")

    @classmethod
    def load(cls, directory: Path) -> CachedFinetuneHead:
        head = super().load(directory)
        head.n_features_in_ = _row_length(head.model_.input_shape[1:], head.meta)
        return head

    def _proba(self, model, X: np.ndarray) -> np.ndarray:
        views = _flips(X) if self.tta else [X]
        return np.mean([np.asarray(model.predict(v, batch_size=128, verbose=0), np.float64)
                        for v in views], axis=0)

    def _initialise(self, model, X: np.ndarray, y: np.ndarray) -> None:
        """``head_init='logistic'``: linear probing, then fine-tuning (LP-FT; Kumar et al., ICLR
        2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution").
        The classifier starts as the standardised multinomial logistic regression at ``init_C``
        fitted on the pooled features (with the metadata, where joined) that the block gives the
        unflipped train maps, its standardisation folded into the Dense layer's weights. Before
        the first step the head then predicts what that frozen logistic predicts (up to the
        test-time flips), and fine-tuning starts from there instead of from a random classifier
        whose first gradients pull the pretrained block towards it."""
        if self.head_init != "logistic":
            return
        if self.width:
            raise HeadError(f"head_init 'logistic' starts the classifier on the pooled features "
                            f"from a logistic regression, which needs width 0 (no hidden layer); "
                            f"got width {self.width}. Use head_init 'random' or width 0.")
        import keras

        # the classifier's input: the pooled features (and metadata) after the dropout, which
        # is the identity outside training
        pooled = keras.Model(model.input, model.get_layer("classifier").input)
        features = np.asarray(pooled.predict(X, batch_size=128, verbose=0), np.float64)
        probe = LogisticHead(C=self.init_C, class_weight=self.class_weight).fit(features, y)
        scores = probe.differentiable_scores()
        model.get_layer("classifier").set_weights([scores.weights.astype(np.float32),
                                                   scores.bias.astype(np.float32)])

    def _build(self, input_shape):
        import keras

        inputs = keras.Input(shape=input_shape, dtype="float16")
        x = keras.layers.RandomFlip("horizontal_and_vertical", seed=self.seed)(inputs) \
            if self.flips else inputs
        x = keras.layers.Activation("linear", dtype="float32", name="to_float32")(x)
        if self.meta:  # the metadata channels are constant over the cells: one cell holds them
            meta = x[:, 0, 0, self.channels:]
            x = x[..., :self.channels]
        source = self._source_layers()
        for block in TOP_BLOCKS[self.cut]:
            build = _projection_bottleneck if block + PROJECTION[0] in source else _bottleneck
            x = build(x, block, source)
        x = keras.layers.GlobalAveragePooling2D()(x)
        if self.meta:  # joined after pooling, as +meta joins the embedding heads' features
            x = keras.layers.Concatenate(name="with_metadata")([x, meta])
        x = keras.layers.Dropout(self.dropout)(x)
        if self.width:
            x = keras.layers.Dense(self.width, activation="relu")(x)
            x = keras.layers.Dropout(self.dropout)(x)
        outputs = keras.layers.Dense(N_CLASSES, activation="softmax", dtype="float32",
                                     name="classifier")(x)
        return keras.Model(inputs, outputs, name="cached_cnn_head")

    def _source_layers(self) -> dict[str, Any]:
        """The frozen network's layers above the cut, with their (ImageNet) weights."""
        import keras


        spec = get_spec(self.cut)
        keras.utils.set_random_seed(self.seed)  # weights 'none': the extractor's random ones
        constructor = getattr(keras.applications, spec.application)
        try:
            base = constructor(include_top=False, weights=resolve_weights(self.weights),
                               input_shape=(32, 32, 3))
        except (ValueError, OSError, KeyError) as exc:
            raise BackboneError(f"Weights {self.weights} do not fit {spec.application}: "
                                f"{str(exc)[:300]}.") from None
        return {layer.name: layer for layer in base.layers}


def _bottleneck(x, block: str, source: dict[str, Any]):
    """A copy of a ResNet bottleneck block (identity shortcut) with the source's weights; its
    batch norms stay frozen (inference statistics), as in any small-batch fine-tune."""
    return _residual(x, x, block, source)


def _projection_bottleneck(x, block: str, source: dict[str, Any]):
    """A copy of a stage's first ResNet bottleneck block, whose shortcut is a projection
    (``_0_conv``, strided like the block's ``_1_conv``, then ``_0_bn``), with the source's
    weights; its batch norms, the shortcut's too, stay frozen (inference statistics)."""
    shortcut = x
    for suffix in PROJECTION:
        shortcut = _copy(shortcut, source[block + suffix])
    return _residual(x, shortcut, block, source)


def _residual(x, shortcut, block: str, source: dict[str, Any]):
    """The block's main path on ``x`` (copied layers), added to ``shortcut``, then ReLU."""
    import keras

    for suffix in BOTTLENECK:
        x = _copy(x, source[block + suffix])
    x = keras.layers.Add(name=f"{block}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{block}_out")(x)


def _copy(x, old):
    """``old`` layer's copy (same config and weights) applied to ``x``: trainable, but a batch
    norm, which stays frozen (whether or not the source network was frozen)."""
    import keras

    layer = type(old).from_config(old.get_config())
    x = layer(x)
    layer.set_weights(old.get_weights())
    layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    return x


def _row_length(map_shape: tuple[int, ...], meta: int) -> int:
    """Values per row of a map (H, W, C + meta) whose last ``meta`` channels are constant
    metadata: the flattened map and the ``meta`` columns."""
    return int(np.prod(map_shape)) - (int(np.prod(map_shape[:-1])) - 1) * meta


def _flips(X: np.ndarray) -> list[np.ndarray]:
    """The four flips of maps (N, H, W, C): as is, left-right, up-down, both."""
    return [X, X[:, :, ::-1], X[:, ::-1], X[:, ::-1, ::-1]]


FEATURES = Setting(
    "cached_cnn_features", "resnet50_c5b2", str, OUTPUT,
    Rule(lambda v: v in TOP_BLOCKS, f"one of {sorted(TOP_BLOCKS)} (an activation-map backbone)"),
    "the activation map it trains on (cached by the extraction)")
WEIGHTS = Setting("cached_cnn_weights", "", str, OUTPUT, None,
                  "the weights its top block starts from ('': the extraction's)")
EPOCHS = Setting("cached_cnn_epochs", 8, int, OUTPUT, at_least(1), "epochs per trial")
# 64, not the protocol's 32: on 2 CPU cores a training step over 64 maps runs at about twice the
# maps/s of 32 (oneDNN's kernels; benchmarks/cached_finetune.py, docs/performance.md), and the
# first point's learning rate doubles with it (the linear scaling rule)
BATCH = Setting("cached_cnn_batch_size", 64, int, OUTPUT, at_least(1),
                "maps per training step (64: about twice the maps/s of 32 on CPU)")
TTA = Setting("cached_cnn_tta", True, bool, OUTPUT, None,
              "average the probabilities of a map's four flips")
META = Setting(
    "cached_cnn_meta", (False,), tuple[bool, ...], OUTPUT,
    Rule(lambda v: len(v) > 0 and len(set(v)) == len(v),
         "a non-empty list of true/false without repeats"),
    "patient metadata (age, sex, localization) joined after pooling: [false], [true], or "
    "[false, true] to search both (input resnet50_c5b2 or resnet50_c5b2+meta)")
# LP-FT: the classifier starts as the logistic regression on the block's own pooled features (of
# the unflipped train maps), so fine-tuning starts where the frozen probe is (dermray/models/
# heads/cached.py, CachedFinetuneHead._initialise); needs no hidden layer (width 0)
HEAD_INIT = Setting(
    "cached_cnn_head_init", "random", str, OUTPUT, one_of("random", "logistic"),
    "the classifier's start: 'random' (Keras' draw) or 'logistic' (the frozen logistic "
    "regression on the block's pooled features, then fine-tuning; the search then keeps width 0)")
GPUS = Setting("cached_cnn_gpus", -1.0, float, OUTPUT, GPU_SHARE,
               "GPUs per trial where the cluster has GPUs (-1: a quarter, so that 4 trials share "
               "one; the maps are small)")
# a trial holds the train maps several times (as cached, repacked with the metadata, in
# TensorFlow's input pipeline) and the four flips of the val maps: 7.8 GB resident for the 7,451
# train maps of ham10000_local.yaml. Ray does not know that unless it is asked for, and starts a
# second such trial beside the first one on a machine that cannot hold both (Ray's memory
# monitor then kills one and the search stops)
MEMORY = Setting("cached_cnn_memory_gb", 0.0, float, NEUTRAL, at_least(0),
                 "memory per trial for Ray to reserve, in GB (0: none); Ray schedules no more "
                 "trials on a node than its memory resource holds")


def _space(trial: Any, cfg: SearchConfig) -> None:
    trial.suggest_float("cached_cnn_learning_rate", 3e-5, 1e-3, log=True)
    trial.suggest_float("cached_cnn_dropout", 0.0, 0.6)
    # a logistic start is a classifier on the pooled features: no hidden layer between
    trial.suggest_categorical("cached_cnn_width",
                              [0] if HEAD_INIT.read(cfg) == "logistic" else [0, 256])
    trial.suggest_categorical("cached_cnn_class_weight", ["none", "balanced"])
    if len(META.read(cfg)) > 1:  # with and without metadata: a searched choice
        trial.suggest_categorical("cached_cnn_meta", list(META.read(cfg)))


def _first_point(cfg: SearchConfig) -> dict[str, Any]:
    searched = {"cached_cnn_meta": META.read(cfg)[0]} if len(META.read(cfg)) > 1 else {}
    return {"cached_cnn_learning_rate": 2e-4, "cached_cnn_dropout": 0.3, "cached_cnn_width": 0,
            "cached_cnn_class_weight": "none", **searched}


def extraction_weights(out: str, backbone: str) -> str:
    """The weights the extraction used for ``backbone`` (OUT/extract_run.json), so that the
    trained block starts from the same network that made the cached maps.

    A trial runs in its own folder (on a cluster, on another machine), so a recorded relative
    path is resolved against the extraction's working directory, and a path that is not there
    is found by its sha256 (``--weights-dir`` folders, $DERMRAY_WEIGHTS_DIR, the Keras cache)."""


    path = storage.join(out, "extract_run.json")
    if not storage.is_file(path):
        return "imagenet"
    record = read_json_output(path, "redo the extraction (`dermray extract --fresh`)", dict)
    weights = record.get("config", {}).get("weights", {}).get(backbone, "imagenet")
    if weights.lower() in ("imagenet", "none"):
        return weights
    local = os.path.join(record.get("cwd", os.getcwd()), os.path.expanduser(weights))
    if os.path.isfile(local):
        return local
    return find_weights(backbone, record.get("weights", {}).get(backbone, "none"),
                        record.get("weights_names", {}).get(backbone, ""),
                        hint=record.get("weights_hints", {}).get(backbone, ""),
                        origin=record.get("weights_origins", {}).get(backbone, ""))


def _fixed(cfg: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:

    cut = FEATURES.read(cfg)
    meta = params.get("meta", META.read(cfg)[0])  # searched, or the setting's one option
    return {"cut": cut, "channels": get_spec(cut).channels, "meta": N_METADATA if meta else 0,
            "weights": WEIGHTS.read(cfg) or extraction_weights(cfg.out, cut),
            "epochs": EPOCHS.read(cfg), "tta": TTA.read(cfg), "patience": 3,
            "batch_size": BATCH.read(cfg), "head_init": HEAD_INIT.read(cfg),
            "seed": cfg.seed}


def _resources(cfg: SearchConfig, cluster_has_gpus: bool) -> dict[str, float]:
    gpus = GPUS.read(cfg)
    gb = MEMORY.read(cfg)
    memory = {"memory": gb * 1e9} if gb > 0 else {}
    return {"CPU": cfg.cpus_per_trial,
            "GPU": gpus if gpus >= 0 else (0.25 if cluster_has_gpus else 0.0), **memory}


SPEC = register_family(FamilySpec(
    "cached_cnn", CachedFinetuneHead, space=_space, first_point=_first_point, input=ACTIVATIONS,
    fixed_params=_fixed, resources=_resources, iterative=True, activations=FEATURES.read,
    metadata=META.read,
    settings=(FEATURES, WEIGHTS, EPOCHS, BATCH, TTA, META, HEAD_INIT, GPUS, MEMORY),
    packages=("tensorflow",)))
