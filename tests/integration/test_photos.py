"""Real photographs in every format the web holds land upright, in their colours, at the configured size.

The photographs are scikit-image's bundled samples (``skimage.data``: a cat, a cup of coffee, a rocket, an
astronaut, a cameraman; files in the wheel, no network). From them the test writes each format of issue #20 part
2: JPEGs whose pixels are stored rotated with EXIF orientation 6, 3 and 8 (as phones store them), a 16-bit grayscale
PNG, a CMYK JPEG, RGBA and palette-with-transparency PNGs, 1-bit, grayscale JPEG, WebP, TIFF, BMP, an animated GIF
and a ~40-megapixel original, plus an undecodable file. Each goes through real ingestion (``capfilt ingest``:
img2dataset downloading from a loopback HTTP server) and through the COCO-Karpathy human-set reader, and is compared
with its upright reference: close, while the same reference turned a quarter (or half) is clearly farther.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from integration_helpers import ingest, read_shards
from PIL import Image

from blip_core.transforms import CorruptImageError
from pipelines import storage
from pipelines.karpathy import KarpathyDataset
from pipelines.world import serve_directory

pytestmark = pytest.mark.integration

SIZE = 64  # the tiny config's ingest.image_size (resize_mode border)
ORIENTATION = 0x0112


def _sample(name: str) -> Image.Image:
    import skimage.data

    return Image.open(Path(skimage.data.__file__).parent / name).convert("RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _on_white(img: Image.Image) -> Image.Image:
    return Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA")).convert("RGB")


def _exif_jpeg(upright: Image.Image, orientation: int) -> bytes:
    """The pixels as a camera stores them, with the tag that tells a viewer how to turn them upright."""
    stored = {
        6: Image.Transpose.ROTATE_90,
        3: Image.Transpose.ROTATE_180,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return _encode(upright.transpose(stored), "JPEG", quality=95, exif=exif.tobytes())


def _photos() -> dict[str, tuple[bytes, Image.Image, str]]:
    """name -> (file bytes, the upright RGB picture a viewer shows, caption)."""
    cat, coffee, rocket, astronaut = (_sample(n) for n in ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"))
    gray = _sample("camera.png").convert("L")  # 512 x 512
    photos: dict[str, tuple[bytes, Image.Image, str]] = {}
    photos["exif6.jpg"] = (_exif_jpeg(cat, 6), cat, "a cat, shot in portrait 📱")
    photos["exif3.jpg"] = (_exif_jpeg(coffee, 3), coffee, "coffee, upside down in the file")
    photos["exif8.jpg"] = (_exif_jpeg(rocket, 8), rocket, "a rocket; EXIF 8")
    wide = np.asarray(gray, dtype=np.uint16)[:, :400] * 257  # 16 bits, not square, full range
    photos["gray16.png"] = (
        _encode(Image.fromarray(wide), "PNG"),
        Image.fromarray((wide // 257).astype(np.uint8)).convert("RGB"),
        "a cameraman in 16-bit grey",
    )
    photos["cmyk.jpg"] = (_encode(astronaut.convert("CMYK"), "JPEG", quality=95), astronaut, "CMYK astronaut")
    rgba = coffee.convert("RGBA")
    alpha = np.full((coffee.height, coffee.width), 255, np.uint8)
    alpha[:, : coffee.width // 3] = 0  # the left third transparent
    rgba.putalpha(Image.fromarray(alpha))
    photos["rgba.png"] = (_encode(rgba, "PNG"), _on_white(rgba), "coffee with a transparent third")
    palette = cat.quantize(64)
    palette.info["transparency"] = 0
    pal_bytes = _encode(palette, "PNG", transparency=0)
    photos["palette.png"] = (pal_bytes, _on_white(Image.open(io.BytesIO(pal_bytes))), "a 64-colour cat")
    one_bit = gray.crop((0, 0, 512, 340)).convert("1")
    photos["onebit.png"] = (_encode(one_bit, "PNG"), one_bit.convert("RGB"), "dithered, 1 bit")
    grey_rocket = rocket.convert("L")
    photos["gray.jpg"] = (_encode(grey_rocket, "JPEG", quality=95), grey_rocket.convert("RGB"), "a grey rocket")
    photos["coffee.webp"] = (_encode(coffee, "WEBP", quality=95), coffee, "coffee (WebP)")
    photos["cat.tiff"] = (_encode(cat, "TIFF"), cat, "cat (TIFF)")
    photos["rocket.bmp"] = (_encode(rocket, "BMP"), rocket, "rocket (BMP)")
    frames = [cat.quantize(256), coffee.resize(cat.size).quantize(256)]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    photos["animated.gif"] = (gif, frames[0].convert("RGB"), "the first frame is the cat")
    big = cat.resize((7800, 5187), Image.Resampling.BILINEAR)  # ~40 MP
    photos["big.jpg"] = (_encode(big, "JPEG", quality=85), big, "forty megapixels of cat")
    return photos


def _border(img: Image.Image, size: int = SIZE) -> Image.Image:
    """img2dataset's ``border`` resize: the longest side to ``size``, centred on white."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(img.resize((nw, nh), Image.Resampling.BOX), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def _turned(img: Image.Image) -> list[Image.Image]:
    return [img.transpose(t) for t in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180)]


