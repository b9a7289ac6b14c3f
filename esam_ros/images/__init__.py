"""Image messages to numpy and the overlay, shared by the node, replay and the CLI (no rclpy, no
rosbags): ``colour`` (sensor_msgs/Image and CompressedImage -> RGB, with the checks), ``depth``
(depth images -> metres or millimetres) and ``overlay`` (entity colours and ids over an image)."""
