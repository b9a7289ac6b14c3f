"""Throughput and latency of esam_node with ``pipeline_overlap`` off and on, under a stream:
``python -m esam_ros.bench.node --stream [--cameras 1,2] [--config FILE | --fake-encoder ...]``.

Each camera publishes rgb8 frames at ``--rate`` Hz, faster than the node serves them, so the node
is saturated and serves the newest frame of each camera (dropping the rest) as on a robot. Runs
alternate overlap off / on (and the camera counts) for ``--runs`` rounds; the table gives the
median of the rounds: frames published per second, latency node receive -> publish and camera
publish -> entities received (p50 / p95), frames dropped per second.

Segmenters: ``--config FILE`` runs real E-SAM (built once, shared by every run); otherwise
``TimedFakeSegmenter``, whose encoder and post-processing take known times.
"""

from __future__ import annotations

import array
import hashlib
import threading
import time
from typing import Any

import numpy as np

from esam_core.labels import entities_from_label_map
from esam_core.types import EntitySegmentation
from esam_ros.bench.node import blocks_label_map, session, wait_matched


class TimedFakeSegmenter:
    """A fake segmenter (no model): ``prepare`` (the encoder's part) and ``finish`` (the
    post-processing's) take known times and answer a fixed block label map of the frame's size.

    Args:
        encoder, post: (seconds, work); work ``sleep``: the time passes without the CPU (an
            encoder running on a GPU), ``burn``: torch work calibrated to take that long alone on
            this machine (``_burn_unit``), so two stages at once compete for the CPU cores as
            real ones do.
        entities: entities in the answer (tracking and publishing cost grow with it).
    """

    device = "cpu"

    def __init__(self, encoder: tuple[float, str], post: tuple[float, str],
                 entities: int = 40) -> None:
        self.encoder, self.post, self.entities = encoder, post, entities
        self._unit_s = _calibrate() if "burn" in (encoder[1], post[1]) else 0.0
        self._answers: dict[tuple[int, int], EntitySegmentation] = {}

    def _spend(self, seconds: float, work: str) -> None:
        if work == "sleep":
            time.sleep(seconds)
        else:
            for _ in range(round(seconds / self._unit_s)):
                _burn_unit()

    def prepare(self, rgb: np.ndarray, cancel: Any = None) -> np.ndarray:
        self._spend(*self.encoder)
        return rgb

    def finish(self, rgb: np.ndarray, cancel: Any = None) -> EntitySegmentation:
        self._spend(*self.post)
        hw = rgb.shape[:2]
        if hw not in self._answers:
            labels = blocks_label_map(*hw, self.entities)
            self._answers[hw] = EntitySegmentation(
                labels, entities_from_label_map(labels, [0.9] * self.entities))
        return self._answers[hw]

    def segment(self, rgb: np.ndarray, cancel: Any = None) -> EntitySegmentation:
        return self.finish(self.prepare(rgb, cancel), cancel)

    def set_config(self, cfg: Any) -> None:
        pass

    def describe(self) -> str:
        return (f"TimedFakeSegmenter: encoder {self.encoder[0] * 1000:.0f} ms {self.encoder[1]}, "
                f"post-processing {self.post[0] * 1000:.0f} ms {self.post[1]}")


_DATA = bytes(range(256)) * 4096  # 1 MiB


def _burn_unit() -> None:
    """About a millisecond of CPU work in native code that releases the GIL (as torch, numpy
    and OpenCV do), on one core: hashing a fixed buffer."""
    hashlib.sha256(_DATA).digest()


def _calibrate() -> float:
    """Seconds of one ``_burn_unit`` alone (median of 9 rounds of 10)."""
    rounds = []
    for _ in range(9):
        t0 = time.perf_counter()
        for _ in range(10):
            _burn_unit()
        rounds.append((time.perf_counter() - t0) / 10)
    return float(np.median(rounds))


def parse_stage(text: str) -> tuple[float, str]:
    """'150:sleep' -> (0.15, 'sleep')."""
    ms, _, work = text.partition(":")
    if work not in ("sleep", "burn"):
        raise ValueError(f"{text!r}: expected MS:sleep or MS:burn")
    return float(ms) / 1000.0, work


def warmup(seconds: float) -> float:
    """Seconds at the start of a run that are not counted (the node starts up)."""
    return min(2.0, seconds / 4)


