"""Prompt and image preprocessing, as OpenVLA's processor does it.

Prompt: ``"In: What action should the robot take to {instruction}?\\nOut:"``, tokenized
with BOS; if the last token is not Llama's empty token "▁" (id 29871), it is appended,
matching the inputs OpenVLA saw in training. The instruction is used as given (OpenVLA's
LIBERO evaluation lower-cases it; do so before calling if your checkpoint expects it).

Image: RGB uint8 (H, W, 3) -> optional centre crop -> resized to the backbone size
(bicubic with antialiasing, OpenVLA's "resize-naive") -> normalised with each
backbone's own mean/std (DINOv2: ImageNet; SigLIP: 0.5/0.5) -> channels stacked.
"""

from __future__ import annotations

import math

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
EMPTY_TOKEN_ID = 29871  # "▁" in the Llama-2 vocabulary
LIBERO_CROP_AREA = 0.9  # OpenVLA's LIBERO evaluation crops 90 % of the image area


def prompt_ids(tokenizer, instruction: str) -> torch.Tensor:
    """(1, T) token ids of the OpenVLA prompt, ending with the empty token."""
    if not instruction or not instruction.strip():
        raise ValueError("instruction must be a non-empty string")
    ids = tokenizer(PROMPT_TEMPLATE.format(instruction=instruction), add_special_tokens=True)["input_ids"]
    if ids[-1] != EMPTY_TOKEN_ID:
        ids = [*ids, EMPTY_TOKEN_ID]
    return torch.tensor([ids], dtype=torch.long)


def validate_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image must be an RGB uint8 array of shape (H, W, 3), got {dtype} {shape}")
    if min(image.shape[:2]) < 2:
        raise ValueError(f"image is too small: {image.shape}")
    return image


class ImagePreprocessor:
    """RGB uint8 image -> (1, 3 * n_backbones, S, S) pixel values."""

    def __init__(self, featurizers: list[nn.Module], image_size: int, center_crop: bool = False) -> None:
        self.image_size = image_size
        self.center_crop = center_crop
        stats = [timm.data.resolve_data_config({}, model=f) for f in featurizers]
        self.mean = torch.tensor([c for s in stats for c in s["mean"]]).view(1, -1, 1, 1)
        self.std = torch.tensor([c for s in stats for c in s["std"]]).view(1, -1, 1, 1)
        self.copies = len(featurizers)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = validate_image(image)
        if not image.flags.writeable:  # e.g. a frame straight from a bag
            image = image.copy()
        return self.batch(torch.from_numpy(image)[None])

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3 * n_backbones, S, S); training feeds batches here."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if self.center_crop:
            h, w = x.shape[2:]
            side = math.sqrt(LIBERO_CROP_AREA)
            ch, cw = round(h * side), round(w * side)
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[:, :, top : top + ch, left : left + cw]
        if x.shape[2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        x = x.clamp(0.0, 1.0).repeat(1, self.copies, 1, 1)
        return (x - self.mean) / self.std
