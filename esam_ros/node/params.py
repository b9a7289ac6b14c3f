"""esam_node parameters: E-SAM's ``PARAMETERS`` plus the node's own, declared with descriptors.

Every parameter gets a ``ParameterDescriptor`` (description, range or choices, ``read_only`` when
it cannot change while the node runs). Values are validated once more with the same rules as the
CLI (``esam_core.config.validate_value``) so a parameter file means the same thing to both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter

from esam_core.config import PARAMETERS, ConfigError, Param, validate_value
from esam_core.param_files import no_section_error, parameter_sections, sections_for

#: The node's own parameters (not read by the CLI); same schema as ``PARAMETERS``.
NODE_PARAMETERS: dict[str, Param] = {
    "cameras": Param([""], "camera namespaces: camera C reads C/image (and C/depth, "
                     "C/camera_info with depth.enabled) and publishes C/entities, "
                     "C/entity_labels, C/entity_overlay ('' = the node's namespace)",
                     dynamic=False),
    "input_transport": Param("raw", "raw: sensor_msgs/Image on C/image; compressed: "
                             "sensor_msgs/CompressedImage on C/image/compressed",
                             choices=("raw", "compressed"), dynamic=False),
    "qos.reliability": Param("best_effort", "input QoS reliability (must be compatible with "
                             "the publisher)", choices=("best_effort", "reliable"), dynamic=False),
    "qos.depth": Param(1, "input QoS keep-last depth", min=1, max=1000, dynamic=False),
    "input_timeout_s": Param(5.0, "warn (/diagnostics, log) when a camera topic has publishers "
                             "but no frame arrived for this long (s)", min=0.1, max=3600.0,
                             dynamic=False),
    "publish_overlay": Param(True, "publish C/entity_overlay (rgb8) when it has subscribers"),
    "overlay_alpha": Param(0.5, "weight of the entity colours in the overlay", min=0.0, max=1.0),
    "overlay_ids": Param(True, "draw each entity's id (its label value) on the overlay"),
    "overlay_boxes": Param(False, "draw each entity's bounding box on the overlay"),
    "max_image_pixels": Param(2073600, "largest frame (width*height) processed as is; "
                              "0 = no limit", min=0, max=10**9),
    "oversize_policy": Param("downscale", "frames above max_image_pixels: downscale (outputs "
                             "at the processed size) or refuse",
                             choices=("downscale", "refuse")),
    "diagnostics_period": Param(1.0, "seconds between /diagnostics messages", min=0.1,
                                max=3600.0, dynamic=False),
    "log_throttle_s": Param(5.0, "bad-frame warnings of one reason at most this often (s)",
                            min=0.0, max=3600.0),
    "shutdown_timeout_s": Param(3.0, "on Ctrl-C, SIGTERM or deactivate the frame in flight is "
                                "cancelled at its next stage boundary; a process exits after "
                                "waiting at most this long (s) for it (a second signal: at once)",
                                min=0.0, max=600.0),
    "pipeline_overlap": Param(True, "two worker threads: encode the next frame (SAM's image "
                              "encoder) while the current one is post-processed (MMG, EMR, USR, "
                              "publishing); false: one thread, one frame at a time",
                              dynamic=False),
    "depth.max_wait_s": Param(0.1, "while the newest depth frame is older than the colour "
                              "frame, wait this long (s) for a nearer one", min=0.0, max=10.0),
}

ALL_PARAMETERS: dict[str, Param] = {**PARAMETERS, **NODE_PARAMETERS}

_NAMESPACE_RE = re.compile(r"^[A-Za-z_~][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")


def check_value(name: str, value: Any) -> Any:
    """Validate one value of ``ALL_PARAMETERS[name]``; returns it (ints widened for floats).

    Raises:
        ConfigError: naming the parameter, the value and what is allowed.
    """
    if name in PARAMETERS:
        return validate_value(name, value)
    if name == "cameras":
        cams = list(value) if isinstance(value, (list, tuple)) else []  # [] arrives as None
        bad = [c for c in cams if not isinstance(c, str) or (c and not _NAMESPACE_RE.match(c))]
        if not cams or bad:
            raise ConfigError(f"parameter 'cameras' = {cams!r}: expected a non-empty list of "
                              f"relative namespaces like ['front', 'rear'] or ['']")
        if len(set(cams)) != len(cams):
            raise ConfigError(f"parameter 'cameras' = {cams!r}: names must be unique")
        return cams
    return validate_value(name, value, NODE_PARAMETERS)


def descriptor(name: str, p: Param) -> ParameterDescriptor:
    """The ROS descriptor of one parameter: description, range or choices, read-only flag.

    Typed dynamically: rclpy's own type check would refuse an integer for a float (``emr.delta
    0``) and name types by number ("expected '3' got '2'"); ``check_value`` checks the type.
    """
    d = ParameterDescriptor(name=name, description=p.description, read_only=not p.dynamic,
                            dynamic_typing=True)
    if p.choices is not None:
        d.additional_constraints = "one of: " + ", ".join(p.choices)
    if p.min is not None and isinstance(p.default, float):
        d.floating_point_range = [FloatingPointRange(from_value=float(p.min),
                                                     to_value=float(p.max), step=0.0)]
    elif p.min is not None and isinstance(p.default, int) and not isinstance(p.default, bool):
        d.integer_range = [IntegerRange(from_value=int(p.min), to_value=int(p.max), step=0)]
    return d


def declare_all(node: Node) -> dict[str, Any]:
    """Declare every parameter on ``node`` and return the validated values by dotted name.

    A parameter already declared (a lifecycle node configured again) keeps its current value.

    Raises:
        ConfigError: one line naming the first invalid parameter (wrong type, out of range,
            not one of the choices), e.g. from the ``--params-file``.
    """
    values: dict[str, Any] = {}
    for name, p in ALL_PARAMETERS.items():
        if node.has_parameter(name):
            values[name] = check_value(name, node.get_parameter(name).value)
            continue
        default = list(p.default) if isinstance(p.default, (list, tuple)) else p.default
        try:
            param = node.declare_parameter(name, default, descriptor(name, p))
        except InvalidParameterTypeException as exc:  # not with dynamic typing; kept for safety
            raise ConfigError(f"parameter '{name}': {str(exc).removesuffix(f': {name}')}") \
                from None
        except InvalidParameterValueException as exc:
            text = str(exc).removesuffix(f": {name}")
            raise ConfigError(f"parameter '{name}': {text.partition('Reason: ')[2] or text}") \
                from None
        values[name] = check_value(name, param.value)
    return values


def undeclared_overrides(node: Node) -> list[str]:
    """Names given to the node (e.g. in its parameter file) that it does not know: likely typos."""
    overrides = getattr(node, "_parameter_overrides", {})  # rclpy has no public accessor
    return sorted(n for n in overrides if not node.has_parameter(n) and not n.startswith("qos_"))


def ros_params_files(args: Sequence[str]) -> list[str]:
    """The ``--params-file`` values inside the ``--ros-args ... [--]`` blocks of ``args``."""
    files, in_ros = [], False
    for i, arg in enumerate(args):
        if arg == "--ros-args":
            in_ros = True
        elif arg == "--":
            in_ros = False
        elif in_ros and arg == "--params-file" and i + 1 < len(args):
            files.append(args[i + 1])
    return files


def check_params_files(files: Sequence[str], fqn: str) -> None:
    """Refuse parameter files that have sections, none for the node ``fqn``.

    rcl silently skips such a file (the node would start with defaults: vit_h, no checkpoint).

    Raises:
        ConfigError: naming the file, the node's full name and the sections present.
    """
    for path in files:
        try:
            doc = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue  # rcl has already read the file, or refused it with its own error
        if sections_for(doc, fqn) == []:
            raise ConfigError(no_section_error(path, fqn, list(parameter_sections(doc))))


def watch_parameters(node: Node, on_set: Any) -> None:
    """Register ``on_set`` (validates, see ``changes_from``) and, where rclpy has it (Iron and
    later), a pre-set callback that stores an integer given to a float parameter as a float."""
    node.add_on_set_parameters_callback(on_set)
    if hasattr(node, "add_pre_set_parameters_callback"):
        node.add_pre_set_parameters_callback(_ints_as_floats)


def _ints_as_floats(params: list[Parameter]) -> list[Parameter]:
    out = []
    for param in params:
        p = ALL_PARAMETERS.get(param.name)
        if (p is not None and isinstance(p.default, float)
                and param.type_ == Parameter.Type.INTEGER):
            param = Parameter(param.name, Parameter.Type.DOUBLE, float(param.value))
        out.append(param)
    return out


def changes_from(params: list[Parameter], declared: Any = None) -> dict[str, Any]:
    """Validate a set-parameters request; returns ``{name: value}`` or raises ConfigError.

    ``declared(name)``: whether the node declared ``name`` itself (``use_sim_time``, ...);
    any other unknown name is refused (the node allows undeclared names to say so clearly).
    """
    changes: dict[str, Any] = {}
    for param in params:
        if param.name not in ALL_PARAMETERS:
            if declared is not None and not declared(param.name):
                raise ConfigError(f"unknown parameter '{param.name}' (typo? `ros2 param list "
                                  f"/esam_node` shows them all)")
            continue  # use_sim_time and other parameters rclpy declares itself
        if not ALL_PARAMETERS[param.name].dynamic:
            raise ConfigError(f"parameter '{param.name}' is read-only while the node runs")
        changes[param.name] = check_value(param.name, param.value)
    return changes


def help_requested(argv: Sequence[str]) -> bool:
    """``-h`` or ``--help`` before the first ``--ros-args`` (ROS arguments never use them)."""
    args = list(argv)
    head = args[: args.index("--ros-args")] if "--ros-args" in args else args
    return "-h" in head or "--help" in head


def usage_text(executable: str, doc: str) -> str:
    """``EXECUTABLE --help``: how to run it, the first paragraph of ``doc``, every parameter."""
    from esam_core.param_files import installed_config

    config = installed_config() or "config/esam.yaml (not found)"
    lines = [f"usage: {executable} [-h] [--ros-args [--params-file FILE] [-p NAME:=VALUE] "
             f"[-r FROM:=TO] [-r __ns:=/NAMESPACE] [-r __node:=NAME] ...]", "",
             doc.strip().split("\n\n")[0], "",
             f"Parameter file with every parameter, its default and a comment: {config}",
             "(its '/**:' section applies under any node name and namespace). Example:",
             f"  {executable} --ros-args --params-file {config} -r image:=/camera/image_raw", "",
             "Parameters (name = default, [dynamic]: may change while running):"]
    for name, p in ALL_PARAMETERS.items():
        extra = f" one of {', '.join(p.choices)};" if p.choices else ""
        rng = f" [{p.min}, {p.max}];" if p.min is not None and not p.choices else ""
        lines.append(f"  {name} = {p.default!r}{' [dynamic]' if p.dynamic else ''}:{extra}{rng} "
                     f"{p.description}")
    return "\n".join(lines)
