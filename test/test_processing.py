"""[R] What reaches the model is what OpenVLA's own inference feeds it: PIL's resize of the
uint8 frame per ``image_resize_strategy``, the lower-cased instruction, and the LIBERO
centre crop as TensorFlow's ``crop_and_resize`` samples it. References here are written
with PIL calls or by hand from the documented rules, independently of the code under test.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dyqvla_ros.model import CheckpointError, VLAPolicy, load_openvla
from dyqvla_ros.model.processing import (
    ImagePreprocessor,
    instruction_text,
    prompt_ids,
    tf_center_crop,
)

INSTRUCTION = "put the red cube on the blue target"
DINO = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet statistics
SIGLIP = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def tiny(tiny_openvla):
    return load_openvla(tiny_openvla)


def frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Camera-like content: smooth gradients, edges and noise (resampling has work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 0 * x], -1)
    image[height // 3 : height // 2, width // 4 : width // 2] = (200, 30, 40)
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def normalized(resized: np.ndarray) -> torch.Tensor:
    """PIL-resized uint8 (S, S, 3) -> what the fused DINOv2 + SigLIP backbones get."""
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255.0
    per_backbone = [
        (x - torch.tensor(m).view(3, 1, 1)) / torch.tensor(s).view(3, 1, 1) for m, s in (DINO, SIGLIP)
    ]
    return torch.cat(per_backbone)[None]


def pil_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def preprocessor(tiny, size: int, strategy: str = "resize-naive") -> ImagePreprocessor:
    return ImagePreprocessor(tiny.model.vision_backbone.featurizers, size, resize_strategy=strategy)


@pytest.mark.parametrize("size", [128, 224])
@pytest.mark.parametrize("shape", [(480, 640), (333, 517), (224, 224), (2, 3)])
def test_resize_naive_is_pils_bicubic_exactly(tiny, size, shape):
    """OpenVLA resizes the uint8 PIL image (bicubic), then converts: identical pixel values."""
    image = frame(*shape)
    ours = preprocessor(tiny, size)(image)
    reference = normalized(pil_resize(image, size, size))
    assert (ours - reference).abs().max().item() == 0.0


def letterbox_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Prismatic's letterbox, with PIL alone: pad both sides by int((max - side) / 2) with
    SigLIP's mean (127), shorter side to ``size`` (bicubic), centre crop size x size."""
    h, w = image.shape[:2]
    dx, dy = int((max(h, w) - w) / 2), int((max(h, w) - h) / 2)
    canvas = Image.new("RGB", (w + 2 * dx, h + 2 * dy), (127, 127, 127))
    canvas.paste(Image.fromarray(image), (dx, dy))
    return resize_crop_reference(np.array(canvas), size)


def resize_crop_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (the longer one int(size * long / short)), centre crop with
    torchvision's rounding: top = round((H - size) / 2)."""
    h, w = image.shape[:2]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    resized = pil_resize(image, new_w, new_h)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return resized[top : top + size, left : left + size]


@pytest.mark.parametrize("shape", [(480, 640), (333, 517), (517, 333)])
@pytest.mark.parametrize(
    "strategy, reference", [("letterbox", letterbox_reference), ("resize-crop", resize_crop_reference)]
)
def test_other_prismatic_resize_strategies(tiny, shape, strategy, reference):
    image = frame(*shape, seed=1)
    ours = preprocessor(tiny, 224, strategy)(image)
    assert (ours - normalized(reference(image, 224))).abs().max().item() == 0.0


def test_the_checkpoints_resize_strategy_is_honoured(tiny_openvla, tmp_path):
    copy = tmp_path / "letterboxed"
    shutil.copytree(tiny_openvla, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "image_resize_strategy": "letterbox"}))
    policy = VLAPolicy(load_openvla(copy))
    image = frame(96, 160)
    assert policy.preprocess.resize_strategy == "letterbox"
    assert torch.equal(policy.preprocess(image), normalized(letterbox_reference(image, 128)))
    (copy / "config.json").write_text(json.dumps({**config, "image_resize_strategy": "stretch"}))
    with pytest.raises(CheckpointError, match="image_resize_strategy must be one of"):
        load_openvla(copy)


@pytest.mark.parametrize("shape", [(1, 1), (1, 640), (480, 1)])
def test_frames_too_small_to_resample_are_refused(tiny, shape):
    with pytest.raises(ValueError, match=r"image is too small: \d+x\d+ pixels"):
        preprocessor(tiny, 128)(np.zeros((*shape, 3), np.uint8))


def test_a_large_frame_gives_the_tokens_of_its_pil_resized_copy(tiny):
    """Through the whole policy: 480x640 in, the action of the frame PIL resized to 128."""
    policy = VLAPolicy(tiny)
    image = frame(480, 640, seed=2)
    small = pil_resize(image, 128, 128)
    assert np.array_equal(
        policy.predict(image, INSTRUCTION).tokens, policy.predict(small, INSTRUCTION).tokens
    )
    assert torch.equal(policy.preprocess(image), policy.preprocess(small))


