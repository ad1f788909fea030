"""Prompt and image preprocessing, as OpenVLA's inference does it.

Prompt: ``"In: What action should the robot take to {instruction}?\\nOut:"``, tokenized
with BOS; if the last token is not Llama's empty token "▁" (id 29871), it is appended,
matching the inputs OpenVLA saw in training. ``instruction_text`` lower-cases and strips
the instruction first, as OpenVLA's inference entry points and its RLDS training
pipeline do (``lowercase=False`` for checkpoints trained on text as given).

Image: RGB uint8 (H, W, 3) -> [optional LIBERO centre crop, ``tf_center_crop``] -> the
Prismatic processor's resize on the uint8 PIL image (``image_resize_strategy`` of
config.json: ``resize-naive`` to size x size, ``letterbox`` pad-to-square then resize,
``resize-crop`` shorter side to size then centre crop; each backbone's interpolation,
bicubic for DINOv2 and SigLIP) -> /255 -> each backbone's own mean/std (DINOv2:
ImageNet; SigLIP: 0.5/0.5) -> channels stacked. The resize calls the same torchvision
functions on the same PIL image as OpenVLA's ``PrismaticImageProcessor.apply_transform``,
so the pixels are PIL's, bit for bit; an image already at the model's size is not
resampled (PIL returns a copy).
"""

from __future__ import annotations

import numpy as np
import timm
import torch
import torchvision.transforms.functional as TVF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
EMPTY_TOKEN_ID = 29871  # "▁" in the Llama-2 vocabulary
LIBERO_CROP_AREA = 0.9  # OpenVLA's LIBERO evaluation crops 90 % of the image area
IMAGE_RESIZE_STRATEGIES = ("resize-naive", "letterbox", "resize-crop")
MIN_IMAGE_SIDE = 2


def instruction_text(instruction: str, lowercase: bool = True) -> str:
    """The instruction as the prompt gets it: stripped, and lower-cased unless told not to."""
    text = instruction.strip()
    return text.lower() if lowercase else text


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
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"image is too small: {image.shape[1]}x{image.shape[0]} pixels (at least "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} to resample)"
        )
    return image


def tf_center_crop(image: np.ndarray, size: int, area: float = LIBERO_CROP_AREA) -> np.ndarray:
    """OpenVLA's LIBERO centre crop, as its TensorFlow code computes it, in float32 numpy.

    ``convert_image_dtype`` to float (x * (1/255)); ``crop_and_resize`` of the centred box
    with sides sqrt(area) (normalised [y1, x1, y2, x2]) to size x size: output pixel (y, x)
    samples the input at in_y = y1 (H-1) + y (y2-y1)(H-1)/(size-1) (x alike), bilinear
    between floor and ceil (top row lerp in x, bottom row lerp in x, then lerp in y); clip to
    [0, 1]; back to uint8 with ``convert_image_dtype(saturate=True)``: truncate(v * 255.5).
    """
    image = validate_image(image)
    h, w = image.shape[:2]
    side = np.sqrt(np.float32(area), dtype=np.float32)
    y1 = x1 = (np.float32(1) - side) / np.float32(2)
    y2 = x2 = y1 + side
    pixels = image.astype(np.float32) * np.float32(1.0 / 255)

    def coordinates(start: np.float32, stop: np.float32, extent: int) -> tuple[np.ndarray, ...]:
        scale = (stop - start) * np.float32(extent - 1) / np.float32(size - 1) if size > 1 else np.float32(0)
        steps = np.arange(size, dtype=np.float32)
        if size > 1:
            at = start * np.float32(extent - 1) + steps * scale
        else:
            at = np.full(1, np.float32(0.5) * (start + stop) * np.float32(extent - 1), np.float32)
        low = np.floor(at).astype(np.int64)
        return low, np.ceil(at).astype(np.int64), (at - low).astype(np.float32)

    top, bottom, y_lerp = coordinates(y1, y2, h)
    left, right, x_lerp = coordinates(x1, x2, w)
    x_lerp = x_lerp[None, :, None]
    upper = pixels[top][:, left] + (pixels[top][:, right] - pixels[top][:, left]) * x_lerp
    lower = pixels[bottom][:, left] + (pixels[bottom][:, right] - pixels[bottom][:, left]) * x_lerp
    crop = upper + (lower - upper) * y_lerp[:, None, None]
    scaled = np.clip(crop, 0.0, 1.0) * np.float32(255.5)
    return np.clip(scaled, 0, 255).astype(np.uint8)  # saturate_cast: clamp, then truncate


