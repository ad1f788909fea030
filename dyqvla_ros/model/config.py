"""OpenVLA ``config.json``: the fields this implementation reads, validated.

Field names are those of the published checkpoint (``OpenVLAConfig`` in openvla's
``prismatic/extern/hf/configuration_prismatic.py``). Two optional fields are ours:
``dyqvla_timm_overrides``, keyword overrides for each timm backbone (sizes of the tiny
model), and ``dyqvla_action_decoding``, how the checkpoint's action tokens are best
decoded (``VLAPolicy``); the published checkpoint has neither and gets the timm defaults
and OpenVLA's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import LlamaConfig

from dyqvla_ros.model.processing import IMAGE_RESIZE_STRATEGIES

ACTION_DECODINGS = ("argmax", "median")


def check_action_decoding(decoding: str) -> str:
    """``decoding`` if it names one of ``ACTION_DECODINGS``, else ValueError."""
    if decoding not in ACTION_DECODINGS:
        raise ValueError(f"action_decoding must be one of {ACTION_DECODINGS}, got {decoding!r}")
    return decoding


class UnsupportedConfigError(ValueError):
    """config.json describes a model this implementation does not run."""


@dataclass
class OpenVLAConfig:
    timm_model_ids: list[str]
    timm_override_act_layers: list[str | None]
    image_sizes: list[int]
    use_fused_vision_backbone: bool
    text_config: dict[str, Any]
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    norm_stats: dict[str, Any] | None = None
    timm_overrides: list[dict[str, Any]] = field(default_factory=list)
    action_decoding: str = "argmax"
    image_resize_strategy: str = "resize-naive"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpenVLAConfig:
        """Validate a parsed config.json; raise UnsupportedConfigError naming the field."""
        if data.get("model_type") != "openvla":
            raise UnsupportedConfigError(f"model_type must be 'openvla', got {data.get('model_type')!r}")
        for key in ("timm_model_ids", "image_sizes", "use_fused_vision_backbone", "text_config"):
            if key not in data:
                raise UnsupportedConfigError(f"config.json has no '{key}'")
        fused = bool(data["use_fused_vision_backbone"])
        n_backbones = 2 if fused else 1
        ids, sizes = list(data["timm_model_ids"]), list(data["image_sizes"])
        acts = list(data.get("timm_override_act_layers") or [None] * n_backbones)
        overrides = list(data.get("dyqvla_timm_overrides") or [{}] * n_backbones)
        for name, value in (
            ("timm_model_ids", ids),
            ("image_sizes", sizes),
            ("timm_override_act_layers", acts),
            ("dyqvla_timm_overrides", overrides),
        ):
            if len(value) != n_backbones:
                raise UnsupportedConfigError(f"{name} must have {n_backbones} entries, got {value!r}")
        if len(set(sizes)) != 1:
            raise UnsupportedConfigError(f"image_sizes must be equal for both backbones, got {sizes}")
        text = dict(data["text_config"])
        if text.get("model_type", "llama") != "llama":
            raise UnsupportedConfigError(
                f"text_config.model_type must be 'llama', got {text.get('model_type')!r}"
            )
        n_bins = int(data.get("n_action_bins", 256))
        if n_bins < 2:
            raise UnsupportedConfigError(f"n_action_bins must be >= 2, got {n_bins}")
        strategy = data.get("image_resize_strategy", "resize-naive")
        if strategy not in IMAGE_RESIZE_STRATEGIES:
            raise UnsupportedConfigError(
                f"image_resize_strategy must be one of {IMAGE_RESIZE_STRATEGIES}, got {strategy!r}"
            )
        decoding = data.get("dyqvla_action_decoding", "argmax")
        if decoding not in ACTION_DECODINGS:
            raise UnsupportedConfigError(
                f"dyqvla_action_decoding must be one of {ACTION_DECODINGS}, got {decoding!r}"
            )
        return cls(
            timm_model_ids=ids,
            timm_override_act_layers=acts,
            image_sizes=sizes,
            use_fused_vision_backbone=fused,
            text_config=text,
            pad_token_id=int(data.get("pad_token_id", 32000)),
            pad_to_multiple_of=int(data.get("pad_to_multiple_of", 64)),
            n_action_bins=n_bins,
            norm_stats=data.get("norm_stats"),
            timm_overrides=overrides,
            action_decoding=decoding,
            image_resize_strategy=strategy,
            raw=data,
        )

    def llama_config(self) -> LlamaConfig:
        """The language model's config (LlamaConfig defaults for fields not given)."""
        text = {k: v for k, v in self.text_config.items() if k not in ("model_type", "torch_dtype")}
        return LlamaConfig(**text)

    @property
    def image_size(self) -> int:
        return self.image_sizes[0]

    @property
    def text_vocab_size(self) -> int:
        """Vocabulary of the tokenizer: the padded embedding size minus the padding."""
        return self.llama_config().vocab_size - self.pad_to_multiple_of
