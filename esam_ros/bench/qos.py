"""Delivery of raw frames by QoS: ``python -m esam_ros.bench.qos [--sizes 640x480,...]``.

A benchmark, not a test: it prints how many ``sensor_msgs/Image`` rgb8 frames a Python publisher
(a separate process, as a camera driver is) gets through to a Python subscription on this host,
for each frame size and publisher/subscriber reliability pair, with the count of lost samples the
middleware reported (rmw message_lost). Large frames over best_effort are lost whole when one of
their fragments is, which is what the README's QoS advice rests on. Like ``bench.node`` it runs on
an isolated domain with localhost-only discovery.
"""

from __future__ import annotations

import argparse
import array
import subprocess
import sys
import time

import numpy as np

from esam_ros.bench.node import isolate_dds

TOPIC = "esam_bench_qos/image"
PAIRS = (("best_effort", "best_effort"), ("reliable", "best_effort"), ("reliable", "reliable"))


def _qos(reliability: str):
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    policy = ReliabilityPolicy.RELIABLE if reliability == "reliable" else \
        ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(depth=1, reliability=policy)


def publish(w: int, h: int, frames: int, rate: float, reliability: str, domain: int) -> None:
    """The publisher process: wait for the subscriber, send ``frames`` frames at ``rate`` Hz."""
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init(domain_id=domain)
    node = rclpy.create_node("bench_qos_camera")
    pub = node.create_publisher(Image, TOPIC, _qos(reliability))
    deadline = time.monotonic() + 20.0
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let discovery settle on both sides
    data = array.array("B", np.random.default_rng(0).integers(0, 256, w * h * 3, np.uint8)
                       .tobytes())
    for i in range(frames):
        msg = Image(height=h, width=w, encoding="rgb8", step=3 * w)
        msg.data = data
        msg.header.stamp.sec, msg.header.stamp.nanosec = i, 0
        pub.publish(msg)
        time.sleep(1.0 / rate)
    time.sleep(1.0)  # reliable: let the last frames be repaired
    node.destroy_node()
    rclpy.shutdown()


def measure(w: int, h: int, frames: int, rate: float, pub_qos: str, sub_qos: str,
            domain: int) -> tuple[int, int]:
    """(frames received, lost samples the middleware reported) for one configuration."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image

    try:  # Iron and newer
        from rclpy.event_handler import SubscriptionEventCallbacks
    except ImportError:  # Humble
        from rclpy.qos_event import SubscriptionEventCallbacks

    context = Context()
    rclpy.init(context=context, domain_id=domain)
    node = rclpy.create_node("bench_qos_subscriber", context=context)
    got: set[int] = set()
    lost = [0]
    node.create_subscription(
        Image, TOPIC, lambda m: got.add(m.header.stamp.sec), _qos(sub_qos),
        event_callbacks=SubscriptionEventCallbacks(
            message_lost=lambda e: lost.__setitem__(0, int(e.total_count))))
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    proc = subprocess.Popen([sys.executable, "-m", "esam_ros.bench.qos", "--publish",
                             f"{w}x{h}", str(frames), str(rate), pub_qos, str(domain)])
    try:
        while proc.poll() is None:
            executor.spin_once(timeout_sec=0.05)
        for _ in range(20):
            executor.spin_once(timeout_sec=0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
    return len(got), lost[0]


def main(argv: list[str] | None = None) -> int:
    from esam_ros.cli import HelpFormatter

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--publish"]:  # the publisher subprocess
        size, frames, rate, reliability, domain = argv[1:6]
        w, h = (int(v) for v in size.split("x"))
        publish(w, h, int(frames), float(rate), reliability, int(domain))
        return 0
    parser = argparse.ArgumentParser(prog="python -m esam_ros.bench.qos",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--sizes", default="320x240,500x375,640x480,1280x720",
                        help="frame sizes WxH, comma-separated")
    parser.add_argument("--frames", type=int, default=100, help="frames per configuration")
    parser.add_argument("--rate", type=float, default=10.0, help="publish rate (Hz)")
    parser.add_argument("--domain-id", type=int, help="ROS domain (default: 200 + pid %% 32)")
    a = parser.parse_args(argv)
    domain = isolate_dds(a.domain_id)
    print(f"DDS: isolated domain {domain}, localhost-only discovery; {a.frames} rgb8 frames "
          f"per row at {a.rate:g} Hz from a Python publisher process")
    print(f"{'size':>10s} {'MB':>5s} {'publisher':>11s} {'subscriber':>11s} "
          f"{'received':>9s} {'lost (rmw)':>10s}")
    for size in a.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        for pub_qos, sub_qos in PAIRS:
            got, lost = measure(w, h, a.frames, a.rate, pub_qos, sub_qos, domain)
            print(f"{size:>10s} {w * h * 3 / 1e6:5.2f} {pub_qos:>11s} {sub_qos:>11s} "
                  f"{got:>5d}/{a.frames:<3d} {lost:>10d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
