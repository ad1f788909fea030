"""The OpenVLA architecture (Prismatic VLM), written for checkpoint-compatible names.

Module names equal checkpoint keys: ``vision_backbone.featurizer.*`` (DINOv2 ViT),
``vision_backbone.fused_featurizer.*`` (SigLIP ViT), ``projector.fc{1,2,3}``,
``language_model.*`` (transformers' LlamaForCausalLM). Each backbone contributes the
patch features of its second-to-last block; the two are concatenated on the feature
dimension, projected to the LLM width, and inserted right after the BOS token.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import LayerScale as TimmLayerScale
from torch import nn
from transformers import LlamaForCausalLM

from dyqvla_ros.model.config import OpenVLAConfig


class LayerScale(nn.Module):
    """timm's LayerScale with the checkpoint's parameter name ``scale_factor``.

    (OpenVLA renamed timm's ``gamma`` because older transformers rewrote parameters
    whose names contain "gamma" on load.)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def _make_featurizer(timm_id: str, image_size: int, act_layer: str | None, overrides: dict) -> nn.Module:
    vit = timm.create_model(
        timm_id, pretrained=False, num_classes=0, img_size=image_size, act_layer=act_layer, **overrides
    )
    for name, module in list(vit.named_modules()):
        if isinstance(module, TimmLayerScale):
            parent_name, _, child = name.rpartition(".")
            setattr(vit.get_submodule(parent_name), child, LayerScale(module.gamma.shape[0]))
    return vit


def _second_to_last_patches(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch tokens (no class/register tokens) after block len(blocks) - 2: (B, P, D)."""
    return vit.get_intermediate_layers(pixels, n={len(vit.blocks) - 2})[0]


class PrismaticVisionBackbone(nn.Module):
    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__()
        self.use_fused_vision_backbone = config.use_fused_vision_backbone
        args = zip(config.timm_model_ids, config.timm_override_act_layers, config.timm_overrides, strict=True)
        featurizers = [_make_featurizer(tid, config.image_size, act, ovr) for tid, act, ovr in args]
        self.featurizer = featurizers[0]
        if self.use_fused_vision_backbone:
            self.fused_featurizer = featurizers[1]
        self.embed_dim = sum(f.embed_dim for f in featurizers)

    @property
    def featurizers(self) -> list[nn.Module]:
        """The backbones in input-channel order (each gets its own 3 channels)."""
        if self.use_fused_vision_backbone:
            return [self.featurizer, self.fused_featurizer]
        return [self.featurizer]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3 or 6, H, W) -> (B, P, D_dino + D_siglip); the 6 channels are per backbone."""
        if not self.use_fused_vision_backbone:
            return _second_to_last_patches(self.featurizer, pixel_values)
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        patches = _second_to_last_patches(self.featurizer, img)
        patches_fused = _second_to_last_patches(self.fused_featurizer, img_fused)
        return torch.cat([patches, patches_fused], dim=2)


class PrismaticProjector(nn.Module):
    """fc1 -> GELU -> fc2 -> GELU -> fc3 (fused backbones) or fc1 -> GELU -> fc2."""

    def __init__(self, use_fused_vision_backbone: bool, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.use_fused_vision_backbone = use_fused_vision_backbone
        if use_fused_vision_backbone:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
            self.act_fn2 = nn.GELU()
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act_fn1(self.fc1(patches)))
        if self.use_fused_vision_backbone:
            x = self.fc3(self.act_fn2(x))
        return x


class OpenVLA(nn.Module):
    """Vision backbone + projector + Llama; ``embed`` builds the multimodal prompt."""

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_backbone = PrismaticVisionBackbone(config)
        llama_config = config.llama_config()
        self.projector = PrismaticProjector(
            config.use_fused_vision_backbone, self.vision_backbone.embed_dim, llama_config.hidden_size
        )
        self.language_model = LlamaForCausalLM(llama_config)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """(1, T) token ids + image -> (1, 1 + P + T - 1, C) embeddings, patches after BOS."""
        patches = self.projector(self.vision_backbone(pixel_values))
        text = self.language_model.get_input_embeddings()(input_ids)
        return torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)
