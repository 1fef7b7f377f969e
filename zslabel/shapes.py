"""Deterministic synthetic "coloured shapes" images for the bundled ``models/shapes-clip`` model.

Every image shows one filled shape of one colour on a background (solid, two-colour gradient,
noise or a stripe/checker/wave texture) with varied size, position and rotation. Its label is
``"<colour> <shape>"`` (e.g. ``"red circle"``) and its training caption puts the label in a random
template (e.g. ``"a photo of a red circle"``).

Vocabularies:

* colours (8): ``red green blue yellow purple orange white black``
* shapes (6): ``circle square triangle star cross ring``

That gives 48 colour-shape labels. :data:`HELD_OUT` lists 10 of them (about 21%) that the model
never sees in training; every colour and every shape still occurs in training with other
partners, so classifying a held-out image correctly needs the colour and the shape to be
recognised separately and composed (compositional zero-shot).

The same ``seed`` always gives the same images (numpy ``default_rng`` + Pillow drawing, no
global state), so tests can regenerate exactly what the model card describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "SHAPES", "HELD_OUT", "TRAIN_TEMPLATES", "COLOUR_TEMPLATES", "SHAPE_TEMPLATES",
    "EVAL_TEMPLATE", "ShapeSample",
    "all_labels", "seen_labels", "held_out_labels", "render", "generate",
]

#: Canonical RGB of each colour word; rendered colours jitter around these (see :func:`render`).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

#: Shape words, in label order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")

#: (colour, shape) pairs never used for training: 10 of 48 (about 21%). Each colour is held out
#: at most twice and each shape at most twice, so all words keep several training partners.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("red", "triangle"), ("green", "star"), ("blue", "circle"), ("yellow", "cross"),
    ("purple", "ring"), ("orange", "square"), ("white", "circle"), ("black", "cross"),
    ("green", "ring"), ("blue", "square"),
})

#: Caption templates drawn at random for training captions.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}", "a {}", "a drawing of a {}", "a picture of a {}", "an image of a {}",
    "a {} on a background", "a small {}", "a big {}", "this is a {}", "a rendering of a {}",
)

#: Partial-caption templates naming only the colour: true of every shape of that colour.
COLOUR_TEMPLATES: tuple[str, ...] = (
    "a {} shape", "something {}", "a photo of something {}", "a {} object",
)

#: Partial-caption templates naming only the shape: true of that shape in every colour.
SHAPE_TEMPLATES: tuple[str, ...] = (
    "a {}", "a photo of a {}", "a drawing of a {}", "a shape that is a {}",
)

#: Template used for zero-shot evaluation; the default of transformers'
#: zero-shot-image-classification pipeline.
EVAL_TEMPLATE = "This is a photo of {}."

_SPLITS = ("seen", "held_out", "all")


def all_labels() -> list[str]:
    """All 48 labels ``"<colour> <shape>"``, colour-major in vocabulary order."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def seen_labels() -> list[str]:
    """The 38 training labels (all labels minus :data:`HELD_OUT`), in :func:`all_labels` order."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]


def held_out_labels() -> list[str]:
    """The 10 held-out labels, in :func:`all_labels` order."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES if (c, s) in HELD_OUT]


@dataclass(frozen=True)
class ShapeSample:
    """One generated example.

    Attributes:
        image: RGB ``PIL.Image`` of ``size x size`` pixels (uint8 per channel).
        label: ``"<colour> <shape>"``, e.g. ``"red circle"``.
        caption: training caption, e.g. ``"a photo of a red circle"``.
    """

    image: Image.Image
    label: str
    caption: str


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    # Per-channel jitter small enough that neighbours (red/orange, blue/purple) stay apart.
    return np.clip(np.asarray(rgb, float) + rng.uniform(-22, 22, 3), 0, 255)


