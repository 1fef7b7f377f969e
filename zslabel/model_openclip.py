"""The open_clip model family: checkpoints loaded by the ``open_clip_torch`` library.

BiomedCLIP (``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``: a timm ViT-B/16 image
tower and a PubMedBERT text tower through transformers) and the open_clip zoo (LAION, DFN,
MetaCLIP, EVA, ConvNeXt, SigLIP ports). Needs the ``open-clip`` extra (``scripts/setup.sh
--open-clip``); this module imports ``open_clip`` only inside functions, so the default install
never needs it.

``--model`` values of this family (``zslabel.model.resolve_checkpoint`` turns each into a local
folder holding ``open_clip_config.json`` and the weights):

- a local folder (or an fsspec URI of one, copied once per node by ``zslabel.model``) with
  ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
  ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors`` (the hub layout);
- ``hf-hub:ORG/NAME``: downloaded once per machine into the Hugging Face cache;
- ``ARCH:pretrained_tag`` (``ViT-B-32:laion2b_s34b_b79k``, ``open_clip.list_pretrained()``):
  open_clip downloads the weights into its cache, and zslabel writes a folder
  ``<zslabel cache>/open_clip/ARCH-tag`` with the architecture's config, the tag's
  preprocessing and a link to the weights, so every later step sees one kind of folder. A tag
  trained with QuickGELU (``quick_gelu`` in its pretrained config: the openai tags) runs with
  QuickGELU, as ``ARCH-quickgelu:tag`` does in open_clip.

Loading, tokenizer, towers and ``logit_scale``/``logit_bias`` are open_clip's own
(``create_model``, ``get_tokenizer``, ``encode_image``/``encode_text``). Preprocessing is read
from the model's preprocess config (``open_clip.get_model_preprocess_cfg``: size,
``resize_mode``, interpolation, mean/std) into a ``PreprocessSpec`` that zslabel's decode stage
applies with Pillow, exactly as open_clip's torchvision transform does for RGB images
(``Resize`` = Pillow resize, ``CenterCrop`` with torchvision's rounding): only uint8 pixels at
model size leave the decode tasks.

One zslabel extension: a BERT-style text tower's ``hf_model_name`` may be a sub-folder of the
checkpoint (``"hf_text"``), so a checkpoint copied from object storage is self-contained; open_clip
itself reads ``hf_model_name`` as a hub id or a path from the current folder.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .decode import PreprocessSpec
from .errors import ModelLoadError
from .model_base import CHECKPOINT_PATTERNS, OPEN_CLIP, OPEN_CLIP_CONFIG, ZeroShotModel, cache_root
from .ranking import SIGMOID, SOFTMAX

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
# The one command that installs this family's dependencies in a checkout.
INSTALL_COMMAND = "scripts/setup.sh --open-clip"
# ARCH:tag; an architecture name has more than one character, so 'C:\\x' (a Windows drive) is not one.
_ARCH_TAG = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.+-]+):([A-Za-z0-9][A-Za-z0-9_.+-]*)$")
# Files that mean "the tokenizer lies in this folder" (a hub-layout checkpoint such as BiomedCLIP).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
# Interpolations of open_clip's inference transform (transform.image_transform): 'random' is a
# training option that inference resolves to bicubic.
_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "random": Image.Resampling.BICUBIC}
_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def import_open_clip():
    """``import open_clip``, or ModelLoadError naming the one install command.

    Any exception counts: a torchvision that does not match torch fails with a RuntimeError
    ('operator torchvision::nms does not exist'), not an ImportError.
    """
    try:
        import open_clip
    except ImportError as exc:  # (a handler scripts/check_lock.py reads as "optional import")
        raise _not_installed(exc) from exc
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise _not_installed(exc) from exc
    return open_clip


def _not_installed(exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"this is an open_clip checkpoint, and open_clip cannot be imported here ({type(exc).__name__}: "
        f"{exc}). Install the open-clip extra with: {INSTALL_COMMAND}  (it builds .venv-openclip; run "
        "zslabel from there)")


def claims(model: str) -> bool:
    """Whether a ``--model`` value (not an existing path) names an open_clip checkpoint by its form:
    ``hf-hub:ORG/NAME`` or ``ARCH:pretrained_tag``. Needs no open_clip."""
    return model.startswith(HF_HUB_PREFIX) or _ARCH_TAG.match(model) is not None


def resolve(model: str, revision: str | None = None) -> Path:
    """The local checkpoint folder of ``hf-hub:ORG/NAME`` or ``ARCH:pretrained_tag``.

    Raises:
        ModelLoadError: open_clip is not installed (the message has the install command); the
            architecture or tag is unknown (the message names close matches); the download failed.
    """
    open_clip = import_open_clip()
    if model.startswith(HF_HUB_PREFIX):
        repo = model[len(HF_HUB_PREFIX):]
        if repo.count("/") != 1:
            raise ModelLoadError(f"--model {model!r}: expected hf-hub:ORG/NAME")

        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "cannot load"
            raise ModelLoadError(f"cannot download model {repo!r} from the Hugging Face hub "
                                 f"({type(exc).__name__}: {exc}); check network/HF_HUB_OFFLINE") from exc
        if not (path / OPEN_CLIP_CONFIG).is_file():
            raise ModelLoadError(f"hub repo {repo} has no {OPEN_CLIP_CONFIG}: not an open_clip checkpoint "
                                 f"(for a transformers checkpoint pass --model {repo})")
        _fetch_hf_text_config(path)
        return path
    match = _ARCH_TAG.match(model)
    assert match is not None, model  # only called for values claims() accepts
    arch, tag = match.groups()
    return _pretrained_folder(open_clip, arch, tag)


def _close(word: str, choices: list[str]) -> str:
    """' (close matches: a, b, c)' or '' from difflib."""
    matches = difflib.get_close_matches(word, choices, n=5, cutoff=0.5)
    if not matches:
        lowered = {c.lower(): c for c in choices}
        matches = [lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), n=5, cutoff=0.5)]
    return f" (close matches: {', '.join(matches)})" if matches else ""


def _pretrained_folder(open_clip, arch: str, tag: str) -> Path:
    """Folder ``<cache>/open_clip/ARCH-tag`` for an open_clip pretrained tag (see the module docstring).

    Raises:
        ModelLoadError: unknown architecture or tag (with close matches), or a failed download.
    """
    from filelock import FileLock

    models = open_clip.list_models()
    if arch not in models:
        raise ModelLoadError(f"--model {arch}:{tag}: unknown open_clip architecture {arch!r}{_close(arch, models)}; "
                             "python -c 'import open_clip; print(open_clip.list_pretrained())' lists ARCH:tag pairs")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        hint = _close(tag, tags) or (f" (its tags: {', '.join(tags)})" if tags else " (it has no pretrained tags)")
        raise ModelLoadError(f"--model {arch}:{tag}: {arch} has no pretrained tag {tag!r}{hint}")
    dest = cache_root() / "open_clip" / re.sub(r"[^\w.+-]", "_", f"{arch}-{tag}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        done = dest / ".zslabel-complete"
        if done.exists():
            return dest
        try:
            weights = Path(open_clip.download_pretrained(cfg))
        except Exception as exc:  # noqa: BLE001 - hub and URL errors come in many types
            raise ModelLoadError(f"cannot download open_clip weights for {arch}:{tag} "
                                 f"({type(exc).__name__}: {exc}); check network/HF_HUB_OFFLINE") from exc
        if not weights.is_file():
            raise ModelLoadError(f"open_clip found no weights file for {arch}:{tag} (got {str(weights)!r})")
        dest.mkdir(exist_ok=True)
        # open_clip looks for *.safetensors, *.bin, *.pth in a folder (factory._find_checkpoint_in_dir).
        suffix = weights.suffix if weights.suffix in (".safetensors", ".bin") else ".pth"
        link = dest / f"open_clip_pytorch_model{suffix}"
        link.unlink(missing_ok=True)
        link.symlink_to(weights.resolve())
        preprocess = {k: v for k, v in cfg.items()
                      if k in ("size", "mean", "std", "interpolation", "resize_mode", "fill_color")}
        model_cfg = open_clip.get_model_config(arch)
        if cfg.get("quick_gelu"):
            # Weights trained with QuickGELU (the openai tags) run with it, as open_clip's
            # ARCH-quickgelu names do; create_model(ARCH, pretrained=tag) would only warn.
            model_cfg["quick_gelu"] = True
        config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess,
                  "zslabel": {"architecture": arch, "pretrained": tag}}
        (dest / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
        done.write_text(f"{arch}:{tag}")
    return dest


def _fetch_hf_text_config(path: Path) -> None:
    """Download the config of a hub text tower named in ``text_cfg.hf_model_name`` (BiomedCLIP:
    PubMedBERT) into the Hugging Face cache now, on the node that resolves the checkpoint, so that
    loading (in every actor) finds it there. A failure only logs: loading reports it."""
    try:
        name = json.loads((path / OPEN_CLIP_CONFIG).read_text())["model_cfg"]["text_cfg"].get("hf_model_name")
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not name or Path(name).exists() or (path / name).is_dir():
        return
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, allow_patterns=["config.json"])
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot fetch the config of text tower %s: %s", name, exc)


def preprocess_spec(cfg: dict, **overrides) -> PreprocessSpec:
    """open_clip's inference preprocessing (``get_model_preprocess_cfg``) as a ``PreprocessSpec``.

    ``resize_mode`` ``"shortest"`` with a square size is torchvision ``Resize(S)`` (shorter side to
    S, Pillow resize) + ``CenterCrop(S)`` (``crop_offset="round"``); ``"squash"`` is a resize to
    exactly (H, W). ``overrides`` replace fields afterwards (``max_pixels``, ``fast``, ...).

    Raises:
        ValueError: ``"longest"`` (resize-and-pad) mode, a non-square ``"shortest"`` size, a mode
            other than RGB, or an unknown interpolation.
    """
    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = cfg.get("resize_mode") or "shortest"
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"unsupported interpolation {interpolation!r}; expected one of {sorted(_INTERPOLATION)}")
    if cfg.get("mode", "RGB") != "RGB":
        raise ValueError(f"unsupported image mode {cfg.get('mode')!r}; expected RGB")
    resample = _INTERPOLATION[interpolation]
    spec: dict[str, Any]  # PreprocessSpec's keyword arguments, checked by its __post_init__
    if mode == "shortest" and h == w:
        spec = dict(resize_mode="shortest_edge", shortest_edge=h, crop_hw=(h, w), crop_offset="round")
    elif mode == "squash":
        spec = dict(resize_mode="exact", size_hw=(h, w))
    else:
        raise ValueError(f"unsupported open_clip preprocessing: resize_mode {mode!r} with size {size!r} "
                         "(supported: 'shortest' with a square size, 'squash')")
    spec.update(resample=resample)
    spec.update(overrides)
    return PreprocessSpec(**spec)


def _describe(model_cfg: dict, model) -> str:
    """A readable architecture name from a model config: the class and each tower's kind."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        v = f"timm:{vision['timm_model_name']}"
    else:
        v = (f"vit(width={vision.get('width')}, layers={vision.get('layers')}, patch={vision.get('patch_size')}, "
             f"image={vision.get('image_size')})")
    if text.get("hf_model_name"):
        t = f"hf:{text['hf_model_name']}"
    else:
        t = f"transformer(width={text.get('width')}, layers={text.get('layers')}, context={text.get('context_length')})"
    return f"{type(model).__name__}(vision={v}, text={t})"


