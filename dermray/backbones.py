"""Registry of frozen feature extractors: name -> builder, preprocessing, input size, feature size.

The model code is plain Keras 3 (``keras.applications``), so it runs on any Keras backend;
only device set-up and the compiled forward call look at the backend.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermray.errors import DermrayError

logger = logging.getLogger(__name__)

# ImageNet channel means in BGR order, as keras.applications' "caffe" mode subtracts them
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)


class BackboneError(DermrayError):
    """An unknown backbone, or weights that cannot be loaded into it."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a frozen extractor is: how to build it, how to feed it, what it returns."""

    name: str
    application: str  # the keras.applications constructor
    feature_dim: int
    preprocessing: str = "caffe"
    default_size: int = 224
    # globally pooled outputs of these layers, concatenated (None: the last block, avg-pooled)
    stages: tuple[str, ...] | None = None
    gflops_224: float = 0.0  # forward GFLOP per 224x224 image (for efficiency figures)
    # (other backbone, start, stop): this backbone's features are a column slice of that one's,
    # so an actor holding both computes the network once
    slice_of: tuple[str, int, int] | None = None


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


register_backbone(BackboneSpec("vgg19", "VGG19", 512, gflops_224=39.3))
register_backbone(BackboneSpec("resnet50", "ResNet50", 2048, gflops_224=8.2,
                               slice_of=("resnet50_ms", 1792, 3840)))
# multi-stage ResNet50: the pooled outputs of all four stages (256+512+1024+2048)
register_backbone(BackboneSpec(
    "resnet50_ms", "ResNet50", 3840, gflops_224=8.2,
    stages=("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
))


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"Unknown backbone {name!r}. Known backbones: "
                            f"{', '.join(sorted(BACKBONES))}.") from None


def caffe_preprocess(images: np.ndarray) -> np.ndarray:
    """keras.applications' "caffe" preprocessing: RGB->BGR, minus the ImageNet mean, 0-255 in."""
    x = np.asarray(images, dtype=np.float32)[..., ::-1]
    return x - CAFFE_MEAN_BGR


def preprocess(name: str, images: np.ndarray) -> np.ndarray:
    """The backbone's own preprocessing of uint8 RGB images (N, H, W, 3)."""
    spec = get_spec(name)
    if spec.preprocessing == "caffe":
        return caffe_preprocess(images)
    raise BackboneError(f"No preprocessing {spec.preprocessing!r} for {name}.")


def resolve_weights(weights: str | None) -> str | None:
    """'imagenet' and None pass through; 'none' means None; a path must exist."""
    if weights is None or str(weights).lower() == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneError(f"Weights file {weights} does not exist. Pass an existing .h5/.keras "
                            "file, 'imagenet' (downloads on a machine with internet) or 'none'.")
    return str(path)


def weights_identity(weights: str | None) -> str:
    """'imagenet', 'none' or 'sha256:<hex>' of a weights file: what the run record stores."""
    resolved = resolve_weights(weights)
    if resolved is None:
        return "none"
    if resolved == "imagenet":
        return "imagenet"
    digest = hashlib.sha256()
    with open(resolved, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def configure_devices(mixed_precision: bool = False) -> list[str]:
    """Set GPU memory growth before any model is built; optionally mixed precision.

    Returns the GPU names seen (empty on a CPU machine).
    """
    import keras

    gpus: list[str] = []
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised: growth can no longer change
                logger.warning("GPU %s already initialised; memory growth unchanged", gpu.name)
            gpus.append(gpu.name)
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    return gpus


def build_extractor(name: str, weights: str | None = "imagenet", image_size: int = 224):
    """A frozen Keras model: preprocessed (N, S, S, 3) float32 -> (N, feature_dim) features."""
    import keras

    spec = get_spec(name)
    resolved = resolve_weights(weights)
    constructor = getattr(keras.applications, spec.application)
    try:
        base = constructor(include_top=False, weights=resolved,
                           input_shape=(image_size, image_size, 3),
                           pooling=None if spec.stages else "avg")
    except (ValueError, OSError, KeyError) as exc:
        raise BackboneError(f"Weights {weights} do not fit {spec.application} (include_top=False): "
                            f"{str(exc)[:300]}. Pass the {spec.application} 'notop' weights file, "
                            "'imagenet' or 'none'.") from None
    if spec.stages:
        pooled = [keras.layers.GlobalAveragePooling2D(name=f"pool_{layer}")(
            base.get_layer(layer).output) for layer in spec.stages]
        model = keras.Model(base.input, keras.layers.Concatenate(name="stages")(pooled),
                            name=f"{name}_extractor")
    else:
        model = base
    model.trainable = False
    return model


def compile_forward(model, jit_compile: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """The fastest plain call of a frozen model: a (XLA-)compiled function, not ``predict``.

    On TensorFlow a ``tf.function`` (``jit_compile`` for XLA); on other backends Keras'
    ``predict_on_batch``, which JAX compiles itself. Feed fixed batch shapes to avoid retracing.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile,
                         reduce_retracing=True)
        return lambda x: np.asarray(fn(tf.convert_to_tensor(x, tf.float32)), dtype=np.float32)
    return lambda x: np.asarray(model.predict_on_batch(x), dtype=np.float32)
