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


def check_size(width: int, height: int, max_pixels: int | None, min_side: int = 1) -> None:
    """Refuse a frame by its declared size, before any of its data is touched."""
    if height <= 0 or width <= 0:
        raise ImageError(f"empty image {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"image {width}x{height} has {width * height} pixels, more than max_image_pixels {max_pixels}"
        )
    if min(width, height) < min_side:
        raise ImageError(f"image {width}x{height} is smaller than the model's {min_side}-pixel patch")


def image_to_rgb(
    encoding: str,
    height: int,
    width: int,
    step: int,
    data: bytes | bytearray | memoryview,
    max_pixels: int | None = None,
    min_side: int = 1,
) -> np.ndarray:
    """Raw image fields (as in sensor_msgs/Image) -> (H, W, 3) RGB uint8 (a copy)."""
    channels = CHANNELS.get(encoding)
    if channels is None:
        raise ImageError(f"unsupported encoding {encoding!r}; supported: {sorted(CHANNELS)}")
    check_size(width, height, max_pixels, min_side)
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


def compressed_to_rgb(
    fmt: str, data: bytes | bytearray | memoryview, max_pixels: int | None = None, min_side: int = 1
) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png) -> (H, W, 3) RGB uint8.

    The byte count (at most 3 bytes a pixel plus 64 KiB of headers) and the size the header
    declares are checked before anything is decompressed: a 100-byte PNG can declare
    20000x20000. Any decoder failure, Pillow's DecompressionBombError included, is an
    ImageError.
    """
    kind = fmt.lower()
    if not any(k in kind for k in ("jpeg", "jpg", "png")):
        raise ImageError(f"unsupported compressed format {fmt!r}; supported: jpeg, png")
    if max_pixels is not None and len(data) > 3 * max_pixels + 65536:
        raise ImageError(f"compressed image of {len(data)} bytes is larger than max_image_pixels allows")
    try:
        with PILImage.open(io.BytesIO(bytes(data))) as img:  # reads the header only
            check_size(*img.size, max_pixels, min_side)
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except ImageError:
        raise
    except Exception as err:  # a decoder may raise anything: the node drops the frame
        raise ImageError(f"cannot decode {fmt} image: {type(err).__name__}: {err}") from err
