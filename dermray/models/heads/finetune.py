"""Fine-tuned CNN: the backbone with its top block(s) unfrozen plus a dense head, trained on
images (uint8, N x S x S x 3) with on-the-fly augmentation. Needs GPUs at full size; on CPU it
runs on tiny inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dermray.errors import check
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
from dermray.models.heads.registry import IMAGES, FamilySpec, register_family

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


def _space(trial: Any, cfg: SearchConfig) -> None:
    trial.suggest_categorical("finetune_backbone", list(cfg.finetune_backbones))
    trial.suggest_int("finetune_unfreeze_blocks", 0, 2)
    trial.suggest_float("finetune_learning_rate", 1e-5, 1e-3, log=True)
    trial.suggest_float("finetune_dropout", 0.0, 0.5)


def _first_point(cfg: SearchConfig) -> dict[str, Any]:
    return {"finetune_backbone": cfg.finetune_backbones[0], "finetune_unfreeze_blocks": 1,
            "finetune_learning_rate": 1e-4, "finetune_dropout": 0.3}


def _fixed(cfg: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    return {"weights": cfg.finetune_weights.get(params["backbone"], "imagenet"),
            "image_size": cfg.finetune_image_size, "epochs": cfg.finetune_epochs,
            "patience": 3, "seed": cfg.seed, "batch_size": 16}


def _resources(cfg: SearchConfig, cluster_has_gpus: bool) -> dict[str, float]:
    gpus = cfg.gpus_per_finetune_trial
    return {"CPU": cfg.cpus_per_trial,
            "GPU": gpus if gpus >= 0 else (1.0 if cluster_has_gpus else 0.0)}


def _image_size(cfg: SearchConfig) -> int:
    return cfg.finetune_image_size


def _max_train_images(cfg: SearchConfig) -> int:
    return cfg.finetune_max_train_images


def _check_config(cfg: SearchConfig) -> None:
    for key in ("finetune_image_size", "finetune_epochs"):
        check(getattr(cfg, key) >= 1, "search", key, getattr(cfg, key), ">= 1")


SPEC = register_family(FamilySpec(
    "finetune", FinetuneHead, space=_space, first_point=_first_point, input=IMAGES,
    fixed_params=_fixed, resources=_resources, iterative=True,
    config_keys=("finetune_backbones", "finetune_weights", "finetune_image_size",
                 "finetune_epochs", "finetune_max_train_images", "gpus_per_finetune_trial"),
    check_config=_check_config, image_size=_image_size, max_train_images=_max_train_images))
