"""Tiny CLIP and SigLIP checkpoints built offline (random weights, small configs).

Tests, benchmarks and the GPU smoke script use these so that nothing ever reaches a model hub.
The tokenizer is a byte-level ``CLIPTokenizer`` with no merges (one token per character),
saved in the standard files; it tokenizes any text, which is all a random-weight model needs.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["build_tiny_checkpoint", "VIT_B32_CLIP_CONFIG", "TINY_VIT_L14_336_CONFIG"]

# Published architecture of openai/clip-vit-base-patch32 (its config.json), so benchmarks run
# the real arithmetic with random weights.
VIT_B32_CLIP_CONFIG = {
    "text_config": {
        "hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
        "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
        "projection_dim": 512,
    },
    "vision_config": {
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
        "num_hidden_layers": 12, "image_size": 224, "patch_size": 32, "projection_dim": 512,
    },
    "projection_dim": 512,
    "logit_scale_init_value": 2.6592,
}


# openai/clip-vit-large-patch14-336's input geometry (336-pixel images, 14-pixel patches: 24 x 24
# patches + class token; its processor resizes the shortest edge to 336 and centre-crops 336) with
# tiny widths, so a test runs that geometry end to end in seconds.
TINY_VIT_L14_336_CONFIG = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                    "num_hidden_layers": 2, "max_position_embeddings": 77},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                      "num_hidden_layers": 2, "image_size": 336, "patch_size": 14},
    "projection_dim": 16,
}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-to-unicode table: every byte maps to a printable character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _write_tokenizer(out: Path, max_length: int) -> int:
    """Write a character-level CLIP BPE tokenizer to ``out``; return its vocabulary size."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    tok.save_pretrained(out)
    return len(vocab)


def build_tiny_checkpoint(out: str | Path, family: str = "clip", *, seed: int = 0,
                          image_size: int = 32, config: dict | None = None) -> Path:
    """Build a random-weight checkpoint in Hugging Face format under ``out``.

    Args:
        out: folder to write (created). Holds ``config.json``, weights, tokenizer and
            image-processor files, loadable with ``AutoModel.from_pretrained(out)`` and by
            ``transformers.pipeline("zero-shot-image-classification", model=out)``.
        family: ``"clip"`` (softmax scores, shortest-edge resize + centre crop, bicubic) or
            ``"siglip"`` (sigmoid scores, ``logit_bias``, square bilinear resize).
        seed: torch seed for the random weights, so the checkpoint is reproducible.
        image_size: model input side in pixels.
        config: optional full CLIP config dict (e.g. ``VIT_B32_CLIP_CONFIG``) replacing the tiny one.

    Returns:
        ``Path(out)``.

    Raises:
        ValueError: for an unknown ``family``.
    """
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, SiglipConfig,
                              SiglipImageProcessorPil, SiglipModel)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    max_len = 77 if family == "clip" else 64
    vocab_size = _write_tokenizer(out, max_len)
    torch.manual_seed(seed)
    if family == "clip":
        cfg = config or {
            "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                            "num_hidden_layers": 2, "max_position_embeddings": max_len},
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                              "num_hidden_layers": 2, "image_size": image_size, "patch_size": 8},
            "projection_dim": 16,
        }
        cfg = json.loads(json.dumps(cfg))
        cfg["text_config"].update(vocab_size=vocab_size, bos_token_id=vocab_size - 2,
                                  eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
        if config is not None:
            cfg["text_config"]["max_position_embeddings"] = max_len
        model = CLIPModel(CLIPConfig(**cfg))
        side = cfg["vision_config"]["image_size"]
        proc = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    elif family == "siglip":
        model = SiglipModel(SiglipConfig(
            text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                         "num_hidden_layers": 2, "max_position_embeddings": max_len,
                         "vocab_size": vocab_size, "pad_token_id": vocab_size - 1,
                         "eos_token_id": vocab_size - 1, "bos_token_id": vocab_size - 2},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                           "num_hidden_layers": 2, "image_size": image_size, "patch_size": 8},
        ))
        proc = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    else:
        raise ValueError(f"unknown family {family!r}; expected 'clip' or 'siglip'")
    with torch.no_grad():
        # Random init leaves logit_scale at its init value; spread it so scores are not uniform.
        model.logit_scale.fill_(2.0)
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(-1.0)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out
