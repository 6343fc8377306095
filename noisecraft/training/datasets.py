"""Training data sets that a trainer treats alike: each item is ``(image, caption)`` with
``image`` a float tensor [3, H, W] in [-1, 1].

* :class:`ImageFolderDataset`: a folder of images captioned by sidecar text files
  (``cat.png`` + ``cat.txt``) or by a ``metadata.jsonl`` (the Hugging Face imagefolder
  convention, one ``{"file_name": "cat.png", "text": "a cat"}`` per line; ``"caption"`` is
  accepted instead of ``"text"``). Images are converted to RGB, resized so the short side is
  ``size``, centre- or randomly cropped and optionally flipped.
* :class:`ShapesTorchDataset`: the procedural shapes of :mod:`noisecraft.training.shapes`.

Random crops and flips are drawn from a NumPy generator seeded with ``(seed, epoch, index)``,
so an item is reproducible; call ``with_epoch(e)`` for the next epoch's augmentations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from noisecraft.training.shapes import OPTIONAL_ATTRIBUTES, ShapesDataset, render, sample_spec

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif",
                                     ".tiff")  # fmt: skip
CAPTION_CONVENTIONS = (
    "captions are read from a sidecar text file with the image's name (img.png + img.txt) or "
    'from a metadata.jsonl in the folder with one {"file_name": "img.png", "text": "..."} '
    "object per line"
)
CROPS = ("center", "random")


class DatasetError(ValueError):
    """Bad training data: the message names the file and what is accepted."""


@dataclass(frozen=True)
class ImageTransform:
    """How an image becomes a training tensor: short side resized to ``size``, then a
    ``crop`` ("center" or "random") to ``size x size``, then a 50% horizontal flip if ``flip``.
    """

    size: int = 128
    crop: str = "center"
    flip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size={self.size!r} must be a positive int")
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r} is not allowed; choose one of {CROPS}")


# ----------------------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF rotation applied, transparency composited over white,
    16-bit and 32-bit greyscale scaled to 8 bits, palette / CMYK / bilevel converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """High-bit-depth greyscale to 0-255: 16-bit ranges are divided by 257, floats in [0, 1]
    are multiplied by 255."""
    is_float = a.dtype.kind == "f"
    a = a.astype(np.float64)
    top = float(a.max()) if a.size else 0.0
    if is_float and top <= 1.0:
        a = a * 255.0
    elif top > 255:
        a = a / 257.0
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def resize_and_crop(
    image: Image.Image, size: int, crop: str = "center", rng: np.random.Generator | None = None
) -> Image.Image:
    """Resize so the shorter side is ``size`` (Lanczos), then crop ``size x size``."""
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.Resampling.LANCZOS)
    if crop == "random":
        if rng is None:
            raise ValueError('crop="random" needs an rng')
        left = int(rng.integers(0, new[0] - size + 1))
        top = int(rng.integers(0, new[1] - size + 1))
    else:
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float32 tensor [3, H, W] in [-1, 1]."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    # transpose in NumPy: torch's threaded copy of small tensors is slow on a busy CPU
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def load_image(path: Path) -> Image.Image:
    """Open and decode ``path`` as RGB; a :class:`DatasetError` naming it if that fails."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DatasetError(
            f"cannot read image {path}: {e}. Replace or remove the file "
            f"(readable formats: {', '.join(IMAGE_EXTENSIONS)})"
        ) from e


# ----------------------------------------------------------------------------- captions


