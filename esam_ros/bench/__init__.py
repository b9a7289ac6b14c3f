"""Benchmarks over DDS on an isolated localhost domain, run as ``python -m esam_ros.bench.node``
(the node's overhead; ``--stream`` for the pipelined worker, in ``stream``) and
``python -m esam_ros.bench.qos`` (raw-frame delivery by QoS). They print numbers; they are not
``esam`` subcommands because they need rclpy and the CLI does not."""
