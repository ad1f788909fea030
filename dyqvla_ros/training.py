"""Behaviour cloning of an OpenVLA-architecture policy on action tokens (no ROS).

Samples are (camera frame, instruction, expert action) triples from ``dyqvla-collect``
bags. Actions are normalised with the dataset's q01/q99 (the gripper, mask false, is
kept as is), tokenized exactly as OpenVLA does, and the model is trained with
cross-entropy on the 7 action tokens that follow the prompt (teacher forcing), the
objective OpenVLA was fine-tuned with.

The softmax of that cross-entropy runs over the action tokens only, the vocabulary the
node and the evaluation decode over (``restrict_to_actions``, their default): the same
greedy choice, without a 32,064-way softmax per token.

Auxiliary supervision (``aux_weight`` > 0, bags with ``/sim_state``): two linear readouts,
used only in training and never saved into the checkpoint, ask (1) the projected patch
tokens for every cube's and target zone's position relative to the hand and (2) the
language model's state before the first action token for the instructed cube's and
target's relative position, the grasp yaw error and the expert's phase. Behaviour cloning
alone grounds the image slowly (measured: 0/50 closed-loop successes after 5000 steps,
the policy picking wrong objects and phases); these targets say directly what the image
and the instruction must yield.

Attention supervision (``attention_weight`` > 0, bags with ``/sim_state`` and
``/ee_pose``): with the readouts alone the language model learned *which* cube the
instruction names slowly and poorly (readout R² ~0 on training episodes through step
5000; 0.21 / 0.32 for dx / dy on held-out steps after 10000; its first moves often
headed for the wrong object): picking the patches of "the green cube" out of 64 is a
two-hop lookup (colour word, then matching patches) whose gradient
through a near-uniform softmax is tiny. So three heads of one middle layer are told where
to look, from every position that predicts an action token: head 0 at the instructed
cube, head 1 at the instructed target zone, head 2 at the hand. The target of each is
the 2x2 block of patches around the object's projection in the (shifted) camera image
(``camera_pixels``); the loss is -log of the attention mass on that block. The other
heads and layers are free. Training only: the policy's architecture and checkpoint are
OpenVLA's, and inference runs the same attention without knowing it was supervised.

Weight averaging (``ema_decay`` > 0): the checkpoint holds an exponential moving average
of the weights (timm's ``ModelEmaV3``) instead of the last step's. Why: the last step's
weights of one run are a noisy sample; the same data and recipe from two training seeds
gave 48/200 and 88/200 closed-loop successes (TRAINING.md, round 6), while their action
losses were alike. The decay warms up as timm's ``1 - (1 + step)^(-3/4)`` (averaging over
roughly the last ``(1 + step)^(3/4)`` steps: ~400 at step 3000), capped at ``ema_decay``,
so the average forgets the starting weights instead of keeping ``ema_decay^steps`` of them.
Measured (TRAINING.md, validation seeds): it rescued a bad run (50 -> 64/200) and did not
lift a good one (119 -> 116/200); the raw weights, and so the batches, are the same as
without it.

The checkpoint is written in the OpenVLA format (``load_openvla`` reads it) with fp32
weights, plus ``training_state.safetensors`` (optimizer moments, step, and the raw
weights when they are averaged; no pickle) so a run can be resumed.
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
from timm.utils.model_ema import ModelEmaV3

from dyqvla_ros.bags.store import BagError, deserialize, iter_messages, typestore
from dyqvla_ros.image_conversion import image_to_rgb
from dyqvla_ros.model.action_tokenizer import ActionStats, ActionTokenizer
from dyqvla_ros.model.config import check_action_decoding
from dyqvla_ros.model.loader import (
    TOKENIZER_FILES,
    CheckpointError,
    LoadedOpenVLA,
    inspect_checkpoint,
    read_tensors,
)
from dyqvla_ros.model.processing import ImagePreprocessor, instruction_text, prompt_ids
from dyqvla_ros.sim.env import TabletopEnv, camera_pixels
from dyqvla_ros.sim.expert import PHASES, STATE_FIELDS
from dyqvla_ros.sim.scene import TABLE_TOP

UNNORM_KEY = "dyqvla_sim"
STATE_FILE = "training_state.safetensors"
AUX_FILE = "auxiliary_heads.safetensors"
RAW = "raw"  # training-state key suffix of a raw weight (the checkpoint holds the average)
# /sim_state columns: the instruction-dependent ones (after the phase) and the scene.
N_TASK = STATE_FIELDS.index("yaw_error")
N_SCENE = len(STATE_FIELDS) - N_TASK - 1
# Metres to decimetres and radians to ~quarter turns: auxiliary targets of order one.
AUX_SCALE = np.array([10.0] * (N_TASK - 1) + [2.5] + [10.0] * N_SCENE, dtype=np.float32)
# Weight averaging: timm's warm-up exponent for runs of thousands of steps (its docstring).
EMA_WARMUP_POWER = 0.75
# Attention supervision: which layer, and what heads 0, 1, 2 of it are told to look at.
ATTENTION_LAYER = 1
ATTENDED = ("instructed cube", "instructed target", "hand")


@dataclass
class Sample:
    image: np.ndarray
    instruction: str
    action: np.ndarray  # (7,)
    state: np.ndarray | None = None  # STATE_FIELDS of that step, if the bag has /sim_state
    hand: np.ndarray | None = None  # measured hand position (m), if the bag has /ee_pose


def load_samples(bags: list[Path]) -> list[Sample]:
    """Frame + instruction + expert action (+ simulator state) of every step in
    ``dyqvla-collect`` bags; messages of one step share a timestamp."""
    store = typestore()
    samples = []
    layout = ",".join(STATE_FIELDS)
    for bag in bags:
        frames: dict[int, np.ndarray] = {}
        labels: dict[int, tuple[str, np.ndarray]] = {}
        states: dict[int, np.ndarray] = {}
        hands: dict[int, np.ndarray] = {}
        instruction = None
        topics = ["/image", "/instruction", "/expert_action", "/sim_state", "/ee_pose"]
        for message in iter_messages(bag, topics):
            msg, ns = deserialize(store, message), message.timestamp_ns
            if message.topic == "/instruction":
                instruction = msg.data
            elif message.topic == "/image":
                frames[ns] = image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data.tobytes())
            elif message.topic == "/expert_action":
                if instruction:
                    labels[ns] = (instruction, np.asarray(msg.data, float))
            elif message.topic == "/ee_pose":
                p = msg.pose.position
                hands[ns] = np.array([p.x, p.y, p.z])
            else:
                label = msg.layout.dim[0].label if msg.layout.dim else ""
                if label != layout:
                    raise BagError(f"{bag}: /sim_state fields {label!r} are not this version's {layout!r}")
                states[ns] = np.asarray(msg.data, np.float32)
        for ns, (text, action) in labels.items():
            if ns in frames:
                samples.append(Sample(frames.pop(ns), text, action, states.get(ns), hands.get(ns)))
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


class AuxiliaryHeads(torch.nn.Module):
    """Training-only linear readouts (see the module docstring); not part of the policy."""

    def __init__(self, n_patches: int, width: int) -> None:
        super().__init__()
        self.scene = torch.nn.Linear(n_patches * width, N_SCENE)
        self.task = torch.nn.Linear(width, N_TASK + len(PHASES))

    def loss(self, patches: torch.Tensor, before_action: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the scaled positions + cross-entropy of the phase."""
        scaled = state[:, 1:] * torch.from_numpy(AUX_SCALE)
        task = self.task(before_action.float())
        scene = self.scene(patches.float().flatten(1))
        return (
            F.mse_loss(scene, scaled[:, N_TASK:])
            + F.mse_loss(task[:, :N_TASK], scaled[:, :N_TASK])
            + F.cross_entropy(task[:, N_TASK:], state[:, 0].long())
        )


