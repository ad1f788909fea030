"""Split inference for the control loop: ``prefill`` while the dispatcher decides, then
``decode`` the action tokens at the dispatched activation bit-width.

``prefill(image, instruction)`` runs the vision encoder, the projector and the LLM over
the prompt *except its last token* and keeps the KV cache. ``decode(state, bits)``
feeds that last token and then each predicted token, so all ``action_dim`` (7) action
tokens come from forward passes at ``bits``. ``decode`` first crops the cache back to
the prefill, so one prefill can be decoded at several bit-widths (offline profiling).

``prefill_bits``: 16 by default. The prefill starts before b*_t exists (the monitor
runs during it), it builds the cache that every action token attends to, and at ~280
tokens it is where activation outliers concentrate; keeping it at 16 bits bounds the
error to what the dispatcher decided for the decode. ``"follow"`` runs it at the
previous step's decode bits instead (faster when the previous step was quantized).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

from dyqvla_ros.model.action_tokenizer import ActionStats, ActionTokenizer
from dyqvla_ros.model.config import check_action_decoding
from dyqvla_ros.model.graphs import DecodeGraphs
from dyqvla_ros.model.loader import LoadedOpenVLA
from dyqvla_ros.model.processing import ImagePreprocessor, instruction_text, prompt_ids
from dyqvla_ros.quant import activation_bits, get_activation_bits, quantized_layers

log = logging.getLogger(__name__)

PREFILL_FOLLOW = "follow"
# transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version has.
_CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
)


def median_action_token(logits: torch.Tensor, action_ids: range) -> torch.Tensor:
    """(B, V) logits -> (B, 1) id of the median action bin under the softmax over ``action_ids``.

    Action token ids count down as their bins count up (OpenVLA), so the flipped slice is
    in value order. Why: where the model splits its mass between "stay" (one bin) and a
    move it is unsure of the length of (many neighbouring bins), argmax picks "stay" even
    when most of the mass says "move"; the median is the bin that minimises the expected
    absolute error of the decoded action.
    """
    probs = torch.softmax(logits[:, action_ids.start : action_ids.stop].float(), dim=-1).flip(-1)
    below = (probs.cumsum(dim=-1) < 0.5).sum(dim=-1, keepdim=True)  # bins before the median
    return action_ids.stop - 1 - below.clamp(max=len(action_ids) - 1)


@dataclass
class PrefillState:
    """What decode needs from a prefill: the KV cache and the last prompt token."""

    cache: DynamicCache | StaticCache
    length: int  # tokens in the cache after the prefill
    last_token: torch.Tensor  # (1, 1)
    bits: int  # activation bits the prefill ran at


@dataclass(frozen=True)
class VLAAction:
    tokens: np.ndarray  # (D,) generated token ids
    normalized: np.ndarray  # (D,) in [-1, 1]
    action: np.ndarray  # (D,) un-normalised to the dataset's action space
    bits: int
    # (D, n_bins) softmax over the action tokens, in token-id order, when the policy's
    # ``keep_distributions`` is set (failure analysis); None otherwise.
    distributions: np.ndarray | None = None


class VLAPolicy:
    """An OpenVLA model ready for per-step inference at a chosen activation precision.

    Args:
        loaded: result of ``load_openvla`` (optionally quantized with ``quantize_model``).
        unnorm_key: dataset statistics to un-normalise with (None if there is only one).
        prefill_bits: 2/4/8/16, or ``"follow"`` (previous decode's bits).
        restrict_to_actions: greedy decode over the action tokens only (OpenVLA decodes
            over the whole vocabulary; off by default to match it exactly).
        center_crop: OpenVLA's LIBERO evaluation centre crop (90 % of the area, TF's
            ``crop_and_resize``; for checkpoints fine-tuned with random crops).
        lowercase_instruction: lower-case (and strip) the instruction, as OpenVLA's
            inference and training do; False for checkpoints trained on text as given.
        action_decoding: ``"argmax"`` (OpenVLA's greedy decode) or ``"median"``: each
            action token is the median bin of the distribution over the action tokens,
            ordered by the value they decode to (see ``median_action_token``). None: the
            checkpoint's ``dyqvla_action_decoding`` (argmax if it has none).
    """

    def __init__(
        self,
        loaded: LoadedOpenVLA,
        unnorm_key: str | None = None,
        prefill_bits: int | str = 16,
        restrict_to_actions: bool = False,
        center_crop: bool = False,
        action_decoding: str | None = None,
        lowercase_instruction: bool = True,
    ) -> None:
        if action_decoding is None:
            action_decoding = loaded.config.action_decoding
        self.action_decoding = check_action_decoding(action_decoding)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.stats = ActionStats.select(loaded.norm_stats, unnorm_key)
        self.action_tokenizer = ActionTokenizer(loaded.config.text_vocab_size, loaded.config.n_action_bins)
        self.quantized = bool(quantized_layers(self.model))
        if prefill_bits != PREFILL_FOLLOW and prefill_bits not in (2, 4, 8, 16):
            raise ValueError(f"prefill_bits must be 2, 4, 8, 16 or '{PREFILL_FOLLOW}', got {prefill_bits!r}")
        if prefill_bits not in (16, PREFILL_FOLLOW) and not self.quantized:
            raise ValueError("prefill_bits below 16 needs a quantized model")
        self.prefill_bits = prefill_bits
        self.preprocess = ImagePreprocessor(
            self.model.vision_backbone.featurizers,
            loaded.config.image_size,
            center_crop,
            loaded.config.image_resize_strategy,
        )
        self.lowercase_instruction = lowercase_instruction
        self.device = next(self.model.parameters()).device
        self.dtype = self.model.language_model.get_input_embeddings().weight.dtype
        self._last_decode_bits = 16
        self.keep_distributions = False  # VLAAction.distributions: off in the node (a copy per token)
        self._action_mask: torch.Tensor | None = None
        if restrict_to_actions:
            vocab = self.model.language_model.config.vocab_size
            mask = torch.full((vocab,), float("-inf"), device=self.device)
            ids = self.action_tokenizer.token_ids
            mask[ids.start : ids.stop] = 0.0
            self._action_mask = mask
        self._static_cache: StaticCache | None = None
        self._static_cache_len = 0
        self._graphs: DecodeGraphs | None = None
        self.graph_status = "off: eager decode"

    def enable_cuda_graphs(self, bits: tuple[int, ...] = (2, 4, 8, 16), max_cache_len: int = 512) -> bool:
        """Static KV cache + one captured decode graph per bit-width (capture once, here).

        Falls back to eager decode, with the reason in ``graph_status`` and the log, on
        the CPU or when capture fails. Returns whether graphs are in use.
        """
        if self.device.type != "cuda":
            self.graph_status = "off: CUDA graphs need a CUDA device (eager decode)"
            log.info(self.graph_status)
            return False
        bits = tuple(b for b in bits if b == 16 or self.quantized)
        try:
            with torch.inference_mode():
                self.use_static_cache(max_cache_len)
                self._graphs = DecodeGraphs(self._graph_forward, bits, self._precision, self.device)
        except Exception as err:
            self._graphs = None
            self.graph_status = f"off: capture failed ({type(err).__name__}: {err}); eager decode"
            log.warning(self.graph_status)
            return False
        self.graph_status = f"on: {len(bits)} decode graphs ({', '.join(map(str, bits))} bits), static cache"
        return True

    def use_static_cache(self, max_cache_len: int = 512) -> None:
        """Prefill into one preallocated KV cache (fixed addresses) instead of a new one."""
        self._static_cache = StaticCache(config=self.model.language_model.config, max_cache_len=max_cache_len)
        self._static_cache_len = max_cache_len
        self.prefill(np.zeros((224, 224, 3), np.uint8), "warm up")  # allocates its tensors

    def _graph_forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model.language_model(
            input_ids=token, cache_position=position, use_cache=True, **{_CACHE_KWARG: self._static_cache}
        )
        return out.logits[:, -1]

    @property
    def action_dim(self) -> int:
        return self.stats.dim

    @property
    def patch_size(self) -> int:
        """The vision backbones' patch, in pixels: a smaller frame holds no patch at all."""
        return max(max(f.patch_embed.patch_size) for f in self.model.vision_backbone.featurizers)

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt (tokens, BOS and template included) that fits the language
        model's context beside the image's patch tokens and the action tokens."""
        context = self.model.language_model.config.max_position_embeddings
        patches = self.model.vision_backbone.featurizer.patch_embed.num_patches
        return context - patches - self.action_dim

    def prompt_ids(self, instruction: str) -> torch.Tensor:
        """(1, T) ids of the prompt ``prefill`` builds for ``instruction`` (on the CPU)."""
        return prompt_ids(self.tokenizer, instruction_text(instruction, self.lowercase_instruction))

    def prompt_length(self, instruction: str) -> int:
        return self.prompt_ids(instruction).shape[1]

    def _precision(self, bits: int):
        """Context for running the model at ``bits``; unquantized models only run 16."""
        if self.quantized:
            return activation_bits(self.model, bits)
        if bits != 16:
            raise ValueError(f"the model is not quantized: it cannot run {bits}-bit activations")
        return torch.inference_mode()  # any no-op context

    @torch.inference_mode()
    def prefill(self, image: np.ndarray, instruction: str) -> PrefillState:
        """Vision encoder + LLM prefill over the prompt without its last token."""
        ids = self.prompt_ids(instruction).to(self.device)
        pixels = self.preprocess(image).to(self.device, self.dtype)
        bits = self._last_decode_bits if self.prefill_bits == PREFILL_FOLLOW else int(self.prefill_bits)
        if not self.quantized:
            bits = 16
        with self._precision(bits):
            embeds = self.model.embed(ids[:, :-1], pixels)
            if self._static_cache is not None:
                cache = self._static_cache
                if embeds.shape[1] + self.action_dim > self._static_cache_len:
                    raise ValueError(
                        f"prompt of {embeds.shape[1]} tokens does not fit the static cache "
                        f"({self._static_cache_len}); enable_cuda_graphs(max_cache_len=...) larger"
                    )
                cache.reset()  # same tensors, emptied
            else:
                cache = DynamicCache(config=self.model.language_model.config)
            positions = torch.arange(embeds.shape[1], device=self.device)
            self.model.language_model(
                inputs_embeds=embeds, cache_position=positions, use_cache=True, **{_CACHE_KWARG: cache}
            )
        return PrefillState(cache=cache, length=embeds.shape[1], last_token=ids[:, -1:], bits=bits)

    @torch.inference_mode()
    def decode(self, state: PrefillState, bits: int) -> VLAAction:
        """Greedy decode of the action tokens with activations at ``bits``."""
        extra = int(state.cache.get_seq_length()) - state.length
        if extra > 0:
            state.cache.crop(-extra)  # back to the prefill (a negative count removes tokens)
        graphs = self._graphs if state.cache is self._static_cache else None
        token = state.last_token
        action_ids = self.action_tokenizer.token_ids
        tokens, distributions = [], []
        with self._precision(bits):
            for i in range(self.action_dim):
                position = state.length + i
                if graphs is not None and bits in graphs.graphs:
                    logits = graphs.step(bits, token, position)
                else:
                    logits = self._decode_forward(state.cache, token, position)
                logits = logits.float()
                if self.keep_distributions:
                    distributions.append(torch.softmax(logits[:, action_ids.start : action_ids.stop], -1))
                if self.action_decoding == "median":
                    token = median_action_token(logits, action_ids)
                else:
                    if self._action_mask is not None:
                        logits = logits + self._action_mask
                    token = logits.argmax(dim=-1, keepdim=True)
                tokens.append(token)
        self._last_decode_bits = bits
        ids = torch.cat(tokens, dim=1)[0].cpu().numpy()  # one device sync per step
        normalized = self.action_tokenizer.decode(ids)
        kept = torch.cat(distributions).cpu().numpy() if distributions else None
        return VLAAction(ids, normalized, self.stats.unnormalize(normalized), bits, kept)

    def _decode_forward(self, cache, token: torch.Tensor, position: int) -> torch.Tensor:
        positions = torch.tensor([position], device=self.device)
        out = self.model.language_model(
            input_ids=token, cache_position=positions, use_cache=True, **{_CACHE_KWARG: cache}
        )
        return out.logits[:, -1]

    def predict(self, image: np.ndarray, instruction: str, bits: int = 16) -> VLAAction:
        return self.decode(self.prefill(image, instruction), bits)

    def active_bits(self) -> int:
        return get_activation_bits(self.model) if self.quantized else 16
