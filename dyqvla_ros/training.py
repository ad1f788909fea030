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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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
    """Owns the model, optimizer and tokenized dataset of one training run."""

    def __init__(self, loaded: LoadedOpenVLA, samples: list[Sample], lr: float, seed: int) -> None:
        self.loaded, self.model = loaded, loaded.model
        actions = np.stack([s.action for s in samples])
        self.stats_dict = action_statistics(actions)
        stats = ActionStats.select({UNNORM_KEY: {"action": self.stats_dict}}, UNNORM_KEY)
        self.tokenizer = ActionTokenizer(loaded.config.text_vocab_size, loaded.config.n_action_bins)
        self.targets = torch.as_tensor(self.tokenizer.encode(stats.normalize(actions)), dtype=torch.long)
        self.samples = samples
        self.preprocess = ImagePreprocessor(self.model.vision_backbone.featurizers, loaded.config.image_size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.seed, self.step = seed, 0
        self.rng = np.random.default_rng([seed, 0])

    def loss(self, index: int) -> torch.Tensor:
        """Cross-entropy of the 7 action tokens after the prompt of sample ``index``."""
        sample, target = self.samples[index], self.targets[index]
        ids = prompt_ids(self.loaded.tokenizer, sample.instruction)
        inputs = torch.cat([ids, target[None, :-1]], dim=1)
        embeds = self.model.embed(inputs, self.preprocess(sample.image))
        logits = self.model.language_model(inputs_embeds=embeds).logits[0, -target.numel() :]
        return torch.nn.functional.cross_entropy(logits, target)

    def train_step(self, batch: int) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for index in self.rng.integers(0, len(self.samples), batch):
            loss = self.loss(int(index)) / batch
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return total

    def save(self, out: Path) -> None:
        """OpenVLA-format checkpoint (fp32) + optimizer state, each file replaced atomically."""
        out.mkdir(parents=True, exist_ok=True)
        source = self.loaded.path
        state = {k: v.detach().float().contiguous() for k, v in self.model.state_dict().items()}
        _atomic(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        self.loaded.tokenizer.save_pretrained(str(out))
        norm_stats = {UNNORM_KEY: {"action": self.stats_dict, "num_transitions": len(self.samples)}}
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


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