def _background_colour(fg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Muted random colour at least 150 RGB units from the shape colour, so the shape is visible
    # and the background never passes for the shape's colour.
    for _ in range(100):
        c = rng.uniform(0, 255, 3)
        grey = c.mean()
        c = grey + (c - grey) * rng.uniform(0.2, 0.8)
        if np.linalg.norm(c - fg) > 150:
            return c
    return 255.0 - fg


def _background(side: int, fg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A ``(side, side, 3)`` float64 background in [0, 255] kept away from colour ``fg``."""
    # Solid and gradient backgrounds are most common; noise and textures, whose edges compete
    # with the shape's outline, are a fifth each.
    kind = rng.choice(4, p=[0.3, 0.3, 0.2, 0.2])
    a = _background_colour(fg, rng)
    y, x = np.mgrid[0:side, 0:side] / max(side - 1, 1)
    if kind == 0:  # solid
        return np.broadcast_to(a, (side, side, 3)).copy()
    if kind == 1:  # linear gradient between two colours along a random direction
        b = _background_colour(fg, rng)
        t = rng.uniform(0, 2 * math.pi)
        u = x * math.cos(t) + y * math.sin(t)
        u = (u - u.min()) / max(np.ptp(u), 1e-6)
        return a * (1 - u[..., None]) + b * u[..., None]
    if kind == 2:  # Gaussian noise around one colour
        return a + rng.normal(0, rng.uniform(8, 30), (side, side, 3))
    # texture: stripes, checker or waves mixing two colours
    b = _background_colour(fg, rng)
    f = rng.uniform(2, 7)
    t = rng.uniform(0, 2 * math.pi)
    sub = rng.integers(3)
    if sub == 0:
        m = (np.sin(2 * math.pi * f * (x * math.cos(t) + y * math.sin(t))) > 0).astype(float)
    elif sub == 1:
        m = ((np.floor(x * f) + np.floor(y * f)) % 2).astype(float)
    else:
        m = 0.5 + 0.5 * np.sin(2 * math.pi * f * x) * np.cos(2 * math.pi * f * y + t)
    return a * (1 - m[..., None]) + b * m[..., None]


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        radii, n = [r] * 4, 4
    elif shape == "triangle":
        radii, n = [r] * 3, 3
    elif shape == "star":
        radii, n = [r, 0.42 * r] * 5, 10
    elif shape == "cross":
        # Plus sign: 12 corners, arm half-width w, arm length r.
        w = 0.34 * r
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in pts]
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    return [(cx + rad * math.cos(rot + 2 * math.pi * k / n), cy + rad * math.sin(rot + 2 * math.pi * k / n))
            for k, rad in enumerate(radii)]


def render(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Draw one ``colour`` ``shape`` on a random background.

    Args:
        colour: a key of :data:`COLOURS`.
        shape: one of :data:`SHAPES`.
        rng: source of all randomness (background, colour jitter, size, position, rotation).
        size: output side in pixels.

    Returns:
        RGB ``PIL.Image`` of ``size x size``. The shape's circumradius is 22-42% of ``size``
        and its centre keeps at least 70% of that radius inside the frame. The shape mask is
        drawn at 2x and box-downsampled, so edges are anti-aliased.

    Raises:
        ValueError: for an unknown colour or shape.
    """
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour/shape {colour!r}/{shape!r}")
    ss = 2 * size
    fg = _jitter_colour(COLOURS[colour], rng)
    bg = _background(size, fg, rng)
    r = rng.uniform(0.22, 0.42) * ss
    margin = 0.7 * r
    cx, cy = rng.uniform(margin, ss - margin, 2)
    rot = rng.uniform(0, 2 * math.pi)
    # The mask alone is drawn at 2x and box-downsampled: anti-aliased edges at a quarter of the
    # cost of compositing at 2x.
    mask = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = 0.55 * r
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=255)
    mask = mask.resize((size, size), Image.Resampling.BOX)
    m = np.asarray(mask, np.float32)[..., None] / 255.0
    # A little shading noise on the shape so it is not a flat colour either.
    fg_img = fg + rng.normal(0, 6, (size, size, 3))
    img = np.clip(bg * (1 - m) + fg_img * m, 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def generate(n: int, seed: int, split: str = "seen", size: int = 64) -> list[ShapeSample]:
    """Generate ``n`` samples deterministically.

    Args:
        n: number of samples.
        seed: seed of the numpy generator; same ``(n, seed, split, size)`` -> same samples.
        split: ``"seen"`` (labels of :func:`seen_labels`, for training), ``"held_out"``
            (labels of :func:`held_out_labels`) or ``"all"`` (all 48 labels). Labels are cycled
            in order so every label of the split gets ``n // len(split)`` or one more samples.
        size: image side in pixels.

    Returns:
        ``n`` :class:`ShapeSample` with captions from a random :data:`TRAIN_TEMPLATES` entry.

    Raises:
        ValueError: for an unknown ``split`` or ``n < 0``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    labels = {"seen": seen_labels, "held_out": held_out_labels, "all": all_labels}[split]()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = labels[i % len(labels)]
        colour, shape = label.split(" ")
        image = render(colour, shape, rng, size)
        caption = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))].format(label)
        out.append(ShapeSample(image, label, caption))
    return out
