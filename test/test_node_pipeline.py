"""esam_node's two-stage frame path (``pipeline_overlap``, issue 10) over real DDS.

With a segmenter double whose ``finish`` the test holds (``Gated``; it records when each half of
each frame starts and ends): frame N+1's encoder starts while frame N is post-processed, at most
one encoded frame waits, a frame replaced while the encoder waits is counted as dropped, every
result carries its own frame's header and size, and a lifecycle deactivate during overlapped
frames cancels both and activate starts exactly one encoder and one post thread. With the real
test_tiny SAM: overlap on gives the same entities as off for the same frames.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import requires_ros
from node_harness import TINY, Harness, image_msg, labels_of, scene

pytestmark = requires_ros
WORKERS = ("esam_worker", "esam_encoder", "esam_post")


class Gated:
    """A segmenter double. A frame's tag is its pixel value; ``prepare`` and ``finish`` log
    (event, tag) when they start and end, ``finish`` of a held tag waits until ``open``ed and
    raises ``Cancelled`` when the node's cancel event is set meanwhile (a stage boundary)."""

    device = "cpu"

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._events: dict[tuple[str, int], threading.Event] = {}
        self._gates: dict[int, threading.Event] = {}

    def _event(self, what: str, tag: int) -> threading.Event:
        with self._lock:
            return self._events.setdefault((what, tag), threading.Event())

    def _note(self, what: str, tag: int) -> None:
        with self._lock:
            self.log.append((what, tag))
        self._event(what, tag).set()

    def seen(self, what: str, tag: int, timeout: float = 30.0) -> bool:
        return self._event(what, tag).wait(timeout)

    def hold(self, tag: int) -> None:
        self._gates[tag] = threading.Event()

    def open(self, tag: int) -> None:
        self._gates[tag].set()

    def prepare(self, rgb: np.ndarray, cancel: Any = None) -> np.ndarray:
        self._note("prepare_start", int(rgb[0, 0, 0]))
        self._note("prepare_end", int(rgb[0, 0, 0]))
        return rgb

    def finish(self, rgb: np.ndarray, cancel: Any = None) -> Any:
        from esam_core.labels import entities_from_label_map
        from esam_core.pipeline import Cancelled
        from esam_core.types import EntitySegmentation

        tag = int(rgb[0, 0, 0])
        self._note("finish_start", tag)
        gate = self._gates.get(tag)
        while gate is not None and not gate.wait(0.05):
            if cancel is not None and cancel.is_set():
                self._note("finish_cancelled", tag)
                raise Cancelled(f"frame {tag}")
        labels = np.zeros(rgb.shape[:2], np.uint16)
        labels[: rgb.shape[0] // 2] = 1
        self._note("finish_end", tag)
        return EntitySegmentation(labels, entities_from_label_map(labels, [0.9]))

    def segment(self, rgb: np.ndarray, cancel: Any = None) -> Any:
        return self.finish(self.prepare(rgb, cancel), cancel)

    def set_config(self, cfg: Any) -> None:
        pass


def tagged(tag: int, h: int, w: int) -> Any:
    """A frame whose pixels are ``tag``, frame_id 'f<tag>_<h>x<w>'."""
    return image_msg(np.full((h, w, 3), tag, np.uint8), "rgb8", f"f{tag}_{h}x{w}")


def wait_until(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def publish_once(h: Harness, cam: str, msg: Any) -> None:
    """Publish one frame (reliable input) and wait until the node has received it."""
    before = h.esam.stats.snapshot(cam)["received"]
    h.pubs[cam].publish(msg)
    wait_until(lambda: h.esam.stats.snapshot(cam)["received"] > before, f"{msg.header.frame_id}")


def outputs_of(h: Harness, cam: str, frame_id: str) -> tuple[Any, Any]:
    """(EntityArray, label image) of ``frame_id`` on camera ``cam``, once both arrived."""
    keys = [f"{cam}/entities", f"{cam}/entity_labels"]
    wait_until(lambda: all(frame_id in h.outputs.get(k, {}) for k in keys),
               f"the outputs of {frame_id}")
    with h.lock:
        return h.outputs[keys[0]][frame_id], h.outputs[keys[1]][frame_id]


def published_sizes(h: Harness) -> dict[str, tuple[int, int]]:
    """frame_id -> (height, width) of every label image received; each checked against the
    size in its frame_id (the header of the frame it answers)."""
    with h.lock:
        labels = {f: m for k, v in h.outputs.items() if k.endswith("/entity_labels")
                  for f, m in v.items()}
    for frame_id, msg in labels.items():
        assert frame_id.endswith(f"_{msg.height}x{msg.width}"), frame_id
    return {f: (m.height, m.width) for f, m in labels.items()}


@contextlib.contextmanager
def serving(cameras: list[str], segmenter: Any = None, **params: Any) -> Iterator[Harness]:
    """An EsamNode (test_tiny parameters, or ``segmenter``; reliable input, ``params``) and its
    client harness; both destroyed afterwards, also when the test fails."""
    import rclpy
    from rclpy.context import Context
    from rclpy.parameter import Parameter

    from esam_ros.node.esam_node import EsamNode

    context = Context()
    rclpy.init(context=context, args=["--ros-args", "--params-file", TINY])
    values = {"cameras": cameras, "qos.reliability": "reliable", "diagnostics_period": 0.2,
              **params}
    node = harness = None
    try:
        node = EsamNode(segmenter=segmenter, context=context,
                        parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
        harness = Harness(context, node, cameras, compressed=False)
        wait_until(lambda: all(p.get_subscription_count() for p in harness.pubs.values()),
                   "the node's subscriptions")
        yield harness
    finally:
        if harness is not None:
            harness.close()
        if node is not None:
            node.destroy_node()
        rclpy.shutdown(context=context)


@pytest.fixture
def two_cameras() -> Iterator[Harness]:
    with serving(["cam_a", "cam_b"], Gated()) as harness:
        yield harness


def test_next_frame_is_encoded_while_one_is_post_processed(two_cameras: Harness) -> None:
    h, seg = two_cameras, two_cameras.esam.segmenter
    seg.hold(1)
    publish_once(h, "cam_a", tagged(1, 48, 64))
    assert seg.seen("finish_start", 1)
    publish_once(h, "cam_b", tagged(2, 40, 56))
    # Frame 2's encoder runs while frame 1 is held in post-processing.
    assert seg.seen("prepare_end", 2), f"frame 2 was not encoded during frame 1: {seg.log}"
    assert ("finish_end", 1) not in seg.log
    # At most one encoded frame waits: frame 3 stays in its camera's slot and, replaced by
    # frame 4 there, is counted as dropped.
    publish_once(h, "cam_a", tagged(3, 48, 64))
    assert h.esam.cameras["cam_a"].slot is not None
    publish_once(h, "cam_a", tagged(4, 32, 48))
    assert ("prepare_start", 3) not in seg.log and ("prepare_start", 4) not in seg.log
    seg.open(1)
    wait_until(lambda: len(published_sizes(h)) == 3, "the labels of frames 1, 2 and 4")
    assert published_sizes(h) == {"f1_48x64": (48, 64), "f2_40x56": (40, 56),
                                  "f4_32x48": (32, 48)}
    with h.lock:  # each on its own camera's topics
        assert sorted(h.outputs["cam_a/entities"]) == ["f1_48x64", "f4_32x48"]
        assert sorted(h.outputs["cam_b/entities"]) == ["f2_40x56"]
    assert seg.log.index(("prepare_start", 2)) < seg.log.index(("finish_end", 1))
    assert ("prepare_start", 3) not in seg.log
    assert [h.esam.stats.snapshot(c)["dropped"] for c in ("cam_a", "cam_b")] == [1, 0]
    wait_until(lambda: h.diag_value("camera 'cam_a'", "dropped") == "1"
               and h.diag_value("camera 'cam_a'", "published") == "2", "/diagnostics")
    assert h.diag_value("camera 'cam_b'", "dropped") == "0"


def test_one_fast_camera_overlaps_too() -> None:
    """One camera whose next frame arrives while the node post-processes the previous one."""
    with serving([""], Gated()) as h:
        seg = h.esam.segmenter
        seg.hold(5)
        publish_once(h, "", tagged(5, 48, 64))
        assert seg.seen("finish_start", 5)
        publish_once(h, "", tagged(6, 40, 56))
        assert seg.seen("prepare_end", 6), seg.log
        assert ("finish_end", 5) not in seg.log
        seg.open(5)
        wait_until(lambda: len(published_sizes(h)) == 2, "both results")


class FinishAfterNextEncode:
    """Wraps the real segmenter: ``finish`` of the first frame of a pair waits (at most 10 s)
    until the second one has been encoded, so with overlap every pair's first frame is
    post-processed after another frame went through SAM's encoder."""

    def __init__(self, real: Any) -> None:
        self.real, self.prepared, self._cond = real, 0, threading.Condition()

    def prepare(self, rgb: np.ndarray, cancel: Any = None) -> Any:
        prepared = self.real.prepare(rgb, cancel)
        with self._cond:
            self.prepared += 1
            self._cond.notify_all()
        return prepared

    def finish(self, prepared: Any, cancel: Any = None) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self.prepared % 2 == 0, timeout=10.0)
        return self.real.finish(prepared, cancel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_overlap_gives_the_same_entities_as_one_thread() -> None:
    """The real test_tiny SAM, two cameras fed at once: the same frames give the same label
    images and entities with pipeline_overlap off and on (where each pair's first frame is
    post-processed after the second one was encoded)."""
    frames = [("cam_a", scene(48, 64), "same_a0"), ("cam_b", scene(40, 56), "same_b0"),
              ("cam_a", scene(48, 64)[::-1].copy(), "same_a1"),
              ("cam_b", scene(40, 56)[:, ::-1].copy(), "same_b1")]
    answers = {}
    for overlap in (False, True):
        with serving(["cam_a", "cam_b"], pipeline_overlap=overlap) as h:
            names = [t.name for t in h.esam._workers]
            assert names == (["esam_encoder", "esam_post"] if overlap else ["esam_worker"])
            if overlap:
                h.esam.segmenter = FinishAfterNextEncode(h.esam.segmenter)
            got = {}
            for i in range(0, len(frames), 2):  # each frame published once (reliable input)
                for cam, rgb, fid in frames[i:i + 2][::-1]:
                    publish_once(h, cam, image_msg(rgb, "rgb8", fid))
                for cam, _, fid in frames[i:i + 2]:
                    entities, labels = outputs_of(h, cam, fid)
                    got[fid] = (labels_of(labels).copy(), [
                        (e.id, e.area, e.score, e.bbox.x_offset, e.bbox.y_offset, e.bbox.width,
                         e.bbox.height) for e in entities.entities])
            for cam in ("cam_a", "cam_b"):
                # The post thread counts a frame just after publishing it.
                wait_until(lambda c=cam: h.esam.stats.snapshot(c)["published"] >= 2,
                           f"{cam}'s count", timeout=5.0)
                snap = h.esam.stats.snapshot(cam)
                assert (snap["published"], snap["dropped"], snap["bad"]) == (2, 0, {}), snap
            answers[overlap] = got
    for fid, (labels, ents) in answers[False].items():
        np.testing.assert_array_equal(answers[True][fid][0], labels, err_msg=fid)
        assert answers[True][fid][1] == ents, fid
    assert any(ents for _, ents in answers[True].values())
