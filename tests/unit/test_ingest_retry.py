"""Which of img2dataset's recorded download failures ``capfilt ingest --retry-failed`` tries again.

The messages are ``str()`` of what ``urllib.request.urlopen`` raises, as img2dataset stores them."""

from __future__ import annotations

import pytest

from pipelines.ingest_retry import is_transient

TRANSIENT = [
    "HTTP Error 503: Service Unavailable",
    "HTTP Error 500: Internal Server Error",
    "HTTP Error 502: Bad Gateway",
    "HTTP Error 504: Gateway Timeout",
    "HTTP Error 429: Too Many Requests",
    "HTTP Error 408: Request Timeout",
    "timed out",
    "The read operation timed out",
    "<urlopen error timed out>",
    "<urlopen error [Errno 111] Connection refused>",
    "[Errno 104] Connection reset by peer",
    "Remote end closed connection without response",
    "IncompleteRead(1024 bytes read, 2048 more expected)",
    "<urlopen error [Errno -3] Temporary failure in name resolution>",
    "<urlopen error [Errno 101] Network is unreachable>",
]
PERMANENT = [
    "HTTP Error 404: Not Found",
    "HTTP Error 403: Forbidden",
    "HTTP Error 410: Gone",
    "<urlopen error [Errno -2] Name or service not known>",
    "unknown url type: 'ftp'",
    "Use of image disallowed by X-Robots-Tag directive",
    "hash mismatch",
]


@pytest.mark.parametrize("message", TRANSIENT)
def test_transient_download_failures_are_retried(message):
    assert is_transient("failed_to_download", message)


@pytest.mark.parametrize("message", PERMANENT)
def test_permanent_download_failures_are_not(message):
    assert not is_transient("failed_to_download", message)


def test_only_download_failures_are_retried():
    assert not is_transient("failed_to_resize", "cannot decode image: image file is truncated")
    assert not is_transient("failed_to_resize", "timed out")  # a resize failure is never the network's
    assert not is_transient("success", None)
    assert not is_transient("failed_to_download", None)
