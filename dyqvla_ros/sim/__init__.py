"""Our own MuJoCo tabletop benchmark: scene, environment, scripted expert (no ROS).

MuJoCo picks its OpenGL platform when it is first imported, so the offscreen default
(EGL; ``osmesa`` also works) is set here, before any module of this package imports it.
A value already in the environment wins.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
