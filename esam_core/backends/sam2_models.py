"""Building SAM 2.1 models with Meta's ``sam2`` package: Hiera-T/S/B+/L from the configs shipped
inside the package and an official checkpoint, random weights for timing, and ``sam2_test_tiny``
(the package's Hiera-T config with tiny widths and random weights, for tests only).

``sam2`` is imported only here and only when a SAM 2 type is built. Importing it initialises
Hydra's global state with the package's config module (``sam2/__init__.py``); its builder
``build_sam2`` composes a config from that module. Nothing else is changed at import time.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from esam_core.backends.checkpoints import check_state_dict, load_checkpoint, resolve_checkpoint
from esam_core.backends.models import random_init
from esam_core.config import Config, ConfigError

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

_LOG = logging.getLogger(__name__)

#: model.type -> the config inside the sam2 package (sam2_test_tiny shrinks Hiera-T's).
SAM2_CONFIGS = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_test_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
}

#: sam2_test_tiny: Hiera trunk width, SAM/memory width, memory-encoder width.
_TINY_TRUNK, _TINY_DIM, _TINY_MEM = 16, 32, 16
#: sam2_test_tiny: gain on the random mask heads so its logits have SAM's magnitude (as test_tiny).
_TINY_LOGIT_GAIN = 100.0
#: Hiera's first stage works at 1/4 of the input in windows of 8 tokens.
_TINY_SIZE_MULTIPLE = 32


class Sam2NotInstalledError(ValueError):
    """A SAM 2 model type was asked for but the ``sam2`` package is missing (one line, with fix).

    A ValueError, like ``CheckpointError``: the node and the CLI report it as one line.
    """


def is_sam2(model_type: str) -> bool:
    """Whether ``model_type`` is built by this module (``sam2.1_hiera_*``, ``sam2_test_tiny``)."""
    return model_type in SAM2_CONFIGS


def require_sam2(model_type: str) -> None:
    """Import ``sam2`` (and Hydra), or raise ``Sam2NotInstalledError`` saying how to install it."""
    try:
        import sam2.build_sam  # noqa: F401  (also checks hydra-core and iopath)
    except ImportError as exc:
        missing = (exc.name or "sam2").split(".")[0]
        raise Sam2NotInstalledError(
            f"model.type {model_type} needs Meta's sam2 package, but {missing} is not installed: "
            "run `make install`, or in your environment `SAM2_BUILD_CUDA=0 pip install "
            "--no-build-isolation -r requirements-sam2.txt` (README, SAM 2.1 backbones)") from None


def _tiny_overrides(img_size: int) -> list[str]:
    """Hydra overrides that shrink the Hiera-T config into sam2_test_tiny (five Hiera blocks,
    32-wide SAM heads, one memory layer): the same classes at about one million parameters."""
    if img_size % _TINY_SIZE_MULTIPLE:
        raise ConfigError(f"model.test_tiny_img_size = {img_size}: sam2_test_tiny needs a multiple "
                          f"of {_TINY_SIZE_MULTIPLE}")
    t, d, m, e = _TINY_TRUNK, _TINY_DIM, _TINY_MEM, img_size // 16
    enc, mem = "++model.image_encoder", "++model.memory_attention"
    return [
        f"++model.image_size={img_size}",
        f"{enc}.trunk.embed_dim={t}", f"{enc}.trunk.num_heads=1",
        # A global-attention block must not pool (blocks 1, 2 and 4 pool here).
        f"{enc}.trunk.stages=[1,1,2,1]", f"{enc}.trunk.global_att_blocks=[3]",
        f"{enc}.neck.d_model={d}", f"{enc}.neck.position_encoding.num_pos_feats={d}",
        f"{enc}.neck.backbone_channel_list=[{8 * t},{4 * t},{2 * t},{t}]",
        f"{mem}.d_model={d}", f"{mem}.num_layers=1", f"{mem}.layer.d_model={d}",
        f"{mem}.layer.dim_feedforward={2 * d}",
        f"{mem}.layer.self_attention.embedding_dim={d}",
        f"{mem}.layer.self_attention.feat_sizes=[{e},{e}]",
        f"{mem}.layer.cross_attention.embedding_dim={d}",
        f"{mem}.layer.cross_attention.feat_sizes=[{e},{e}]",
        f"{mem}.layer.cross_attention.kv_in_dim={m}",
        f"++model.memory_encoder.out_dim={m}",
        f"++model.memory_encoder.position_encoding.num_pos_feats={m}",
        f"++model.memory_encoder.fuser.layer.dim={d}", "++model.memory_encoder.fuser.num_layers=1",
    ]


def _make(cfg: Config) -> SAM2Base:
    """The ``cfg["model.type"]`` SAM 2 with fresh (random) weights, on the CPU, in eval mode."""
    model_type = cfg["model.type"]
    require_sam2(model_type)
    from sam2.build_sam import build_sam2

    tiny = model_type == "sam2_test_tiny"
    overrides = _tiny_overrides(cfg["model.test_tiny_img_size"]) if tiny else []
    model = build_sam2(SAM2_CONFIGS[model_type], ckpt_path=None, device="cpu",
                       hydra_overrides_extra=overrides)
    if tiny:  # random logits are about ±0.1; SAM's are about ±10 (the stability offset is 1)
        with torch.no_grad():
            for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(_TINY_LOGIT_GAIN)
    return model.eval()


def build_sam2_model(cfg: Config, random_weights: bool = False) -> SAM2Base:
    """The ``cfg["model.type"]`` SAM 2.1 on the CPU, in eval mode.

    ``sam2.1_hiera_*`` load ``model.checkpoint`` (searched like SAM's, see
    ``esam_core.backends.checkpoints.checkpoint_candidates``; an official file holds its
    state_dict under ``"model"``); with ``random_weights`` they get random weights instead
    (timing only).
    ``sam2_test_tiny`` has random weights seeded by ``model.seed`` unless ``model.checkpoint``
    names a saved one.

    Raises:
        Sam2NotInstalledError: the sam2 package (or hydra-core, iopath) is missing.
        CheckpointError: missing, truncated/corrupt, or wrong checkpoint (one line with the fix).
    """
    model_type = cfg["model.type"]
    model = random_init(cfg, partial(_make, cfg), random_weights, "sam2_test_tiny")
    if model is not None:
        return model
    checkpoint = cfg["model.checkpoint"]
    require_sam2(model_type)  # before reading a large file
    path = resolve_checkpoint(checkpoint, model_type)
    state = load_checkpoint(path, model_type)
    model = _make(cfg)  # no meta-device build: Hiera's constructor reads tensor values
    check_state_dict(state, model.state_dict(), path, model_type)
    model.load_state_dict(state)
    _LOG.info("loaded %s checkpoint %s", model_type, path)
    return model


def checkpoint_problem(path: Path, model_type: str) -> str | None:
    """Why the file at ``path`` is not a ``model_type`` checkpoint (None: it loads and has the
    keys and shapes of that model), for SAM 2.1 downloads, which have no published digest."""
    try:
        check_state_dict(load_checkpoint(path, model_type),
                         _make(Config({"model.type": model_type})).state_dict(), path, model_type)
    except ValueError as exc:  # CheckpointError, or sam2 not installed
        return f"does not load as a {model_type} checkpoint ({exc})"
    return None


@contextmanager
def quiet_jit_warning() -> Iterator[None]:
    """Hide the FutureWarning torch >= 2.10 gives for ``torch.jit.script``, which sam2's
    ``SAM2Transforms`` calls whenever a predictor is built (nothing a user can do about it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        yield
