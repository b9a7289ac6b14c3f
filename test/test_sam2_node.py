"""esam_node over real DDS on the tiny random-weight SAM 2 (model.type sam2_test_tiny): the node
builds a Sam2Backend from its parameters and publishes entities and labels for a frame."""

from __future__ import annotations

from contextlib import contextmanager

from conftest import requires_ros
from node_harness import check_outputs, image_msg, scene, serve

pytestmark = requires_ros


def test_node_serves_frames_with_sam2_test_tiny() -> None:
    from esam_core.backends.sam2 import Sam2Backend

    with contextmanager(serve)({"model.type": "sam2_test_tiny"}, [""], False) as harness:
        assert isinstance(harness.esam.segmenter.backend, Sam2Backend)
        assert harness.esam.model_name == "sam2_test_tiny"
        rgb = scene()
        sent = image_msg(rgb, "bgr8", "sam2_frame")
        entities, labels = harness.send("", sent)
        check_outputs(sent, entities, labels, rgb.shape[:2])
        assert entities.entities, "sam2_test_tiny found no entity at all"
