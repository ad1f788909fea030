"""Behaviour cloning of an OpenVLA-architecture policy on action tokens (no ROS).

Samples are (camera frame, instruction, expert action) triples from ``dyqvla-collect``
bags. Actions are normalised with the dataset's q01/q99 (the gripper, mask false, is
kept as is), tokenized exactly as OpenVLA does, and the model is trained with
cross-entropy on the 7 action tokens that follow the prompt (teacher forcing), the
objective OpenVLA was fine-tuned with.

The checkpoint is written in the OpenVLA format (``load_openvla`` reads it) with fp32
weights, plus ``training_state.safetensors`` (optimizer moments, step; no pickle) so a
run can be resumed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from dyqvla_ros.bags.store import BagError, deserialize, iter_messages, typestore
from dyqvla_ros.image_conversion import image_to_rgb
from dyqvla_ros.model.action_tokenizer import ActionStats, ActionTokenizer
from dyqvla_ros.model.loader import LoadedOpenVLA
from dyqvla_ros.model.processing import ImagePreprocessor, prompt_ids

UNNORM_KEY = "dyqvla_sim"
STATE_FILE = "training_state.safetensors"


@dataclass
class Sample:
    image: np.ndarray
    instruction: str
    action: np.ndarray  # (7,)


def load_samples(bags: list[Path]) -> list[Sample]:
    """Frame + instruction + expert action of every step in ``dyqvla-collect`` bags."""
    store = typestore()
    samples = []
    for bag in bags:
        frames: dict[int, np.ndarray] = {}
        instruction = None
        for message in iter_messages(bag, ["/image", "/instruction", "/expert_action"]):
            msg = deserialize(store, message)
            if message.topic == "/instruction":
                instruction = msg.data
            elif message.topic == "/image":
                frames[message.timestamp_ns] = image_to_rgb(
                    msg.encoding, msg.height, msg.width, msg.step, msg.data.tobytes()
                )
            elif message.timestamp_ns in frames and instruction:
                samples.append(
                    Sample(frames.pop(message.timestamp_ns), instruction, np.asarray(msg.data, float))
                )
    if not samples:
        raise BagError(f"no (image, instruction, /expert_action) samples in {[str(b) for b in bags]}")
    return samples


def action_statistics(actions: np.ndarray) -> dict:
    """OpenVLA-style statistics; the gripper (last dimension) is not normalised."""
    mask = [True] * (actions.shape[1] - 1) + [False]
    return {
        "q01": np.quantile(actions, 0.01, axis=0).tolist(),
        "q99": np.quantile(actions, 0.99, axis=0).tolist(),
        "mask": mask,
        "mean": actions.mean(axis=0).tolist(),
        "std": actions.std(axis=0).tolist(),
        "min": actions.min(axis=0).tolist(),
        "max": actions.max(axis=0).tolist(),
    }


class BehaviourCloning:
    """Owns the model, optimizer and tokenized dataset of one training run.

    Batches are built whole: the frames are kept as one uint8 tensor at the model's
    image size (resized once, as the policy's preprocessing would), each sequence is
    ``[BOS, patches, prompt, 6 action tokens]`` right-padded to the longest in the batch
    (causal attention: no real token ever sees the padding, so no mask is needed), and
    only the 7 positions that predict action tokens go through the LM head.

    Augmentation: a random shift of up to ``shift`` pixels (edge-replicated padding, then
    a crop back to size), the standard remedy for behaviour cloning from few images
    (DrQ, Kostrikov et al. 2020). Learning rate: linear warm-up over ``warmup`` steps,
    then cosine decay to 10 % at ``total_steps``, a function of the step so that a
    resumed run continues the same schedule.
    """

    def __init__(
        self,
        loaded: LoadedOpenVLA,
        samples: list[Sample],
        lr: float,
        seed: int,
        total_steps: int = 1,
        warmup: int = 0,
        shift: int = 4,
    ) -> None:
        self.loaded, self.model = loaded, loaded.model
        actions = np.stack([s.action for s in samples])
        self.stats_dict = action_statistics(actions)
        stats = ActionStats.select({UNNORM_KEY: {"action": self.stats_dict}}, UNNORM_KEY)
        self.tokenizer = ActionTokenizer(loaded.config.text_vocab_size, loaded.config.n_action_bins)
        self.targets = torch.as_tensor(self.tokenizer.encode(stats.normalize(actions)), dtype=torch.long)
        self.preprocess = ImagePreprocessor(self.model.vision_backbone.featurizers, loaded.config.image_size)
        self.frames = torch.stack([_resized(s.image, loaded.config.image_size) for s in samples])
        prompts = {s.instruction: prompt_ids(loaded.tokenizer, s.instruction)[0] for s in samples}
        self.prompts = [prompts[s.instruction] for s in samples]
        self.n_samples = len(samples)
        self.lr, self.total_steps, self.warmup, self.shift = lr, max(total_steps, 1), warmup, shift
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.01)
        self.seed, self.step = seed, 0
        self.rng = np.random.default_rng([seed, 0])

    def learning_rate(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))

    def _augment(self, frames: torch.Tensor) -> torch.Tensor:
        """Random shift of each (H, W, 3) frame by up to ``shift`` pixels."""
        if self.shift <= 0:
            return frames
        s = self.shift
        h, w = frames.shape[1:3]
        padded = F.pad(frames.permute(0, 3, 1, 2).float(), (s, s, s, s), mode="replicate")
        offsets = self.rng.integers(0, 2 * s + 1, (frames.shape[0], 2))
        crops = [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
        return torch.stack(crops).permute(0, 2, 3, 1).to(torch.uint8)

    def loss(self, indices: np.ndarray, augment: bool = True) -> torch.Tensor:
        """Mean cross-entropy of the 7 action tokens after the prompt of each sample."""
        frames = self.frames[indices]
        pixels = self.preprocess.batch(self._augment(frames) if augment else frames)
        targets = self.targets[indices]
        sequences = [torch.cat([self.prompts[i], targets[k, :-1]]) for k, i in enumerate(indices)]
        ids = torch.nn.utils.rnn.pad_sequence(
            sequences, batch_first=True, padding_value=self.loaded.config.pad_token_id
        )
        dtype = self.model.language_model.get_input_embeddings().weight.dtype
        embeds = self.model.embed(ids, pixels.to(dtype))
        hidden = self.model.language_model.model(inputs_embeds=embeds).last_hidden_state
        n_patches = embeds.shape[1] - ids.shape[1]
        n_actions = targets.shape[1]
        ends = torch.tensor([len(q) for q in sequences]) + n_patches  # real length of each row
        positions = ends[:, None] - n_actions + torch.arange(n_actions)[None]
        picked = hidden[torch.arange(len(indices))[:, None], positions]
        logits = self.model.language_model.lm_head(picked).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def train_step(self, batch: int) -> float:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.rng.integers(0, self.n_samples, batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def save(self, out: Path) -> None:
        """OpenVLA-format checkpoint (fp32) + optimizer state, each file replaced atomically."""
        out.mkdir(parents=True, exist_ok=True)
        source = self.loaded.path
        state = {k: v.detach().float().contiguous() for k, v in self.model.state_dict().items()}
        _atomic(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        self.loaded.tokenizer.save_pretrained(str(out))
        norm_stats = {UNNORM_KEY: {"action": self.stats_dict, "num_transitions": self.n_samples}}
        config = {**json.loads((source / "config.json").read_text()), "norm_stats": norm_stats}
        _atomic(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
        _atomic(out / "dataset_statistics.json", lambda p: p.write_text(json.dumps(norm_stats, indent=2)))
        moments, opt_steps = {}, {}
        for name, p in self.model.named_parameters():
            for key, value in self.optimizer.state.get(p, {}).items():
                if key == "step":
                    opt_steps[name] = float(value)
                elif torch.is_tensor(value) and value.dim() > 0:
                    moments[f"{name}/{key}"] = value.contiguous()
        meta = {"step": str(self.step), "opt_step": json.dumps(opt_steps)}
        _atomic(out / STATE_FILE, lambda p: save_file(moments, str(p), metadata=meta))

    def resume(self, out: Path) -> None:
        """Restore optimizer moments and the step count written by ``save``."""
        names = dict(self.model.named_parameters())
        with safe_open(str(out / STATE_FILE), framework="pt") as f:
            meta = f.metadata()
            opt_steps = json.loads(meta["opt_step"])
            for key in f.keys():
                name, moment = key.rsplit("/", 1)
                state = self.optimizer.state[names[name]]
                state[moment] = f.get_tensor(key)
                state["step"] = torch.tensor(float(opt_steps[name]))
        self.step = int(meta["step"])
        self.rng = np.random.default_rng([self.seed, self.step])  # batches continue, not repeat


def export_bf16(checkpoint: Path, out: Path) -> None:
    """A deployable copy of a training checkpoint: bf16 weights (as OpenVLA ships), no
    optimizer state. The node and the evaluation load it as any OpenVLA checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k).to(torch.bfloat16).contiguous() for k in f.keys()}
    _atomic(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    for name in ("config.json", "dataset_statistics.json", "tokenizer.json", "tokenizer_config.json"):
        _atomic(out / name, lambda p, name=name: p.write_bytes((checkpoint / name).read_bytes()))
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors writes 0600; a shipped file is world-readable


def _resized(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: the policy's bicubic resize, rounded back to
    uint8 so a whole dataset fits in memory (identity for bags recorded at the model's size)."""
    x = torch.from_numpy(np.array(image))  # a writable copy (bag frames are read-only)
    if x.shape[:2] == (size, size):
        return x
    x = F.interpolate(x.permute(2, 0, 1)[None].float(), size=(size, size), mode="bicubic", antialias=True)
    return x[0].clamp(0, 255).round().permute(1, 2, 0).to(torch.uint8)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