class ImagePreprocessor:
    """RGB uint8 image -> (1, 3 * n_backbones, S, S) pixel values, as OpenVLA's processor."""

    def __init__(
        self,
        featurizers: list[nn.Module],
        image_size: int,
        center_crop: bool = False,
        resize_strategy: str = "resize-naive",
    ) -> None:
        if resize_strategy not in IMAGE_RESIZE_STRATEGIES:
            raise ValueError(
                f"image_resize_strategy must be one of {IMAGE_RESIZE_STRATEGIES}, got {resize_strategy!r}"
            )
        self.image_size = image_size
        self.center_crop = center_crop
        self.resize_strategy = resize_strategy
        stats = [timm.data.resolve_data_config({}, model=f) for f in featurizers]
        self.interpolations = [InterpolationMode(s["interpolation"]) for s in stats]
        self.mean = torch.tensor([c for s in stats for c in s["mean"]]).view(1, -1, 1, 1)
        self.std = torch.tensor([c for s in stats for c in s["std"]]).view(1, -1, 1, 1)
        # OpenVLA's processor pads with int(255 * mean) of the *last* backbone (its loop
        # overwrites the fill per backbone): SigLIP's 0.5 -> 127 for the fused models.
        self.letterbox_fill = tuple(int(255 * m) for m in stats[-1]["mean"])

    def resize(self, image: np.ndarray, interpolation: InterpolationMode) -> np.ndarray:
        """The processor's resize strategy on the uint8 image -> (S, S, 3) uint8."""
        img, size = Image.fromarray(image), self.image_size
        if self.resize_strategy == "letterbox":
            (w, h), longest = img.size, max(img.size)
            dx, dy = int((longest - w) / 2), int((longest - h) / 2)
            img = TVF.pad(img, [dx, dy, dx, dy], fill=self.letterbox_fill, padding_mode="constant")
        target = [size, size] if self.resize_strategy == "resize-naive" else size
        img = TVF.resize(img, target, interpolation=interpolation, max_size=None, antialias=True)
        return np.array(TVF.center_crop(img, [size, size]))  # writable, owned

    def frame(self, image: np.ndarray) -> list[np.ndarray]:
        """The (S, S, 3) uint8 frame each backbone sees (one per distinct interpolation)."""
        image = validate_image(image)
        if self.center_crop:
            image = tf_center_crop(image, self.image_size)
        resized = {mode: self.resize(image, mode) for mode in dict.fromkeys(self.interpolations)}
        return [resized[mode] for mode in self.interpolations]

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        frames = self.frame(image)
        x = torch.cat([torch.from_numpy(f).permute(2, 0, 1) for f in frames])[None]
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3 * n, S, S) uint8 -> /255, then each backbone's mean and std."""
        return (x.float() / 255.0 - self.mean) / self.std

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 frames already at the model's size (training resizes each frame
        once with ``frame``) -> (B, 3 * n_backbones, S, S)."""
        if tuple(images.shape[1:3]) != (self.image_size, self.image_size):
            raise ValueError(f"batch frames must be {self.image_size} px square, got {tuple(images.shape)}")
        if len(set(self.interpolations)) > 1:
            raise ValueError("one frame per sample cannot serve backbones that resample differently")
        copies = len(self.interpolations)
        return self.normalize(images.permute(0, 3, 1, 2).repeat(1, copies, 1, 1))
