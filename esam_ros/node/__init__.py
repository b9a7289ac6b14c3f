"""The ROS 2 nodes: ``esam_node`` (plain) and ``esam_lifecycle_node`` (managed), one runtime.

``runtime`` (parameters, model, topics, ``run``), ``worker`` (newest-frame slot, publishing),
``pipeline`` and ``handoff`` (the worker threads), ``frame_decode`` (which frames are taken),
``depth`` (depth pairing, track ids), ``inputs`` (receive-side health), ``stats``
(/diagnostics), ``params``, ``shutdown``. Importing this package imports nothing; its modules
need rclpy (except ``frame_decode`` and ``inputs``).
"""
