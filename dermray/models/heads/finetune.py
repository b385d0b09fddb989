"""Fine-tuned CNN: the backbone with its top block(s) unfrozen plus a dense head, trained on
images (uint8, N x S x S x 3) with on-the-fly augmentation. Needs GPUs at full size; on CPU it
runs on tiny inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dermray.io.fingerprint import OUTPUT
from dermray.models.backbones import CAFFE_MEAN_BGR, build_extractor, get_spec
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
from dermray.models.heads.registry import (
    GPU_SHARE,
    IMAGES,
    FamilySpec,
    Setting,
    at_least,
    register_family,
)

if TYPE_CHECKING:
    from dermray.config import SearchConfig

# the layer-name prefixes of each backbone's last blocks, top first
TOP_BLOCKS = {"vgg19": ("block5", "block4", "block3"),
              "resnet50": ("conv5", "conv4", "conv3")}


class FinetuneHead(KerasHead):
    family = "finetune"
    rules: ClassVar[dict[str, Rule]] = {"backbone": one_of(*TOP_BLOCKS),
             "weights": Rule(lambda v: isinstance(v, str) and v != "",
                             "'imagenet', 'none' or a weights file path"),
             "image_size": integer(32), "unfreeze_blocks": integer(0, 3), "width": integer(1),
             "dropout": real(0, 1, high_open=True), "learning_rate": real(0, None, low_open=True),
             "class_weight": CLASS_WEIGHT, "epochs": integer(1), "patience": integer(0),
             "batch_size": integer(1), "seed": integer(0)}

    def __init__(self, backbone: str = "resnet50", weights: str = "imagenet",
                 image_size: int = 224, unfreeze_blocks: int = 1, width: int = 256,
                 dropout: float = 0.3, learning_rate: float = 1e-4, class_weight: str = "none",
                 epochs: int = 10, patience: int = 3, batch_size: int = 32, seed: int = 0) -> None:
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.unfreeze_blocks = unfreeze_blocks
        self.width = width
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.class_weight = class_weight
        self.epochs = epochs
        self.patience = patience
        self.batch_size = batch_size
        self.seed = seed

    def _inputs(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 4 or X.shape[1:] != (self.image_size, self.image_size, 3):
            raise HeadError(f"FinetuneHead takes images of shape (N, {self.image_size}, "
                            f"{self.image_size}, 3). Got {X.shape} instead.")
        return X.astype(np.float32)

    def _build(self, input_shape):
        import keras

        get_spec(self.backbone)
        base = build_extractor(self.backbone, self.weights, self.image_size)
        base.trainable = True
        unfrozen = TOP_BLOCKS[self.backbone][: self.unfreeze_blocks]
        for layer in base.layers:
            # batch-norm statistics stay frozen: small batches would wreck them
            layer.trainable = (layer.name.startswith(unfrozen)
                               and not isinstance(layer, keras.layers.BatchNormalization))
        inputs = keras.Input(shape=input_shape)
        x = keras.layers.RandomFlip("horizontal_and_vertical")(inputs)
        x = keras.layers.RandomRotation(0.05, fill_mode="reflect")(x)
        # the "caffe" preprocessing as plain layers (no Lambda: the .keras file stays code-free)
        x = _caffe_layer()(x)
        x = base(x, training=False)
        x = keras.layers.Dropout(self.dropout)(x)
        x = keras.layers.Dense(self.width, activation="relu")(x)
        outputs = keras.layers.Dense(N_CLASSES, activation="softmax", dtype="float32")(x)
        return keras.Model(inputs, outputs, name="finetune_head")


def _caffe_layer():
    """RGB->BGR and mean subtraction as a 1x1 convolution with fixed weights."""
    import keras

    kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
    for out_c, in_c in enumerate((2, 1, 0)):
        kernel[0, 0, in_c, out_c] = 1.0
    layer = keras.layers.Conv2D(3, 1, use_bias=True, trainable=False, name="caffe_preprocess")
    layer.build((None, None, None, 3))
    layer.set_weights([kernel, -CAFFE_MEAN_BGR])
    return layer


BACKBONES = Setting(
    "finetune_backbones", ("resnet50",), tuple[str, ...], OUTPUT,
    Rule(lambda v: len(v) > 0 and len(set(v)) == len(v) and set(v) <= set(TOP_BLOCKS),
         f"a non-empty list of {', '.join(sorted(TOP_BLOCKS))} without repeats"),
    "the backbones a trial may fine-tune (searched; the first is the first trial's)")
WEIGHTS = Setting(
    "finetune_weights", {}, dict[str, str], OUTPUT,
    Rule(lambda v: set(v) <= set(TOP_BLOCKS) and all(isinstance(w, str) and w for w in v.values()),
         f"keyed by {', '.join(sorted(TOP_BLOCKS))}, each 'imagenet', 'none' or a weights "
         "file path"),
    "backbone -> the weights a fine-tune starts from (default 'imagenet')")
IMAGE_SIZE = Setting("finetune_image_size", 224, int, OUTPUT, at_least(1),
                     "the side of the images a fine-tune trains on")
EPOCHS = Setting("finetune_epochs", 10, int, OUTPUT, at_least(1), "epochs per trial")
MAX_TRAIN_IMAGES = Setting("finetune_max_train_images", 0, int, OUTPUT, at_least(0, "0: all"),
                           "train images per trial: all on a cluster, a few on a laptop")
GPUS = Setting("gpus_per_finetune_trial", -1.0, float, OUTPUT, GPU_SHARE,
               "GPUs per trial; -1: one where the cluster has GPUs, else none")


def _space(trial: Any, cfg: SearchConfig) -> None:
    trial.suggest_categorical("finetune_backbone", list(BACKBONES.read(cfg)))
    trial.suggest_int("finetune_unfreeze_blocks", 0, 2)
    trial.suggest_float("finetune_learning_rate", 1e-5, 1e-3, log=True)
    trial.suggest_float("finetune_dropout", 0.0, 0.5)


def _first_point(cfg: SearchConfig) -> dict[str, Any]:
    return {"finetune_backbone": BACKBONES.read(cfg)[0], "finetune_unfreeze_blocks": 1,
            "finetune_learning_rate": 1e-4, "finetune_dropout": 0.3}


def _fixed(cfg: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    return {"weights": WEIGHTS.read(cfg).get(params["backbone"], "imagenet"),
            "image_size": IMAGE_SIZE.read(cfg), "epochs": EPOCHS.read(cfg),
            "patience": 3, "seed": cfg.seed, "batch_size": 16}


def _resources(cfg: SearchConfig, cluster_has_gpus: bool) -> dict[str, float]:
    gpus = GPUS.read(cfg)
    return {"CPU": cfg.cpus_per_trial,
            "GPU": gpus if gpus >= 0 else (1.0 if cluster_has_gpus else 0.0)}


SPEC = register_family(FamilySpec(
    "finetune", FinetuneHead, space=_space, first_point=_first_point, input=IMAGES,
    fixed_params=_fixed, resources=_resources, iterative=True,
    settings=(BACKBONES, WEIGHTS, IMAGE_SIZE, EPOCHS, MAX_TRAIN_IMAGES, GPUS),
    packages=("tensorflow",), image_size=IMAGE_SIZE.read, max_train_images=MAX_TRAIN_IMAGES.read))
