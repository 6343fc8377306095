"""Procedural captioned shapes: one coloured shape on a flat coloured background.

Every sample is a :class:`ShapeSpec` (colour, shape, size, position, background plus a small
jitter of position and scale) rendered anti-aliased by :func:`render` and described by one of a
few caption templates, e.g. ``"a small red circle at the top left on a blue background"``.
:func:`parse_caption` reads any caption (or a hand-written prompt using the same words) back
into a :class:`PartialSpec`, which is what ``shape_checker.score`` compares an image against.

Held-out split (used to prove prompt following, :func:`heldout_prompts`): about 10% of the
full attribute combinations ``(colour, shape, size, position, background)`` are held out
*entirely* (:func:`is_heldout`, a stable hash of the combination); training draws never contain
them and held-out prompts contain only them, drawn from a separate seed stream. Every single
attribute value, and every pair of values, still occurs in training; only the exact 5-way
combination is new. The split is symmetric under left/right mirroring, so a flip augmentation
can never move a training sample into the held-out split.

Geometry (fractions of the image side): the shape's bounding box is ``s x s`` with
``s`` = 0.12 / 0.18 / 0.26 for small / medium / large, times a jitter in [0.94, 1.06]; its
centre is at the grid point 0.2 / 0.5 / 0.8 of its cell plus a jitter of at most 0.04 on each
axis.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Collection
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 25, 25),
    "orange": (250, 135, 0),
    "yellow": (250, 230, 50),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "purple": (135, 35, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
"""Named colours; the closest pair (orange, yellow) is 107 apart in RGB (0-255)."""

COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""No star: a small star blurred by 1 px reads as a circle, so it could not be checked."""
SIZES: tuple[str, ...] = ("small", "medium", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
"""Row-major 3x3 grid; ``POSITIONS[3 * row + col]``."""

SIZE_FRACTION: dict[str, float] = {"small": 0.12, "medium": 0.18, "large": 0.26}
SIZE_JITTER = 0.06
"""Relative scale jitter: a drawn shape is ``SIZE_FRACTION * scale``, scale in 1 +- SIZE_JITTER."""
GRID_CENTERS: tuple[float, float, float] = (0.2, 0.5, 0.8)
POSITION_JITTER = 0.04
"""Largest centre offset from the grid point, per axis, as a fraction of the image side."""
SUPERSAMPLE = 4

TEMPLATES: tuple[str, ...] = (
    "{a_size} {color} {shape} {where} on {a_bg} background",
    "{a_color} {shape}, {size}, {where}, {bg} background",
    "{size} {color} {shape} {where} against {a_bg} background",
    "{a_bg} background with {a_size} {color} {shape} {where}",
)
"""Caption templates; every one is read back exactly by :func:`parse_caption`."""
OPTIONAL_ATTRIBUTES: tuple[str, ...] = ("size", "position", "background")
"""What a caption may leave unsaid (``ShapeSpec.caption(omit=...)``); colour and shape are
always named."""

SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium", "medium-sized"),
              "large": ("large", "big")}  # fmt: skip
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",)}
_CORNER = ("at the {}", "in the {} corner", "in the {}")
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": tuple(p.format("top left") for p in _CORNER[:2]) + ("in the upper left",),
    "top right": tuple(p.format("top right") for p in _CORNER[:2]) + ("in the upper right",),
    "bottom left": tuple(p.format("bottom left") for p in _CORNER[:2]) + ("in the lower left",),
    "bottom right": tuple(p.format("bottom right") for p in _CORNER[:2]) + ("in the lower right",),
    "top": ("at the top", "at the top center", "along the top edge"),
    "bottom": ("at the bottom", "at the bottom center", "along the bottom edge"),
    "left": ("on the left", "at the left side", "at the center left"),
    "right": ("on the right", "at the right side", "at the center right"),
    "center": ("in the center", "in the middle", "at the centre"),
}
"""Phrase variants per position; all are read back by :func:`parse_caption`."""


