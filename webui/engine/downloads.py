"""Files the server fetches on first use (Real-ESRGAN's upscalers, the face restorers' weights): saved whole or not at
all, so a cut download never looks like the file."""
from __future__ import annotations

import http.client
import logging
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

DOWNLOAD_SECONDS = 60  # per read of the connection; a stalled download fails instead of holding the worker

log = logging.getLogger(__name__)
open_url = urllib.request.urlopen  # (the tests' conftest lets it read local files only)


class DownloadFailed(Exception):
    """The file could not be fetched, or what came was not it; the message says why."""


def download(url: str, path: Path, check: Callable[[Path], object], what: str) -> None:
    """Fetch `url` into `path`. `check(partial_path)` raises when what came is not the file (a page of HTML, a cut
    file); DownloadFailed then, or when the connection fails, and nothing is left behind."""
    log.info("downloading %s from %s", what, url)
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        with os.fdopen(handle, "wb") as file, open_url(url, timeout=DOWNLOAD_SECONDS) as answer:
            expected = answer.headers.get("Content-Length") if getattr(answer, "headers", None) else None
            written = 0
            while chunk := answer.read(1 << 20):
                written += file.write(chunk)
        # urllib ends a cut connection as a short read, without an error: the length says whether it is whole
        if expected is not None and expected.isdigit() and written != int(expected):
            raise OSError(f"the connection ended after {written} of {expected} bytes")
        check(Path(partial))
        os.replace(partial, path)
    except Exception as err:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        if isinstance(err, (OSError, http.client.HTTPException, ValueError)):
            raise DownloadFailed(str(err)) from None
        raise
