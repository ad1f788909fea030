"""sensor_msgs/Image and CompressedImage -> RGB uint8 arrays, with numpy.

(PyPI's cv_bridge is a broken ROS 1 port; the conversion is a reshape and a channel
reorder, checked field by field so a malformed message is rejected, never misread.)
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage

CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


class ImageError(ValueError):
    """The message cannot be turned into an image."""


def image_to_rgb(
    encoding: str, height: int, width: int, step: int, data: bytes | bytearray | memoryview
) -> np.ndarray:
    """Raw image fields (as in sensor_msgs/Image) -> (H, W, 3) RGB uint8 (a copy)."""
    channels = CHANNELS.get(encoding)
    if channels is None:
        raise ImageError(f"unsupported encoding {encoding!r}; supported: {sorted(CHANNELS)}")
    if height <= 0 or width <= 0:
        raise ImageError(f"empty image {width}x{height}")
    if step < width * channels:
        raise ImageError(f"step {step} is shorter than a row of {width} x {channels} bytes")
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size != step * height:
        raise ImageError(f"data has {buffer.size} bytes, expected step x height = {step * height}")
    pixels = buffer.reshape(height, step)[:, : width * channels].reshape(height, width, channels)
    if encoding == "mono8":
        return np.repeat(pixels, 3, axis=2)
    if encoding.startswith("bgr"):
        pixels = pixels[:, :, 2::-1]
    return np.ascontiguousarray(pixels[:, :, :3])


def compressed_to_rgb(fmt: str, data: bytes | bytearray | memoryview) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png) -> (H, W, 3) RGB uint8."""
    kind = fmt.lower()
    if not any(k in kind for k in ("jpeg", "jpg", "png")):
        raise ImageError(f"unsupported compressed format {fmt!r}; supported: jpeg, png")
    try:
        with PILImage.open(io.BytesIO(bytes(data))) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as err:
        raise ImageError(f"cannot decode {fmt} image: {err}") from err