def stream_run(segmenter: Any, config: str | None, cameras: int, overlap: bool, rate: float,
               seconds: float, hw: tuple[int, int], domain_id: int | None = None
               ) -> dict[str, float]:
    """One run: ``cameras`` cameras at ``rate`` Hz each for ``seconds``; figures after the
    ``warmup``."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from esam_ros.msg import EntityArray

    names = [f"cam{i}" for i in range(cameras)]
    overrides = {"qos.reliability": "reliable", "cameras": names, "pipeline_overlap": overlap,
                 "diagnostics_period": 1.0}
    h, w = hw
    pixels = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes()
    sent: dict[tuple[int, int], float] = {}
    arrived: dict[tuple[int, int], float] = {}
    lock = threading.Lock()

    def on_entities(msg: EntityArray) -> None:
        with lock:
            arrived[(msg.header.stamp.nanosec, msg.header.stamp.sec)] = time.perf_counter()

    with session(segmenter, config, overrides, domain_id, announce=False) as (node, client, ns):
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        pubs = [client.create_publisher(Image, f"{c}/image", qos) for c in names]
        for c in names:
            client.create_subscription(EntityArray, f"{c}/entities", on_entities, qos)
        wait_matched(client, pubs, [f"{ns}/{c}/entities" for c in names])
        msgs = []
        for i in range(cameras):
            msg = Image(height=h, width=w, encoding="rgb8", step=3 * w)
            msg.data = array.array("B", pixels)
            msg.header.stamp.nanosec = i  # camera index; sec = sequence number
            msgs.append(msg)
        t0 = time.perf_counter()
        period, seq = 1.0 / rate, 0
        while (now := time.perf_counter()) < t0 + seconds:
            for i, (pub, msg) in enumerate(zip(pubs, msgs)):
                msg.header.stamp.sec = seq
                sent[(i, seq)] = time.perf_counter()
                pub.publish(msg)
            seq += 1
            time.sleep(max(0.0, t0 + seq * period - time.perf_counter()))
        t_end = now
        time.sleep(1.0)  # let the frames in flight arrive (not counted in the window)
        snaps = [node.stats.snapshot(c) for c in names]
        stage_s = dict(node.stats.stage_s)
    start = t0 + warmup(seconds)
    with lock:
        window = [(k, t) for k, t in arrived.items() if start <= t <= t_end]
    e2e = [(t - sent[k]) * 1000.0 for k, t in window if k in sent]
    node_lat = np.concatenate([np.asarray(s["latency_s"][2:]) * 1000.0 for s in snaps])
    return dict(fps=len(window) / (t_end - start),
                node_p50=_pct(node_lat, 50), node_p95=_pct(node_lat, 95),
                e2e_p50=_pct(e2e, 50), e2e_p95=_pct(e2e, 95),
                dropped_per_s=sum(s["dropped"] for s in snaps) / seconds,
                wait_ms=stage_s.get("wait_post", 0.0) * 1000.0)


def _pct(values: Any, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def halves_alone(segmenter: Any, hw: tuple[int, int]) -> tuple[float, float]:
    """Milliseconds of ``prepare`` and ``finish`` alone on one frame (median of 3, after one
    warm-up frame), in a thread of their own as in the node (on a loaded machine torch in the
    main thread can be several times slower)."""
    rgb = np.random.default_rng(2).integers(0, 256, (*hw, 3), dtype=np.uint8)
    times = []

    def run() -> None:
        segmenter.segment(rgb)
        for _ in range(3):
            t0 = time.perf_counter()
            prepared = segmenter.prepare(rgb)
            t1 = time.perf_counter()
            segmenter.finish(prepared)
            times.append((t1 - t0, time.perf_counter() - t1))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    enc, post = np.median(np.asarray(times), axis=0) * 1000.0
    return float(enc), float(post)


COLUMNS = ("fps", "node_p50", "node_p95", "e2e_p50", "e2e_p95", "dropped_per_s", "wait_ms")


def run_stream_benchmark(a: Any) -> int:
    """``bench.node --stream``: interleaved runs, then the table of medians."""
    hw = (a.height, a.width)
    if a.config:
        from esam_core.config import load_config
        from esam_core.pipeline import EntitySegmenter

        segmenter = EntitySegmenter(load_config(a.config))
        what = f"E-SAM from {a.config} ({segmenter.config['model.type']}, {segmenter.device})"
    else:
        segmenter = TimedFakeSegmenter(parse_stage(a.fake_encoder), parse_stage(a.fake_post),
                                       a.entities)
        what = segmenter.describe()
    encoder_ms, post_ms = halves_alone(segmenter, hw)
    counts = [int(c) for c in a.cameras.split(",")]
    print(f"stream: {what}; measured alone (median of 3): prepare {encoder_ms:.0f} ms, finish "
          f"{post_ms:.0f} ms; {a.width}x{a.height} rgb8 at {a.rate:g} Hz per camera, "
          f"{a.seconds:g} s per run (first {warmup(a.seconds):g} s not counted), {a.runs} "
          f"interleaved rounds")
    results: dict[tuple[int, bool], list[dict[str, float]]] = {}
    for r in range(a.runs):
        for cams in counts:
            for overlap in (False, True):
                res = stream_run(segmenter, a.config, cams, overlap, a.rate, a.seconds, hw,
                                 domain_id=a.domain_id)
                results.setdefault((cams, overlap), []).append(res)
                print(f"  round {r + 1}: {cams} camera(s), overlap {'on ' if overlap else 'off'}"
                      f"  " + "  ".join(f"{k} {res[k]:.2f}" for k in COLUMNS), flush=True)
    print("median of the rounds (latencies in ms):")
    print(f"  {'cameras':>7} {'overlap':>7} {'frames/s':>9} {'node p50':>9} {'node p95':>9} "
          f"{'e2e p50':>9} {'e2e p95':>9} {'dropped/s':>9}")
    for (cams, overlap), runs in results.items():
        med = {k: float(np.median([x[k] for x in runs])) for k in COLUMNS}
        print(f"  {cams:>7} {'on' if overlap else 'off':>7} {med['fps']:9.2f} "
              f"{med['node_p50']:9.0f} {med['node_p95']:9.0f} {med['e2e_p50']:9.0f} "
              f"{med['e2e_p95']:9.0f} {med['dropped_per_s']:9.2f}")
    return 0
