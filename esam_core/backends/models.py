"""Building segment-anything models: official ViT-B/L/H from a checkpoint, random weights for
timing, and ``test_tiny`` (a small SAM from segment-anything's own classes, for tests only)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from esam_core.backends.checkpoints import check_state_dict, load_checkpoint, resolve_checkpoint
from esam_core.config import Config, ConfigError

_LOG = logging.getLogger(__name__)

#: test_tiny: gain on the random mask heads so its logits have SAM's magnitude.
_TINY_LOGIT_GAIN = 100.0


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a usable device (auto: CUDA when present).

    Raises:
        ValueError: unknown name, CUDA asked but absent, or N beyond the visible GPUs.
    """
    key = name.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(key)
    except RuntimeError:
        raise ValueError(f"model.device = {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"model.device = {name!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"model.device = {name!r} but CUDA is not available (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); use cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"model.device = {name!r} but only {torch.cuda.device_count()} CUDA "
                         "device(s) are visible")
    return device


# --- models --------------------------------------------------------------------------------------

def _build_tiny(img_size: int) -> Sam:
    """A small SAM from segment-anything's own classes: 2 encoder blocks of width 64, 256 out."""
    patch, prompt_dim = 16, 256
    if img_size % patch:
        raise ConfigError(f"model.test_tiny_img_size = {img_size}: must be a multiple of {patch}")
    side = img_size // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=patch, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=prompt_dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=4, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(side, side),
            input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=prompt_dim, iou_head_depth=3,
            iou_head_hidden_dim=64,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=256,
                                          num_heads=8)),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    # Default init gives logits of about ±0.1; real SAM's are about ±10 and the stability offset
    # (1.0) assumes that scale, so scale the mask heads up (on meta tensors this is a no-op).
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(_TINY_LOGIT_GAIN)
    return sam


def random_init(cfg: Config, make: Callable[[], torch.nn.Module], random_weights: bool,
                test_type: str) -> torch.nn.Module | None:
    """``make()`` in eval mode with fresh weights seeded by ``model.seed`` (the caller's RNG
    untouched) when ``random_weights`` is set or the test model ``test_type`` has no
    checkpoint; None when a checkpoint is to be loaded. Logs that a test model is meaningless
    and that a real-size model with random weights is for timing only."""
    model_type = cfg["model.type"]
    if model_type == test_type:
        _LOG.warning("model.type %s: a tiny random-weight model whose masks are meaningless "
                     "(tests and smoke runs only)", test_type)
    if not (random_weights or (model_type == test_type and not cfg["model.checkpoint"])):
        return None
    if model_type != test_type:
        _LOG.warning("%s with random weights: for timing only", model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["model.seed"])
        return make().eval()


def build_sam_model(cfg: Config, random_weights: bool = False) -> Sam:
    """The ``cfg["model.type"]`` SAM on the CPU, in eval mode.

    ``vit_b|vit_l|vit_h`` load ``model.checkpoint`` (see ``checkpoint_candidates``); with
    ``random_weights`` they get random weights instead (timing only). ``test_tiny`` has random
    weights seeded by ``model.seed`` unless ``model.checkpoint`` names a saved one.

    Raises:
        CheckpointError: missing, truncated/corrupt, or wrong checkpoint (one line with the fix).
    """
    model_type = cfg["model.type"]
    make = (partial(_build_tiny, cfg["model.test_tiny_img_size"]) if model_type == "test_tiny"
            else sam_model_registry[model_type])
    model = random_init(cfg, make, random_weights, "test_tiny")
    if model is not None:
        return model
    checkpoint = cfg["model.checkpoint"]
    path = resolve_checkpoint(checkpoint, model_type)
    state = load_checkpoint(path, model_type)
    with torch.device("meta"):  # shapes only: no memory, no random init of weights we replace
        model = make()
    check_state_dict(state, model.state_dict(), path, model_type)
    model.load_state_dict(state, assign=True)
    _LOG.info("loaded %s checkpoint %s", model_type, path)
    return model.eval()
