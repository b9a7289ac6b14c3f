"""Node overhead benchmark: ``python -m esam_ros.bench.node [--frames 50] [--config FILE]``.

Prints the time the ROS shell adds per frame at 640x480 (target: <= 10 ms): decoding each input
encoding, building the EntityArray, label and overlay images, and publishing; then the end-to-end
latency through a real EsamNode over DDS (publish -> entities received, and the node's own
receive -> publish). Without ``--config`` the node gets a segmenter that returns a precomputed
result instantly, so the latency is the node's overhead alone; with ``--config`` it runs E-SAM.

The DDS part never talks on the robot's network: it uses its own ROS domain (``--domain-id``,
default one derived from the process id in 200..231, whatever ``ROS_DOMAIN_ID`` says), discovery
on localhost only, and topics under a private namespace; it prints all three.

``--stream`` measures instead throughput and latency under a stream of frames, with the node's
``pipeline_overlap`` off and on (``esam_ros.bench.stream``).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np

from esam_core.labels import entities_from_label_map
from esam_core.types import EntitySegmentation
from esam_ros import messages
from esam_ros.images import colour, overlay


def blocks_label_map(h: int, w: int, n: int) -> np.ndarray:
    """(H, W) uint16 map of about ``n`` rectangular entities, with a 0 border (background)."""
    cols = int(np.ceil(np.sqrt(n * w / h)))
    rows = int(np.ceil(n / cols))
    ys, xs = np.mgrid[0:h, 0:w]
    labels = (ys * rows // h) * cols + xs * cols // w + 1
    labels[labels > n] = 0
    labels[:4], labels[:, :4] = 0, 0
    return labels.astype(np.uint16)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(median, p95) of ``fn`` in milliseconds."""
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(samples)), float(np.percentile(samples, 95))


class Precomputed:
    """A segmenter that answers instantly with a fixed result (isolates the node's own cost)."""

    device = "cpu"

    def __init__(self, result: EntitySegmentation) -> None:
        self.result = result

    def segment(self, rgb: np.ndarray, cancel: Any = None) -> EntitySegmentation:
        return self.result

    def set_config(self, cfg: Any) -> None:
        pass


def stage_benchmarks(h: int, w: int, n: int, repeat: int) -> dict[str, tuple[float, float]]:
    from sensor_msgs.msg import CompressedImage, Image

    rng = np.random.default_rng(0)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (9, 9), 3)
    labels = blocks_label_map(h, w, n)
    result = EntitySegmentation(labels, entities_from_label_map(labels, [0.9] * n))
    out: dict[str, tuple[float, float]] = {}
    for enc, pixels in (("rgb8", rgb), ("bgr8", rgb[:, :, ::-1]), ("mono8", rgb[:, :, 0]),
                        ("bgra8", np.dstack([rgb, rgb[:, :, :1]]))):
        pixels = np.ascontiguousarray(pixels)
        msg = Image(height=h, width=w, encoding=enc, step=pixels.strides[0])
        msg.data = array.array("B", pixels.tobytes())
        out[f"decode {enc}"] = timed(lambda m=msg: colour.image_to_rgb(m), repeat)
    for ext in (".jpg", ".png"):
        cmsg = CompressedImage(format=ext[1:])
        cmsg.data = array.array("B", cv2.imencode(ext, rgb)[1].tobytes())
        out[f"decode {ext[1:]}"] = timed(lambda m=cmsg: colour.compressed_to_rgb(m), repeat)
    header, types = Image().header, messages.rclpy_types()
    out[f"EntityArray ({n} entities)"] = timed(
        lambda: messages.entity_array(types, header, result), repeat)
    out["label image (mono16)"] = timed(
        lambda: messages.image(types, header, messages.label_image_fields(labels)), repeat)
    out["overlay image (rgb8, ids)"] = timed(lambda: messages.image(
        types, header, messages.rgb_image_fields(
            overlay.overlay_image(rgb, labels, entities=result.entities))), repeat)
    big = cv2.resize(rgb, (1920, 1440))
    out["downscale 1920x1440 -> 0.3 MP"] = timed(
        lambda: colour.fit_max_pixels(big, h * w), repeat)
    return out


