"""img2dataset's Resizer, fed by the project's decoder: every photograph upright, in its colours, at 8 bits.

img2dataset decodes with OpenCV's ``IMREAD_UNCHANGED``, which ignores the EXIF orientation (a phone's portrait
lands sideways and the re-encoded JPEG drops the tag) and clips 16-bit samples to 255 (a 16-bit grayscale PNG
lands all white). :class:`UprightResizer` decodes with :func:`blip_core.transforms.decode_image` instead, the one
decoder training, CapFilt and the human set use, and hands img2dataset's own resizing the upright 8-bit picture,
so its resize modes, size limits, encode format and statuses stay as they are: an undecodable file is a
``failed_to_resize`` row whose ``error_message`` is ``cannot decode image: <the decoder's reason>`` (one message per
kind of failure, as the manifest counts them). The picture travels to img2dataset's code as an uncompressed BMP
(lossless; a copy of the pixels), the input it decodes with OpenCV.

Imports img2dataset (and so OpenCV and albumentations): import it only where the download runs, after
:func:`pipelines.ingest_shards.quiet_environment`.
"""

from __future__ import annotations

import io
from typing import Any

from img2dataset.resizer import Resizer

from blip_core.transforms import CorruptImageError, decode_image


class UprightResizer(Resizer):
    """img2dataset's Resizer (same arguments, same return tuple) over :func:`decode_image`'s RGB picture."""

    def __call__(self, img_stream: Any, blurring_bbox_list: Any = None) -> tuple:
        img_stream.seek(0)
        try:
            img = decode_image(img_stream.read())
        except CorruptImageError as err:
            return None, None, None, None, None, f"cannot decode image: {err.reason}"
        bmp = io.BytesIO()
        img.save(bmp, format="BMP")
        return super().__call__(bmp, blurring_bbox_list)
