"""The transformers model family: checkpoints with a ``config.json`` naming a ``model_type``
(CLIP, SigLIP, SigLIP 2, any dual encoder with ``get_image_features``/``get_text_features``),
loaded with transformers' Auto classes. No Ray here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .decode import PreprocessSpec
from .errors import ModelLoadError
from .model_base import TRANSFORMERS, ZeroShotModel
from .ranking import SIGMOID, SOFTMAX

# transformers' pipeline pads SigLIP prompts to this length (zero_shot_image_classification.py).
SIGLIP_TEXT_LENGTH = 64


class TransformersModel(ZeroShotModel):
    """A Hugging Face ``transformers`` checkpoint (``config.json``) ready for zero-shot classification.

    Holds the model (both towers), tokenizer and the preprocessing facts of its image
    processor. ``score_kind`` is ``"sigmoid"`` for SigLIP-family checkpoints (model_type contains
    "siglip") and ``"softmax"`` otherwise, as in transformers' zero-shot pipeline.

    Raises:
        ModelLoadError: the folder cannot be loaded by transformers' Auto classes, or the model
            has no ``get_image_features``/``get_text_features`` (not a dual encoder).
    """

    def __init__(self, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 **spec_overrides):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from .quiet import no_transformers_progress

        self.path = Path(path)
        try:
            with no_transformers_progress():  # a local folder: nothing to watch, one bar per actor
                self.model = AutoModel.from_pretrained(self.path, dtype=dtype).to(device).eval()
                self.tokenizer = AutoTokenizer.from_pretrained(self.path)
                processor = AutoImageProcessor.from_pretrained(self.path)
        except Exception as exc:  # noqa: BLE001
            # The first line only: an Auto class that finds no tokenizer lists every model type
            # it knows (~300 names) on the next.
            raise ModelLoadError(f"cannot load checkpoint at {self.path}: {type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                                 f"{_missing_tokenizer_hint(self.path)}") from exc
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ModelLoadError(f"{self.path} ({type(self.model).__name__}) is not a CLIP-family dual encoder")
        _check_tokenizer(self.tokenizer, self.model.config, self.path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_type: str = self.model.config.model_type
        self.library, self.architecture = TRANSFORMERS, type(self.model).__name__
        self.score_kind = SIGMOID if "siglip" in self.model_type else SOFTMAX
        try:
            self.preprocess = PreprocessSpec.from_image_processor(processor, **spec_overrides)
        except ValueError as exc:
            raise ModelLoadError(f"unsupported image processor in {self.path}: {exc}") from exc
        # Rescale + normalise run on the device, so only uint8 pixels travel between stages.
        mean = processor.image_mean if processor.do_normalize else [0.0, 0.0, 0.0]
        std = processor.image_std if processor.do_normalize else [1.0, 1.0, 1.0]
        self._set_normalisation(mean, std, float(processor.rescale_factor) if processor.do_rescale else 1.0)

    @property
    def max_text_length(self) -> int:
        """Longest prompt in tokens the text tower accepts (its position embeddings)."""
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        limit = int(getattr(text_cfg, "max_position_embeddings", 77))
        if self.score_kind == SIGMOID:
            limit = min(limit, SIGLIP_TEXT_LENGTH)
        return limit

    def prompt_token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt (special tokens included, no truncation, no padding)."""
        return [list(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]

    def _tokenize(self, prompts: list[str]):
        # Same tokenizer arguments as transformers' zero-shot pipeline, so embeddings match it.
        if self.score_kind == SIGMOID:
            kw = {"padding": "max_length", "max_length": SIGLIP_TEXT_LENGTH, "truncation": True}
        else:
            kw = {"padding": True}
        return self.tokenizer(prompts, return_tensors="pt", **kw).to(self.device)

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        feats = self.model.get_text_features(**self._tokenize(prompts))
        return getattr(feats, "pooler_output", feats)  # transformers 5 returns a ModelOutput

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.model.get_image_features(pixel_values=pixel_values)
        return getattr(feats, "pooler_output", feats)


# Files transformers reads a tokenizer from (one of them at least, by tokenizer type).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")
_COPY_TOKENIZER = ("copy tokenizer.json and tokenizer_config.json (or vocab.json and merges.txt, or spiece.model) "
                   "from the original checkpoint")


def _missing_tokenizer_hint(path: Path) -> str:
    """What to do when ``path`` holds none of ``TOKENIZER_FILES`` (a SigLIP folder without them
    fails to load at all; a CLIP one gets a stand-in, see :func:`_check_tokenizer`); else ""."""
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return ""
    return f" ({path} holds no tokenizer files: {_COPY_TOKENIZER})"


def _check_tokenizer(tokenizer, config, path: Path) -> None:
    """Refuse a tokenizer far smaller than the text tower's vocabulary.

    Without its tokenizer files a folder still loads: transformers builds a stand-in tokenizer
    of a few special tokens (huggingface/transformers#45538), every prompt becomes the same
    unknown tokens and every image gets equal scores for all labels, exit 0. Half the text
    tower's ``vocab_size`` is the bound: real tokenizers fill it (CLIP 49,408 of 49,408; some
    checkpoints pad the embedding a little beyond the tokenizer).

    Raises:
        ModelLoadError: naming both sizes and the files a tokenizer is read from.
    """
    text_cfg = getattr(config, "text_config", config)
    vocab = getattr(text_cfg, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) * 2 < vocab:
        raise ModelLoadError(
            f"the tokenizer of {path} knows {len(tokenizer)} tokens, its text tower {vocab}: its tokenizer files "
            f"are missing or wrong (without them transformers makes a stand-in that reads every label alike); "
            f"{_COPY_TOKENIZER}")