def _choices(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ShapeSpec:
    """One sample: what is drawn (attributes) and how it is jittered (dx, dy, scale).

    ``dx``/``dy`` move the centre by that fraction of the image side (|d| <= POSITION_JITTER);
    ``scale`` multiplies the nominal size (within 1 +- SIZE_JITTER). ``template`` and
    ``variant`` pick the caption wording only.
    """

    color: str
    shape: str
    size: str
    position: str
    background: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    template: int = 0
    variant: int = 0

    def __post_init__(self) -> None:
        _choices("color", self.color, COLORS)
        _choices("shape", self.shape, SHAPES)
        _choices("size", self.size, SIZES)
        _choices("position", self.position, POSITIONS)
        _choices("background", self.background, COLORS)
        if self.background == self.color:
            raise ValueError(f"background must differ from the colour; both are {self.color!r}")
        if max(abs(self.dx), abs(self.dy)) > POSITION_JITTER + 1e-9:
            raise ValueError(f"dx={self.dx}, dy={self.dy}: each must lie in +-{POSITION_JITTER}")
        if abs(self.scale - 1.0) > SIZE_JITTER + 1e-9:
            raise ValueError(f"scale={self.scale} must lie in 1 +- {SIZE_JITTER}")
        if not 0 <= self.template < len(TEMPLATES):
            raise ValueError(f"template={self.template}; allowed 0..{len(TEMPLATES) - 1}")

    @property
    def attributes(self) -> PartialSpec:
        """The five named attributes, without jitter or wording."""
        return PartialSpec(self.color, self.shape, self.size, self.position, self.background)

    def caption(self, template: int | None = None, variant: int | None = None,
                omit: Collection[str] = ()) -> str:
        """The caption in ``TEMPLATES[template]`` (default: this spec's own wording).

        ``omit`` (a subset of ``OPTIONAL_ATTRIBUTES``) leaves those attributes unsaid, in the
        short form people type: "a red circle", "a small red circle on a blue background"."""
        t = self.template if template is None else template
        v = self.variant if variant is None else variant
        size = SIZE_WORDS[self.size][v % len(SIZE_WORDS[self.size])]
        shape = SHAPE_WORDS[self.shape][v % len(SHAPE_WORDS[self.shape])]
        where = POSITION_WORDS[self.position][v % len(POSITION_WORDS[self.position])]
        if omit:
            unknown = set(omit) - set(OPTIONAL_ATTRIBUTES)
            if unknown:
                raise ValueError(f"omit={sorted(unknown)}; only {', '.join(OPTIONAL_ATTRIBUTES)}"
                                 " can be left out of a caption")
            words = [size] if "size" not in omit else []
            words += [self.color, shape]
            words += [where] if "position" not in omit else []
            if "background" not in omit:
                words.append(f"on {_article(self.background)} background")
            return _article(" ".join(words))
        return TEMPLATES[t].format(
            size=size, a_size=_article(size), color=self.color, a_color=_article(self.color),
            shape=shape, where=where, bg=self.background, a_bg=_article(self.background),
        )  # fmt: skip

    def mirrored(self) -> ShapeSpec:
        """The spec of this image flipped left-right (all shapes are left-right symmetric)."""
        row, col = divmod(POSITIONS.index(self.position), 3)
        return replace(self, position=POSITIONS[3 * row + 2 - col], dx=-self.dx)

    def box(self) -> tuple[float, float, float]:
        """``(cx, cy, s)``: bounding-box centre and width as fractions of the image side."""
        row, col = divmod(POSITIONS.index(self.position), 3)
        s = SIZE_FRACTION[self.size] * self.scale
        return GRID_CENTERS[col] + self.dx, GRID_CENTERS[row] + self.dy, s


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass(frozen=True)
class PartialSpec:
    """Attributes named in a prompt (or read from an image); ``None`` = not stated."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None


ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "background")


def shape_polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` whose bounding box is centred on (cx, cy) and is ``s`` wide.

    Circles are returned as their bounding box's two corners (for ``ImageDraw.ellipse``).
    """
    h = s / 2
    if shape in ("circle", "square"):
        return [(cx - h, cy - h), (cx + h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    raise ValueError(f"shape={shape!r} is not allowed; choose one of {', '.join(SHAPES)}")


def draw_shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Anti-aliased coverage [0,1] of ``shape`` stretched to fill a ``height x width`` box."""
    f = SUPERSAMPLE
    side = max(width, height) * f
    canvas = Image.new("L", (side, side), 0)
    _draw(ImageDraw.Draw(canvas), shape, side / 2, side / 2, side, 255)
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, fill) -> None:
    pts = shape_polygon(shape, cx, cy, s)
    if shape == "circle":
        draw.ellipse(pts, fill=fill)
    elif shape == "square":
        draw.rectangle(pts, fill=fill)
    else:
        draw.polygon(pts, fill=fill)


def check_size(size: object) -> None:
    """Reject image sizes the shapes cannot be drawn and read at."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 32:
        raise ValueError(f"size={size!r}: must be an int >= 32 (e.g. 64, 128, 256)")


def render(spec: ShapeSpec, size: int = 128) -> Image.Image:
    """Draw ``spec`` as a ``size x size`` RGB image, supersampled 4x then box-downscaled."""
    check_size(size)
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[spec.background])
    cx, cy, s = spec.box()
    _draw(ImageDraw.Draw(image), spec.shape, cx * big, cy * big, s * big, PALETTE[spec.color])
    return image.resize((size, size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- captions

_NORMALISE = {"centre": "center", "middle": "center", "centered": "center", "central": "center",
              "upper": "top", "lower": "bottom", "grey": "gray", "violet": "purple",
              "big": "large", "little": "small", "disc": "circle", "circles": "circle",
              "squares": "square", "triangles": "triangle"}  # fmt: skip


def parse_caption(text: str) -> PartialSpec:
    """Read the attributes a caption or prompt asks for; unstated ones are ``None``.

    The colour word right before "background" is the background; any other colour word is
    the shape's colour. Position: top/upper, bottom/lower, left, right, center/centre/middle.
    Raises ``ValueError`` when a prompt names two different values of one attribute.
    """
    words = [_NORMALISE.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]
    background = None
    colors = []
    for i, w in enumerate(words):
        if w in PALETTE:
            if i + 1 < len(words) and words[i + 1] == "background":
                background = _one("background", background, w, text)
            else:
                colors.append(w)
    color = _unique("color", colors, text)
    shape = _unique("shape", [w for w in words if w in SHAPES], text)
    size = _unique("size", [w for w in words if w in SIZES], text)
    return PartialSpec(color, shape, size, _parse_position(words, text), background)


def _parse_position(words: list[str], text: str) -> str | None:
    vertical = _unique("position", [w for w in words if w in ("top", "bottom")], text)
    horizontal = _unique("position", [w for w in words if w in ("left", "right")], text)
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    if vertical or horizontal:
        return vertical or horizontal
    return "center" if "center" in words else None


def _one(name: str, old: str | None, new: str, text: str) -> str:
    if old is not None and old != new:
        raise ValueError(f"prompt {text!r} names two {name}s: {old!r} and {new!r}")
    return new


def _unique(name: str, found: list[str], text: str) -> str | None:
    value = None
    for w in found:
        value = _one(name, value, w, text)
    return value


# ----------------------------------------------------------------------------- sampling

_TRAIN_STREAM = 0
_HELDOUT_STREAM = 1
HELDOUT_FRACTION = 10
"""One in this many attribute combinations is held out of training."""


def is_heldout(spec: ShapeSpec | PartialSpec) -> bool:
    """Whether the attribute combination belongs to the held-out split (stable across runs).

    Hashes the combination with the position's column folded (left == right), so a spec and
    its mirror image are always in the same split.
    """
    row, col = divmod(POSITIONS.index(spec.position), 3)
    key = f"{spec.color}|{spec.shape}|{spec.size}|{row},{min(col, 2 - col)}|{spec.background}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_FRACTION == 0


def _draw_spec(rng: np.random.Generator) -> ShapeSpec:
    color = COLORS[rng.integers(len(COLORS))]
    others = [c for c in COLORS if c != color]
    return ShapeSpec(
        color=color,
        shape=SHAPES[rng.integers(len(SHAPES))],
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        background=others[rng.integers(len(others))],
        dx=float(rng.uniform(-POSITION_JITTER, POSITION_JITTER)),
        dy=float(rng.uniform(-POSITION_JITTER, POSITION_JITTER)),
        scale=float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)),
        template=int(rng.integers(len(TEMPLATES))),
        variant=int(rng.integers(6)),
    )


def sample_spec(seed: int, index: int, split: str = "train") -> ShapeSpec:
    """The spec at ``index`` of the ``split`` ("train" or "heldout") stream of ``seed``.

    A pure function of its arguments: a NumPy generator seeded with ``(seed, stream, index)``
    draws all attributes uniformly (background != colour) and redraws until the combination
    is in the requested split.
    """
    _choices("split", split, ("train", "heldout"))
    if index < 0:
        raise IndexError(f"index={index} must be >= 0")
    stream = _TRAIN_STREAM if split == "train" else _HELDOUT_STREAM
    rng = np.random.default_rng([seed, stream, index])
    while True:
        spec = _draw_spec(rng)
        if is_heldout(spec) == (split == "heldout"):
            return spec


def heldout_combinations() -> list[PartialSpec]:
    """Every held-out attribute combination (about a tenth of all of them)."""
    combos = itertools.product(COLORS, SHAPES, SIZES, POSITIONS, COLORS)
    return [PartialSpec(*c) for c in combos if c[0] != c[4] and is_heldout(PartialSpec(*c))]


def heldout_specs(n: int = 200, seed: int = 0) -> list[ShapeSpec]:
    """``n`` specs from the held-out split (combinations never drawn for training).

    The first ``len(heldout_combinations())`` specs all have different attribute combinations.
    """
    distinct = len(heldout_combinations())
    specs, seen, index = [], set(), 0
    while len(specs) < n:
        spec = sample_spec(seed, index, "heldout")
        index += 1
        if spec.attributes not in seen or len(seen) >= distinct:
            seen.add(spec.attributes)
            specs.append(spec)
    return specs


def heldout_prompts(n: int = 200, seed: int = 0) -> list[str]:
    """Captions of :func:`heldout_specs`; feed them to the model and ``shape_checker.score``."""
    return [spec.caption() for spec in heldout_specs(n, seed)]


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image
    caption: str
    spec: ShapeSpec


@dataclass(frozen=True)
class ShapesDataset:
    """``count`` lazily rendered samples; ``ds[i]`` depends only on (seed, split, i, size)."""

    count: int
    size: int = 128
    seed: int = 0
    split: str = "train"

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count={self.count} must be >= 0")
        _choices("split", self.split, ("train", "heldout"))
        check_size(self.size)

    def __len__(self) -> int:
        return self.count

    def spec(self, index: int) -> ShapeSpec:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for ShapesDataset of {self.count}")
        return sample_spec(self.seed, index % self.count, self.split)

    def __getitem__(self, index: int) -> ShapeSample:
        spec = self.spec(index)
        return ShapeSample(render(spec, self.size), spec.caption(), spec)
