"""AP^e evaluation with pycocotools (no rclpy): ``evaluate`` (ground truth, predictions, COCO AP),
``ground_truth`` (the annotation file's checks) and ``fidelity`` (E-SAM vs AMG and SAM^O on
simulated SAM masks). The command lines are in ``esam_ros.cli``."""
