"""The world's images over HTTP while ``capfilt ingest`` downloads them (the ``{base}`` of its URLs): on 127.0.0.1,
or on the address a Ray cluster's other nodes reach this machine by."""

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
def serve_directory(url: str, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve the files under ``url`` (any fsspec URL) over HTTP on ``host`` (loopback by default), on a free port.

    Yields the base URL (``http://HOST:PORT``); a file ``url/a/b.jpg`` is at ``BASE/a/b.jpg``. Files are
    read through fsspec on each request, so an ``s3://`` directory serves the same way as a local one.
    Only GET and HEAD; paths that leave the directory are 404s.
    """
    # The filesystem's cat_file(), not storage.open_url(): one GET per request, and a directory is a 404 on
    # object stores too (opening a prefix there reads as an empty file).
    fs, root = storage.filesystem(url)
    handler = type("WorldHandler", (_Handler,), {"fs": fs, "root": root.rstrip("/")})
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="capfilt-http", daemon=True)
    thread.start()
    base = f"http://{host}:{server.server_address[1]}"
    log.info("serving %s at %s", url, base)
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_world(world_url: str, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve a world's ``images/`` (never ``truth/``) on ``host``; yields what replaces ``{base}``. Loopback unless
    the downloads run on other machines (a Ray cluster's nodes): then an address of this machine they reach."""
    with serve_directory(world_files(world_url)["images"], host) as base:
        yield base