def test_instructions_are_lower_cased_and_stripped_by_default(tiny):
    mixed = "  Put the RED Cube on the Blue Target \n"
    assert instruction_text(mixed) == INSTRUCTION
    assert instruction_text(mixed, lowercase=False) == "Put the RED Cube on the Blue Target"
    as_given = prompt_ids(tiny.tokenizer, instruction_text(mixed, lowercase=False))
    assert not torch.equal(as_given, prompt_ids(tiny.tokenizer, INSTRUCTION))  # the case matters to the model
    image = frame(128, 128, seed=3)
    lowered, kept = VLAPolicy(tiny), VLAPolicy(tiny, lowercase_instruction=False)
    assert lowered.prefill(image, mixed).length == lowered.prefill(image, INSTRUCTION).length
    assert kept.prefill(image, mixed).length == kept.prefill(image, INSTRUCTION).length + (
        as_given.shape[1] - prompt_ids(tiny.tokenizer, INSTRUCTION).shape[1]
    )
    assert np.array_equal(lowered.predict(image, mixed).tokens, lowered.predict(image, INSTRUCTION).tokens)


# --- the LIBERO centre crop, against TF's documented crop_and_resize rule -------------------
# Box [y1, x1, y2, x2] = [(1 - s) / 2, (1 - s) / 2, (1 + s) / 2, (1 + s) / 2], s = sqrt(area).
# Output pixel (i, j) of an S x S crop samples the input at
#   in_y = y1 (H - 1) + i (y2 - y1)(H - 1)/(S - 1),  in_x alike,
# bilinear between floor and ceil; float values v / 255; uint8 = trunc(255.5 * clip(v, 0, 1)).


def test_center_crop_of_a_gradient_by_hand():
    """area 0.81 (s = 0.9) of a 5 x 5 image v = 10 y + x, to 3 x 3: in_y = 0.2, 2.0, 3.8
    (in_x alike); bilinear is exact on a linear image, so the value is 10 in_y + in_x, then
    trunc(value * 255.5 / 255): 2.2 -> 2, 4.0 -> 4, 5.8 -> 5; 20.2 -> 20, 22.0 -> 22,
    23.8 -> 23; 38.2 -> 38, 40.0 -> 40, 41.8 -> 41."""
    y, x = np.mgrid[0:5, 0:5]
    image = np.repeat((10 * y + x).astype(np.uint8)[..., None], 3, axis=2)
    crop = tf_center_crop(image, 3, area=0.81)
    assert crop[..., 0].tolist() == [[2, 4, 5], [20, 22, 23], [38, 40, 41]]
    assert (crop[..., 0] == crop[..., 2]).all()


def test_center_crop_of_an_impulse_by_hand():
    """A 255 at (1, 2) of a 4 x 5 black image, area 0.81, to 4 x 4: rows sample in_y = 0.15,
    1.05, 1.95, 2.85 and columns in_x = 0.2, 1.4, 2.6, 3.8. Row 1 weighs 0.15 at in_y 0.15
    (lerp from row 0), 0.95 at 1.05 and 0.05 at 1.95; column 2 weighs 0.4 at in_x 1.4 and
    0.4 at 2.6. 255 * 0.15 * 0.4 / 255 = 0.06 -> * 255.5 = 15.33 -> 15; 0.38 -> 97.09 -> 97;
    0.02 -> 5.11 -> 5."""
    image = np.zeros((4, 5, 3), np.uint8)
    image[1, 2] = 255
    crop = tf_center_crop(image, 4, area=0.81)[..., 1]
    assert crop.tolist() == [[0, 15, 15, 0], [0, 97, 97, 0], [0, 5, 5, 0], [0, 0, 0, 0]]


def test_center_crop_corners_centre_and_range():
    """LIBERO's area 0.9 on a 224 x 224 frame: the output corners sample the input at
    (1 - sqrt(0.9)) / 2 * 223 = 5.7233 px from the edges, output pixel 112 at 5.7233 + 112
    sqrt(0.9) = 111.9758 (-> 112.195 -> 112); a white frame stays 255 (255.5 truncates to
    255), a black one 0."""
    side = 224
    y, x = np.mgrid[0:side, 0:side]
    ramp = np.stack([x, y, 0 * x], -1).astype(np.uint8)  # red = column, green = row
    crop = tf_center_crop(ramp, side)
    edge = (1 - np.sqrt(0.9)) / 2 * (side - 1)
    assert crop[0, 0, 0] == int(edge * 255.5 / 255) == crop[0, 0, 1]  # 5.7233 -> 5
    assert crop[-1, -1, 0] == int((side - 1 - edge) * 255.5 / 255)  # 217.2767 -> 217
    assert crop[112, 112, 0] == 112 == crop[112, 112, 1]
    assert (tf_center_crop(np.full((50, 70, 3), 255, np.uint8), 32) == 255).all()
    assert (tf_center_crop(np.zeros((50, 70, 3), np.uint8), 32) == 0).all()


def test_the_policys_center_crop_is_the_tf_crop_then_the_processor(tiny):
    image = frame(480, 640, seed=4)
    cropped = VLAPolicy(tiny, center_crop=True).preprocess(image)
    assert torch.equal(cropped, normalized(tf_center_crop(image, 128)))
    assert not torch.equal(cropped, VLAPolicy(tiny).preprocess(image))


def test_training_frames_are_the_nodes_frames(tiny):
    """Behaviour cloning stores each frame resized once; it must be the node's resize."""
    from dyqvla_ros.training import BehaviourCloning, Sample

    image = frame(96, 160, seed=5)
    sample = Sample(image, "Put The Red Cube on the Blue Target", np.zeros(7, np.float32), None, None)
    run = BehaviourCloning(tiny, [sample, sample], lr=1e-3, seed=0)
    assert np.array_equal(run.frames[0].numpy(), pil_resize(image, 128, 128))
    assert torch.equal(run.prompts[0], prompt_ids(tiny.tokenizer, INSTRUCTION)[0])  # lower-cased
