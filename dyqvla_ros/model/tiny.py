"""``dyqvla-make-tiny OUT``: a tiny OpenVLA with the real architecture, built offline.

Same parameter names, config.json fields and checkpoint files as ``openvla/openvla-7b``;
only the sizes differ (3-layer Llama of width 64, 4-block ViTs of width 64 with 16 px
patches at 128 px), set through ``image_sizes``, ``dyqvla_timm_overrides`` and
``text_config``. The vocabulary has the real
layout: 32000 text tokens (``<unk>``, ``<s>``, ``</s>``, 256 byte-fallback tokens,
single characters, the empty token "▁" at id 29871, the 256 action tokens last),
``<PAD>`` at 32000, and embeddings padded to 32064. Its tokenizer is a character-level
BPE built with the ``tokenizers`` library, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import string
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from dyqvla_ros.model.config import OpenVLAConfig
from dyqvla_ros.model.loader import build_model, default_cache_dir
from dyqvla_ros.model.processing import EMPTY_TOKEN_ID

TEXT_VOCAB = 32000
PADDED_VOCAB = 32064
TINY_UNNORM_KEY = "dyqvla_tiny"
# 128 px (what the tabletop camera records) in 16 px patches: 8 x 8 = 64 patch tokens.
# With 8 px patches (256 tokens, as OpenVLA's 224 px / 14 px) behaviour cloning barely
# used the image after 1000 steps: the loss with images shuffled across the batch was
# only 0.08 nats above the loss with the right ones; fewer, richer tokens train faster.
TINY_IMAGE_SIZE = 128
# Action statistics of the tiny model: 7-D deltas (m, rad) and a gripper in [0, 1].
TINY_ACTION_STATS = {
    "q01": [-0.03, -0.03, -0.03, -0.2, -0.2, -0.2, 0.0],
    "q99": [0.03, 0.03, 0.03, 0.2, 0.2, 0.2, 1.0],
    "mask": [True, True, True, True, True, True, False],
}


def tiny_config_dict(seed: int, n_action_bins: int = 256) -> dict:
    """config.json of the tiny model (fields of the published OpenVLA config)."""
    return {
        "model_type": "openvla",
        "architectures": ["OpenVLAForActionPrediction"],
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "image_sizes": [TINY_IMAGE_SIZE, TINY_IMAGE_SIZE],
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "llm_max_length": 2048,
        "pad_token_id": 32000,
        "pad_to_multiple_of": 64,
        "n_action_bins": n_action_bins,
        "output_projector_states": False,
        "torch_dtype": "bfloat16",
        "transformers_version": transformers.__version__,
        "text_config": {
            "model_type": "llama",
            "vocab_size": PADDED_VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "pad_token_id": 32000,
            "torch_dtype": "bfloat16",
        },
        "dyqvla_timm_overrides": [
            {"embed_dim": 64, "depth": 4, "num_heads": 4, "patch_size": 16},
            {"embed_dim": 64, "depth": 4, "num_heads": 4, "patch_size": 16},
        ],
        "dyqvla_tiny_seed": seed,
    }


# Whole-word tokens, as Llama-2's vocabulary has them ("▁red", "▁cube", ...), for the words
# of OpenVLA's prompt and of manipulation instructions. Spelled out in characters (85
# prompt tokens) the instructed cube's colour was a 3-5 character pattern deep inside the
# prompt: after 3000 training steps a linear readout of the state before the first action
# token could not tell the instructed cube's position at all (R^2 ~ 0), though the patch
# tokens located every cube (R^2 ~ 0.95). Other text still falls back to characters.
WORD_TOKENS = (
    *("In", "What", "action", "should", "the", "robot", "take", "to"),
    *("put", "pick", "place", "move", "push", "open", "close", "up", "on", "in", "into", "of", "and", "a"),
    *("cube", "block", "bowl", "plate", "drawer", "target", "left", "right", "top"),
    *("red", "green", "blue", "yellow", "black", "white"),
)


def _word_merges() -> list[tuple[str, str]]:
    """BPE merges that build each ``WORD_TOKENS`` word after a space ("▁" + word), left to
    right; the result of every merge is a vocabulary entry."""
    merges: list[tuple[str, str]] = []
    for word in WORD_TOKENS:
        for i in range(len(word)):
            merge = ("▁" + word[:i], word[i])
            if merge not in merges:
                merges.append(merge)
    return merges


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2-shaped vocabulary: whole-word tokens for ``WORD_TOKENS``, characters
    otherwise, byte fallback."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    chars = [c for c in string.printable if c not in " \t\n\r\x0b\x0c"]
    for c in chars:
        vocab[c] = len(vocab)
    merges = _word_merges()
    for left, right in merges:
        vocab[left + right] = len(vocab)
    while len(vocab) < TEXT_VOCAB:
        if len(vocab) == EMPTY_TOKEN_ID:
            vocab["▁"] = EMPTY_TOKEN_ID
        else:
            vocab[f"<unused_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048
    )
    fast.add_special_tokens({"pad_token": "<PAD>"})  # id 32000, as in OpenVLA
    return fast


def tiny_build_id(seed: int, n_action_bins: int = 256) -> str:
    """Names what this code builds for ``seed``: config, tokenizer words, statistics and the
    torch version (its RNG draws the weights). ``ensure_tiny_openvla`` rebuilds a directory
    whose id differs, so a checkpoint left by older code is never reused."""
    spec = [tiny_config_dict(seed, n_action_bins), WORD_TOKENS, TINY_ACTION_STATS, torch.__version__]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def make_tiny_openvla(out: str | Path, seed: int = 0, n_action_bins: int = 256) -> Path:
    """Write a tiny OpenVLA checkpoint directory to ``out`` and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {**tiny_config_dict(seed, n_action_bins), "dyqvla_tiny_build": tiny_build_id(seed, n_action_bins)}
    torch.manual_seed(seed)
    model = build_model(OpenVLAConfig.from_dict(data), device="cpu")
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = build_tokenizer()
    assert tokenizer.convert_tokens_to_ids("<PAD>") == data["pad_token_id"]
    tokenizer.save_pretrained(str(out))
    stats = {TINY_UNNORM_KEY: {"action": TINY_ACTION_STATS, "num_trajectories": 0, "num_transitions": 0}}
    (out / "dataset_statistics.json").write_text(json.dumps(stats, indent=2))
    (out / "config.json").write_text(json.dumps({**data, "norm_stats": stats}, indent=2))
    return out


def default_tiny_path() -> Path:
    return default_cache_dir() / "openvla-tiny"


def _built_by_this_code(path: Path, seed: int) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("dyqvla_tiny_build") == tiny_build_id(seed)


def ensure_tiny_openvla(path: str | Path | None = None, seed: int = 0) -> Path:
    """The random-weight tiny model for benchmarks: built on first use (about 5 s), then
    reused while it is what this code would build (``tiny_build_id``)."""
    path = Path(path).expanduser() if path else default_tiny_path()
    if not _built_by_this_code(path, seed):
        staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        make_tiny_openvla(staging, seed)
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)  # whole directory appears at once
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny OpenVLA-architecture model offline.")
    parser.add_argument("out", type=Path, help="output checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    path = make_tiny_openvla(args.out, args.seed)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"tiny OpenVLA written to {path} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
