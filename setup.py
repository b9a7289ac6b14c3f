"""pip/venv install of esam_ros (a ROS 2 workspace uses CMakeLists.txt instead).

The shipped parameter files, viewer layouts, launch file and message definitions go to
``<prefix>/share/esam_ros/`` as data files, where ``esam`` finds its default config
(``esam_core.param_files.config_dirs``) when not run from a source tree.
"""

from glob import glob

from setuptools import find_packages, setup

setup(
    name="esam_ros",
    version="0.1.0",
    description="E-SAM entity segmentation on Segment Anything, with a ROS 2 node",
    license="Apache-2.0",
    packages=find_packages(include=["esam_core", "esam_core.*", "esam_ros", "esam_ros.*"]),
    package_data={"esam_ros": ["msg/*.py", "*.so"]},
    data_files=[
        ("share/esam_ros/config", sorted(glob("config/*"))),
        ("share/esam_ros/launch", sorted(glob("launch/*.py"))),
        ("share/esam_ros/msg", sorted(glob("msg/*.msg"))),
    ],
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "esam = esam_ros.cli:main",
            "esam_node = esam_ros.node.esam_node:main",
            "esam_lifecycle_node = esam_ros.node.esam_lifecycle_node:main",
        ]
    },
)
