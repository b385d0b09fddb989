"""Where the evidence is: a heat map per image for an exported model (``dermray explain``).

Two methods, chosen from what the head is:

**Grad-CAM** (Selvaraju et al. 2017) where the whole model is differentiable, as the head's
``differentiable_scores()`` says: a linear map of the features (``LinearScores``: the logistic
head) or a Keras model (``KerasScores``: the MLP and the fine-tuned CNN). The frozen backbone
and the head are composed into one TensorFlow function, image -> class score, so gradients flow
from the score back to the backbone's last convolutional map ``A`` (the last 4-D, non-pooling
layer: ``conv5_block3_out`` of ResNet50, ``block5_conv4`` of VGG19). Per channel ``k`` the weight
is the spatial mean of the gradient, ``alpha_k = mean_ij dS/dA_ijk``, and the map is
``ReLU(sum_k alpha_k A_ijk)``.

- The score ``S`` is the *pre-softmax* score of the class: the logistic head's logit, the last
  Dense layer's input times its kernel plus bias for Keras heads. The softmax would mix in the
  other classes' scores.
- For the logistic head on an average-pooled map (ResNet50) this is *exactly* CAM (Zhou et al.
  2016): the logit is ``sum_ij (1/HW) sum_k w'_k A_ijk + b`` (``w'`` the weights over the
  standardisation scale), so the gradient is the same at every position, ``alpha_k = w'_k / HW``,
  and the map is each location's additive share of the logit. Elsewhere (VGG19's max pool,
  MLP non-linearities) it is Grad-CAM's first-order approximation.
- Fused backbones (``resnet50+vgg19``): each backbone's map, scaled by its cells (``H*W``) so
  that maps of different resolutions are per-pixel shares of the same score, is upsampled and
  the maps are added. Patient metadata enters as constants.
- A bundle with test-time views averages the features of the dihedral views, as predict does;
  the gradient of that average reaches each view's map, which is turned back to the image's
  orientation before the maps are averaged.

**Occlusion sensitivity** (Zeiler & Fergus 2014) for everything else (XGBoost, whose trees
have no gradient, and any head whose ``differentiable_scores()`` is None), or when asked: a
patch of the image's mean colour slides over it (a quarter of the side, stride an eighth) and
each pixel gets the mean drop of the class probability over the patches that cover it. It costs
one forward pass per patch position (49), and it uses the bundle's own ``features`` and head, so
it explains exactly what ``dermray predict`` computes.

An ensemble bundle (a soft vote of several heads) is explained by occlusion over the ensemble's
own probability, the weighted mean ``dermray predict`` reports: its members need not be
differentiable (XGBoost), and a mixture of probabilities has no one pre-softmax score.

The class explained is the one ``dermray predict`` decides under ``policy``; the probability
shown is the head's, as in predict's ``p_<class>`` column.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from dermray.data.augment import DecodeError, decode_image, dihedral
from dermray.errors import DermrayError
from dermray.models.backbones import build_extractor, get_spec, preprocess
from dermray.models.bundle import Bundle
from dermray.models.features import metadata_matrix
from dermray.models.heads.base import LinearScores
from dermray.models.predict_io import Limits, read_limited

logger = logging.getLogger(__name__)

METHODS = ("auto", "gradcam", "occlusion")


@dataclass
class Explanation:
    """One image explained: the model's input, its decision and the heat map (S x S, 0..1)."""

    image: np.ndarray  # (S, S, 3) uint8, what the model saw
    label: str
    proba: float
    method: str
    heat: np.ndarray  # (S, S) float32, 1 at the strongest evidence
    probabilities: dict[str, float]


def gradcam_supported(bundle: Bundle) -> bool:
    """Whether the head is a differentiable function Grad-CAM can go through (see the module
    docstring): a linear head or a Keras head, on pooled backbone features or on images."""
    if bundle.head.differentiable_scores() is None:
        return False
    return not any(get_spec(b.name).is_map for b in bundle.spec.backbones)


