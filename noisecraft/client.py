"""``generate_image()`` against a running ``noisecraft serve``: the same call, over HTTP.

    >>> from noisecraft.client import generate_image
    >>> image = generate_image("a red circle", url="http://127.0.0.1:8188")  # doctest: +SKIP

The URL comes from ``url=`` or the ``NOISECRAFT_URL`` environment variable (default
``http://127.0.0.1:8188``); credentials from ``api_key=`` / ``auth=(user, password)`` or
``NOISECRAFT_API_KEY``.  Settings are those of :func:`noisecraft.api.generate_image`; images
(``init_image``, ``mask``) may be paths or PIL images.  Only the standard library is used.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from typing import Any

from PIL import Image

DEFAULT_URL = "http://127.0.0.1:8188"


class ServerError(RuntimeError):
    """The server refused the request or failed; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server answered {status}: {message}")
        self.status = status


def _image_b64(value: Any) -> str:
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        with open(value, "rb") as f:
            data = f.read()
    return base64.b64encode(data).decode("ascii")


def generate_image(prompt: str, url: str | None = None, *, api_key: str | None = None,
                   auth: tuple[str, str] | None = None, timeout: float = 3600.0,
                   **settings: Any) -> Image.Image | list[Image.Image]:
    """Generate on the server; a PIL image (a list when ``batch_size > 1``) whose ``info``
    holds ``seed``, ``parameters`` and ``prompt_id``."""
    base = (url or os.environ.get("NOISECRAFT_URL") or DEFAULT_URL).rstrip("/")
    body: dict[str, Any] = {"prompt": prompt, "response": "json", "timeout": timeout, **settings}
    for name in ("init_image", "mask"):
        if body.get(name) is not None:
            body[name] = _image_b64(body[name])
    if "outpaint" in body:
        body["outpaint"] = list(body["outpaint"])
    headers = {"Content-Type": "application/json"}
    api_key = api_key or os.environ.get("NOISECRAFT_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    elif auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    req = urllib.request.Request(f"{base}/api/generate", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout + 30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raw = e.read().decode("utf-8", "replace")
        try:
            message = json.loads(raw).get("detail", raw)
        except (json.JSONDecodeError, AttributeError):
            message = raw
        raise ServerError(e.code, str(message)) from None
    except urllib.error.URLError as e:
        raise ConnectionError(
            f"cannot reach the noisecraft server at {base} ({e.reason}); start one with "
            "`noisecraft serve` or set NOISECRAFT_URL") from None
    images = []
    for data, seed in zip(answer["images"], answer["seeds"], strict=False):
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.load()
            image = im.copy()
        image.info.update(im.info)
        image.info["seed"] = seed
        image.info["prompt_id"] = answer["prompt_id"]
        images.append(image)
    return images[0] if len(images) == 1 else images
