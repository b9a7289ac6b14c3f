"""Prompt backends: what answers E-SAM's point prompts (see ``esam_core.backends.protocol``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from esam_core.backends.protocol import PromptBackend
    from esam_core.config import Config


def build_backend(cfg: Config, random_weights: bool = False) -> PromptBackend:
    """The model backend ``cfg["model.type"]`` names: ``Sam2Backend`` for ``sam2.1_hiera_*`` and
    ``sam2_test_tiny``, ``SamBackend`` for the SAM types. Imports only that backend's package.

    Raises:
        Sam2NotInstalledError: a SAM 2 type without the ``sam2`` package (one line, with fix).
        CheckpointError: the checkpoint is missing or does not fit (one line, with fix).
    """
    from esam_core.backends.sam2_models import is_sam2, require_sam2

    if is_sam2(cfg["model.type"]):
        require_sam2(cfg["model.type"])
        from esam_core.backends.sam2 import Sam2Backend

        return Sam2Backend(cfg, random_weights=random_weights)
    from esam_core.backends.sam import SamBackend

    return SamBackend(cfg, random_weights=random_weights)
