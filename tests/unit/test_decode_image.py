"""``decode_image`` on the pixel formats photographs come in: high bit depths scaled, transparency on white, EXIF
orientation applied, failures counted by one message per kind (the real photographs are in
tests/integration/test_photos.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip_core.transforms import CorruptImageError, decode_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "img,fmt,expected",
    [
        (Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)), "PNG", [0, 128, 255]),  # I;16
        (Image.fromarray(np.array([[0, 32896, 65535]], np.int32)), "TIFF", [0, 128, 255]),  # I, 16-bit range
        (Image.fromarray(np.array([[0, 100, 255]], np.int32)), "TIFF", [0, 100, 255]),  # I, 8-bit range
        (Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)), "TIFF", [0, 128, 255]),  # F, fractions
        (Image.fromarray(np.array([[-1.0, 0.0, 1.0]], np.float32)), "TIFF", [0, 128, 255]),  # F, stretched
    ],
)
def test_high_bit_depths_are_scaled_not_clipped(img, fmt, expected):
    out = np.asarray(decode_image(_encode(img, fmt)))
    assert out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == expected and (out[..., 0] == out[..., 2]).all()


def test_transparency_is_white_and_exif_orientation_is_applied():
    la = Image.new("LA", (2, 1), (0, 255))
    la.putpixel((1, 0), (0, 0))  # transparent black
    assert np.asarray(decode_image(_encode(la, "PNG")))[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    stored = Image.new("RGB", (3, 2), (0, 0, 255))
    stored.putpixel((0, 0), (255, 0, 0))  # red at the top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: red at the top-right
    out = decode_image(_encode(stored, "PNG", exif=exif.tobytes()))
    assert out.size == (2, 3) and out.getpixel((1, 0)) == (255, 0, 0)


def test_failures_give_one_reason_per_kind():
    reasons = set()
    for junk in (b"<html>one</html>", b"<html>another page</html>"):
        with pytest.raises(CorruptImageError) as err:
            decode_image(junk)
        assert " at 0x" not in str(err.value)
        reasons.add(err.value.reason)
    assert reasons == {"cannot identify image file"}
