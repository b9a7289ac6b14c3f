"""A lifecycle deactivate during overlapped frames (``pipeline_overlap``) cancels both halves, and
activate starts exactly one encoder and one post thread again."""

from __future__ import annotations

import threading
from typing import Any

from conftest import requires_ros
from node_harness import TINY, Harness
from test_lifecycle_node import change
from test_node_pipeline import WORKERS, Gated, publish_once, published_sizes, tagged, wait_until

pytestmark = requires_ros


class GatedLifecycle:
    """EsamLifecycleNode whose configure and activate 'load' a ``Gated`` segmenter."""

    @staticmethod
    def make(context: Any) -> Any:
        from rclpy.parameter import Parameter

        from esam_ros.node.esam_lifecycle_node import EsamLifecycleNode

        class Node(EsamLifecycleNode):
            segmenters: list[Gated] = []

            def _load_model(self, segmenter: Any = None) -> None:
                self.segmenters.append(Gated())
                super()._load_model(self.segmenters[-1])

        return Node(context=context, parameter_overrides=[
            Parameter("autostart", value=False), Parameter("qos.reliability", value="reliable"),
            Parameter("diagnostics_period", value=0.2)])


def test_deactivate_during_overlapped_frames_cancels_both_and_activate_recovers() -> None:
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, args=["--ros-args", "--params-file", TINY])
    node = GatedLifecycle.make(context)
    h = Harness(context, node, [""], compressed=False)
    try:
        assert change(h.node, "configure") and change(h.node, "activate")
        seg, workers = node.segmenter, list(node._workers)
        assert [t.name for t in workers] == ["esam_encoder", "esam_post"]
        wait_until(lambda: h.pubs[""].get_subscription_count() > 0, "the node")
        seg.hold(7)
        publish_once(h, "", tagged(7, 48, 64))
        assert seg.seen("finish_start", 7)
        publish_once(h, "", tagged(8, 40, 56))
        assert seg.seen("prepare_end", 8)  # encoded, waiting for post-processing
        assert change(h.node, "deactivate")
        assert not any(t.is_alive() for t in workers) and node.segmenter is None
        assert seg.seen("finish_cancelled", 7, timeout=0) and ("finish_start", 8) not in seg.log
        assert node.stats.snapshot("")["cancelled"] == 2
        assert change(h.node, "activate")
        live = [t for t in threading.enumerate() if t.name in WORKERS]
        assert sorted(t.name for t in live) == ["esam_encoder", "esam_post"]
        assert set(live) == set(node._workers)
        sent = tagged(9, 32, 48)
        h.send("", sent)
        assert published_sizes(h) == {"f9_32x48": (32, 48)}  # 7 and 8 never published
        wait_until(lambda: h.diag_value("camera '/'", "cancelled (stopping)") == "2",
                   "/diagnostics")
    finally:
        h.close()
        node.destroy_node()
        rclpy.shutdown(context=context)
