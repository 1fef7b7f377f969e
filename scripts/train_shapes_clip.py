#!/usr/bin/env python
"""Train the bundled ``models/shapes-clip`` checkpoint: a small CLIP on synthetic coloured shapes.

Runs offline on CPU in a few minutes (2 threads). Steps:

1. build a word-level ``CLIPTokenizer`` (byte-level characters plus one merged token per
   vocabulary word, so any text still tokenizes) and a small ``CLIPModel``
   (ViT 64x64, patch 8; text transformer; 64-d joint embedding);
2. generate training pairs with :mod:`zslabel.shapes` (seen colour-shape labels only, random
   caption templates) and preprocess them with the very ``CLIPImageProcessorPil`` that is saved
   with the checkpoint, so the pipeline's preprocessing reproduces training;
3. train with the CLIP contrastive loss (Radford et al. 2021, eq. in Fig. 3), except that captions
   of the same label in a batch count as positives (soft targets spread over them), since with
   38 labels a batch of 128 always repeats labels;
4. evaluate zero-shot top-1 over all 48 labels with the pipeline's default template
   ``"This is a photo of {}."`` on fresh held-out-combination images and fresh seen images;
5. ``save_pretrained`` model, tokenizer and image processor to ``--out`` with a model card, and
   write the small example folder ``--examples``.

Usage::

    python scripts/train_shapes_clip.py            # writes models/shapes-clip and examples/shapes
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel,  # noqa: E402
                          CLIPTokenizer)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zslabel import shapes  # noqa: E402
from zslabel.tiny import _bytes_to_unicode  # noqa: E402

IMAGE_SIZE = 64
MAX_TEXT_LEN = 77
PATCH = 16


def build_tokenizer() -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose BPE merges turn every word of the shapes vocabulary into one token.

    The base vocabulary is CLIP's 256 byte-level characters, each also with the end-of-word
    suffix ``</w>``, so unknown words fall back to characters. Merges are added left to right
    for each vocabulary word until every word tokenizes to exactly one ``word</w>`` token
    (iterated because an earlier word's merge can pre-empt a later word's chain).

    Raises:
        RuntimeError: if some word does not end up as one token.
    """
    words: list[str] = []
    for text in list(shapes.COLOURS) + list(shapes.SHAPES) + list(shapes.TRAIN_TEMPLATES) + [shapes.EVAL_TEMPLATE]:
        for w in text.lower().replace("{}", " ").replace(".", " ").split():
            if w not in words:
                words.append(w)
    chars = list(_bytes_to_unicode().values())
    base = chars + [c + "</w>" for c in chars]
    merged: list[str] = []
    merges: list[tuple[str, str]] = []

    def make() -> CLIPTokenizer:
        tokens = base + merged + ["<|startoftext|>", "<|endoftext|>"]
        return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges),
                             model_max_length=MAX_TEXT_LEN)

    for _ in range(20):
        tok = make()
        pending = [(w, tok.tokenize(w)) for w in words]
        pending = [(w, p) for w, p in pending if len(p) > 1]
        if not pending:
            return tok
        for _, pieces in pending:
            cur = pieces[0]
            for p in pieces[1:]:
                merges.append((cur, p))
                cur += p
                if cur not in merged:
                    merged.append(cur)
    raise RuntimeError(f"words not single tokens after 20 rounds: {[w for w, _ in pending]}")


def build_model(tok: CLIPTokenizer, seed: int) -> CLIPModel:
    """A small ``CLIPModel``: ViT 64x64/8 (4 layers, width 128), text 3 layers width 128, 64-d."""
    vocab = len(tok)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    bos = tok.convert_tokens_to_ids("<|startoftext|>")
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
                     "num_hidden_layers": 3, "max_position_embeddings": MAX_TEXT_LEN,
                     "vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos,
                     "pad_token_id": eos},
        vision_config={"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4,
                       "num_hidden_layers": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH},
        projection_dim=64,
    )
    model = CLIPModel(cfg)
    _init_sincos_positions(model)
    return model


def _init_sincos_positions(model: CLIPModel) -> None:
    """Initialise the vision position embeddings to fixed 2-D sine-cosine values (still trained).

    Random position embeddings leave a from-scratch ViT blind to patch layout for many steps,
    and shape recognition is all layout; sin-cos initialisation (MAE, He et al. 2021,
    ``get_2d_sincos_pos_embed``) gives it from step one. The class token's row is zero.
    """
    emb = model.vision_model.embeddings.position_embedding.weight  # (1 + g*g, width)
    width = emb.shape[1]
    g = int(round((emb.shape[0] - 1) ** 0.5))
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        ang = pos[:, None] * omega[None, :]
        parts += [torch.sin(ang), torch.cos(ang)]
    grid = torch.cat(parts, dim=1)  # (g*g, 4*quarter)
    table = torch.zeros_like(emb, dtype=torch.float64)
    table[1:, : grid.shape[1]] = grid
    with torch.no_grad():
        emb.copy_(table.to(emb.dtype))


