"""OpenVLA (Prismatic) model: architecture, checkpoint loading, tiny model, split inference.

No ROS imports. Parameter names and ``config.json`` fields follow the published
``openvla/openvla-7b`` checkpoint, so its safetensors load unchanged and without
executing any code from the checkpoint directory.
"""

from dyqvla_ros.model.action_tokenizer import ActionStats, ActionTokenizer
from dyqvla_ros.model.config import OpenVLAConfig
from dyqvla_ros.model.loader import CheckpointError, LoadedOpenVLA, load_openvla
from dyqvla_ros.model.modeling import OpenVLA
from dyqvla_ros.model.policy import PrefillState, VLAAction, VLAPolicy

__all__ = [
    "ActionStats",
    "ActionTokenizer",
    "CheckpointError",
    "LoadedOpenVLA",
    "OpenVLA",
    "OpenVLAConfig",
    "PrefillState",
    "VLAAction",
    "VLAPolicy",
    "load_openvla",
]
