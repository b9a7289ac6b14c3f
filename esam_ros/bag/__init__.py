"""``esam replay``'s bag side, with rosbags only (no rclpy): ``reader`` (and ``repair`` for
cut-off MCAP files), ``writer``, ``replay`` (the run), ``depth`` (colour/depth pairing by header
stamp) and ``report`` (per-topic counts, temporal stability, the summary)."""
