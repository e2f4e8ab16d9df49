"""blip_core.transforms: BLIP's preprocessing, the left/right policy, and decoding that fails clearly."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from blip_core.transforms import (
    BLIP_AUG_OPS,
    GEOMETRIC_OPS,
    MEAN,
    STD,
    CorruptImageError,
    RandomAugment,
    decode_image,
    denormalize,
    eval_transform,
    train_transform,
)


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def red_left_blue_right(w: int = 64, h: int = 64) -> Image.Image:
    """Square, so that every RandomResizedCrop (area >= 1/2, aspect 3/4..4/3) spans the middle."""
    img = Image.new("RGB", (w, h), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, w // 2, h))
    return img


def test_eval_transform_shape_and_normalisation():
    x = eval_transform(32)(Image.new("RGB", (50, 20), (128, 64, 32)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = (torch.tensor([128, 64, 32]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-3)
    assert torch.allclose(denormalize(x)[:, 0, 0], torch.tensor([128, 64, 32]) / 255, atol=1e-3)


@pytest.mark.parametrize("hflip,randaugment", [(True, True), (False, True), (False, False)])
def test_train_transform_shape(hflip, randaugment):
    torch.manual_seed(0)
    tf = train_transform(48, hflip=hflip, randaugment=randaugment)
    for size in [(64, 64), (30, 90), (1, 1)]:
        x = tf(Image.new("RGB", size, (10, 200, 30)))
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and torch.isfinite(x).all()
    crop = tf.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.5, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in tf.transforms) == hflip
    assert any(isinstance(t, RandomAugment) for t in tf.transforms) == randaugment
    norm = tf.transforms[-1]
    assert tuple(norm.mean) == MEAN and tuple(norm.std) == STD


def test_without_random_crop_the_whole_image_is_kept():
    """``random_crop=False`` (worlds whose captions state positions and counts): every training view is the whole
    image, resized as at evaluation; with BLIP's crop, views differ and some lose part of the image."""
    torch.manual_seed(0)
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 8))  # a white corner a crop of half the area often cuts away
    whole = train_transform(32, hflip=False, randaugment=False, random_crop=False)
    assert isinstance(whole.transforms[0], T.Resize)
    views = [whole(img) for _ in range(20)]
    assert all(torch.equal(v, eval_transform(32)(img)) for v in views)
    cropped = train_transform(32, hflip=False, randaugment=False)
    corner_lost = sum(bool(denormalize(cropped(img)).amax() < 0.5) for _ in range(60))
    assert corner_lost > 5


def left_is_red(x: torch.Tensor) -> bool:
    """Red's centre of mass lies left of blue's (crops, shifts and small rotations keep that; a mirror not)."""
    px = denormalize(x)
    cols = torch.arange(px.shape[-1], dtype=px.dtype)
    red, blue = (px[0] - px[2]).clamp(min=0).sum(0), (px[2] - px[0]).clamp(min=0).sum(0)
    return bool((red * cols).sum() / red.sum() < (blue * cols).sum() / blue.sum())


def test_no_hflip_keeps_left_left_even_with_randaugment():
    """Worlds whose captions say left/right train with hflip=False: no op may mirror the image."""
    torch.manual_seed(0)
    tf = train_transform(32, hflip=False, randaugment=True)
    img = red_left_blue_right()
    assert all(left_is_red(tf(img)) for _ in range(60))


def test_hflip_mirrors_about_half_the_time():
    torch.manual_seed(0)
    tf = train_transform(32, hflip=True, randaugment=False)
    img = red_left_blue_right()
    flipped = sum(not left_is_red(tf(img)) for _ in range(60))
    assert 15 < flipped < 45


def test_randaugment_ops_are_blips_and_excludable():
    assert set(GEOMETRIC_OPS) < set(BLIP_AUG_OPS) and len(BLIP_AUG_OPS) == 10
    ra = RandomAugment(2, 5, [op for op in BLIP_AUG_OPS if op not in GEOMETRIC_OPS])
    assert not set(ra.ops) & set(GEOMETRIC_OPS)
    tf = train_transform(32, hflip=False, aug_ops=["Identity", "Equalize"])
    assert next(t for t in tf.transforms if isinstance(t, RandomAugment)).ops == ("Identity", "Equalize")
    with pytest.raises(ValueError, match="unknown augmentation ops"):
        RandomAugment(2, 5, ["Identity", "Solarize"])
    # Every op runs on a real image and keeps its size.
    img = red_left_blue_right(40, 30)
    for op in BLIP_AUG_OPS:
        assert RandomAugment(1, 5, [op])._apply(op, img).size == (40, 30)


def test_train_transform_is_reproducible_under_a_seed():
    tf = train_transform(32)
    img = red_left_blue_right()
    torch.manual_seed(7)
    a = tf(img)
    torch.manual_seed(7)
    b = tf(img)
    torch.manual_seed(8)
    c = tf(img)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decode_image_converts_to_rgb():
    for img, fmt in [
        (Image.new("L", (5, 4), 100), "PNG"),
        (Image.new("RGBA", (5, 4), (1, 2, 3, 4)), "PNG"),
        (Image.new("RGB", (5, 4), (9, 9, 9)), "JPEG"),
        (Image.new("P", (5, 4), 3), "GIF"),
    ]:
        out = decode_image(encode(img, fmt))
        assert out.mode == "RGB" and out.size == (5, 4)


@pytest.mark.parametrize(
    "data,why",
    [
        (b"", "empty"),
        (b"<html><body>not found</body></html>", "cannot decode"),
        ("truncated", "cannot decode"),
    ],
)
def test_decode_image_rejects_corrupt_data_clearly(data, why):
    if data == "truncated":
        good = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
        data = good[: len(good) // 2]
    with pytest.raises(CorruptImageError, match=why):
        decode_image(data)
