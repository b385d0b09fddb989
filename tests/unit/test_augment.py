import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermray.data.augment import (
    DecodeError,
    augment_image,
    decode_image,
    dihedral,
    make_view,
    plan_views,
)
from dermray.domain import CLASSES


def _jpeg(arr: np.ndarray, mode: str | None = None, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)


def test_augmentation_is_deterministic(rgb):
    img = decode_image(_jpeg(rgb), 40)
    a = augment_image(img, "ISIC_0000001", 3, seed=7)
    assert np.array_equal(a, augment_image(img, "ISIC_0000001", 3, seed=7))
    assert not np.array_equal(a, augment_image(img, "ISIC_0000001", 4, seed=7))
    assert not np.array_equal(a, augment_image(img, "ISIC_0000001", 3, seed=8))
    assert not np.array_equal(a, augment_image(img, "ISIC_0000002", 3, seed=7))
    assert np.array_equal(augment_image(img, "ISIC_0000001", 0, seed=7), img)
    assert a.shape == img.shape and a.dtype == np.uint8


def test_dihedral_group_and_tta_views(rgb):
    sq = rgb[:48, :48]
    views = [dihedral(sq, k) for k in range(8)]
    assert len({v.tobytes() for v in views}) == 8
    assert np.array_equal(make_view(sq, "val", "ISIC_0000001", 5, 0), views[5])
    assert np.array_equal(make_view(sq, "test", "ISIC_0000001", 0, 0), sq)


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
                                       ("P", "PNG"), ("I;16", "PNG"), ("LA", "PNG")])
def test_odd_modes_are_converted(rgb, mode, fmt):
    if mode == "I;16":
        data = io.BytesIO()
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(data, "PNG")
        data = data.getvalue()
    else:
        data = _jpeg(rgb, mode, fmt)
    out = decode_image(data, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out.std() > 10  # the picture survived the conversion


def test_bad_files_raise_with_reason(rgb):
    good = _jpeg(rgb)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(good[: len(good) // 2], 32)
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(b"lesion_id,image_id\n", 32)
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(b"", 32)


def test_draft_decode_matches_full_decode(ham):
    path = next((ham / "originals_600x450").glob("*.jpg"))
    data = path.read_bytes()
    draft = decode_image(data, 224, draft=True).astype(float)
    full = decode_image(data, 224, draft=False).astype(float)
    assert np.abs(draft - full).mean() < 3.0


def _manifest(counts: dict[str, int]) -> pd.DataFrame:
    rows = []
    i = 0
    for dx, n in counts.items():
        for split in ("train", "val", "test"):
            for _ in range(n if split == "train" else 2):
                rows.append({"image_id": f"ISIC_{i:07d}", "lesion_id": f"HAM_{i:07d}", "dx": dx,
                             "label": CLASSES.index(dx), "split": split, "path": "x"})
                i += 1
    return pd.DataFrame(rows)


def test_plan_balances_train_and_caps_views():
    counts = {"nv": 100, "mel": 30, "df": 5, "akiec": 50}
    plan = plan_views(_manifest(counts), augment=True, max_views_per_image=4, seed=1)
    train = plan[plan["split"] == "train"]
    per_class = train["dx"].value_counts()
    assert per_class["nv"] == 100 and per_class["akiec"] == 100 and per_class["mel"] == 100
    assert per_class["df"] == 20  # capped: 5 images x 4 views
    assert train.groupby("image_id").size().max() <= 4
    assert not plan.duplicated(["image_id", "aug_index"]).any()
    held = plan[plan["split"] != "train"]
    assert (held["aug_index"] == 0).all()
    assert plan.equals(plan_views(_manifest(counts), augment=True, max_views_per_image=4, seed=1))


def test_plan_target_no_augment_and_tta():
    m = _manifest({"nv": 10, "mel": 4})
    assert len(plan_views(m, augment=False)) == len(m)
    plan = plan_views(m, augment=True, target_per_class=6)
    assert plan[plan["split"] == "train"]["dx"].value_counts().to_dict() == {"nv": 10, "mel": 6}
    tta = plan_views(m, augment=False, tta_views=3)
    held = tta[tta["split"] != "train"]
    assert sorted(held["aug_index"].unique()) == [0, 1, 2, 3]
    assert len(held) == 4 * (m["split"] != "train").sum()
