"""Downloading a SAM or SAM 2.1 checkpoint (``esam download-weights``), verified before use.

``download_weights`` streams to ``<name>.part``, verifies it and only then renames it, so a
half-downloaded file is never mistaken for a checkpoint. Meta publishes SHA-256 digests for the
SAM files only; a SAM 2.1 download is verified by its length (the server's Content-Length) and by
loading it into the model its type names. The official files are in
``esam_core.backends.checkpoints``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from esam_core.backends.checkpoints import CHECKPOINTS, file_name

_LOG = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes per read / hash update


class WeightsError(RuntimeError):
    """A download failed or did not verify; the message is one line naming the URL and the fix."""


def url_filename(url: str) -> str:
    """Last path component of ``url`` (``.../sam_vit_b_01ec64.pth`` -> ``sam_vit_b_01ec64.pth``)."""
    name = file_name(url)
    if not name:
        raise WeightsError(f"cannot tell a file name from URL {url}")
    return name


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_weights(model_type: str, directory: str | Path, url: str | None = None,
                     sha256: str | None = None, progress: bool = True) -> Path:
    """Download and verify a SAM or SAM 2.1 checkpoint; returns the path of the verified file.

    Args:
        model_type: a key of ``CHECKPOINTS`` (any name when ``url`` and ``sha256`` are both
            given).
        directory: where the file goes (created if needed); the file name is the URL's.
        url: a mirror of the official file (default: the official URL).
        sha256: expected hex digest (default: the official one for ``model_type``; SAM 2.1 has
            none, so its file is checked by length and by loading it into the model instead).
        progress: show a tqdm progress bar on stderr.

    An already present file that verifies is kept and not downloaded again.

    Raises:
        WeightsError: unknown model type, network/HTTP failure, a short read, checksum mismatch,
            or a file that does not load as ``model_type`` (the partial file is deleted in every
            failure case).
    """
    info = CHECKPOINTS.get(model_type)
    if info is None and (url is None or sha256 is None):
        raise WeightsError(f"unknown model type '{model_type}': expected one of "
                           f"{sorted(CHECKPOINTS)} (or give both a URL and a SHA-256)")
    url = url or info.url
    expected = (sha256 or info.sha256 or "").lower() or None
    directory = Path(directory)
    target = directory / url_filename(url)

    if target.is_file():
        problem = _unverified(target, model_type, expected)
        if problem is None:
            _LOG.info("%s already present and verified", target)
            return target
        _LOG.warning("%s exists but %s; downloading it again", target, problem)

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create {directory}: {exc.strerror or exc}") from None
    part = target.with_name(target.name + ".part")
    try:
        actual = _stream(url, part, progress)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        digest = f"SHA-256 {expected}" if expected else "Meta publishes no SHA-256 for it"
        raise WeightsError(f"could not download {url}: {_reason(exc)}; download it manually to "
                           f"{directory.resolve()} ({digest})") from None
    problem = _unverified(part, model_type, expected, actual)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise WeightsError(f"{url}: {problem}; the partial file was deleted")
    os.replace(part, target)
    _LOG.info("downloaded and verified %s (SHA-256 %s)", target, actual)
    return target


def _unverified(path: Path, model_type: str, expected: str | None,
                digest: str | None = None) -> str | None:
    """Why ``path`` is not a good ``model_type`` checkpoint (None: it is): the digest decides,
    or without one (SAM 2.1) whether it loads and fits the model."""
    if expected is None:
        from esam_core.backends.sam2_models import checkpoint_problem

        return checkpoint_problem(path, model_type)
    digest = digest or sha256_file(path)
    return (None if digest == expected
            else f"checksum mismatch: got SHA-256 {digest}, expected {expected}")


def _stream(url: str, part: Path, progress: bool) -> str:
    """Copy ``url`` to ``part`` and return the hex SHA-256 of what was written.

    Raises:
        ValueError: fewer bytes arrived than the server's Content-Length (urllib reads a
            connection closed early as the end of the file).
    """
    digest = hashlib.sha256()
    written = 0
    with urllib.request.urlopen(url, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=part.name[:-5],
                                         disable=not progress) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                f.write(block)
                digest.update(block)
                written += len(block)
                bar.update(len(block))
    if total is not None and written != total:
        raise ValueError(f"the connection closed after {written} of {total} bytes")
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    """A short reason: 'HTTP 404 Not Found', 'Connection refused', 'timed out', ..."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
