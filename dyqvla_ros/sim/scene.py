"""The MJCF of our tabletop: table, coloured cubes, coloured target zones, a gripper.

The gripper is a free hand welded to a mocap target (its pose follows the commanded
end-effector pose, as a Cartesian controller would make an arm's hand do; the weld keeps
real velocities, which friction needs to carry a cube) with two position-controlled
slide fingers. A fixed camera looks down at the table from the front (about 55° below
the horizon, the workspace filling the frame, the hand visible from its start height).
"""

from __future__ import annotations

COLORS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.3, 0.85)}
TARGETS = ("blue", "green")  # colours of the target zones
CUBE_HALF = 0.02  # m
TARGET_RADIUS = 0.045  # m
TABLE_TOP = 0.0  # table surface height (m)
FINGER_OPEN = 0.04  # finger slide at full opening (m)
TIMESTEP = 0.002  # s


def _rgba(color: tuple[float, float, float], alpha: float = 1.0) -> str:
    return " ".join(f"{c:g}" for c in (*color, alpha))


def scene_xml(cubes: tuple[str, ...] = tuple(COLORS), targets: tuple[str, ...] = TARGETS) -> str:
    """MJCF text; cube ``c`` is body ``cube_<c>``, target ``t`` is site ``target_<t>``."""
    cube_bodies = "\n".join(
        f"""    <body name="cube_{c}" pos="0 0 {CUBE_HALF}">
      <freejoint name="cube_{c}"/>
      <geom type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}" mass="0.05" rgba="{_rgba(COLORS[c])}"
            friction="1.5 0.02 0.002" condim="4"/>
    </body>"""
        for c in cubes
    )
    target_sites = "\n".join(
        f"""    <site name="target_{t}" type="cylinder" size="{TARGET_RADIUS} 0.0005" pos="0 0 0.0005"
          rgba="{_rgba(COLORS[t], 0.6)}"/>"""
        for t in targets
    )
    return f"""<mujoco model="dyqvla_tabletop">
  <option timestep="{TIMESTEP}" gravity="0 0 -9.81" integrator="implicitfast" cone="elliptic" impratio="10"
          noslip_iterations="3"/>
  <!-- 512 px shadow map: the default 4096 costs ~70 ms per frame in software GL -->
  <visual><global offwidth="256" offheight="256"/><quality shadowsize="512"/></visual>
  <asset>
    <texture name="wood" type="2d" builtin="checker" rgb1="0.72 0.6 0.45" rgb2="0.68 0.56 0.42"
             width="256" height="256"/>
    <material name="table" texture="wood" texrepeat="4 4"/>
  </asset>
  <worldbody>
    <light pos="0.4 -0.4 1.2" dir="-0.2 0.3 -1" diffuse="0.8 0.8 0.8"/>
    <light pos="0.4 0.4 1.2" dir="0 0 -1" diffuse="0.4 0.4 0.4"/>
    <geom name="table" type="box" size="0.5 0.5 0.02" pos="0.45 0 {TABLE_TOP - 0.02}" material="table"
          friction="1 0.02 0.002"/>
    <camera name="front" pos="0.45 -0.38 0.62" xyaxes="1 0 0 0 0.57 0.4" fovy="45"/>
{target_sites}
{cube_bodies}
    <body name="hand_target" mocap="true" pos="0.35 0 0.3"/>
    <body name="hand" pos="0.35 0 0.3" gravcomp="1">
      <freejoint name="hand"/>
      <inertial pos="0 0 0" mass="0.5" diaginertia="0.001 0.001 0.001"/>
      <geom type="box" size="0.012 0.05 0.012" pos="0 0 0.045" rgba="0.3 0.3 0.3 1"
            contype="0" conaffinity="0"/>
      <site name="tcp" pos="0 0 0" size="0.005"/>
      <body name="finger_left" pos="0 0 0" gravcomp="1">
        <joint name="finger_left" type="slide" axis="0 1 0" range="0 {FINGER_OPEN}" damping="5"/>
        <geom type="box" size="0.008 0.006 0.035" pos="0 0.006 0.005" rgba="0.25 0.25 0.25 1" mass="0.02"
              friction="2 0.05 0.005" condim="4"/>
      </body>
      <body name="finger_right" pos="0 0 0" gravcomp="1">
        <joint name="finger_right" type="slide" axis="0 -1 0" range="0 {FINGER_OPEN}" damping="5"/>
        <geom type="box" size="0.008 0.006 0.035" pos="0 -0.006 0.005" rgba="0.25 0.25 0.25 1" mass="0.02"
              friction="2 0.05 0.005" condim="4"/>
      </body>
    </body>
  </worldbody>
  <equality>
    <!-- The hand is a dynamic body welded to the mocap target: it moves with real
         velocities, so friction at the fingers can carry a cube. -->
    <weld body1="hand_target" body2="hand" solref="0.005 1"/>
  </equality>
  <actuator>
    <position name="finger_left" joint="finger_left" kp="300" ctrlrange="0 {FINGER_OPEN}"/>
    <position name="finger_right" joint="finger_right" kp="300" ctrlrange="0 {FINGER_OPEN}"/>
  </actuator>
</mujoco>
"""