def isolate_dds(domain_id: int | None) -> int:
    """Localhost-only discovery (set before rclpy starts) and the domain id to use."""
    if os.environ.get("ROS_DISTRO") == "humble":  # Humble knows only the older variable
        os.environ["ROS_LOCALHOST_ONLY"] = "1"
    else:  # Iron and newer; ROS_LOCALHOST_ONLY is deprecated there and would conflict
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        os.environ.pop("ROS_LOCALHOST_ONLY", None)
        os.environ["ROS_STATIC_PEERS"] = ""
    return 200 + os.getpid() % 32 if domain_id is None else domain_id


@contextlib.contextmanager
def session(segmenter: Any, config: str | None, overrides: dict[str, Any],
            domain_id: int | None = None, announce: bool = True
            ) -> Iterator[tuple[Any, Any, str]]:
    """A real EsamNode (``segmenter``, or built from ``config``; parameter ``overrides``) and a
    client node on an isolated DDS domain (``isolate_dds``, printed with ``announce``), spun by
    a two-thread executor.

    Yields (node, client, namespace). On exit everything is shut down and the threads joined.
    """
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from esam_ros.node.esam_node import EsamNode

    domain = isolate_dds(domain_id)
    namespace = f"/esam_bench_{os.getpid()}"
    context = Context()
    args = ["--ros-args", "--params-file", config] if config else None
    rclpy.init(context=context, args=args, domain_id=domain)
    if announce:
        print(f"DDS: isolated domain {domain}, localhost-only discovery, topics under "
              f"{namespace} (ROS_DOMAIN_ID ignored)")
    node = client = executor = spinner = None
    try:
        node = EsamNode(segmenter=segmenter, context=context, namespace=namespace,
                        parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()],
                        params_files=[config] if config else None)
        client = rclpy.create_node("bench_client", namespace=namespace, context=context)
        executor = MultiThreadedExecutor(num_threads=2, context=context)
        executor.add_node(node)
        executor.add_node(client)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        yield node, client, namespace
    finally:  # an executor thread left spinning at exit aborts the process ("terminate called")
        if executor is not None:
            executor.shutdown(timeout_sec=10.0)
        if spinner is not None:
            spinner.join(timeout=10.0)
        for n_ in (node, client):
            if n_ is not None:
                n_.destroy_node()
        rclpy.shutdown(context=context)


def wait_matched(client: Any, pubs: list[Any], outputs: list[str]) -> None:
    """Wait until the node subscribes to every publisher and publishes every output topic."""
    deadline = time.monotonic() + 20.0
    while any(p.get_subscription_count() == 0 for p in pubs) or any(
            client.count_publishers(t) == 0 for t in outputs):
        if time.monotonic() > deadline:
            raise RuntimeError("the node and the benchmark client did not discover each other")
        time.sleep(0.05)