class OpenClipModel(ZeroShotModel):
    """An open_clip checkpoint folder (``open_clip_config.json`` + weights) ready for zero-shot
    classification. The interface is ``ZeroShotModel``'s; ``zslabel.model.load_model(path)``
    returns one of these for such a folder.

    ``score_kind`` is ``"sigmoid"`` when the model has a ``logit_bias`` (SigLIP ports, built with
    ``init_logit_bias``) and ``"softmax"`` otherwise, as open_clip's own zero-shot recipe.
    ``dtype`` float16/bfloat16 use open_clip's mixed precision (``precision="fp16"``/``"bf16"``:
    LayerNorms stay float32).

    Raises:
        ModelLoadError: open_clip is not installed (install command in the message), the folder
            cannot be loaded by ``open_clip.create_model``, or its preprocessing is unsupported.
    """

    def __init__(self, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 **spec_overrides):
        open_clip = import_open_clip()
        self.path = Path(path).resolve()
        self.device = torch.device(device)
        self.dtype = dtype
        try:
            config = json.loads((self.path / OPEN_CLIP_CONFIG).read_text())
            model_cfg = config["model_cfg"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot read {self.path / OPEN_CLIP_CONFIG}: {type(exc).__name__}: {exc}") from exc
        arch = (config.get("zslabel") or {}).get("architecture")
        try:
            kwargs = {}
            text_cfg = model_cfg.get("text_cfg", {})
            local_text = text_cfg.get("hf_model_name") and (self.path / text_cfg["hf_model_name"]).is_dir()
            if local_text:
                # The zslabel extension (module docstring): a text tower inside the checkpoint.
                # create_model's keyword arguments replace model_cfg entries; no pretrained text
                # weights are loaded since the checkpoint holds them all.
                kwargs["text_cfg"] = {**text_cfg, "hf_model_name": str(self.path / text_cfg["hf_model_name"]),
                                      "hf_model_pretrained": False}
            self.model = open_clip.create_model(
                f"local-dir:{self.path}", precision=_PRECISION.get(dtype, "fp32"), device=self.device,
                require_pretrained=True, **kwargs).eval()
            self.tokenizer = self._load_tokenizer(open_clip, arch, text_cfg)
            pp_cfg = open_clip.get_model_preprocess_cfg(self.model)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - open_clip/timm/transformers raise many types
            raise ModelLoadError(f"cannot load open_clip checkpoint at {self.path}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        self.library = OPEN_CLIP
        self.architecture = arch or _describe(model_cfg, self.model)
        self.model_type = f"{OPEN_CLIP}:{self.architecture}"
        self.score_kind = SOFTMAX if getattr(self.model, "logit_bias", None) is None else SIGMOID
        try:
            self.preprocess = preprocess_spec(pp_cfg, **spec_overrides)
        except ValueError as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from exc
        # open_clip's ToTensor (/255) + Normalize(mean, std), on the device (only uint8 travels).
        self._set_normalisation(pp_cfg["mean"], pp_cfg["std"])

    def _load_tokenizer(self, open_clip, arch: str | None, text_cfg: dict):
        """open_clip's tokenizer for this checkpoint.

        An ``ARCH:tag`` folder uses ``get_tokenizer(ARCH)`` (it picks SigLIP's tokenizers by
        name); a folder with tokenizer files uses ``get_tokenizer("local-dir:...")`` (open_clip
        reads them from the folder, as BiomedCLIP's repo holds them); a folder without them whose
        config names ``hf_tokenizer_name`` loads that tokenizer as ``hf-hub:`` loading would.
        """
        if arch:
            return open_clip.get_tokenizer(arch)
        hf_name = text_cfg.get("hf_tokenizer_name")
        if hf_name and not any((self.path / f).is_file() for f in _TOKENIZER_FILES):
            HFTokenizer = open_clip.tokenizer.HFTokenizer
            source = str(self.path / hf_name) if (self.path / hf_name).is_dir() else hf_name
            return HFTokenizer(source, context_length=text_cfg.get("context_length", 77),
                               tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))
        return open_clip.get_tokenizer(f"local-dir:{self.path}")

    @property
    def max_text_length(self) -> int:
        """The tokenizer's context length (open_clip pads and truncates every prompt to it)."""
        return int(getattr(self.tokenizer, "context_length", None) or 77)

    def prompt_token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt with its special tokens, untruncated and unpadded, as the
        tokenizer would produce before cutting to ``max_text_length`` (for the length check)."""
        hf = getattr(self.tokenizer, "tokenizer", None)
        if hf is not None:  # HFTokenizer / SigLipTokenizer wrap a transformers tokenizer
            clean = getattr(self.tokenizer, "clean_fn", lambda t: t)
            return [list(ids) for ids in hf([clean(p) for p in prompts], truncation=False)["input_ids"]]
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        return [[sot, *self.tokenizer.encode(p), eot] for p in prompts]

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        # open_clip's recipe: tokenizer(texts) -> (N, context_length) ids -> encode_text.
        return self.model.encode_text(self.tokenizer(prompts).to(self.device))

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)
