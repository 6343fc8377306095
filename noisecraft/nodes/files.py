"""Nodes that read and write image files, inside the folders of the execution context.

Names from a workflow are relative to the context's input (or output/temp) folder; ``..`` and
absolute paths are refused.  ``"name.png [output]"`` reads from the output folder, as in
ComfyUI.  Writes are atomic (:func:`noisecraft.metadata.save_png`).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from noisecraft.graph.context import NodeContext, safe_join
from noisecraft.graph.schema import COMBO, IMAGE, MASK, STRING, Input, Node, NodeOutput, NodeSchema
from noisecraft.graph.schema import Output as Out
from noisecraft.metadata import save_png
from noisecraft.nodes.tensors import image_to_pil

_ANNOTATION = re.compile(r"^(.*?)\s*\[(input|output|temp)\]$")
CHANNELS = ("alpha", "red", "green", "blue")


def input_files(context, suffix: str = "") -> list[str]:
    """The files in the input folder (with subfolders) whose names end with ``suffix``."""
    folder = getattr(context, "input_dir", None)
    if folder is None or not Path(folder).is_dir():
        return []
    root = Path(folder)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.name.endswith(suffix))


def resolve_annotated(context, name: str, what: str = "image") -> Path:
    """The file a loader's value names: relative to the input folder, or to the output/temp
    folder with a ``" [output]"`` / ``" [temp]"`` annotation; subfolders allowed, traversal
    refused (:func:`~noisecraft.graph.context.safe_join`)."""
    match = _ANNOTATION.match(str(name))
    kind, relative = ("input", name) if match is None else (match.group(2), match.group(1))
    return safe_join(context.folder(kind), relative, what=f"{kind} {what} name")


def resolve_image_path(context, name: str) -> Path:
    """The file a LoadImage ``image`` value names (annotations and subfolders allowed)."""
    return resolve_annotated(context, name, "image")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        im = Image.open(path)
        im.load()
        return im
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _frame_tensors(frame: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    frame = ImageOps.exif_transpose(frame) or frame
    if frame.mode == "I":
        frame = frame.point(lambda v: v * (1 / 255))
    rgb = torch.from_numpy(np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0)
    if "A" in frame.getbands():
        alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
        mask = 1.0 - torch.from_numpy(alpha)
    else:
        mask = torch.zeros((64, 64), dtype=torch.float32)
    return rgb, mask


class _ReadsInputFile(Node):
    @classmethod
    def fingerprint(cls, context=None, **inputs):
        """The file's SHA-256, so an edited file on disk is re-read (ComfyUI's IS_CHANGED)."""
        path = resolve_image_path(context, inputs["image"])
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def validate_inputs(cls, context=None, **inputs):
        name = inputs.get("image")
        if context is None:
            return {"image": "no execution context, so no input folder to find the file in"}
        try:
            path = resolve_image_path(context, name)
        except ValueError as e:
            return {"image": str(e)}
        return {} if path.is_file() else {"image": f"Invalid image file: {name} (no such file)"}


class LoadImage(_ReadsInputFile):
    schema = NodeSchema(
        name="LoadImage", display_name="Load Image", category="image", needs_context=True,
        inputs=[Input("image", COMBO, choices=input_files, image_upload=True,
                      check_choices=False)],
        outputs=[Out(IMAGE), Out(MASK)],
    )

    @classmethod
    def execute(cls, image, context: NodeContext):
        """IMAGE [B, H, W, 3] and MASK [B, H, W] (1 - alpha; zeros 64x64 without alpha).
        Frames of an animated file that match the first frame's size form the batch."""
        im = _open(resolve_image_path(context.execution, image))
        images, masks = [], []
        for frame in ImageSequence.Iterator(im):
            rgb, mask = _frame_tensors(frame)
            if images and rgb.shape != images[0].shape:
                continue
            images.append(rgb)
            masks.append(mask)
        if len(images) > 1 and im.format != "MPO":
            return (torch.stack(images), torch.stack(masks))
        return (images[0][None], masks[0][None])


