"""ament_python setup for dyqvla_ros.

`kernels/` lives at the repository root (the project's layout) but is shipped as the
sub-package `dyqvla_ros.kernels`, so no top-level module called `kernels` is installed.
"""

from glob import glob

from setuptools import setup

PACKAGE = "dyqvla_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[
        PACKAGE,
        f"{PACKAGE}.kernels",
        f"{PACKAGE}.model",
        f"{PACKAGE}.bags",
        f"{PACKAGE}.tools",
        f"{PACKAGE}.sim",
    ],
    package_dir={f"{PACKAGE}.kernels": "kernels"},
    # The embedded tabletop policy (OpenVLA-format checkpoint, ~9 MB) ships inside the package.
    package_data={PACKAGE: ["policies/tabletop/*"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="dyqvla_ros maintainers",
    maintainer_email="dyqvla@example.com",
    description="DyQ-VLA dynamic activation quantization for OpenVLA-shaped policies on ROS 2",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "policy_node = dyqvla_ros.policy_node:main",
            "dyqvla-make-tiny = dyqvla_ros.model.tiny:main",
            "dyqvla-make-random = dyqvla_ros.tools.make_random:main",
            "dyqvla-synth-bag = dyqvla_ros.bags.synthetic:main",
            "dyqvla-replay = dyqvla_ros.bags.replay:main",
            "dyqvla-record = dyqvla_ros.bags.record:main",
            "dyqvla-profile = dyqvla_ros.tools.profile:main",
            "dyqvla-plot = dyqvla_ros.tools.plot:main",
            "dyqvla-demo = dyqvla_ros.tools.demo:main",
            "dyqvla-collect = dyqvla_ros.sim.collect:main",
            "dyqvla-train = dyqvla_ros.tools.train:main",
            "dyqvla-average = dyqvla_ros.tools.average:main",
            "dyqvla-eval-sim = dyqvla_ros.tools.eval_sim:main",
            "dyqvla-compare = dyqvla_ros.tools.compare:main",
            "dyqvla-sensitivity = dyqvla_ros.tools.sensitivity:main",
            "dyqvla-diagnose = dyqvla_ros.tools.diagnose:main",
        ],
    },
)
