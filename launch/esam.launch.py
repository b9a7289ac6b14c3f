"""Start esam_node: ``ros2 launch esam_ros esam.launch.py image:=/camera/image_raw``.

Arguments (``ros2 launch esam_ros esam.launch.py --show-args``):
    params_file      parameter file (default: the installed config/esam.yaml; its '/**:' section
                     applies whatever the node name and namespace)
    node_name        name of the node (default esam_node); parameters: /<namespace>/<node_name>
    namespace        namespace of the node and its topics (entities, entity_labels, ...)
    image            remap of the input 'image' (compressed input: '<image>/compressed')
    depth, camera_info               remaps of the depth inputs (with depth.enabled)
    entities, entity_labels, entity_overlay   remaps of the outputs
                     (the remaps apply to the default camera, cameras: ['']; '' = no remap)
    device           model.device override: auto | cpu | cuda | cuda:N ('' = as in params_file)
    use_sim_time     true while replaying a bag with --clock
    input_transport  raw | compressed ('' = as in params_file); compressed reads <image>/compressed
    lifecycle        true: esam_lifecycle_node, the managed variant (frees the model's memory
                     while inactive); it configures and activates itself unless the parameter
                     file sets autostart: false (then drive it with `ros2 lifecycle set`)

The node command is built by ``node_ros_args`` (no launch import), so tests run exactly the same
``esam_node --ros-args ...`` where launch_ros is not installed. The model loads before the node
reports ready (its log line lists the resolved input and output topics); a missing checkpoint
stops it with the path tried and how to fetch the file.
"""

from __future__ import annotations

import os

NODE_NAME = "esam_node"  # default name of both executables
#: Topic names of the default camera that the launch file can remap (besides 'image').
REMAPPABLE = ("depth", "camera_info", "entities", "entity_labels", "entity_overlay")


def node_executable(lifecycle: bool) -> str:
    """The executable ``lifecycle:=true|false`` starts."""
    return "esam_lifecycle_node" if lifecycle else "esam_node"


def node_ros_args(params_file: str, image: str = "", device: str = "",
                  use_sim_time: bool = False, input_transport: str = "",
                  **remaps: str) -> list[str]:
    """Arguments after ``esam_node --ros-args`` (the node name and namespace excepted).

    ``remaps``: ``depth=``, ``camera_info=``, ``entities=``, ... (``REMAPPABLE``; '' = none).
    """
    unknown = sorted(set(remaps) - set(REMAPPABLE))
    if unknown:
        raise ValueError(f"cannot remap {unknown}; remappable: image, {', '.join(REMAPPABLE)}")
    args = ["--params-file", params_file]
    if image:
        # Remap rules match whole names: the compressed subscription needs its own rule.
        args += ["-r", f"image:={image}", "-r", f"image/compressed:={image}/compressed"] \
            if input_transport == "compressed" else ["-r", f"image:={image}"]
    for name in REMAPPABLE:
        if remaps.get(name):
            args += ["-r", f"{name}:={remaps[name]}"]
    if device:
        args += ["-p", f"model.device:={device}"]
    if input_transport:
        args += ["-p", f"input_transport:={input_transport}"]
    if use_sim_time:
        args += ["-p", "use_sim_time:=true"]
    return args


def _launch_setup(context, *_, **__):
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    lifecycle = arg("lifecycle").lower() == "true"
    ros_args = node_ros_args(arg("params_file"), arg("image"), arg("device"),
                             arg("use_sim_time").lower() == "true", arg("input_transport"),
                             **{name: arg(name) for name in REMAPPABLE})
    action = Node
    if lifecycle:
        try:  # the action that knows lifecycle events (launch_ros of Humble and newer)
            from launch_ros.actions import LifecycleNode as action
        except ImportError:
            pass
    return [action(package="esam_ros", executable=node_executable(lifecycle),
                   name=arg("node_name") or NODE_NAME, namespace=arg("namespace"),
                   arguments=["--ros-args", *ros_args], output="screen", emulate_tty=True)]


def generate_launch_description():
    from ament_index_python.packages import get_package_share_directory
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchDescription

    default_params = os.path.join(get_package_share_directory("esam_ros"), "config", "esam.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="E-SAM parameter file (ROS 2 params YAML)"),
        DeclareLaunchArgument("image", default_value="",
                              description="input image topic (remaps 'image'); '' = no remap"),
        DeclareLaunchArgument("node_name", default_value=NODE_NAME,
                              description="node name (parameters: /<namespace>/<node_name>)"),
        DeclareLaunchArgument("namespace", default_value="",
                              description="namespace of the node and its topics"),
        *(DeclareLaunchArgument(name, default_value="",
                                description=f"remap of '{name}' ('' = no remap)")
          for name in REMAPPABLE),
        DeclareLaunchArgument("device", default_value="",
                              description="model.device: auto, cpu, cuda, cuda:N "
                                          "('' = as in params_file)"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              choices=["true", "false"], description="use /clock time"),
        DeclareLaunchArgument("input_transport", default_value="",
                              choices=["", "raw", "compressed"],
                              description="raw Image or CompressedImage ('' = as in "
                                          "params_file)"),
        DeclareLaunchArgument("lifecycle", default_value="false", choices=["true", "false"],
                              description="start the managed (lifecycle) node "
                                          "esam_lifecycle_node instead of esam_node"),
        OpaqueFunction(function=_launch_setup),
    ])