class LoadImageMask(_ReadsInputFile):
    schema = NodeSchema(
        name="LoadImageMask", display_name="Load Image (as Mask)", category="mask",
        needs_context=True,
        inputs=[Input("image", COMBO, choices=input_files, image_upload=True,
                      check_choices=False),
                Input("channel", COMBO, choices=CHANNELS)],
        outputs=[Out(MASK)],
    )

    @classmethod
    def execute(cls, image, channel, context: NodeContext):
        """One channel as MASK [1, H, W]; alpha is inverted (transparent = 1)."""
        im = _open(resolve_image_path(context.execution, image))
        im = ImageOps.exif_transpose(im) or im
        if im.getbands() != ("R", "G", "B", "A"):
            if im.mode == "I":
                im = im.point(lambda v: v * (1 / 255))
            im = im.convert("RGBA")
        band = channel[0].upper()
        mask = torch.from_numpy(np.asarray(im.getchannel(band), dtype=np.float32) / 255.0)
        return ((1.0 - mask if band == "A" else mask)[None],)


def _next_counter(folder: Path, stem: str, suffix: str = ".png") -> int:
    pattern = re.compile(re.escape(stem) + r"_(\d{5,})_" + re.escape(suffix) + "$")
    numbers = [int(m.group(1)) for p in folder.glob(f"*{suffix}")
               if (m := pattern.match(p.name))]
    return max(numbers, default=0) + 1


def save_slot(prefix: str, kind: str, context: NodeContext,
              suffix: str = ".png") -> tuple[Path, str, str, int]:
    """Where ``<prefix>_<counter:05>_<suffix>`` files go (ComfyUI's ``get_save_image_path``):
    (directory, subfolder relative to the ``kind`` folder, file stem, next free counter).
    ``prefix`` may name subfolders; leaving the folder is refused.  Creates the directory."""
    folder = context.folder(kind)
    target = safe_join(folder, f"{prefix}_00001_{suffix}", what="filename_prefix")
    subfolder = target.parent.relative_to(folder.resolve()).as_posix()
    stem = target.name[: -len(f"_00001_{suffix}")]
    target.parent.mkdir(parents=True, exist_ok=True)
    counter = _next_counter(target.parent, stem, suffix)
    return target.parent, "" if subfolder == "." else subfolder, stem, counter


def save_batch(images, prefix: str, kind: str, context: NodeContext) -> list[dict[str, str]]:
    """Write each image as ``<prefix>_<counter:05>_.png``; ComfyUI's result entries."""
    directory, subfolder, stem, counter = save_slot(prefix, kind, context)
    results = []
    for batch_number, image in enumerate(images):
        context.check_interrupted()
        name = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        save_png(image_to_pil(image), directory / name, None)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return results


class SaveImage(Node):
    schema = NodeSchema(
        name="SaveImage", display_name="Save Image", category="image", output_node=True,
        needs_context=True, description="Saves the input images to your output directory.",
        inputs=[
            Input("images", IMAGE, tooltip="The images to save."),
            Input("filename_prefix", STRING, default="ComfyUI",
                  tooltip="The prefix for the file to save; may name a subfolder (a/b)."),
        ],
        outputs=[],
    )

    @classmethod
    def execute(cls, images, filename_prefix="ComfyUI", context: NodeContext = None):
        return NodeOutput((), ui={"images": save_batch(images, filename_prefix, "output",
                                                       context)})


class PreviewImage(Node):
    schema = NodeSchema(
        name="PreviewImage", display_name="Preview Image", category="image", output_node=True,
        needs_context=True, description="Saves the input images to the temporary directory.",
        inputs=[Input("images", IMAGE)], outputs=[],
    )

    @classmethod
    def execute(cls, images, context: NodeContext):
        prefix = f"ComfyUI_temp_{uuid.uuid4().hex[:5]}"
        return NodeOutput((), ui={"images": save_batch(images, prefix, "temp", context)})


FILE_NODES = [LoadImage, LoadImageMask, SaveImage, PreviewImage]
