"""Where a world's files are under ``<root>/world/``, and the ``{base}`` placeholder of its web URLs."""

from __future__ import annotations

from .. import storage

URL_PLACEHOLDER = "{base}"

WORLD_LAYOUT: dict[str, str] = {
    "images": "images",
    "web": "web.parquet",
    "human_train": "human_train.json",
    "human_test": "human_test.json",
    "truth_web": "truth/web.parquet",
    "truth_images": "truth/images.parquet",
    "manifest": "manifest.json",
}


COPIES_FILE = "truth/copies.parquet"  # only in a world with injected copies (world.duplicate_rate / leak_rate)


def copies_url(world_url: str) -> str:
    return storage.join(world_url, *COPIES_FILE.split("/"))


def world_files(world_url: str) -> dict[str, str]:
    """Every path of a world by name, as URLs (``human.*: null`` in a config resolves to ``human_*``)."""
    return {name: storage.join(world_url, *rel.split("/")) for name, rel in WORLD_LAYOUT.items()}


def resolve_urls(urls: list[str], base: str) -> list[str]:
    """Replace the ``{base}`` placeholder at the start of each URL by the live server's address."""
    n = len(URL_PLACEHOLDER)
    return [base + u[n:] if u.startswith(URL_PLACEHOLDER) else u for u in urls]
