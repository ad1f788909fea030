"""``dyqvla-collect OUT``: scripted-expert episodes of the tabletop as a rosbag2.

Same topics the node consumes (camera, end-effector pose, joint states, instruction)
plus the expert's action, so ``dyqvla-profile`` runs on simulated recordings and
behaviour cloning can read them:

    /image          sensor_msgs/Image          rgb8 from the front camera, 10 Hz (each step)
    /ee_pose        geometry_msgs/PoseStamped  measured hand pose, 10 Hz
    /joint_states   sensor_msgs/JointState     the two finger slides (m), 10 Hz
    /instruction    std_msgs/String            at each episode start, transient local
    /expert_action  std_msgs/Float32MultiArray the expert's 7-D action at that step
    /sim_state      std_msgs/Float32MultiArray what the expert saw at that step (its phase,
                    object positions relative to the hand; ``STATE_FIELDS``, named in the
                    layout's dimension label): auxiliary targets for training, never an
                    input of the policy

``--noise SIGMA`` executes the expert's action plus gaussian noise (SIGMA m on each of
Δxyz, 10·SIGMA rad on Δyaw) while recording the clean expert action as the label (DART,
Laskey et al. 2017): the demonstrations then show how to recover from the small errors
a cloned policy makes, instead of only the expert's own perfect states.
``--coarse-noise R`` adds gaussian noise of R times the step's length to each executed
Δxyz of the coarse phases (``COARSE_PHASES``): centimetres on a 4 cm move, vanishing as the
hand arrives, so the demonstrations show recovery from the centimetre-scale misses a
cloned policy makes on its way to an object without spoiling the fine phases (σ = 6 mm
on every step left only 72/300 expert successes; a fixed 1.5 cm in the coarse phases
17/60, the hand never settling within the 1 cm that ends the phase; R = 0.3: 60/60,
R = 0.5: 54/60, 60 episodes each).

``--policy CKPT --beta B`` collects DAgger data (Ross et al. 2011): at each step the
expert's action is executed with probability B, otherwise the action of the cloned
policy (the W4 model at 16-bit activations, as ``dyqvla-eval-sim --precision 16`` runs
it); the label is always the expert's. The demonstrations then cover the states the
policy itself drives into -- the centimetre misses, early descents and empty grasps that
no noise model of the expert produces -- with what the expert would do there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Writer

from dyqvla_ros.bags.store import STORAGES, ros_time, typestore
from dyqvla_ros.bags.synthetic import LATCHED_QOS, RELIABLE_QOS, START_NS
from dyqvla_ros.model import CheckpointError, VLAPolicy
from dyqvla_ros.model.loader import load_quantized_openvla
from dyqvla_ros.sim.env import CONTROL_HZ, Observation, TabletopEnv
from dyqvla_ros.sim.expert import COARSE_PHASES, STATE_FIELDS, ScriptedExpert, privileged_state


class _BagOut:
    """Typed writers for the collected topics."""

    def __init__(self, writer: Writer) -> None:
        self.store = store = typestore()
        t = store.types
        self.T = t
        add = lambda topic, name, qos=RELIABLE_QOS: writer.add_connection(  # noqa: E731
            topic, t[name].__msgtype__, typestore=store, offered_qos_profiles=[qos]
        )
        self.writer = writer
        self.image = add("/image", "sensor_msgs/msg/Image")
        self.pose = add("/ee_pose", "geometry_msgs/msg/PoseStamped")
        self.joints = add("/joint_states", "sensor_msgs/msg/JointState")
        self.instruction = add("/instruction", "std_msgs/msg/String", LATCHED_QOS)
        self.action = add("/expert_action", "std_msgs/msg/Float32MultiArray")
        self.state = add("/sim_state", "std_msgs/msg/Float32MultiArray")

    def _write(self, connection, ns: int, msg) -> None:
        self.writer.write(connection, ns, self.store.serialize_cdr(msg, msg.__msgtype__))

    def header(self, ns: int, frame: str):
        return self.T["std_msgs/msg/Header"](stamp=ros_time(self.store, ns), frame_id=frame)

    def observation(self, ns: int, obs: Observation) -> None:
        t = self.T
        h, w, _ = obs.image.shape
        self._write(
            self.image,
            ns,
            t["sensor_msgs/msg/Image"](
                header=self.header(ns, "camera"), height=h, width=w, encoding="rgb8", is_bigendian=0,
                step=w * 3, data=obs.image.reshape(-1),
            ),
        )  # fmt: skip
        p, q = obs.ee_position, obs.ee_quaternion
        pose = t["geometry_msgs/msg/Pose"](
            position=t["geometry_msgs/msg/Point"](x=p[0], y=p[1], z=p[2]),
            orientation=t["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3]),
        )
        self._write(
            self.pose, ns, t["geometry_msgs/msg/PoseStamped"](header=self.header(ns, "base_link"), pose=pose)
        )
        joints = t["sensor_msgs/msg/JointState"](
            header=self.header(ns, ""), name=["finger_left", "finger_right"], position=obs.fingers,
            velocity=np.zeros(0), effort=np.zeros(0),
        )  # fmt: skip
        self._write(self.joints, ns, joints)

    def instruction_text(self, ns: int, text: str) -> None:
        self._write(self.instruction, ns, self.T["std_msgs/msg/String"](data=text))

    def _array(self, connection, ns: int, values: np.ndarray, label: str = "") -> None:
        t = self.T
        dims = [t["std_msgs/msg/MultiArrayDimension"](label=label, size=len(values), stride=len(values))]
        layout = t["std_msgs/msg/MultiArrayLayout"](dim=dims if label else [], data_offset=0)
        msg = t["std_msgs/msg/Float32MultiArray"](layout=layout, data=values.astype(np.float32))
        self._write(connection, ns, msg)

    def expert_action(self, ns: int, action: np.ndarray) -> None:
        self._array(self.action, ns, action)

    def sim_state(self, ns: int, state: np.ndarray) -> None:
        self._array(self.state, ns, state, ",".join(STATE_FIELDS))


def collect(
    out: str | Path,
    episodes: int,
    seed: int = 0,
    size: int = 128,
    storage: str = "mcap",
    noise: float = 0.0,
    coarse_noise: float = 0.0,
    policy: VLAPolicy | None = None,
    beta: float = 0.5,
) -> dict:
    """Run ``episodes`` episodes (seeds seed, seed+1, ...) into a new bag: the expert's,
    or with ``policy`` the mixture that executes the expert's action with probability ``beta``."""
    if noise < 0.0 or coarse_noise < 0.0:
        raise ValueError(f"noise must be >= 0, got {noise} and coarse noise {coarse_noise}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; rosbag2 writes a new directory")
    env, expert = TabletopEnv(render_size=size), ScriptedExpert()
    period_ns = int(1e9 / CONTROL_HZ)
    ns, successes, steps, policy_steps = START_NS, 0, 0, 0
    noise_rng, mixing_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    noise_scale = noise * np.array([1.0, 1.0, 1.0, 0.0, 0.0, 10.0, 0.0])
    with Writer(out, version=9, storage_plugin=STORAGES[storage]) as writer:
        bag = _BagOut(writer)
        for k in range(episodes):
            obs = env.reset(seed + k)
            expert.reset()
            bag.instruction_text(ns, obs.instruction)
            done = success = False
            while not done:
                phase = expert.sync(env)  # the phase the label comes from, after any recovery
                state = privileged_state(env, phase)
                action = expert.act(env)
                bag.observation(ns, obs)
                bag.expert_action(ns, action)
                bag.sim_state(ns, state)
                executed = action + noise_scale * noise_rng.standard_normal(7)
                if phase in COARSE_PHASES:
                    executed[:3] += coarse_noise * np.linalg.norm(action[:3]) * noise_rng.standard_normal(3)
                # The noise is drawn on every step, also those the policy then drives, so that
                # the noise stream does not depend on the mixing draws.
                if policy is not None and mixing_rng.random() >= beta:
                    executed = policy.predict(obs.image, obs.instruction).action
                    policy_steps += 1
                obs, done, success = env.step(executed)
                ns += period_ns
                steps += 1
            bag.observation(ns, obs)
            successes += success
            ns += 10 * period_ns  # a pause between episodes
    return {"episodes": episodes, "successes": successes, "steps": steps, "policy_steps": policy_steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="bag directory to create")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="camera image side (pixels)")
    parser.add_argument("--storage", choices=sorted(STORAGES), default="mcap")
    parser.add_argument(
        "--noise", type=float, default=0.0, help="std (m) of the noise added to executed actions (DART)"
    )
    parser.add_argument(
        "--coarse-noise",
        type=float,
        default=0.0,
        help="std of extra noise on executed Δxyz in the coarse phases, relative to the step's length",
    )
    parser.add_argument(
        "--policy", type=Path, help="OpenVLA checkpoint that drives the steps the expert does not (DAgger)"
    )
    parser.add_argument(
        "--beta", type=float, default=0.5, help="with --policy: probability of executing the expert's action"
    )
    args = parser.parse_args(argv)
    try:
        policy = None
        if args.policy:
            policy = VLAPolicy(load_quantized_openvla(args.policy), restrict_to_actions=True)
        summary = collect(
            args.out, args.episodes, args.seed, args.size, args.storage, args.noise, args.coarse_noise,
            policy, args.beta,
        )  # fmt: skip
    except (CheckpointError, FileExistsError, ValueError) as err:
        parser.exit(2, f"dyqvla-collect: {err}\n")
    successes, episodes, steps = summary["successes"], summary["episodes"], summary["steps"]
    driver = f", {summary['policy_steps']} of them the policy's" if policy else ""
    print(f"{successes}/{episodes} successes, {steps} steps{driver} -> {args.out}")


if __name__ == "__main__":
    main()
