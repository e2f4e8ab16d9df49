"""Perceptual hashes for duplicates and test-set leaks: ``capfilt.scorers.phash: {}`` adds, on every row of an
image, its 64-bit perceptual hash (``imagehash.phash``: the signs of the 8 x 8 lowest DCT frequencies of the image
in grayscale, robust to re-encoding, resizing and small crops) and ``leak_distance``, the smallest Hamming distance
from it to the hash of any image of the human TEST set (the run's ``human.test``, or the synthetic world's).

``leak_distance`` is the scorer's first column, so ``keep_above: 4`` drops leaks in CapFilt itself; ``capfilt
assemble`` drops them by rule (``assemble.drop_leaks``, at this scorer's ``leak_distance`` option) and groups exact
and near duplicates over the whole run (``assemble.drop_duplicates``, ``pipelines/dedup.py``): grouping needs every
hash at once, so it is not a per-row score.

Both columns are per image, on each of its rows that is scored (status ``ok``). An image with no test set to
compare with gets ``leak_distance`` 65 (more than any 64-bit distance). The actor hashes the test set once, when it
starts; the scorer's content id covers its options and the test annotations, so another test set is another run.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from .. import storage
from ..dedup import hamming
from .models import CapfiltError, ModelRef, Scorer, register_scorer
from .pixels import PixelSpec, pil_transform

log = logging.getLogger(__name__)

NO_TEST_SET = 65  # leak_distance without a test set: above any Hamming distance of 64 bits


class PhashOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int = Field(64, ge=32, description="pixels the image is resized to (square) before hashing")
    leak_distance: int = Field(4, ge=0, le=64, description="an image this close to a test image is a leak (bits)")
    test: str | None = Field(None, description="test annotations (COCO-Karpathy JSON); null: the run's human.test")
    test_image_root: str | None = Field(None, description="their image root; null: the run's human.image_root")


def pixels(size: int) -> PixelSpec:
    """Square bicubic resize, values x / 255 (mean 0, std 1): the hash sees the plain colours."""
    return PixelSpec("blip", size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def hash_pixels(rgb: np.ndarray) -> int:
    """The 64-bit perceptual hash of a uint8 [H, W, 3] image, as a signed int64 (the same bits)."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(rgb)).hash.reshape(-1)
    return int(np.packbits(bits).view(">u8")[0].astype(np.uint64).view(np.int64))


def hash_images(urls: list[str], spec: PixelSpec) -> np.ndarray:
    """The hashes of images read from ``urls`` through the same decode and resize as the web images; an
    undecodable image is left out (logged)."""
    from blip_core.transforms import CorruptImageError, decode_image

    resize = pil_transform(spec)
    out = []
    for url in urls:
        with storage.open_url(url, "rb") as f:
            data = f.read()
        try:
            out.append(hash_pixels(np.asarray(resize(decode_image(data)), dtype=np.uint8)))
        except CorruptImageError as err:
            log.warning("phash: test image %s left out: %s", url, err)
    return np.array(out, dtype=np.int64)


@register_scorer("phash")
class PhashScorer(Scorer):
    columns = (pa.field("leak_distance", pa.int32()), pa.field("phash", pa.int64()))
    packages = ("ImageHash",)

    @classmethod
    def resolve(cls, cfg, root: str, round: int, section) -> ModelRef:
        from ..modeling import human_set

        try:
            opts = PhashOptions(**(section.model_extra or {}))
        except ValueError as err:
            raise CapfiltError(f"capfilt.scorers.phash: {err}") from None
        if opts.test is None or opts.test_image_root is None:
            human: dict[str, str | None] = {"test": None, "image_root": None}
            try:
                human = dict(human_set(cfg, root))
            except ValueError:
                pass  # no human set: no test images to compare with
            opts.test = opts.test or human["test"]
            opts.test_image_root = opts.test_image_root or human["image_root"]
        h = hashlib.sha256(json.dumps(opts.model_dump(), sort_keys=True).encode())
        if opts.test is not None:
            if not storage.exists(opts.test):
                raise CapfiltError(f"capfilt.scorers.phash.test: no annotations at {opts.test}")
            with storage.open_url(opts.test, "rb") as f:
                h.update(f.read())
        return ModelRef("phash", cls, None, "phash-" + h.hexdigest()[:16], pixels(opts.size), opts.model_dump())

    def __init__(self, ref: ModelRef, settings, device):
        from ..karpathy import join_url, read_karpathy

        super().__init__(ref, settings, device)
        test, root = ref.options["test"], ref.options["test_image_root"]
        urls = [join_url(root, e.image) for e in read_karpathy(test)] if test and root else []
        self.test_hashes = hash_images(urls, ref.pixels)
        log.info("phash: %d test images hashed", len(self.test_hashes))

    def score(self, images, texts, scored):
        per = len(texts) // len(images)
        rgb = images.mul(255).round_().clamp_(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        hashes = np.array([hash_pixels(im) for im in rgb], dtype=np.int64)
        if len(self.test_hashes):
            leak = hamming(hashes[:, None], self.test_hashes[None, :]).min(axis=1)
        else:
            leak = np.full(len(hashes), NO_TEST_SET, dtype=np.int32)
        return {
            "leak_distance": np.repeat(leak[:, None], per, axis=1),
            "phash": np.repeat(hashes[:, None], per, axis=1),
        }
