"""The world's images over HTTP on 127.0.0.1 while ``capfilt ingest`` downloads them (the ``{base}`` of its URLs)."""

from __future__ import annotations

import contextlib
import http.server
import logging
import mimetypes
import posixpath
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

from .. import storage
from .layout import world_files

log = logging.getLogger(__name__)


class _Handler(http.server.BaseHTTPRequestHandler):
    fs: Any = None
    root: str = ""
    server_version = "capfilt-world"

    def _resolve(self) -> str | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") or "\\" in p for p in parts):
            return None
        return posixpath.join(self.root, *parts)

    def _serve(self, body: bool) -> None:
        target = self._resolve()
        try:
            if target is None:
                raise FileNotFoundError(self.path)
            data = self.fs.cat_file(target)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self.send_error(404, "File not found")
            return
        except Exception as err:  # noqa: BLE001 - the storage failed: tell the client, keep serving
            log.warning("serving %s failed: %s", self.path, err)
            self.send_error(500, "Storage error")
            return
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(target)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s " + format, self.address_string(), *args)


@contextlib.contextmanager
def serve_directory(url: str) -> Iterator[str]:
    """Serve the files under ``url`` (any fsspec URL) over HTTP on 127.0.0.1, on a free port.

    Yields the base URL (``http://127.0.0.1:PORT``); a file ``url/a/b.jpg`` is at ``BASE/a/b.jpg``. Files are
    read through fsspec on each request, so an ``s3://`` directory serves the same way as a local one.
    Only GET and HEAD; paths that leave the directory are 404s.
    """
    # The filesystem's cat_file(), not storage.open_url(): one GET per request, and a directory is a 404 on
    # object stores too (opening a prefix there reads as an empty file).
    fs, root = storage.filesystem(url)
    handler = type("WorldHandler", (_Handler,), {"fs": fs, "root": root.rstrip("/")})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="capfilt-http", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    log.info("serving %s at %s", url, base)
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_world(world_url: str) -> Iterator[str]:
    """Serve a world's ``images/`` (never ``truth/``) on 127.0.0.1; yields what replaces ``{base}``."""
    with serve_directory(world_files(world_url)["images"]) as base:
        yield base