def attended_pixels(samples: list[Sample], size: int) -> torch.Tensor:
    """(N, len(ATTENDED), 2) image coordinates, at the model's square image size, of each
    sample's instructed cube, instructed target zone (on the table) and hand."""
    model = TabletopEnv(render_size=0).model
    cube, target = STATE_FIELDS.index("cube_dx"), STATE_FIELDS.index("target_dx")
    points = []
    for s in samples:
        target_xy = s.hand[:2] + s.state[target : target + 2]
        points.append([s.hand + s.state[cube : cube + 3], [*target_xy, TABLE_TOP], s.hand])
    return torch.from_numpy(camera_pixels(model, np.array(points), size)).float()


def patch_blocks(pixels: torch.Tensor, patch: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 2) pixel coordinates -> ((..., grid²) mask of the 2x2 patches whose centres
    surround each point, (...) whether the point is in the image at all)."""
    low = (pixels / patch - 0.5).floor().long()
    cols = (low[..., :1] + torch.tensor([0, 1, 0, 1])).clamp(0, grid - 1)
    rows = (low[..., 1:] + torch.tensor([0, 0, 1, 1])).clamp(0, grid - 1)
    mask = torch.zeros(*pixels.shape[:-1], grid * grid, dtype=torch.bool)
    mask.scatter_(-1, rows * grid + cols, True)
    return mask, ((pixels >= 0) & (pixels < patch * grid)).all(-1)


class BehaviourCloning:
    """Owns the model, optimizer and tokenized dataset of one training run.

    Batches are built whole: the frames are kept as one uint8 tensor at the model's
    image size (resized once, as the policy's preprocessing would), each sequence is
    ``[BOS, patches, prompt, 6 action tokens]`` right-padded to the longest in the batch
    (causal attention: no real token ever sees the padding, so no mask is needed), and
    only the 7 positions that predict action tokens go through the LM head.

    Augmentation: a random shift of up to ``shift`` pixels (edge-replicated padding, then
    a crop back to size), the standard remedy for behaviour cloning from few images
    (DrQ, Kostrikov et al. 2020). ``ema_decay`` > 0 averages the weights (module
    docstring); the average is what ``save`` writes as the policy. Learning rate: linear
    warm-up over ``warmup`` steps, then cosine decay to 10 % at ``total_steps``, a function
    of the step so that a resumed run continues the same schedule.
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
        aux_weight: float = 0.0,
        attention_weight: float = 0.0,
        token_noise: float = 0.0,
        action_decoding: str | None = None,
        ema_decay: float = 0.0,
        keep_statistics: bool = False,
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if action_decoding is not None:
            check_action_decoding(action_decoding)
        self.action_decoding = action_decoding  # written to config.json; None: keep the init's
        self.loaded, self.model = loaded, loaded.model
        actions = np.stack([s.action for s in samples])
        if keep_statistics:
            # A fine-tune on other bags of the same task: new statistics would move every
            # bin boundary (a bin of Δx is ~2 mm at 32 bins) under weights trained on the old.
            if UNNORM_KEY not in loaded.norm_stats:
                raise CheckpointError(
                    f"{loaded.path} has no {UNNORM_KEY!r} action statistics to keep "
                    f"(it has {sorted(loaded.norm_stats)}); keep_statistics needs a tabletop checkpoint"
                )
            self.norm_stats = {UNNORM_KEY: loaded.norm_stats[UNNORM_KEY]}
        else:
            self.norm_stats = {
                UNNORM_KEY: {"action": action_statistics(actions), "num_transitions": len(samples)}
            }
        stats = ActionStats.select(self.norm_stats, UNNORM_KEY)
        self.tokenizer = ActionTokenizer(loaded.config.text_vocab_size, loaded.config.n_action_bins)
        self.targets = torch.as_tensor(self.tokenizer.encode(stats.normalize(actions)), dtype=torch.long)
        self.preprocess = ImagePreprocessor(
            self.model.vision_backbone.featurizers,
            loaded.config.image_size,
            resize_strategy=loaded.config.image_resize_strategy,
        )
        # Filled in place: stacking a list of per-sample copies held that list and the stack
        # beside the bag frames at its peak (177k tabletop frames, 8.7 GB each copy, were killed
        # for memory at 24 GiB; in place they peaked at 18.3 GB resident).
        size = loaded.config.image_size
        self.frames = torch.empty((len(samples), size, size, 3), dtype=torch.uint8)
        for i, sample in enumerate(samples):
            self.frames[i] = torch.from_numpy(self.preprocess.frame(sample.image)[0])  # the node's resize
        # Lower-cased, as OpenVLA's RLDS pipeline trains and the node runs by default.
        prompts = {
            s.instruction: prompt_ids(loaded.tokenizer, instruction_text(s.instruction))[0] for s in samples
        }
        self.prompts = [prompts[s.instruction] for s in samples]
        self.n_samples = len(samples)
        self.lr, self.total_steps, self.warmup, self.shift = lr, max(total_steps, 1), warmup, shift
        self.aux_weight, self.aux, self.states = aux_weight, None, None
        parameters = list(self.model.parameters())
        if aux_weight > 0:
            if any(s.state is None for s in samples):
                raise BagError("auxiliary targets need /sim_state in every bag (dyqvla-collect writes it)")
            self.states = torch.from_numpy(np.stack([s.state for s in samples]))
            width = self.model.language_model.config.hidden_size
            n_patches = self.model.vision_backbone.featurizers[0].patch_embed.num_patches
            self.aux = AuxiliaryHeads(n_patches, width)
            parameters += list(self.aux.parameters())
        self.token_noise = token_noise
        self.attention_weight, self.pixels = attention_weight, None
        if attention_weight > 0:
            if any(s.state is None or s.hand is None for s in samples):
                raise BagError("attention supervision needs /sim_state and /ee_pose in every bag")
            self.pixels = attended_pixels(samples, loaded.config.image_size)
            self.patch = self.model.vision_backbone.featurizers[0].patch_embed.patch_size[0]
            self.model.language_model.set_attn_implementation("eager")  # returns attention weights
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
        self.ema_decay, self.ema = ema_decay, None
        if ema_decay > 0:
            self.ema = ModelEmaV3(self.model, decay=ema_decay, use_warmup=True, warmup_power=EMA_WARMUP_POWER)
        self.seed, self.step = seed, 0
        self.rng = np.random.default_rng([seed, 0])

    def learning_rate(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))

    def _augment(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random shift of each (H, W, 3) frame by up to ``shift`` pixels; returns the
        frames and how far (B, 2: right, down) each frame's content moved."""
        s = self.shift
        if s <= 0:
            return frames, torch.zeros(frames.shape[0], 2)
        h, w = frames.shape[1:3]
        padded = F.pad(frames.permute(0, 3, 1, 2).float(), (s, s, s, s), mode="replicate")
        offsets = self.rng.integers(0, 2 * s + 1, (frames.shape[0], 2))
        crops = [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
        moved = torch.from_numpy(s - offsets[:, ::-1].copy()).float()
        return torch.stack(crops).permute(0, 2, 3, 1).to(torch.uint8), moved

    def loss(self, indices: np.ndarray, augment: bool = True) -> torch.Tensor:
        """Mean cross-entropy of the 7 action tokens after the prompt of each sample."""
        return self.losses(indices, augment)[0]

    def losses(
        self, indices: np.ndarray, augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(action cross-entropy, auxiliary loss or None, attention loss or None) of one
        batch, one forward pass."""
        frames, moved = self.frames[indices], torch.zeros(len(indices), 2)
        if augment:
            frames, moved = self._augment(frames)
        pixels = self.preprocess.batch(frames)
        targets = self.targets[indices]
        action_ids = self.tokenizer.token_ids
        inputs = targets[:, :-1]
        if augment and self.token_noise > 0:
            replace = torch.from_numpy(self.rng.random(inputs.shape) < self.token_noise)
            noise = torch.from_numpy(self.rng.integers(action_ids.start, action_ids.stop, inputs.shape))
            inputs = torch.where(replace, noise, inputs)
        sequences = [torch.cat([self.prompts[i], inputs[k]]) for k, i in enumerate(indices)]
        ids = torch.nn.utils.rnn.pad_sequence(
            sequences, batch_first=True, padding_value=self.loaded.config.pad_token_id
        )
        dtype = self.model.language_model.get_input_embeddings().weight.dtype
        embeds = self.model.embed(ids, pixels.to(dtype))
        supervise = self.attention_weight > 0
        output = self.model.language_model.model(inputs_embeds=embeds, output_attentions=supervise)
        hidden = output.last_hidden_state
        n_patches = embeds.shape[1] - ids.shape[1]
        n_actions = targets.shape[1]
        ends = torch.tensor([len(q) for q in sequences]) + n_patches  # real length of each row
        positions = ends[:, None] - n_actions + torch.arange(n_actions)[None]
        picked = hidden[torch.arange(len(indices))[:, None], positions]
        start, n = action_ids.start, len(action_ids)
        logits = F.linear(picked, self.model.language_model.lm_head.weight[start : start + n]).float()
        action_loss = F.cross_entropy(logits.reshape(-1, n), (targets - start).reshape(-1))
        aux_loss = attention_loss = None
        if self.aux is not None:
            aux_loss = self.aux.loss(embeds[:, 1 : 1 + n_patches], picked[:, 0], self.states[indices])
        if supervise:
            where = self.pixels[indices] + moved[:, None]
            attention_loss = self._attention_loss(output.attentions[ATTENTION_LAYER], positions, where)
        return action_loss, aux_loss, attention_loss

    def _attention_loss(
        self, attention: torch.Tensor, positions: torch.Tensor, pixels: torch.Tensor
    ) -> torch.Tensor:
        """-log of the attention mass that heads 0..2 put, from each action-predicting
        position, on the patches of their object (``ATTENDED``); objects outside the image
        are left out."""
        grid = self.loaded.config.image_size // self.patch
        mask, inside = patch_blocks(pixels, self.patch, grid)  # (B, K, P), (B, K)
        rows = torch.arange(len(positions))[:, None, None]
        heads = torch.arange(len(ATTENDED))[None, :, None]
        on_patches = attention[rows, heads, positions[:, None, :], 1 : 1 + grid * grid]  # (B, K, A, P)
        mass = (on_patches.float() * mask[:, :, None]).sum(-1)
        nll = -torch.log(mass + 1e-6) * inside[:, :, None]
        return nll.sum() / (inside.sum() * positions.shape[1]).clamp(min=1)

    def train_step(self, batch: int) -> tuple[float, float | None, float | None]:
        """One optimizer step; returns (action loss, auxiliary loss, attention loss), the
        last two None when not trained."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        action_loss, aux_loss, attention_loss = self.losses(self.rng.integers(0, self.n_samples, batch))
        loss = action_loss
        if aux_loss is not None:
            loss = loss + self.aux_weight * aux_loss
        if attention_loss is not None:
            loss = loss + self.attention_weight * attention_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], 1.0)
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        extra = [None if x is None else float(x.detach()) for x in (aux_loss, attention_loss)]
        return float(action_loss.detach()), *extra

    def save(self, out: Path) -> None:
        """OpenVLA-format checkpoint (fp32; the averaged weights if any) + optimizer state
        (+ the raw weights), each file replaced atomically."""
        out.mkdir(parents=True, exist_ok=True)
        source = self.loaded.path
        policy = self.model if self.ema is None else self.ema.module
        state = {k: v.detach().float().contiguous() for k, v in policy.state_dict().items()}
        _save_weights(out, state)
        self.loaded.tokenizer.save_pretrained(str(out))
        norm_stats = self.norm_stats  # kept ones carry the num_transitions they were computed on
        config = {**json.loads((source / "config.json").read_text()), "norm_stats": norm_stats}
        if self.action_decoding is not None:
            config["dyqvla_action_decoding"] = self.action_decoding
        _atomic(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
        _atomic(out / "dataset_statistics.json", lambda p: p.write_text(json.dumps(norm_stats, indent=2)))
        if self.aux is not None:
            heads = {k: v.detach().contiguous() for k, v in self.aux.state_dict().items()}
            _atomic(out / AUX_FILE, lambda p: save_file(heads, str(p)))
        moments, opt_steps = {}, {}
        for name, p in self._named_parameters().items():
            for key, value in self.optimizer.state.get(p, {}).items():
                if key == "step":
                    opt_steps[name] = float(value)
                elif torch.is_tensor(value) and value.dim() > 0:
                    moments[f"{name}/{key}"] = value.contiguous()
            if self.ema is not None and not name.startswith("auxiliary."):
                moments[f"{name}/{RAW}"] = p.detach().contiguous()
        meta = {
            "step": str(self.step),
            "opt_step": json.dumps(opt_steps),
            "ema_decay": str(self.ema_decay),
            "rng": json.dumps(self.rng.bit_generator.state),  # batches, shifts, token noise
        }
        _atomic(out / STATE_FILE, lambda p: save_file(moments, str(p), metadata=meta))

    def _named_parameters(self) -> dict[str, torch.nn.Parameter]:
        named = dict(self.model.named_parameters())
        if self.aux is not None:
            named |= {f"auxiliary.{k}": v for k, v in self.aux.named_parameters()}
        return named

    def load_auxiliary_heads(self, checkpoint: Path, why: str) -> None:
        """The auxiliary heads a run saved beside ``checkpoint`` (``why`` names the option
        that asked, for the error). A fine-tune that starts them fresh spends its first
        steps with readouts that are wrong by several units of loss, whose gradients reach
        the trunk the ``--init`` checkpoint trained."""
        if self.aux is None:
            raise CheckpointError(f"{why}: this run has no auxiliary targets (--aux-weight 0)")
        if not (checkpoint / AUX_FILE).is_file():
            raise CheckpointError(f"{why} with auxiliary targets: {checkpoint} has no {AUX_FILE}")
        with safe_open(str(checkpoint / AUX_FILE), framework="pt") as f:
            heads = {k: f.get_tensor(k) for k in f.keys()}
        try:
            self.aux.load_state_dict(heads)
        except RuntimeError as err:
            message = f"{why}: {checkpoint / AUX_FILE} does not fit this run's heads: {err}"
            raise CheckpointError(message) from err

    def resume(self, out: Path) -> None:
        """Restore optimizer moments, auxiliary heads, the step count, the sampling RNG and
        (averaged runs) the raw weights written by ``save``; the model was loaded from
        ``out``'s average. The resumed run is the interrupted one, step for step."""
        if self.aux is not None:
            self.load_auxiliary_heads(out, "--resume")
        names = self._named_parameters()
        with safe_open(str(out / STATE_FILE), framework="pt") as f:
            meta = f.metadata()
            saved_decay = float(meta.get("ema_decay", 0.0))
            if saved_decay != self.ema_decay:
                raise CheckpointError(
                    f"--resume: {out} was trained with --ema {saved_decay}, not {self.ema_decay}"
                )
            opt_steps = json.loads(meta["opt_step"])
            for key in f.keys():
                name, moment = key.rsplit("/", 1)
                if moment == RAW:
                    with torch.no_grad():
                        names[name].copy_(f.get_tensor(key))
                    continue
                state = self.optimizer.state[names[name]]
                state[moment] = f.get_tensor(key)
                state["step"] = torch.tensor(float(opt_steps[name]))
        self.step = int(meta["step"])
        if "rng" in meta:
            self.rng.bit_generator.state = json.loads(meta["rng"])
        else:  # saved before the RNG was: a new stream for the remaining steps (not a repeat)
            self.rng = np.random.default_rng([self.seed, self.step])


def export_bf16(checkpoint: Path, out: Path) -> None:
    """A deployable copy of a training checkpoint: bf16 weights (as OpenVLA ships), no
    optimizer state. The node and the evaluation load it as any OpenVLA checkpoint."""
    weights = read_tensors(inspect_checkpoint(checkpoint).weight_files, torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(out, {k: v.contiguous() for k, v in weights.items()})
    _copy_metadata(checkpoint, out)


def average_checkpoints(checkpoints: list[Path], out: Path) -> None:
    """The uniform average of the weights of several training runs (a "model soup",
    Wortsman et al. 2022), written as one checkpoint of the inputs' dtype.

    Why: runs of one recipe from different seeds differ far more in closed loop than in
    loss (TRAINING.md: 119, 88 and 114 of 200 from three seeds); runs fine-tuned from one
    checkpoint can be averaged, a candidate that costs no training. Measured there: two
    bad runs averaged to a good policy (stage 9 + 9b: 109/200), a good and a bad one to the
    good one's level, three runs to less than two of them (98/200): validate it like a run.
    The inputs must share ``config.json`` (architecture, and the action statistics that
    say what each action bin means) and parameter shapes."""
    if len(checkpoints) < 2:
        raise CheckpointError(f"averaging needs at least two checkpoints, got {len(checkpoints)}")
    inspected = [inspect_checkpoint(path) for path in checkpoints]  # a specific error for each
    first, config = checkpoints[0], json.loads((checkpoints[0] / "config.json").read_text())
    for path, checkpoint in zip(checkpoints[1:], inspected[1:], strict=True):
        same_config = json.loads((path / "config.json").read_text()) == config
        if not same_config or checkpoint.norm_stats != inspected[0].norm_stats:
            raise CheckpointError(
                f"{path} differs from {first} in config.json or dataset_statistics.json: only runs "
                "of one architecture on one dataset (the same action statistics) can be averaged"
            )
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path, checkpoint in zip(checkpoints, inspected, strict=True):
        weights = read_tensors(checkpoint.weight_files, None)
        if total and weights.keys() != total.keys():
            raise CheckpointError(f"{path} has other parameters than {first}")
        for key, weight in weights.items():
            if key not in total:
                total[key], dtypes[key] = weight.double(), weight.dtype
            elif weight.shape != total[key].shape:
                shape, expected = tuple(weight.shape), tuple(total[key].shape)
                raise CheckpointError(f"{path}: {key} is {shape}, not {expected}")
            else:
                total[key] += weight.double()
    state = {k: (v / len(checkpoints)).to(dtypes[k]).contiguous() for k, v in total.items()}
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(out, state)
    _copy_metadata(first, out)


def _save_weights(out: Path, state: dict[str, torch.Tensor]) -> None:
    _atomic(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))


def _copy_metadata(checkpoint: Path, out: Path) -> None:
    """Config, statistics and tokenizer of ``checkpoint`` into ``out``, world-readable."""
    for name in ("config.json", "dataset_statistics.json", "tokenizer_config.json", *TOKENIZER_FILES):
        if (checkpoint / name).is_file():  # the inspection asked for the ones a checkpoint needs
            _atomic(out / name, lambda p, name=name: p.write_bytes((checkpoint / name).read_bytes()))
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors writes 0600; a shipped file is world-readable


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
