"""File routes (ComfyUI's): ``GET /view``, ``POST /upload/image``, ``POST /upload/mask``.

Every name from a request goes through :func:`noisecraft.graph.safe_join` (no absolute paths,
no ``..``, nothing resolving outside its folder).  Uploads are decoded as images within the
pixel limit and re-encoded as PNG: what lands on disk is always an image we wrote.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from PIL import Image, PngImagePlugin
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from noisecraft.graph import UnsafePathError, safe_join
from noisecraft.server.config import Folders, Limits
from noisecraft.server.security import RequestError, decode_image

router = APIRouter()

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
               ".webp": "image/webp", ".gif": "image/gif"}
_SAFE_NAME = re.compile(r"[^\w.\- ]")


def folder_path(folders: Folders, kind: str, subfolder: str, filename: str) -> Path:
    """A file in the input/output/temp folder named by a request, or a 400 saying why not."""
    if kind not in ("input", "output", "temp"):
        raise RequestError(f"type must be input, output or temp, got {kind!r}")
    if not filename:
        raise RequestError("filename is required")
    relative = f"{subfolder.strip('/')}/{filename}" if subfolder else filename
    if any(ord(ch) < 32 for ch in relative):
        raise RequestError("file names must not contain control characters (NUL, newline, ...)",
                           kind="unsafe_path")
    try:
        return safe_join(folders.of_type(kind), relative, what="file name")
    except (UnsafePathError, ValueError) as e:
        raise RequestError(str(e), kind="unsafe_path") from None


@router.get("/view")
async def view(request: Request, filename: str = "", subfolder: str = "", type: str = "output",
               preview: str | None = None, channel: str | None = None):
    state = request.app.state.noisecraft
    path = folder_path(state.folders, type, subfolder, filename)
    if not path.is_file():
        raise RequestError(f"no file {filename!r} in {type}/{subfolder}", status=404,
                           kind="not_found")
    media = IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream")
    if preview or channel:
        return Response(await run_in_threadpool(_transcode, path, preview, channel),
                        media_type="image/webp" if (preview or "").startswith("webp")
                        else ("image/jpeg" if preview else "image/png"))
    return FileResponse(path, media_type=media)


def _transcode(path: Path, preview: str | None, channel: str | None) -> bytes:
    with Image.open(path) as im:
        im = im.convert("RGBA")
        if channel in ("rgb", "a"):
            im = im.convert("RGB") if channel == "rgb" else im.getchannel("A")
        elif channel not in (None, "", "rgba"):
            raise RequestError(f"channel must be rgba, rgb or a, got {channel!r}")
        buf = io.BytesIO()
        fmt, _, quality = (preview or "").partition(";")
        if fmt in ("jpeg", "webp"):
            im.convert("RGB").save(buf, format=fmt.upper(),
                                   quality=int(quality) if quality.isdigit() else 90)
        else:
            im.save(buf, format="PNG")
        return buf.getvalue()


async def _form_upload(request: Request):
    try:
        form = await request.form(max_files=4, max_fields=16)
    except Exception as e:  # malformed multipart
        raise RequestError(f"expected a multipart/form-data body with an 'image' file: {e}") \
            from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise RequestError("the form has no file field named 'image'")
    data = await upload.read()
    return form, upload.filename or "upload.png", data


def _clean_name(name: str) -> str:
    stem = Path(name.replace("\\", "/")).name
    stem = _SAFE_NAME.sub("_", stem).strip(". ") or "upload"
    return str(Path(stem).with_suffix(".png"))


def _store(folders: Folders, limits: Limits, data: bytes, filename: str, kind: str,
           subfolder: str, overwrite: bool, image: Image.Image | None = None) -> dict[str, str]:
    image = image if image is not None else decode_image(data, limits, "uploaded image")
    name = _clean_name(filename)
    path = folder_path(folders, kind, subfolder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, n = path.stem, 1
    while path.exists() and not overwrite:
        path = path.with_name(f"{stem} ({n}).png")
        n += 1
    tmp = path.with_name(f".{path.name}.part")
    image.save(tmp, format="PNG", pnginfo=_keep_text(image))
    tmp.replace(path)
    return {"name": path.name, "subfolder": subfolder, "type": kind}


def _keep_text(image: Image.Image) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in getattr(image, "text", {}).items():
        if isinstance(value, str):
            info.add_itxt(key, value)
    return info


def _form_fields(form) -> tuple[str, str, bool]:
    kind = str(form.get("type") or "input")
    subfolder = str(form.get("subfolder") or "")
    overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
    return kind, subfolder, overwrite


@router.post("/upload/image")
async def upload_image(request: Request):
    state = request.app.state.noisecraft
    form, filename, data = await _form_upload(request)
    kind, subfolder, overwrite = _form_fields(form)
    return await run_in_threadpool(_store, state.folders, state.config.limits, data, filename,
                                   kind, subfolder, overwrite)


@router.post("/upload/mask")
async def upload_mask(request: Request):
    """ComfyUI's mask upload: the uploaded image's alpha replaces the alpha of
    ``original_ref``'s image, saved under the uploaded file's name."""
    state = request.app.state.noisecraft
    form, filename, data = await _form_upload(request)
    kind, subfolder, overwrite = _form_fields(form)
    try:
        ref = json.loads(str(form.get("original_ref") or ""))
        if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
            raise ValueError("missing filename")
    except ValueError as e:
        raise RequestError(f"original_ref must be JSON like {{\"filename\": \"x.png\", "
                           f"\"subfolder\": \"\", \"type\": \"input\"}} ({e})") from None

    def combine():
        limits = state.config.limits
        mask = decode_image(data, limits, "uploaded mask")
        src = folder_path(state.folders, str(ref.get("type") or "input"),
                          str(ref.get("subfolder") or ""), ref["filename"])
        if not src.is_file():
            raise RequestError(f"original_ref {ref['filename']!r} does not exist", status=404)
        original = decode_image(src.read_bytes(), limits, "original_ref image").convert("RGBA")
        alpha = mask.convert("RGBA").getchannel("A").resize(original.size)
        original.putalpha(alpha)
        return _store(state.folders, limits, b"", filename, kind, subfolder, overwrite,
                      image=original)

    return await run_in_threadpool(combine)