def choose_method(bundle: Bundle, method: str = "auto") -> str:
    if method not in METHODS:
        raise DermrayError(f"--method must be one of {', '.join(METHODS)}. Got {method!r} instead.")
    if method == "auto":
        return "gradcam" if gradcam_supported(bundle) else "occlusion"
    if method == "gradcam" and not gradcam_supported(bundle):
        raise DermrayError(f"The {bundle.spec.family} head has no gradient (trees, a soft-vote "
                           "ensemble, or an unknown form): use --method occlusion (or auto).")
    return method


def normalise(heat: np.ndarray) -> np.ndarray:
    """ReLU, then scaled to 0..1 (all zeros stay zeros: no evidence anywhere)."""
    heat = np.maximum(np.nan_to_num(np.asarray(heat, dtype=np.float64)), 0.0)
    top = heat.max()
    return (heat / top if top > 0 else heat).astype(np.float32)


def upsample(cells: np.ndarray, size: int) -> np.ndarray:
    """A coarse (h, w) map to (size, size), bilinear: each cell covers its patch of the image."""
    img = Image.fromarray(np.asarray(cells, dtype=np.float32))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)


def undo_dihedral(cells: np.ndarray, k: int) -> np.ndarray:
    """The inverse of ``augment.dihedral`` on a square map: back to the image's orientation."""
    out = cells[:, ::-1] if k >= 4 else cells
    return np.ascontiguousarray(np.rot90(out, -(k % 4), axes=(0, 1)))


# ---- occlusion --------------------------------------------------------------------------------

