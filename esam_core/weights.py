"""SAM and SAM 2.1 checkpoints: the official files, finding and checking one, downloading.

Weights are never downloaded implicitly (a robot must not fetch 2.5 GB on start-up): the node and
the CLI fail with the paths they looked at, the official URL and SHA-256, and the command to run.
``download_weights`` streams to ``<name>.part``, verifies it and only then renames it, so a
half-downloaded file is never mistaken for a checkpoint. Meta publishes SHA-256 digests for the
SAM files only; a SAM 2.1 download is verified by its length (the server's Content-Length) and by
loading it into the model its type names. torch is imported only to read one.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlparse

from tqdm import tqdm

if TYPE_CHECKING:
    import torch

_LOG = logging.getLogger(__name__)

_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
#: Where facebookresearch/sam2's checkpoints/download_ckpts.sh fetches the SAM 2.1 files.
_SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_CHUNK = 1 << 20  # bytes per read / hash update
#: Encoder width -> model type, to say what a wrong checkpoint looks like.
_EMBED_DIM_TO_TYPE = {64: "test_tiny", 768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
#: SAM 2 Hiera trunk width -> model type (tiny and small share a width).
_HIERA_DIM_TO_TYPE = {16: "sam2_test_tiny", 96: "sam2.1_hiera_t or sam2.1_hiera_s",
                      112: "sam2.1_hiera_b+", 144: "sam2.1_hiera_l"}


class CheckpointInfo(NamedTuple):
    """An official checkpoint: download URL, SHA-256 (hex) and size in bytes (None: not
    published by Meta, as for SAM 2.1)."""

    url: str
    sha256: str | None = None
    size: int | None = None

    @property
    def filename(self) -> str:
        return url_filename(self.url)


#: The checkpoints released with segment-anything (README "Model Checkpoints").
CHECKPOINTS: dict[str, CheckpointInfo] = {
    "vit_h": CheckpointInfo(
        _BASE_URL + "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879,
    ),
    "vit_l": CheckpointInfo(
        _BASE_URL + "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607,
    ),
    "vit_b": CheckpointInfo(
        _BASE_URL + "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
    ),
    # SAM 2.1 (facebookresearch/sam2 README "Download Checkpoints"); no digests are published.
    "sam2.1_hiera_t": CheckpointInfo(_SAM2_BASE_URL + "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": CheckpointInfo(_SAM2_BASE_URL + "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": CheckpointInfo(_SAM2_BASE_URL + "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": CheckpointInfo(_SAM2_BASE_URL + "sam2.1_hiera_large.pt"),
}


class WeightsError(RuntimeError):
    """A download failed or did not verify; the message is one line naming the URL and the fix."""


class CheckpointError(ValueError):
    """A SAM checkpoint is missing, unreadable or for another model; one line says how to fix it."""


def url_filename(url: str) -> str:
    """Last path component of ``url`` (``.../sam_vit_b_01ec64.pth`` -> ``sam_vit_b_01ec64.pth``)."""
    name = Path(urlparse(url).path).name
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


# --- checkpoint files -----------------------------------------------------------------------------

def _hint(model_type: str) -> str:
    info = CHECKPOINTS.get(model_type)
    if info is None:
        return f"{model_type} has no official checkpoint (save one with torch.save(state_dict))"
    digest = (f"SHA-256 {info.sha256}" if info.sha256
              else "Meta publishes no SHA-256; it is checked by loading it")
    return (f"the official {model_type} checkpoint is {info.url} ({digest}); get it "
            f"with `esam download-weights {model_type}`")


def checkpoint_candidates(checkpoint: str, model_type: str) -> list[Path]:
    """Where ``model.checkpoint`` may be, in search order.

    Absolute: itself. Relative: ``$ESAM_WEIGHTS_DIR/<path>``, the ``esam_ros`` share directory
    (when ament_index_python knows it), the working directory, then ``./weights/``. Empty: the
    official file name, searched the same way.
    """
    path = Path(checkpoint).expanduser()
    if checkpoint and path.is_absolute():
        return [path]
    roots: list[Path] = []
    if os.environ.get("ESAM_WEIGHTS_DIR"):
        roots.append(Path(os.environ["ESAM_WEIGHTS_DIR"]).expanduser())
    try:  # optional: only present in a ROS install
        from ament_index_python.packages import get_package_share_directory

        roots.append(Path(get_package_share_directory("esam_ros")))
    except (ImportError, LookupError, OSError, ValueError):  # not installed, or no ROS env
        pass
    # ./weights/ is where `esam download-weights` (and `make weights`) put the files.
    roots += [Path.cwd(), Path.cwd() / "weights"]
    if not checkpoint:
        if model_type not in CHECKPOINTS:
            return []
        path = Path(CHECKPOINTS[model_type].filename)
    return [root / path for root in roots]


def resolve_checkpoint(checkpoint: str, model_type: str) -> Path:
    """The first existing file among ``checkpoint_candidates``; CheckpointError naming all tried."""
    tried = checkpoint_candidates(checkpoint, model_type)
    for path in tried:
        if path.is_file():
            return path
    where = ", ".join(str(p) for p in tried) or "(model.checkpoint is empty)"
    raise CheckpointError(f"{model_type} checkpoint not found (model.checkpoint = {checkpoint!r}, "
                          f"tried {where}); {_hint(model_type)}")


def load_checkpoint(path: Path, model_type: str) -> dict[str, torch.Tensor]:
    """Read a state_dict on the CPU (``weights_only``), refusing truncated or corrupt files.

    The size is checked first when the file has an official name and size, so a truncated
    2.5 GB download fails at once instead of after reading it. A SAM 2 checkpoint's state_dict
    is the one under its ``"model"`` key (as ``sam2.build_sam`` reads it).
    """
    import torch

    info = CHECKPOINTS.get(model_type)
    size = path.stat().st_size
    if info is not None and info.size and path.name == info.filename and size != info.size:
        raise CheckpointError(f"{path} has {size} bytes, expected {info.size} for the {model_type} "
                              f"checkpoint (truncated or corrupt); {_hint(model_type)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same here
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read {path} as a {model_type} checkpoint (truncated or "
                              f"corrupt?): {reason}; {_hint(model_type)}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a SAM state_dict (expected a mapping of tensors) "
                              f"for {model_type}; {_hint(model_type)}")
    return state


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                     path: Path, model_type: str) -> None:
    """CheckpointError unless ``state`` has exactly the keys and shapes of ``expected`` (the
    model's own ``state_dict()``, which may live on the meta device)."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(k for k in expected.keys() & state.keys()
                       if state[k].shape != expected[k].shape)
    if not (missing or unexpected or misshaped):
        return
    pos, hiera = state.get("image_encoder.pos_embed"), state.get("image_encoder.trunk.pos_embed")
    if pos is None and hiera is None:
        looks = "it is not a SAM or SAM 2 checkpoint (no image_encoder.pos_embed)"
    else:
        if pos is not None:
            dim = int(pos.shape[-1])
            guess = _EMBED_DIM_TO_TYPE.get(dim, f"a SAM with a {dim}-wide encoder")
        else:
            dim = int(hiera.shape[1])
            guess = _HIERA_DIM_TO_TYPE.get(dim, f"a SAM 2 with a {dim}-wide Hiera")
        looks = (f"it has {model_type}'s encoder width but other layers"
                 if model_type in guess.split(" or ") else
                 f"it looks like {guess}, expected {model_type}")
    example = (misshaped or missing or unexpected)[0]
    raise CheckpointError(
        f"{path} does not fit model type {model_type}: {looks} "
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped "
        f"keys, e.g. {example}); {_hint(model_type)}")


# --- CLI ---------------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``esam download-weights vit_b|...|sam2.1_hiera_l [--dir DIR]``."""
    p = subparsers.add_parser("download-weights",
                              help="download and verify a SAM or SAM 2.1 checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("model_type", choices=sorted(CHECKPOINTS), help="SAM or SAM 2.1 backbone")
    p.add_argument("--dir", default="weights", help="target directory")
    p.add_argument("--url", default=None,
                   help="a mirror of the official file (default: the official URL)")
    p.add_argument("--sha256", default=None, help="expected SHA-256 (default: the official one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        path = download_weights(args.model_type, args.dir, url=args.url, sha256=args.sha256,
                                progress=not args.no_progress)
    except WeightsError as exc:
        print(f"esam download-weights: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
