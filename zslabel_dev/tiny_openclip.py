"""Tiny random open_clip checkpoints built offline, in the hub layout.

Two shapes, both saved as ``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` (what
``hf-hub:`` repos hold, and what ``open_clip.create_model("local-dir:...")`` loads):

- ``"vit"``: open_clip's own ``CLIP`` (ViT image tower, causal text transformer) with the
  bundled BPE ``SimpleTokenizer`` (it ships inside open_clip, so nothing is downloaded).
  ``sigmoid=True`` adds ``init_logit_bias`` (a SigLIP-style head: sigmoid scores).
- ``"biomed"``: BiomedCLIP's shape: ``CustomTextCLIP`` with a timm ViT image tower
  (``timm_model_name``, ``timm_pool=""``, ``timm_proj="linear"``) and a BERT text tower through
  transformers (``hf_model_name``, ``hf_proj_type="mlp"``,
  ``hf_pooler_type="cls_last_hidden_state_pooler"``, context length 256), tokenized by a
  WordPiece ``BertTokenizerFast`` over a small ``vocab.txt`` (whole test words, and single
  characters for any other word) whose files lie in the checkpoint folder (as in BiomedCLIP's
  repo; open_clip's ``HFTokenizer`` loads them with ``AutoTokenizer``). The
  BERT config lies in the sub-folder ``hf_text/`` and ``hf_model_name`` is ``"hf_text"``: the
  checkpoint is self-contained (see ``zslabel.model_openclip``); open_clip itself resolves it
  from the current folder, so a reference load runs with the checkpoint as working folder.

Needs the ``open-clip`` extra (``scripts/setup.sh --open-clip``).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

__all__ = ["build_tiny_openclip", "in_folder", "OPENAI_MEAN", "OPENAI_STD"]

# BiomedCLIP's preprocess_cfg (the OpenAI CLIP statistics).
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
# A BERT vocabulary big enough to tokenize test prompts into distinct ids: special tokens,
# lowercase letters and digits (with ## continuations, so any word splits into characters), and
# a few whole words.
_WORDS = ["this", "is", "a", "photo", "of", "the", "cat", "dog", "bird", "car", "red", "tree", "chest",
          "x", "ray", "scan", "tissue", "cell", "."]


@contextmanager
def in_folder(path: str | Path):
    """Run a block with ``path`` as the working folder (open_clip resolves ``hf_model_name`` from it)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _write_bert_tokenizer(out: Path, max_length: int) -> int:
    """Write a lowercase WordPiece tokenizer (vocab.txt + tokenizer files) to ``out``; return its size.

    The ``tokenizers`` backend is built here over the vocabulary (BERT's normaliser, pre-tokenizer
    and ``[CLS] ... [SEP]`` template) and saved through ``BertTokenizerFast``: transformers 5's
    ``BertTokenizerFast(vocab_file=...)`` ignores the file and saves a ``tokenizer.json`` of the 5
    special tokens only, so every word of every prompt read back as ``[UNK]``. The saved files are
    read back as open_clip's ``HFTokenizer`` reads them (``AutoTokenizer``) and checked.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import AutoTokenizer, BertTokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    punct = list(".,'-/()")
    vocab = specials + punct + chars + [f"##{c}" for c in chars] + [w for w in _WORDS if w not in chars + punct]
    ids = {token: i for i, token in enumerate(vocab)}
    backend = Tokenizer(WordPiece(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    backend.decoder = decoders.WordPiece()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(tokenizer_object=backend, do_lower_case=True, model_max_length=max_length).save_pretrained(out)
    got = AutoTokenizer.from_pretrained(str(out))("This is a photo of the Cat.")["input_ids"]
    want = [ids[t] for t in ("[CLS]", "this", "is", "a", "photo", "of", "the", "cat", ".", "[SEP]")]
    if got != want:  # a transformers release that saves or loads these files differently
        raise RuntimeError(f"the tiny BERT tokenizer in {out} reads back as {got}, expected {want}")
    return len(vocab)


def build_tiny_openclip(out: str | Path, shape: str = "vit", *, seed: int = 0, image_size: int = 32,
                        sigmoid: bool = False, resize_mode: str | None = None,
                        interpolation: str | None = None) -> Path:
    """Build a random-weight open_clip checkpoint folder under ``out`` (hub layout).

    Args:
        out: folder to write (created).
        shape: ``"vit"`` (open_clip ``CLIP``, ViT + causal text transformer, BPE tokenizer) or
            ``"biomed"`` (BiomedCLIP's: timm ViT + BERT through transformers).
        seed: torch seed of the random weights (reproducible checkpoints).
        image_size: model input side in pixels (``"biomed"`` patches are 16 pixels, ``"vit"`` 8).
        sigmoid: add a ``logit_bias`` (``init_logit_bias``): sigmoid scores, as SigLIP.
        resize_mode, interpolation: written to ``preprocess_cfg`` when given (open_clip's
            defaults otherwise: ``"shortest"``, ``"bicubic"``).

    Returns:
        ``Path(out)``, loadable with ``open_clip.create_model_from_pretrained("local-dir:" + out)``
        (for ``"biomed"``: with ``out`` as the working folder, see ``in_folder``) and by zslabel.

    Raises:
        ValueError: unknown ``shape``.
    """
    import torch
    from open_clip.model import CLIP, CustomTextCLIP

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": OPENAI_MEAN, "std": OPENAI_STD}
    if resize_mode:
        preprocess["resize_mode"] = resize_mode
    if interpolation:
        preprocess["interpolation"] = interpolation
    torch.manual_seed(seed)
    if shape == "vit":
        model_cfg = {
            "embed_dim": 16,
            "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "head_width": 16,
                           "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        }
        if sigmoid:
            model_cfg["init_logit_bias"] = -2.0
        model = CLIP(**model_cfg)
    elif shape == "biomed":
        context = 256
        size = _write_bert_tokenizer(out, context)
        from transformers import BertConfig

        BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=context, pad_token_id=0
                   ).save_pretrained(out / "hf_text")
        model_cfg = {
            "embed_dim": 16,
            # timm's test_vit: a ViT with tiny widths (BiomedCLIP: vit_base_patch16_224).
            "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": image_size},
            "text_cfg": {"hf_model_name": "hf_text", "hf_tokenizer_name": "hf_text", "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": context},
        }
        if sigmoid:
            model_cfg["init_logit_bias"] = -2.0
        build_text = {**model_cfg["text_cfg"], "hf_model_name": str(out / "hf_text"), "hf_model_pretrained": False}
        model = CustomTextCLIP(**{**model_cfg, "text_cfg": build_text})
    else:
        raise ValueError(f"unknown shape {shape!r}; expected 'vit' or 'biomed'")
    with torch.no_grad():
        # Spread the scale so that scores are not uniform (init is log(1/0.07)). The tiny random
        # BERT's prompt embeddings lie close together (labels' scores ~3e-4 apart at 2.0, barely
        # over the parity tests' 1e-4): log(100), BiomedCLIP's trained scale, spreads them ~13x.
        model.logit_scale.fill_(math.log(100.0) if shape == "biomed" else 2.0)
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                          indent=2))
    return out