def occlusion_map(predict: Any, image: np.ndarray, target: int, patch: int | None = None,
                  stride: int | None = None) -> np.ndarray:
    """Mean drop of ``predict(images)[:, target]`` when a mean-coloured patch covers each pixel.

    ``predict``: uint8 images (N, S, S, 3) -> probabilities (N, classes).
    """
    size = image.shape[0]
    patch = patch or max(2, size // 4)
    stride = stride or max(1, size // 8)
    fill = image.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    boxes = [(y, x) for y in starts for x in starts]
    batch = np.repeat(image[None], len(boxes) + 1, axis=0)
    for i, (y, x) in enumerate(boxes, start=1):
        batch[i, y:y + patch, x:x + patch] = fill
    proba = np.asarray(predict(batch))[:, target]
    drop = np.zeros((size, size))
    count = np.zeros((size, size))
    for (y, x), p in zip(boxes, proba[1:], strict=True):
        drop[y:y + patch, x:x + patch] += proba[0] - p
        count[y:y + patch, x:x + patch] += 1
    return (drop / np.maximum(count, 1)).astype(np.float32)


# ---- Grad-CAM ---------------------------------------------------------------------------------

def conv_map_layer(model: Any) -> Any:
    """The last layer with a 4-D output that is not a pooling layer: the map Grad-CAM uses."""
    import keras

    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None) is not None and layer.output.shape
        if (shape and len(shape) == 4 and not isinstance(layer, keras.layers.InputLayer)
                and "Pooling" not in type(layer).__name__):
            return layer
    raise DermrayError(f"{model.name} has no convolutional map for Grad-CAM: use --method "
                       "occlusion.")


def _keras_logits(model: Any) -> tuple[Any, Any, Any]:
    """A Keras head split at its last Dense layer: (model up to that layer's input, kernel,
    bias), so that the pre-softmax score is ``sub(x) @ kernel + bias``."""
    import keras

    last = model.layers[-1]
    if not isinstance(last, keras.layers.Dense):
        raise DermrayError(f"The head's last layer is {type(last).__name__}, not Dense: use "
                           "--method occlusion.")
    return keras.Model(model.inputs, last.input), last.kernel, last.bias


class GradCam:
    """The bundle's backbones and head as one differentiable function, built once."""

    def __init__(self, bundle: Bundle) -> None:
        import keras


        self.bundle = bundle
        self.size = bundle.spec.image_size
        self.on_images = bundle.spec.takes_images
        scores = bundle.head.differentiable_scores()
        self.nets = []
        if self.on_images:
            self._finetune_parts(scores.model)
        else:
            for b in bundle.spec.backbones:
                # seeded as the bundle's embedder builds it: random weights are the same weights
                keras.utils.set_random_seed(bundle.spec.seed)
                net = build_extractor(b.name, bundle.weights[b.name], self.size)
                layer = conv_map_layer(net)
                self.nets.append((b, keras.Model(net.inputs, [layer.output, net.output])))
            if isinstance(scores, LinearScores):
                self.head_sub = None
                self.kernel, self.bias = scores.weights, scores.bias
            else:
                self.head_sub, self.kernel, self.bias = _keras_logits(scores.model)

    def _finetune_parts(self, model: Any) -> None:
        """The fine-tuned CNN: its outer layers around the nested backbone model."""
        import keras

        self.outer = [layer for layer in model.layers[:-1]
                      if not isinstance(layer, keras.layers.InputLayer)]
        self.last = model.layers[-1]
        inner = [layer for layer in self.outer if isinstance(layer, keras.Model)]
        if len(inner) != 1 or not isinstance(self.last, keras.layers.Dense):
            raise DermrayError("This fine-tuned model is not backbone + dense layers: use "
                               "--method occlusion.")
        self.inner = inner[0]
        layer = conv_map_layer(self.inner)
        self.inner_grad = keras.Model(self.inner.inputs, [layer.output, self.inner.output])

    def _logits(self, X: Any) -> Any:
        import tensorflow as tf

        if self.head_sub is None:  # linear: X @ weights + bias (the logistic head's logits)
            return (tf.matmul(X, tf.constant(self.kernel, tf.float32))
                    + tf.constant(self.bias, tf.float32))
        return tf.matmul(self.head_sub(X, training=False), self.kernel) + self.bias

    def heat(self, image: np.ndarray, target: int, meta: np.ndarray | None = None) -> np.ndarray:
        """The (S, S) Grad-CAM map of class ``target`` for one uint8 image (not normalised)."""
        import tensorflow as tf

        if self.on_images:
            return self._heat_images(image, target)

        views = list(range(self.bundle.spec.tta_views + 1))
        total = np.zeros((self.size, self.size), dtype=np.float32)
        with tf.GradientTape() as tape:
            maps, feats = [], []
            for b, net in self.nets:  # in the preprocessing the bundle records
                x = preprocess(b.name, np.stack([dihedral(image, k) for k in views]),
                               b.preprocessing)
                fmap, pooled = net(tf.constant(x), training=False)
                maps.append(fmap)
                feats.append(tf.reduce_mean(pooled, axis=0, keepdims=True))  # the TTA average
            X = tf.concat(feats, axis=1)
            if meta is not None:
                X = tf.concat([X, tf.constant(meta, tf.float32)], axis=1)
            score = self._logits(X)[0, target]
        grads = tape.gradient(score, maps)
        for fmap, grad in zip(maps, grads, strict=True):
            fmap, grad = fmap.numpy(), grad.numpy()
            for v, k in enumerate(views):
                cells = np.tensordot(fmap[v], grad[v].mean(axis=(0, 1)), axes=([2], [0]))
                cells = undo_dihedral(cells * cells.size, k)  # per-pixel share across resolutions
                total += upsample(cells, self.size) / len(views)
        return total

    def _heat_images(self, image: np.ndarray, target: int) -> np.ndarray:
        import tensorflow as tf

        x = tf.constant(image[None].astype(np.float32))
        with tf.GradientTape() as tape:
            for layer in self.outer:
                if layer is self.inner:
                    fmap, x = self.inner_grad(x, training=False)
                else:
                    x = layer(x, training=False)
            score = (tf.matmul(x, self.last.kernel) + self.last.bias)[0, target]
        grad = tape.gradient(score, fmap).numpy()[0]
        fmap = fmap.numpy()[0]
        cells = np.tensordot(fmap, grad.mean(axis=(0, 1)), axes=([2], [0]))
        return upsample(cells, self.size)


# ---- one image, and the command ---------------------------------------------------------------

class Explainer:
    """Explain images with one bundle: the method chosen once, Grad-CAM's graph built once."""

    def __init__(self, bundle: Bundle, method: str = "auto", policy: str = "accuracy") -> None:
        self.bundle, self.policy = bundle, policy
        self.method = choose_method(bundle, method)
        self._gradcam = GradCam(bundle) if self.method == "gradcam" else None

    def _meta(self) -> np.ndarray | None:
        """The 'unknown' metadata encoding, for heads trained with metadata (as predict)."""
        if not self.bundle.uses_metadata:
            return None


        return metadata_matrix(pd.DataFrame({"age": [np.nan], "sex": ["unknown"],
                                             "localization": ["unknown"]}))

    def predict(self, images: np.ndarray) -> np.ndarray:
        meta = self._meta()
        frame = None
        if meta is not None:

            frame = pd.DataFrame({"age": [np.nan] * len(images), "sex": "unknown",
                                  "localization": "unknown"})
        return self.bundle.head.predict_proba(self.bundle.features(images, frame))

    def explain(self, image: np.ndarray) -> Explanation:
        proba = self.predict(image[None])
        target = int(self.bundle.decide(proba, self.policy)[0])
        if self._gradcam is not None:
            raw = self._gradcam.heat(image, target, self._meta())
        else:
            raw = occlusion_map(self.predict, image, target)
        labels = self.bundle.labels
        return Explanation(image=image, label=labels[target], proba=float(proba[0, target]),
                           method=self.method, heat=normalise(raw),
                           probabilities={c: float(p) for c, p in zip(labels, proba[0],
                                                                      strict=True)})


def render(explanation: Explanation, original: Image.Image | None, path: str | Path,
           title: str = "") -> Path:
    """A PNG: the image, and the image under the heat map, titled with the decision."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    shown = np.asarray(original.convert("RGB")) if original is not None else explanation.image
    height, width = shown.shape[:2]
    heat = np.asarray(Image.fromarray(explanation.heat).resize((width, height),
                                                                         Image.BILINEAR))
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.0 * height / width + 0.6), dpi=100)
    axes[0].imshow(shown)
    axes[0].set_title(title or "image", fontsize=9)
    axes[1].imshow(shown)
    # opacity follows the evidence: where there is none, the image shows through untinted
    axes[1].imshow(heat, cmap="jet", alpha=0.7 * np.clip(heat, 0.0, 1.0), vmin=0.0, vmax=1.0)
    axes[1].set_title(f"{explanation.label}  p={explanation.proba:.2f}  ({explanation.method})",
                      fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def display_image(data: bytes, width: int = 600) -> Image.Image:
    """The image as shown beside its heat map: upright (EXIF), RGB, at most ``width`` wide (the
    model's square input stretches over it, as the model's resize stretched the image)."""
    from PIL import ImageOps

    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (width, width))  # JPEGs decode small; the pixel limit was checked before
    img = ImageOps.exif_transpose(img) or img
    img.thumbnail((width, width * 4))
    return img.convert("RGB")


def explain_files(bundle: Bundle, paths: list[str | Path], out: str | Path, method: str = "auto",
                  policy: str = "accuracy", limits: Limits | None = None,
                  explainer: Explainer | None = None
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    """A PNG per image in ``out`` (``<image name>.png``) and ``explanations.json``; returns the
    records and a problem per file that could not be read (within ``limits``, as predict reads).
    ``explainer``: one already built for ``bundle`` (its method and policy are used)."""

    explainer = explainer or Explainer(bundle, method, policy)
    limits = limits or Limits()
    out = Path(out)
    records, problems = [], []
    for path in paths:
        try:
            data = read_limited(path, limits.max_bytes)
            image = decode_image(data, bundle.spec.image_size, max_pixels=limits.max_pixels)
            original = display_image(data)
        except (DecodeError, OSError) as exc:
            problems.append(f"{path}: {exc}; skipped")
            continue
        exp = explainer.explain(image)
        target = out / f"{Path(path).stem}.png"
        if any(r["png"] == str(target) for r in records):  # two files named alike
            target = out / f"{Path(path).stem}-{len(records)}.png"
        render(exp, original, target, title=Path(path).name)
        records.append({"path": str(path), "png": str(target), "dx": exp.label,
                        "probability": exp.proba, "method": exp.method,
                        "probabilities": exp.probabilities})
    if records:
        (out / "explanations.json").write_text(json.dumps(records, indent=2))
    return records, problems