def end_to_end(h: int, w: int, n: int, frames: int, config: str | None,
               domain_id: int | None = None) -> dict[str, Any]:
    """Publish ``frames`` frames one at a time through a real EsamNode on an isolated DDS domain
    (``isolate_dds``); latencies in ms. Everything is shut down, threads joined, before return."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from esam_ros.msg import EntityArray

    labels = blocks_label_map(h, w, n)
    seg = None if config else Precomputed(
        EntitySegmentation(labels, entities_from_label_map(labels, [0.9] * n)))
    with session(seg, config, {"qos.reliability": "reliable"}, domain_id) as (node, client, ns):
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        arrived = threading.Event()
        received: dict[int, float] = {}

        def on_entities(msg: EntityArray) -> None:
            received[msg.header.stamp.nanosec] = time.perf_counter()
            arrived.set()

        client.create_subscription(EntityArray, "entities", on_entities, qos)
        pub = client.create_publisher(Image, "image", qos)
        wait_matched(client, [pub], [f"{ns}/entities"])
        rgb = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
        sent: dict[int, float] = {}
        for i in range(frames + 3):  # three warm-up frames
            msg = Image(height=h, width=w, encoding="rgb8", step=3 * w)
            msg.data = array.array("B", rgb.tobytes())
            msg.header.stamp.nanosec = i
            arrived.clear()
            sent[i] = time.perf_counter()
            pub.publish(msg)
            arrived.wait(timeout=120.0)
        stats = node.stats.snapshot("")
        stage_s = dict(node.stats.stage_s)
    lat = [(received[i] - sent[i]) * 1000.0 for i in range(3, frames + 3) if i in received]
    node_lat = np.asarray(stats["latency_s"][3:]) * 1000.0
    return dict(frames=len(lat), e2e=(np.median(lat), np.percentile(lat, 95)),
                node=(np.median(node_lat), np.percentile(node_lat, 95)),
                dropped=stats["dropped"], stage_s=stage_s)


def main(argv: list[str] | None = None) -> int:
    from esam_ros.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m esam_ros.bench.node",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--width", type=int, default=640, help="frame width")
    parser.add_argument("--height", type=int, default=480, help="frame height")
    parser.add_argument("--entities", type=int, default=40, help="entities in the result")
    parser.add_argument("--repeat", type=int, default=30, help="repeats per stage")
    parser.add_argument("--frames", type=int, default=30, help="end-to-end frames")
    parser.add_argument("--config", help="run real E-SAM from this params file (default: an "
                                         "instant segmenter, node overhead only)")
    parser.add_argument("--domain-id", type=int, choices=range(0, 233), metavar="0..232",
                        help="ROS domain of the DDS part (default: 200 + pid %% 32)")
    stream = parser.add_argument_group("--stream: pipeline_overlap off vs on under a stream")
    stream.add_argument("--stream", action="store_true", help="run this instead")
    stream.add_argument("--cameras", default="1,2", help="camera counts to run")
    stream.add_argument("--rate", type=float, default=5.0, help="frames per second per camera")
    stream.add_argument("--seconds", type=float, default=12.0, help="length of one run")
    stream.add_argument("--runs", type=int, default=3, help="interleaved rounds")
    stream.add_argument("--fake-encoder", default="150:sleep", metavar="MS:sleep|burn",
                        help="without --config: TimedFakeSegmenter's encoder time and kind")
    stream.add_argument("--fake-post", default="300:burn", metavar="MS:sleep|burn",
                        help="without --config: its post-processing time and kind")
    a = parser.parse_args(argv)
    if a.stream:
        from esam_ros.bench.stream import run_stream_benchmark

        return run_stream_benchmark(a)
    h, w, n = a.height, a.width, a.entities
    print(f"node stages at {w}x{h}, {n} entities (ms, median / p95):")
    for name, (med, p95) in stage_benchmarks(h, w, n, a.repeat).items():
        print(f"  {name:32s} {med:8.2f} {p95:8.2f}")
    r = end_to_end(h, w, n, a.frames, a.config, a.domain_id)
    what = f"E-SAM from {a.config}" if a.config else "instant segmenter: node overhead only"
    print(f"end to end over DDS, {r['frames']} frames, {what} (ms, median / p95):")
    print(f"  {'publish -> entities received':32s} {r['e2e'][0]:8.2f} {r['e2e'][1]:8.2f}")
    print(f"  {'node receive -> publish':32s} {r['node'][0]:8.2f} {r['node'][1]:8.2f}")
    print("  node stage averages (ms): " + ", ".join(
        f"{k} {v * 1000:.2f}" for k, v in r["stage_s"].items()))
    print(f"  dropped frames: {r['dropped']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
