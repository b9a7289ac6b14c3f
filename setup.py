"""pip/venv install of esam_ros (a ROS 2 workspace uses CMakeLists.txt instead)."""

from setuptools import find_packages, setup

setup(
    name="esam_ros",
    version="0.1.0",
    description="E-SAM entity segmentation on Segment Anything, with a ROS 2 node",
    license="Apache-2.0",
    packages=find_packages(include=["esam_core", "esam_core.*", "esam_ros", "esam_ros.*"]),
    package_data={"esam_ros": ["msg/*.py", "*.so"]},
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "esam = esam_ros.cli:main",
            "esam_node = esam_ros.esam_node:main",
            "esam_lifecycle_node = esam_ros.esam_lifecycle_node:main",
        ]
    },
)
