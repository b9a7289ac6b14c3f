"""SAM and SAM 2.1 checkpoints: the official files, finding one and checking what it holds.

Weights are never downloaded implicitly (a robot must not fetch 2.5 GB on start-up): the node and
the CLI fail with the paths they looked at, the official URL and SHA-256, and the command to run
(``esam download-weights``, ``esam_core.backends.weights``). torch is imported only to read a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlparse

if TYPE_CHECKING:
    import torch

_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
#: Where facebookresearch/sam2's checkpoints/download_ckpts.sh fetches the SAM 2.1 files.
_SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
#: Encoder width -> model type, to say what a wrong checkpoint looks like.
_EMBED_DIM_TO_TYPE = {64: "test_tiny", 768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
#: SAM 2 Hiera trunk width -> model type (tiny and small share a width).
_HIERA_DIM_TO_TYPE = {16: "sam2_test_tiny", 96: "sam2.1_hiera_t or sam2.1_hiera_s",
                      112: "sam2.1_hiera_b+", 144: "sam2.1_hiera_l"}


def file_name(url: str) -> str:
    """Last path component of ``url`` ('' when it has none)."""
    return Path(urlparse(url).path).name


class CheckpointInfo(NamedTuple):
    """An official checkpoint: download URL, SHA-256 (hex) and size in bytes (None: not
    published by Meta, as for SAM 2.1)."""

    url: str
    sha256: str | None = None
    size: int | None = None

    @property
    def filename(self) -> str:
        return file_name(self.url)


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


class CheckpointError(ValueError):
    """A SAM checkpoint is missing, unreadable or for another model; one line says how to fix it."""


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


