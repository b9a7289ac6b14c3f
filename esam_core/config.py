"""E-SAM configuration: one YAML file that is also a ROS 2 parameter file.

The file has the form ``/**: {ros__parameters: {model: {type: vit_h, ...}, mmg: {...}}}``
(a bare mapping without the ``/**``/``ros__parameters`` wrapper is accepted too). Sections apply as
rcl applies them to the node ``/esam_node`` (``esam_core.param_files``). Nested keys flatten to
dotted names (``mmg.theta_o``), exactly as ROS 2 flattens them into parameter names, so the node
and the CLI read the same file and the same names.

Every key, its default and its allowed values are declared once, in ``PARAMETERS``. Defaults are
the paper's optimum (Table 4) and, for what the paper leaves open, the recommended interpretation
(``docs/method.md``); every interpretation is a named parameter so it can be ablated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from esam_core.param_files import no_section_error, parameter_sections, sections_for

NODE_NAME = "esam_node"


@dataclass(frozen=True)
class Param:
    """One parameter: default, allowed range or choices, description, and whether it is live."""

    default: Any
    description: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    #: Algorithm thresholds may change while the node runs; model and device may not.
    dynamic: bool = True


def _f(default: float, lo: float, hi: float, desc: str) -> Param:
    return Param(default, desc, min=lo, max=hi)


def _i(default: int, lo: int, hi: int, desc: str, dynamic: bool = True) -> Param:
    return Param(default, desc, min=lo, max=hi, dynamic=dynamic)


def _c(default: str, choices: tuple[str, ...], desc: str, dynamic: bool = True) -> Param:
    return Param(default, desc, choices=choices, dynamic=dynamic)


def _b(default: bool, desc: str) -> Param:
    return Param(default, desc)


PARAMETERS: dict[str, Param] = {
    # --- model and device (read-only while running) -------------------------------------
    "model.type": _c("vit_h", ("vit_h", "vit_l", "vit_b", "test_tiny", "sam2.1_hiera_t",
                               "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l",
                               "sam2_test_tiny"),
                     "SAM or SAM 2.1 backbone; test_tiny / sam2_test_tiny = random-weight SAM / "
                     "SAM 2 for tests only", dynamic=False),
    "model.checkpoint": Param("", "SAM checkpoint path (relative paths: to $ESAM_WEIGHTS_DIR, "
                              "then the package share dir); empty for test_tiny", dynamic=False),
    "model.device": Param("auto", "auto | cpu | cuda | cuda:N", dynamic=False),
    "model.precision": _c("fp32", ("fp32", "bf16", "fp16"),
                          "SAM precision (bf16/fp16 on CUDA only)", dynamic=False),
    "model.points_per_batch": _i(64, 1, 1024, "prompts per decoder call (~28 MB each, fp32)"),
    "model.test_tiny_img_size": _i(256, 64, 1024, "test_tiny / sam2_test_tiny input size",
                                   dynamic=False),
    "model.seed": _i(0, 0, 2**31 - 1, "seed of the test_tiny / sam2_test_tiny random weights",
                     dynamic=False),
    # --- what runs ---------------------------------------------------------------------
    "mode": _c("esam", ("esam", "amg", "sam_o"),
               "esam = full method; amg = SamAutomaticMaskGenerator; sam_o = object level only"),
    "modules.mmg": _b(True, "MMG on (off: EMR/USR start from AMG-style output, Table 3)"),
    "modules.emr": _b(True, "EMR on (split overlaps, merge an entity's pieces)"),
    "modules.usr": _b(True, "USR on (fill under-segmented regions)"),
    # --- SAM AMG settings (the amg/sam_o baselines and mmg.prefilter) ----------------------
    "sam.pred_iou_thresh": _f(0.88, 0.0, 1.0, "AMG predicted-IoU filter"),
    "sam.stability_score_thresh": _f(0.95, 0.0, 1.0, "AMG stability-score filter"),
    "sam.stability_score_offset": _f(1.0, 0.0, 10.0, "logit offset of the stability score"),
    "sam.box_nms_thresh": _f(0.7, 0.0, 1.0, "AMG box-NMS IoU threshold"),
    "sam.crop_n_layers": _i(0, 0, 0, "AMG crop layers (none in E-SAM)"),
    # --- MMG (Eq.1-4) -------------------------------------------------------------------
    "mmg.points_per_side": _i(32, 1, 128, "main point grid per side"),
    "mmg.prefilter": _c("amg", ("none", "amg"), "drop masks under AMG thresholds per level"),
    "mmg.nms_iou": _c("mask", ("mask", "box"), "IoU used by the naive NMS"),
    "mmg.theta_o": _f(0.8, 0.0, 1.0, "theta_O: naive-NMS IoU threshold (Eq.2)"),
    "mmg.gamma_o": _f(0.6, 0.0, 1.0, "gamma_O: min IoU of a kept O mask with a B mask (Eq.2)"),
    "mmg.nms_best_level": _b(True, "de-duplicate best-level masks before the Eq.2 test"),
    "mmg.density.mode": _c("boundary", ("boundary", "inv_superpixel_size", "off"),
                           "Eq.3 density map reading"),
    "mmg.density.window_px": _i(31, 1, 255, "density window at a 1024-px long side"),
    "mmg.adaptive_nms.base": _f(0.7, 0.0, 1.0, "Eq.4 base threshold N_t"),
    # --- gallery ------------------------------------------------------------------------
    "gallery.points_per_side": _i(64, 1, 128, "gallery point grid per side"),
    "gallery.nms": _b(True, "de-duplicate gallery masks with theta_O, keeping prompt->mask map"),
    "gallery.lazy": _b(True, "decode a gallery prompt only when EMR needs it"),
    # --- EMR (Eq.5-8) -------------------------------------------------------------------
    "emr.delta": _f(0.05, 0.0, 1.0, "delta: overlap ratio under which the larger mask loses it"),
    "emr.tau": _f(0.1, 0.0, 1.0, "tau: best-vs-object score margin for the guidance mask (Eq.6)"),
    "emr.pair_order": _c("score_desc", ("score_desc", "area_asc"), "order of overlap pairs"),
    "emr.overlap_assign": _c("whole_to_best_iou", ("whole_to_best_iou", "split_by_guidance"),
                             "how the overlap region is divided"),
    "emr.nested": _c("keep_smaller", ("guidance", "keep_smaller"),
                     "a mask nested in another: Eq.6 guidance decides, or it keeps its cells"),
    "emr.nested_frac": _f(0.9, 0.0, 1.0, "share of the smaller mask inside the larger: nested"),
    "emr.no_prompt_fallback": _c("carve_larger", ("carve_larger", "nearest_prompt"),
                                 "no gallery prompt inside the overlap"),
    "emr.top_k": _i(5, 1, 64, "k of Top_k in Eq.7"),
    "emr.sm_threshold": _f(0.5, 0.0, 64.0, "S_M threshold on the raw [0, k] scale"),
    "emr.require_adjacent": _b(True, "merge only masks that share a boundary"),
    "emr.gallery_match": _c("mutual", ("cover_each", "iou_union", "mutual"),
                            "Eq.8 gallery match test"),
    "emr.mutual_vote": _c("majority", ("majority", "mode"),
                          "mutual match: most of a piece's prompts, or its most frequent mask"),
    "emr.mutual_share": _f(0.34, 0.0, 1.0, "majority: share of a piece's prompts that must agree"),
    "emr.mutual_voters": _i(0, 0, 100000, "mutual: most prompts of a piece that vote (0 = all)"),
    "emr.mutual_level": _c("object", ("guidance", "object"),
                           "mutual match: each piece's Eq.6 guidance mask, or its O mask"),
    "emr.gallery_cover": _f(0.5, 0.0, 1.0, "cover_each: min share of each mask it covers"),
    "emr.merged_mask": _c("union_of_pieces", ("union_of_pieces", "gallery_union"), "merged mask"),
    "emr.min_fragment_frac": _f(0.0, 0.0, 0.1, "drop carved fragments under this image fraction"),
    "emr.sliver_width": _f(1.0, 0.0, 16.0, "drop carved fragments no thicker than this (cells)"),
    # --- USR (Eq.9-10) ------------------------------------------------------------------
    "usr.coverage_thresh": _f(0.5, 0.0, 1.0, "a superpixel covered less than this remains"),
    "usr.containment_thresh": _f(0.9, 0.0, 1.0, "fraction of a region inside a part mask"),
    "usr.containing_mask": _c("smallest", ("smallest", "largest"), "which containing mask"),
    "usr.sam_output": _c("best_score", ("best_score", "object_level"), "which SAM output is M_A"),
    "usr.prefilter": _c("iou", ("none", "iou", "amg"),
                        "add only M_A above AMG's predicted-IoU filter (iou) or both filters"),
    "usr.rho": _f(0.1, 0.0, 1.0, "rho: IoU above which M_A joins an entity (Eq.10)"),
    "usr.order": _c("uncovered_area_desc", ("uncovered_area_desc",), "greedy order"),
    "usr.write_uncovered_only": _b(True, "write only uncovered pixels (non-overlapping map)"),
    # --- superpixels --------------------------------------------------------------------
    "superpixel.scale": _f(300.0, 1.0, 10000.0, "Felzenszwalb scale"),
    "superpixel.sigma": _f(0.8, 0.0, 10.0, "Felzenszwalb Gaussian sigma"),
    "superpixel.min_size": _i(50, 1, 100000, "Felzenszwalb min component size (at max_side)"),
    "superpixel.max_side": _i(1024, 16, 8192, "superpixels run on a copy at most this long"),
    "superpixel.thread_nice": _i(5, 0, 19, "nice value of the Felzenszwalb thread (Linux; 0 = "
                                 "the pipeline's priority)", dynamic=False),
    # --- output -------------------------------------------------------------------------
    "output.score": _c("pred_iou", ("pred_iou", "pred_iou_x_stability", "area_weighted"),
                       "per-entity confidence"),
    "output.max_entities": _i(0, 0, 65535, "keep the top-N entities by score (0 = all)"),
    "output.min_area": _i(0, 0, 10**9, "drop entities smaller than this many pixels"),
    # --- 3D from depth (esam_core.depth) -------------------------------------------------
    "depth.enabled": Param(False, "subscribe to depth + camera_info and pair them with colour",
                           dynamic=False),
    "depth.min_m": _f(0.1, 0.0, 1000.0, "depth readings below this (m) are invalid"),
    "depth.max_m": _f(10.0, 0.0, 1000.0, "depth readings above this (m) are invalid"),
    "depth.min_valid_pixels": _i(20, 1, 10**9, "fewer valid depth pixels: no position"),
    "depth.min_valid_fraction": _f(0.1, 0.0, 1.0, "lower valid-depth fraction: no position"),
    "depth.extent_percentile": _f(2.0, 0.0, 24.0, "percentile extrapolated to the extent"),
    "depth.fence_k": _f(2.0, 0.0, 100.0, "drop depths this many spreads off the median"),
    "depth.fence_margin": _f(0.05, 0.0, 10.0, "minimum depth fence half-width (m)"),
    "depth.sync_tolerance_s": _f(0.02, 0.0, 10.0, "max colour/depth stamp difference (s)"),
    "depth.sync_queue": _i(30, 1, 1000, "depth frames kept for pairing"),
    # --- stable ids across frames (esam_core.tracking) ------------------------------------
    "tracking.enabled": _b(True, "keep track_id stable across frames of one camera"),
    "tracking.iou_threshold": _f(0.3, 0.01, 1.0, "min mask IoU to continue a track"),
    "tracking.max_age": _i(5, 0, 10000, "frames an unmatched track survives"),
    "tracking.max_distance_m": _f(0.5, 0.0, 1000.0, "max 3D centroid jump (m); 0 = no gate"),
}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


def validate_value(key: str, value: Any, schema: dict[str, Param] | None = None) -> Any:
    """Check one value against ``schema[key]`` (default ``PARAMETERS``) and return it (ints
    widened to float, integral floats narrowed to int).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    schema = PARAMETERS if schema is None else schema
    if key not in schema:
        raise ConfigError(f"unknown parameter '{key}'")
    p = schema[key]
    d = p.default
    if isinstance(d, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"parameter '{key}' = {value!r}: expected true or false")
    elif isinstance(d, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"parameter '{key}' = {value!r}: expected a number "
                              f"in [{p.min}, {p.max}]")
        if isinstance(d, int) and not float(value).is_integer():
            raise ConfigError(f"parameter '{key}' = {value!r}: expected an integer "
                              f"in [{p.min}, {p.max}]")
        value = type(d)(value)
        if (p.min is not None and value < p.min) or (p.max is not None and value > p.max):
            raise ConfigError(f"parameter '{key}' = {value!r} is out of range [{p.min}, {p.max}]")
    elif isinstance(d, str):
        if not isinstance(value, str):
            raise ConfigError(f"parameter '{key}' = {value!r}: expected a string")
        if p.choices is not None and value not in p.choices:
            raise ConfigError(f"parameter '{key}' = {value!r}: expected one of {list(p.choices)}")
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'mmg': {'theta_o': 0.8}}`` -> ``{'mmg.theta_o': 0.8}`` (as ROS 2 names parameters)."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and name not in PARAMETERS:
            flat.update(flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


class Config:
    """Validated E-SAM settings, read by dotted key: ``cfg["emr.delta"]``.

    Unknown keys are ignored by the algorithm only if ``known_prefixes`` says so (the node's own
    parameters, e.g. ``cameras`` or ``qos.*``, live in the same file).
    """

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self._values = {k: p.default for k, p in PARAMETERS.items()}
        for k, v in (values or {}).items():
            self._values[k] = validate_value(k, v)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def replace(self, **changes: Any) -> Config:
        """A copy with some values changed; keys use ``__`` for dots (``emr__delta=0.1``)."""
        return self.updated({k.replace("__", "."): v for k, v in changes.items()})

    def updated(self, changes: dict[str, Any]) -> Config:
        """A copy with ``changes`` (dotted keys) applied and validated."""
        new = copy.copy(self)
        new._values = dict(self._values)
        for k, v in changes.items():
            new._values[k] = validate_value(k, v)
        return new

    def as_dict(self) -> dict[str, Any]:
        """All values by dotted key (a copy)."""
        return dict(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and other._values == self._values

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._values.items() if v != PARAMETERS[k].default}
        return f"Config({changed})"


def read_parameter_file(path: str | Path, node_name: str = NODE_NAME) -> dict[str, Any]:
    """Read a ROS 2 params file (or a bare mapping) into a flat ``{dotted key: value}`` dict.

    Merges, in file order, every section that applies to the node ``/node_name`` (``/**``,
    ``node_name``, ``/*``, ...: rcl's rules). All keys are returned, including ones that are not
    E-SAM parameters (the node's own).

    Raises:
        ConfigError: the file is missing, is not YAML, or has no section for the node.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    fqn = "/" + node_name.strip("/")
    sections = sections_for(doc, fqn)
    if sections is None:
        return flatten(doc)
    if not sections:
        raise ConfigError(no_section_error(path, fqn, list(parameter_sections(doc))))
    flat: dict[str, Any] = {}
    for params in sections:
        flat.update(flatten(params))
    return flat


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate an E-SAM config; keys that are not E-SAM parameters are ignored.

    Args:
        path: YAML file (ROS 2 params file or bare mapping); None gives the defaults.
        overrides: dotted keys applied after the file (e.g. from command-line flags).
    """
    flat = read_parameter_file(path) if path is not None else {}
    flat.update(overrides or {})
    return Config({k: v for k, v in flat.items() if k in PARAMETERS})
