"""pip install of the ROS-free core and tools (training, codecs, datasets) without a ROS build.

The ROS 2 package itself (messages + nodes) is built by colcon from package.xml/CMakeLists.txt;
colcon ignores this file. See README.md, "Build arrangement".
"""

from setuptools import find_packages, setup

setup(
    name="edge_vlm_ros",
    version="0.1.0",
    description="Split vision-language(-action) models between a robot and a server over ROS 2",
    packages=find_packages(include=["edge_vlm_ros", "edge_vlm_ros.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "transformers>=5.0", "numpy", "opencv-python-headless", "pillow", "pyyaml",
                      "tqdm", "rosbags"],
    data_files=[("share/ament_index/resource_index/packages", ["resource/edge_vlm_ros"]),
                ("share/edge_vlm_ros", ["package.xml"])],
    license="Apache-2.0",
)
