"""dyqvla_ros: DyQ-VLA dynamic activation quantization for OpenVLA-shaped policies.

The core (kinematics, dispatcher, quant, kernels, model) imports no ROS; the ROS
layer (policy node, message conversion, bag tools) is a thin adapter over it.
"""

__version__ = "0.1.0"