def build_processor() -> CLIPImageProcessorPil:
    """Shortest-edge resize to 64 (bicubic) + 64x64 centre crop + CLIP mean/std normalisation."""
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def preprocess(proc: CLIPImageProcessorPil, images, chunk: int = 1024) -> torch.Tensor:
    """Run the checkpoint's processor over PIL images -> ``(N, 3, 64, 64)`` float32 tensor."""
    out = []
    for i in range(0, len(images), chunk):
        out.append(proc(images=images[i:i + chunk], return_tensors="pt")["pixel_values"])
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(model: CLIPModel, tok: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """``(len(texts), 64)`` float32 L2-normalised text embeddings."""
    enc = tok(texts, padding=True, return_tensors="pt")
    return F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)


@torch.no_grad()
def image_embeddings(model: CLIPModel, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``(N, 64)`` float32 L2-normalised image embeddings of ``(N, 3, 64, 64)`` pixel values."""
    parts = [model.get_image_features(pixel_values=pixels[i:i + batch]).pooler_output
             for i in range(0, len(pixels), batch)]
    return F.normalize(torch.cat(parts), dim=-1)


def zero_shot_top1(model: CLIPModel, tok: CLIPTokenizer, pixels: torch.Tensor,
                   labels: list[str]) -> float:
    """Top-1 accuracy over all 48 labels with the pipeline's default template."""
    cands = shapes.all_labels()
    model.eval()
    t = text_embeddings(model, tok, [shapes.EVAL_TEMPLATE.format(c) for c in cands])
    pred = (image_embeddings(model, pixels) @ t.T).argmax(-1)
    truth = torch.tensor([cands.index(lab) for lab in labels])
    return float((pred == truth).float().mean())


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and 90-degree rotation per batch: labels are invariant to both."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    k = int(torch.randint(4, (), generator=gen))
    return torch.rot90(x, k, (-2, -1)) if k else x


def caption_bank() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every training caption with the colour and shape it names.

    Returns:
        ``(texts, colour_ids, shape_ids)``: full captions (each :data:`shapes.TRAIN_TEMPLATES`
        with each seen label), colour-only captions and shape-only captions; ``colour_ids`` and
        ``shape_ids`` are ``(len(texts),)`` int64 indices into ``COLOURS`` / ``SHAPES``, -1 where
        the caption does not name one.
    """
    colours, shape_names = list(shapes.COLOURS), list(shapes.SHAPES)
    texts, cid, sid = [], [], []
    for label in shapes.seen_labels():
        c, s = label.split(" ")
        for t in shapes.TRAIN_TEMPLATES:
            texts.append(t.format(label)), cid.append(colours.index(c)), sid.append(shape_names.index(s))
    for c in colours:
        for t in shapes.COLOUR_TEMPLATES:
            texts.append(t.format(c)), cid.append(colours.index(c)), sid.append(-1)
    for s in shape_names:
        for t in shapes.SHAPE_TEMPLATES:
            texts.append(t.format(s)), cid.append(-1), sid.append(shape_names.index(s))
    return texts, torch.tensor(cid), torch.tensor(sid)


def train(model, tok, pixels, labels, *, steps, batch, lr, seed, max_seconds, partial=0.4,
          log_every=100, eval_fn=None):
    """Contrastive training; returns the number of steps actually run (stops at ``max_seconds``).

    Each image in a batch gets a random caption from :func:`caption_bank` that is true of it:
    with probability ``partial`` one naming only its colour or only its shape (half each),
    else a full one. Targets of the symmetric CLIP cross-entropy are spread uniformly over every
    batch pair whose caption is true of the image (a caption is true of an image when each
    attribute it names matches), so repeated labels and partial captions are never negatives.
    Partial captions teach the towers colour and shape as separate directions, which is what
    lets held-out combinations compose.

    ``eval_fn(model)``, when given, is called every ``log_every`` steps and its result logged.
    """
    colours, shape_names = list(shapes.COLOURS), list(shapes.SHAPES)
    img_c = torch.tensor([colours.index(lab.split(" ")[0]) for lab in labels])
    img_s = torch.tensor([shape_names.index(lab.split(" ")[1]) for lab in labels])
    texts, cap_c, cap_s = caption_bank()
    enc = tok(texts, padding=True, return_tensors="pt")  # pads to the longest caption
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # Candidate caption indices per (colour, shape) and kind, for fast sampling.
    full = {(c, s): torch.nonzero((cap_c == c) & (cap_s == s)).flatten()
            for c in range(len(colours)) for s in range(len(shape_names))}
    by_colour = [torch.nonzero((cap_c == c) & (cap_s == -1)).flatten() for c in range(len(colours))]
    by_shape = [torch.nonzero((cap_s == s) & (cap_c == -1)).flatten() for s in range(len(shape_names))]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    step = 0
    for step in range(1, steps + 1):
        idx = torch.randint(len(pixels), (batch,), generator=gen)
        x = augment(pixels[idx], gen)
        kind = torch.rand(batch, generator=gen)
        pick = torch.randint(1 << 30, (batch,), generator=gen)
        cap = []
        for k, u, r in zip(idx.tolist(), kind.tolist(), pick.tolist()):
            c, s = int(img_c[k]), int(img_s[k])
            pool = by_colour[c] if u < partial / 2 else by_shape[s] if u < partial else full[(c, s)]
            cap.append(int(pool[r % len(pool)]))
        cap = torch.tensor(cap)
        bc, bs = img_c[idx], img_s[idx]
        tc, ts = cap_c[cap], cap_s[cap]
        same = (((tc[None, :] == -1) | (tc[None, :] == bc[:, None]))
                & ((ts[None, :] == -1) | (ts[None, :] == bs[:, None]))).float()  # (image, caption)
        out = model(pixel_values=x, input_ids=ids[cap], attention_mask=mask[cap])
        logits = out.logits_per_image  # (image, caption)
        t_img = same / same.sum(1, keepdim=True)
        t_txt = (same / same.sum(0, keepdim=True)).T
        loss = 0.5 * (torch.sum(-t_img * F.log_softmax(logits, -1), -1).mean()
                      + torch.sum(-t_txt * F.log_softmax(logits.T, -1), -1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP paper: temperature capped at 100
        if step % log_every == 0 or step == 1:
            extra = ""
            if eval_fn is not None and step > 1:
                extra = f" eval {eval_fn(model)}"
                model.train()
            print(f"step {step}/{steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f} "
                  f"{time.time() - t0:.0f}s{extra}", flush=True)
        if time.time() - t0 > max_seconds:
            print(f"time budget reached at step {step}", flush=True)
            break
    model.eval()
    return step


def write_examples(folder: Path, seed: int) -> list[tuple[str, str]]:
    """Write 24 PNGs (all 10 held-out labels + 14 seen ones), labels.txt and ground_truth.csv."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    seen = shapes.seen_labels()
    picks = shapes.held_out_labels() + [seen[i] for i in sorted(rng.choice(len(seen), 14, replace=False))]
    rows = []
    for k, label in enumerate(picks):
        colour, shape = label.split(" ")
        img = shapes.render(colour, shape, np.random.default_rng([seed, k]), size=96)
        name = f"{colour}_{shape}_01.png"
        img.save(folder / name, optimize=True)
        rows.append((name, label))
    (folder / "labels.txt").write_text("\n".join(shapes.all_labels()) + "\n")
    with open(folder / "ground_truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return rows


MODEL_CARD = """# shapes-clip

A small CLIP (`transformers.CLIPModel`, {params:,} parameters, {mb:.1f} MB safetensors) trained
from scratch, offline, on synthetic images of coloured shapes. It exists so that zslabel's
README example and tests run a model with real zero-shot signal without any model hub. It knows
nothing outside this toy domain.

## Architecture

- vision: ViT, 64x64 input, patch 8, 4 layers, width 128, 4 heads
- text: 3-layer causal transformer, width 128, 4 heads, max 77 tokens
- joint embedding: 64-d; learned temperature `logit_scale` = {scale:.2f} (exp = {scale_exp:.1f})
- tokenizer: `CLIPTokenizer` over CLIP's byte-level characters plus BPE merges that make each
  word below a single token (any other text falls back to characters)
- image processor: `CLIPImageProcessorPil`, shortest edge 64 (bicubic), centre crop 64x64,
  CLIP mean/std; training used this very processor, so
  `transformers.pipeline("zero-shot-image-classification", model="models/shapes-clip")`
  reproduces the accuracies below

## Data and labels

Images from `zslabel/shapes.py` (deterministic): one filled shape, size 22-42% of the frame,
random position and rotation, jittered colour, on a solid / gradient / noise / texture
background kept away from the shape colour.

- colours (8): {colours}
- shapes (6): {shapes}
- labels: `"<colour> <shape>"`, 48 in all (`examples/shapes/labels.txt`)
- held out of training (10 of 48, never seen): {held_out}

## Training

{n_train:,} generated images of the 38 seen labels (seed {seed}), captions from random
templates ({templates}); random flips and 90-degree rotations. CLIP contrastive loss with
same-label captions in a batch counted as positives; AdamW (lr {lr}, weight decay 0.05, cosine
schedule with warm-up), batch {batch}, {steps} steps, torch CPU with 2 threads,
{train_s:.0f} s of training ({total_s:.0f} s for the whole script including data generation).
Reproduce with `python scripts/train_shapes_clip.py`.

## Zero-shot evaluation

Template `"This is a photo of {{}}."` (the pipeline default), top-1 over all 48 labels
(chance 2.1%), on freshly generated images (seed {eval_seed}):

| split | images | top-1 |
|---|---|---|
| held-out colour-shape combinations | {n_eval_held} | {acc_held:.1%} |
| seen combinations | {n_eval_seen} | {acc_seen:.1%} |

Pipeline check: the same held-out images through `transformers.pipeline` give {acc_pipe:.1%}
on the first {n_pipe}.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "shapes-clip")
    ap.add_argument("--examples", type=Path, default=ROOT / "examples" / "shapes")
    ap.add_argument("--n-train", type=int, default=30000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-train-seconds", type=float, default=300.0,
                    help="stop training early past this many seconds (wall clock)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    tok = build_tokenizer()
    model = build_model(tok, args.seed)
    proc = build_processor()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; tokenizer: {len(tok)} tokens", flush=True)

    train_set = shapes.generate(args.n_train, args.seed, "seen", IMAGE_SIZE)
    pixels = preprocess(proc, [s.image for s in train_set])
    labels = [s.label for s in train_set]
    del train_set
    print(f"data: {len(pixels)} images {tuple(pixels.shape)} in {time.time() - t_start:.0f}s", flush=True)

    t_train = time.time()
    steps = train(model, tok, pixels, labels, steps=args.steps, batch=args.batch,
                  lr=args.lr, seed=args.seed, max_seconds=args.max_train_seconds)
    train_s = time.time() - t_train

    eval_seed = args.seed + 1000
    held = shapes.generate(500, eval_seed, "held_out", IMAGE_SIZE)
    seen = shapes.generate(500, eval_seed + 1, "seen", IMAGE_SIZE)
    acc_held = zero_shot_top1(model, tok, preprocess(proc, [s.image for s in held]), [s.label for s in held])
    acc_seen = zero_shot_top1(model, tok, preprocess(proc, [s.image for s in seen]), [s.label for s in seen])
    print(f"zero-shot top-1 over 48 labels: held-out {acc_held:.3f}, seen {acc_seen:.3f}", flush=True)

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    proc.save_pretrained(out)

    # Check that the saved folder, through the public pipeline, scores like the training code.
    from transformers import pipeline
    pipe = pipeline("zero-shot-image-classification", model=str(out), device="cpu")
    n_pipe = 100
    res = pipe([s.image for s in held[:n_pipe]], candidate_labels=shapes.all_labels())
    acc_pipe = float(np.mean([r[0]["label"] == s.label for r, s in zip(res, held[:n_pipe])]))
    print(f"pipeline top-1 on {n_pipe} held-out images: {acc_pipe:.3f}", flush=True)

    mb = (out / "model.safetensors").stat().st_size / 1e6
    total_s = time.time() - t_start
    card = MODEL_CARD.format(
        params=n_params, mb=mb, scale=model.logit_scale.item(), scale_exp=model.logit_scale.exp().item(),
        colours=", ".join(shapes.COLOURS), shapes=", ".join(shapes.SHAPES),
        held_out=", ".join(shapes.held_out_labels()), n_train=args.n_train, seed=args.seed,
        templates=", ".join(f'"{t}"' for t in shapes.TRAIN_TEMPLATES), lr=args.lr, batch=args.batch,
        steps=steps, train_s=train_s, total_s=total_s, eval_seed=eval_seed, n_eval_held=len(held),
        acc_held=acc_held, n_eval_seen=len(seen), acc_seen=acc_seen, acc_pipe=acc_pipe, n_pipe=n_pipe)
    (out / "README.md").write_text(card)
    (out / "training_metrics.json").write_text(json.dumps({
        "held_out_top1": acc_held, "seen_top1": acc_seen, "pipeline_held_out_top1": acc_pipe,
        "steps": steps, "train_seconds": round(train_s, 1), "total_seconds": round(total_s, 1),
        "n_train": args.n_train, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "safetensors_mb": round(mb, 2), "parameters": n_params}, indent=2) + "\n")
    write_examples(args.examples, args.seed + 2000)
    print(f"saved {out} ({mb:.1f} MB) and {args.examples}; total {total_s:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