def find_captioned_images(root: str | Path) -> list[tuple[Path, str]]:
    """All images under ``root`` (recursively, sorted) with their captions.

    A ``metadata.jsonl`` entry wins over a sidecar ``.txt``. Raises :class:`DatasetError` for
    a missing or empty folder, a bad metadata line, or images that have no caption.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a directory")
    images = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )  # fmt: skip
    metadata = _read_metadata(root / "metadata.jsonl")
    if not images and not metadata:
        raise DatasetError(
            f"no images in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}); "
            f"{CAPTION_CONVENTIONS}"
        )
    captions = dict(metadata)
    missing = []
    for path in images:
        key = path.resolve()
        if key in captions:
            continue
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            captions[key] = sidecar.read_text(encoding="utf-8").strip()
        else:
            missing.append(path)
    if missing:
        shown = ", ".join(str(p.relative_to(root)) for p in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DatasetError(
            f"{len(missing)} image(s) in {root} have no caption: {shown}{more}; "
            f"{CAPTION_CONVENTIONS}"
        )
    return sorted(captions.items())


def _read_metadata(path: Path) -> dict[Path, str]:
    if not path.is_file():
        return {}
    captions = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{where} is not JSON ({e.msg}): {line[:80]!r}; each line must be an object "
                'like {"file_name": "img.png", "text": "a caption"}'
            ) from e
        image = _metadata_file(entry, where, path.parent)  # checks entry is a dict first
        captions[image] = _metadata_text(entry, where)
    return captions


def _metadata_file(entry: object, where: str, folder: Path) -> Path:
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
        raise DatasetError(f'{where} needs a string "file_name" (the image path relative to '
                           f"{folder}), got {str(entry)[:80]}")  # fmt: skip
    image = folder / entry["file_name"]
    if not image.is_file():
        raise DatasetError(f"{where} names {entry['file_name']!r}, but {image} does not exist")
    return image.resolve()


def _metadata_text(entry: dict, where: str) -> str:
    for key in ("text", "caption"):
        if isinstance(entry.get(key), str):
            return entry[key].strip()
    raise DatasetError(f'{where} needs a string "text" (or "caption"), got keys {sorted(entry)}')


# ----------------------------------------------------------------------------- data sets


class ImageFolderDataset(Dataset):
    """Captioned images from a folder; ``ds[i] -> (tensor [3, size, size] in [-1, 1], caption)``.

    Files are listed and captions checked when constructed; images are decoded per item (a
    corrupt one raises :class:`DatasetError` naming it then, or all at once from
    :meth:`verify`). Flipping does not edit captions: leave ``flip`` off if they name sides.
    """

    def __init__(
        self,
        root: str | Path,
        transform: ImageTransform = ImageTransform(),  # noqa: B008 (frozen, immutable)
        seed: int = 0,
        epoch: int = 0,
        items: list[tuple[Path, str]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.seed = seed
        self.epoch = epoch
        self.items = find_captioned_images(self.root) if items is None else items

    def __len__(self) -> int:
        return len(self.items)

    def with_epoch(self, epoch: int) -> ImageFolderDataset:
        """The same files with the augmentations of ``epoch`` (no re-scan of the folder)."""
        return ImageFolderDataset(self.root, self.transform, self.seed, epoch, self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.items[index]
        rng = np.random.default_rng([self.seed, self.epoch, index % len(self)])
        t = self.transform
        image = resize_and_crop(load_image(path), t.size, t.crop, rng)
        if t.flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        return image_to_tensor(image), caption

    def verify(self) -> None:
        """Decode every image; one :class:`DatasetError` listing all that fail."""
        errors = []
        for path, _ in self.items:
            try:
                load_image(path)
            except DatasetError as e:
                errors.append(str(e))
        if errors:
            raise DatasetError(f"{len(errors)} unreadable image(s):\n" + "\n".join(errors))


@dataclass(frozen=True)
class ShapesTorchDataset(Dataset):
    """:class:`ShapesDataset` in the trainer's format: ``(tensor [3, size, size], caption)``.

    With ``flip``, half the items (chosen by ``(seed, epoch, index)``) are rendered mirrored
    and captioned from the mirrored spec, so "left" and "right" stay true. (Positions are
    already uniform, so flipping only adds jitter variety.) The mirror of a training spec is
    always a training spec (see ``shapes.is_heldout``).
    """

    count: int
    size: int = 128
    seed: int = 0
    split: str = "train"
    flip: bool = False
    epoch: int = 0
    partial_captions: float = 0.0
    """Probability of leaving each of size, position and background out of a caption
    (independently; drawn from ``(seed, epoch, index)``), so short prompts such as
    "a red circle" are in the training distribution."""

    def __post_init__(self) -> None:
        ShapesDataset(self.count, self.size, self.seed, self.split)  # validates the arguments
        if not 0.0 <= self.partial_captions <= 1.0:
            raise ValueError(f"partial_captions={self.partial_captions} must lie in [0, 1]")

    def __len__(self) -> int:
        return self.count

    def with_epoch(self, epoch: int) -> ShapesTorchDataset:
        return replace(self, epoch=epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} shapes")
        index %= self.count
        spec = sample_spec(self.seed, index, self.split)
        if self.flip and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5:
            spec = spec.mirrored()
        omit: tuple[str, ...] = ()
        if self.partial_captions > 0:
            draws = np.random.default_rng([self.seed, self.epoch, index, 1]).random(
                len(OPTIONAL_ATTRIBUTES))
            omit = tuple(a for a, u in zip(OPTIONAL_ATTRIBUTES, draws, strict=True)
                         if u < self.partial_captions)
        return image_to_tensor(render(spec, self.size)), spec.caption(omit=omit)
