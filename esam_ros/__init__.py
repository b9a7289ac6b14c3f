"""esam_ros: the ROS 2 node, rosbag replay and AP^e evaluation around esam_core.

Importing this package needs no ROS install; only esam_ros.node, esam_ros.bench and esam_ros.msg do.
"""

__version__ = "0.1.0"
