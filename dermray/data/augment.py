"""Image decoding, transforms and the class-balancing plan. Pure functions, no Ray.

``decode_batch`` turns a batch of views (``dict[str, np.ndarray]``, as Ray Data hands it) into
decoded, augmented images; the extraction job maps it over its dataset.

A view is ``(image_id, aug_index)``. View 0 is the original image. In the train split, views
1..k of minority-class images are random lesion-preserving augmentations, deterministic in
``(image_id, aug_index, seed)``. In val and test, views 1..k (test-time augmentation) are the
fixed flips and 90-degree rotations of the dihedral group, in a fixed order.
"""

from __future__ import annotations

import io
import re
import zlib

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageOps

from dermray.data.checks import HEADER_BYTES, MAX_PIXELS, header_size, too_many_pixels
from dermray.domain import CLASSES
from dermray.io import storage


class DecodeError(ValueError):
    """An image that cannot be decoded; the message is the quarantine reason."""


class TooManyPixels(DecodeError):
    """An image whose header says it is over a pixel limit (``dims``, ``limit``)."""

    def __init__(self, message: str, dims: tuple[int, int], limit: int) -> None:
        super().__init__(message)
        self.dims, self.limit = dims, limit


BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert odd modes (grayscale, 16-bit, RGBA, CMYK, palette) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        scale = 255.0 / (65535.0 if hi > 255 and img.mode.startswith("I;16") else max(hi, 255.0))
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def decode_image(data: bytes, size: int, draft: bool = True,
                 max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes to a (size, size, 3) uint8 RGB array.

    ``draft`` lets the JPEG decoder downscale by 2/4/8 while decoding (much faster for 600x450 ->
    224), never below ``size``. ``max_pixels`` refuses larger images from their header, before
    decoding. Raises DecodeError with the reason for a bad file.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if max_pixels and img.size[0] * img.size[1] > max_pixels:
            raise TooManyPixels(f"image of {img.size[0]}x{img.size[1]} pixels is over the limit "
                                f"of {max_pixels} pixels", img.size, max_pixels)
        if draft and img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.load()  # truncated files fail here, not later
        img = _to_rgb(ImageOps.exif_transpose(img) or img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        kind = "truncated image" if "truncated" in str(exc) else "unreadable or not an image"
        # PIL names the buffer (<_io.BytesIO object at 0x...>); the caller names the file
        detail = BUFFER_REPR.sub("", str(exc)).strip()
        raise DecodeError(f"{kind}: {detail} ({len(data)} bytes)") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """The k-th (0..7) element of the dihedral group: k % 4 quarter turns, mirrored if k >= 4."""
    out = np.rot90(image, k % 4, axes=(0, 1))
    if k >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def view_rng(image_id: str, aug_index: int, seed: int) -> np.random.Generator:
    """A generator that depends only on (image_id, aug_index, seed)."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode()), aug_index])


def augment_image(image: np.ndarray, image_id: str, aug_index: int, seed: int) -> np.ndarray:
    """A random lesion-preserving view: dihedral flip/rotation, small rotation/zoom/shift,
    mild brightness/contrast/saturation jitter. View 0 is the image unchanged."""
    if aug_index == 0:
        return image
    rng = view_rng(image_id, aug_index, seed)
    out = dihedral(image, int(rng.integers(8)))
    height, width = out.shape[:2]
    img = Image.fromarray(out)
    angle = float(rng.uniform(-15, 15))
    zoom = float(rng.uniform(1.0, 1.15))  # zooming in keeps the corners filled after rotation
    shift = rng.uniform(-0.05, 0.05, 2) * (width, height)
    fill = tuple(int(v) for v in out.reshape(-1, 3).mean(0))
    img = img.rotate(angle, resample=Image.BILINEAR, translate=tuple(shift), fillcolor=fill)
    if zoom > 1.0:
        cw, ch = width / zoom, height / zoom
        left, top = (width - cw) / 2, (height - ch) / 2
        img = img.resize((width, height), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.9, 1.1)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.9, 1.1)))
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.9, 1.1)))
    return np.asarray(img, dtype=np.uint8)


def make_view(image: np.ndarray, split: str, image_id: str, aug_index: int, seed: int) -> np.ndarray:
    """The view ``aug_index`` of a decoded image: random augmentation in train, TTA elsewhere."""
    if split == "train":
        return augment_image(image, image_id, aug_index, seed)
    return dihedral(image, aug_index)


def decode_pixels_limited(data: bytes, image_size: int, draft: bool = True,
                          max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """``decode_image`` under validate's pixel limit, refused as validate reports it ('image
    too large: WxH pixels, over LIMIT'), from the same header reading (``checks.header_size``;
    PIL's where that cannot tell), before anything is decoded."""
    dims = header_size(data[:HEADER_BYTES])
    if dims is not None and too_many_pixels(dims, max_pixels):
        raise DecodeError(f"image too large: {too_many_pixels(dims, max_pixels)}")
    try:
        return decode_image(data, image_size, draft=draft, max_pixels=max_pixels)
    except TooManyPixels as exc:
        raise DecodeError(f"image too large: {too_many_pixels(exc.dims, exc.limit)}") from None


def decode_batch(batch: dict[str, np.ndarray], image_size: int, seed: int,
                 draft: bool = True, max_pixels: int = MAX_PIXELS) -> dict[str, np.ndarray]:
    """Read, decode, resize and augment each view; failures get an ``error`` and a blank image.
    An image over ``max_pixels`` (validate's limit, ``checks.MAX_PIXELS``) is one of them."""
    n = len(batch["image_id"])
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    cache: dict[str, np.ndarray | str] = {}  # several views of one image decode it once
    for i in range(n):
        path = str(batch["path"][i])
        if path not in cache:
            # the reason names the file (credentials redacted), as the quarantine shows it
            try:
                cache[path] = decode_pixels_limited(storage.read_bytes(path), image_size,
                                                    draft=draft, max_pixels=max_pixels)
            except DecodeError as exc:
                cache[path] = f"{storage.display(path)}: {exc}"
            except (FileNotFoundError, OSError) as exc:
                cache[path] = f"{storage.display(path)}: cannot read file: {storage.redact(exc)}"
        decoded = cache[path]
        if isinstance(decoded, str):
            errors[i] = decoded
            continue
        images[i] = make_view(decoded, str(batch["split"][i]), str(batch["image_id"][i]),
                              int(batch["aug_index"][i]), seed)
    out = dict(batch)
    out["image"] = images
    out["error"] = errors
    return out


def plan_views(manifest: pd.DataFrame, augment: bool = True, target_per_class: int = 0,
               max_views_per_image: int = 8, tta_views: int = 0, seed: int = 0) -> pd.DataFrame:
    """Which views to make: one row per (image_id, aug_index) with the manifest's columns.

    Train: every image once; with ``augment``, minority classes get extra views until they reach
    ``target_per_class`` (0: the largest class's image count), at most ``max_views_per_image``
    views per image, spread evenly over the class's images (seeded order).
    Val/test: the original plus ``tta_views`` fixed dihedral views.
    """
    parts = [manifest.assign(aug_index=0)]
    train = manifest[manifest["split"] == "train"]
    if augment and len(train):
        counts = train["dx"].value_counts()
        target = target_per_class or int(counts.max())
        rng = np.random.default_rng(seed)
        for cls in CLASSES:
            rows = train[train["dx"] == cls].sort_values("image_id")
            n = len(rows)
            extra = min(max(0, target - n), n * (max_views_per_image - 1))
            if extra == 0:
                continue
            order = rows.iloc[rng.permutation(n)]
            per_image = np.full(n, extra // n)
            per_image[: extra % n] += 1
            reps = order.loc[order.index.repeat(per_image)].copy()
            reps["aug_index"] = np.concatenate([np.arange(1, k + 1) for k in per_image if k])
            parts.append(reps)
    if tta_views:
        held = manifest[manifest["split"] != "train"]
        for k in range(1, tta_views + 1):
            parts.append(held.assign(aug_index=k))
    plan = pd.concat(parts, ignore_index=True)
    plan["aug_index"] = plan["aug_index"].astype("int32")
    return plan.sort_values(["split", "image_id", "aug_index"]).reset_index(drop=True)