@pytest.fixture(scope="module")
def photo_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    site = tmp_path_factory.mktemp("photos")
    photos = _photos()
    for name, (data, _, _) in photos.items():
        (site / name).write_bytes(data)
    (site / "broken.jpg").write_bytes(photos["exif6.jpg"][0][:2000])  # cut: the decoder must say so
    return site, photos


def test_every_format_is_ingested_upright_in_its_colours(photo_site, tmp_path):
    site, photos = photo_site
    with serve_directory(str(site)) as base:
        rows = [(f"{base}/{name}", caption) for name, (_, _, caption) in photos.items()]
        rows.append((f"{base}/broken.jpg", "a cut file"))
        with open(tmp_path / "urls.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("url", "caption"), *rows])
        root = str(tmp_path / "run")
        proc, seconds = ingest(
            root,
            f"ingest.url_list={tmp_path / 'urls.csv'}",
            "ingest.input_format=csv",
            "ingest.source=photos",
            "ingest.shard_size=8",
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = storage.RunRoot(root).ingest("photos")
    samples, parquet_rows = read_shards(out)
    by_name = {json.loads(s["json"])["url"].rsplit("/", 1)[1]: s for s in samples.values()}
    assert set(by_name) == set(photos)
    report = {}
    for name, (_, upright, caption) in photos.items():
        files = by_name[name]
        assert files["txt"] == caption.encode("utf-8"), name
        got = Image.open(io.BytesIO(files["jpg"]))
        assert got.size == (SIZE, SIZE) and got.mode == "RGB", name
        meta = json.loads(files["json"])
        assert (meta["original_width"], meta["original_height"]) == upright.size, name  # upright dimensions
        right = _diff(got, _border(upright))
        wrong = min(_diff(got, _border(t)) for t in _turned(upright))
        report[name] = (round(right, 1), round(wrong, 1))
        assert right < 8 and wrong > 2 * right + 4, (name, right, wrong)
    broken = next(r for r in parquet_rows if r["url"].endswith("/broken.jpg"))
    assert broken["status"] == "failed_to_resize" and "cannot decode" in broken["error_message"]
    assert broken["caption"] == "a cut file"
    print(f"\n{len(photos)} photographs ingested in {seconds:.1f}s; mean abs diff (upright, turned): {report}")


def test_every_format_reads_upright_from_a_karpathy_human_set(photo_site, tmp_path):
    site, photos = photo_site
    ann = [
        {"image": name, "caption": caption, "image_id": i} for i, (name, (_, _, caption)) in enumerate(photos.items())
    ]
    ann.append({"image": "broken.jpg", "caption": "a cut file"})
    (tmp_path / "human.json").write_text(json.dumps(ann, ensure_ascii=False), encoding="utf-8")
    dataset = KarpathyDataset(str(tmp_path / "human.json"), str(site))
    for i, (name, (_, upright, caption)) in enumerate(photos.items()):
        img, captions, image_id = dataset[i]
        assert captions == [caption] and image_id == str(i)
        assert img.mode == "RGB" and img.size == upright.size, name
        small = (upright.width // 8, upright.height // 8)
        got = img.resize(small, Image.Resampling.BOX)
        right = _diff(got, upright.resize(small, Image.Resampling.BOX))
        wrong = _diff(got, upright.transpose(Image.Transpose.ROTATE_180).resize(small, Image.Resampling.BOX))
        assert right < 4 and wrong > 2 * right + 4, (name, right, wrong)
    with pytest.raises(CorruptImageError, match="broken.jpg: cannot decode"):
        dataset[len(photos)]
